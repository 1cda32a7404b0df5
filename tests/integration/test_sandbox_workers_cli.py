"""``python -m sandbox``: one command starts the living sandbox; kubectl works against it; SIGTERM ends it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_one_command_starts_the_sandbox_and_kubectl_sees_its_workers(
    settings: Settings, redis, tmp_path: Path
) -> None:
    env = dict(os.environ)
    env.update({"FD_STREAM": settings.stream, "FD_DLQ_STREAM": settings.dlq_stream, "FD_GROUP": settings.group})
    env.pop("FD_DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--state-dir", str(tmp_path / "sbx"), "--load", "50", "--step-ms", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline, info, seen = time.monotonic() + 60, None, []
        while info is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"sandbox exited early: {''.join(seen)}"
            seen.append(line)
            if line.startswith("{"):
                info = json.loads(line)
        kubeconfig = info["kubeconfig"]
        assert Path(kubeconfig).is_file() and "gateway" in info["urls"] and "mcp_health" in info["urls"]
        env_file = Path(info["env_file"]).read_text()
        assert f"FD_STREAM={settings.stream}" in env_file and "FD_GATEWAY_API_KEY=" in env_file
        assert Path(info["env_file"]).stat().st_mode & 0o077 == 0  # the key file is private

        kubectl = subprocess.run(
            ["kubectl", "get", "pods", "-n", "ferrumdeck", "-l", "app=worker", "--no-headers"],
            env={**env, "KUBECONFIG": kubeconfig, "KUBECACHEDIR": str(tmp_path / "kcache")},
            capture_output=True, text=True, timeout=30,
        )
        assert kubectl.returncode == 0, kubectl.stderr
        rows = [line.split() for line in kubectl.stdout.splitlines()]
        assert len(rows) == 3 and all(r[1] == "1/1" and r[2] == "Running" for r in rows)

        # the steady load is consumed by workers named like those pods
        def consumed() -> bool:
            # at least 20 entries delivered to the group (entries-read can be unknown, so count up to
            # last-delivered-id instead)
            groups = redis.xinfo_groups(settings.stream) if redis.exists(settings.stream) else []
            if not groups:
                return False
            return len(redis.xrange(settings.stream, "-", groups[0]["last-delivered-id"], count=20)) >= 20

        while not consumed():
            assert time.monotonic() < deadline, "the sandbox workers consumed nothing"
            time.sleep(0.05)  # poll
        consumers = {c["name"] for c in redis.xinfo_consumers(settings.stream, settings.group)}
        assert consumers and consumers <= {r[0] for r in rows}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0


def test_the_console_script_reaches_the_checkout_sandbox_from_any_directory(tmp_path: Path) -> None:
    """`fd-recovery sandbox` (the installed script) finds the sandbox beside deployments/, from any cwd."""
    script = Path(sys.executable).parent / "fd-recovery"
    done = subprocess.run([str(script), "sandbox", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fd-recovery sandbox") and "--state-dir" in done.stdout
