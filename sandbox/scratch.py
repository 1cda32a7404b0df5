"""Scratch resources for the sandbox, the benchmarks and the tests: a free port on 127.0.0.1, and a PostgreSQL
database of one's own (created, then dropped even while sessions are still connected)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

#: the server's maintenance database (trust auth on this machine); FD_BENCH_PG_URL points elsewhere
PG_ADMIN_URL = os.environ.get("FD_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now on ``host`` (nothing listens there until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def scratch_database(*, prefix: str, admin_url: str = PG_ADMIN_URL, driver: str | None = None) -> Iterator[str]:
    """A fresh database ``<prefix>_<random>`` on ``admin_url``'s server, dropped afterwards (``WITH (FORCE)``:
    sessions still connected are ended); yields its URL, with ``driver`` if given (``asyncpg`` for a Prefect
    server), else ``admin_url``'s."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        scheme, rest = admin_url.split("://", 1)
        yield f"{f'postgresql+{driver}' if driver else scheme}://{rest.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
