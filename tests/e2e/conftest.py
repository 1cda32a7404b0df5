import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from sandbox.scratch import free_port, scratch_database
from tasks.settings import Settings
from tests.conftest import PG_ADMIN_URL, REDIS_URL

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="session")
def _prefect(prefect_harness):
    """Integration tests run flows and tasks against the session's Prefect test server."""
    yield


@pytest.fixture(scope="session")
def claim_settings() -> Iterator[Settings]:
    """Settings whose Redis keys (the runners' flow-run claims) are private to this session, removed afterwards."""
    prefix = f"fdtest:{uuid.uuid4().hex[:10]}"
    yield Settings(redis_url=REDIS_URL, state_prefix=f"{prefix}:state")
    client = redis_lib.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """Every field of ``settings`` as ``FD_*`` variables (secrets revealed: for a child process only)."""
    import json

    from pydantic import SecretStr

    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"FD_{name.upper()}"] = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
    return env


class PrefectServer:
    """``prefect server start`` as a subprocess on a fixed port and database, so it can be stopped and started
    again (a restart, as a rolling update of the server does): PostgreSQL, as in production."""

    def __init__(self, home: Path, database_url: str) -> None:
        self.home, self.database_url = home, database_url
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.log_path = home / "prefect-server.log"

    def client_env(self) -> dict[str, str]:
        """Environment of a process that talks to this server (no PREFECT_* of the test session leaks in)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FD_"))}
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.home / "client"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
        return env

    def start(self, timeout_s: float = 120.0) -> float:
        """Start it and wait for ``/api/health``; seconds it took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home / "server"), PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING")
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                 "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=PROJECT_ROOT)
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the Prefect server did not become healthy within {timeout_s:g} s")
            time.sleep(0.2)  # poll
        return time.monotonic() - t0

    def healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        return False

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after 20 s); returns once it no longer answers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
                break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def scratch_postgres() -> contextlib.AbstractContextManager[str]:
    """A fresh PostgreSQL database for a Prefect server (asyncpg URL), dropped afterwards."""
    return scratch_database(prefix="fd_prefect", admin_url=PG_ADMIN_URL, driver="asyncpg")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server of this module's own (PostgreSQL), which its tests may stop and start again."""
    with scratch_postgres() as url:
        server = PrefectServer(tmp_path_factory.mktemp("prefect"), url)
        server.start()
        try:
            yield server
        finally:
            server.stop()


class Serve:
    """``fd-recovery serve`` (``python -m deployments.cli serve``) as a subprocess in its own process group."""

    def __init__(self, name: str, *, env: dict[str, str], log_dir: Path, only: list[str]) -> None:
        self.name = name
        self.log_path = log_dir / f"serve-{name}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deployments.cli", "serve", "--only", *only], env=env, cwd=PROJECT_ROOT,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def registered(self) -> bool:
        """It registered its deployments (its poll loop starts right after)."""
        if not self.alive():
            raise AssertionError(f"serve {self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        return "registered " in self.log()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGTERM)  # a second stop: do not wait for running flows
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)


def holder_pid(pending_message: str) -> int | None:
    """The pid in ``claimed by fd-recovery serve <host>:<pid>:<random>`` (the runner that claimed the run)."""
    found = re.search(r"claimed by fd-recovery serve [^:\s]+:(\d+):", pending_message or "")
    return int(found.group(1)) if found else None
