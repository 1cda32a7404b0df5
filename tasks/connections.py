"""Connection factories: one pooled client per URL per process, so tasks never connect per item."""

from __future__ import annotations

import threading

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tasks.settings import Settings

_lock = threading.Lock()
_redis: dict[str, redis.Redis] = {}
_engines: dict[str, Engine] = {}


def redis_client(settings: Settings) -> redis.Redis:
    """A shared Redis client (decoded strings, health-checked connections) for ``settings.redis_url``."""
    url = settings.redis_url.get_secret_value()
    with _lock:
        client = _redis.get(url)
        if client is None:
            client = redis.Redis.from_url(
                url, decode_responses=True, health_check_interval=30, socket_timeout=30, socket_connect_timeout=5
            )
            _redis[url] = client
        return client


def db_engine(settings: Settings) -> Engine:
    """A shared SQLAlchemy engine for ``settings.database_url`` (psycopg 3 for PostgreSQL URLs)."""
    url = settings.database_url.get_secret_value()
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            kwargs: dict = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"timeout": 30}
            engine = sa.create_engine(url, **kwargs)
            _engines[url] = engine
        return engine


def reset_connections() -> None:
    """Close every cached client (tests, and after a fork)."""
    with _lock:
        for client in _redis.values():
            client.close()
        for engine in _engines.values():
            engine.dispose()
        _redis.clear()
        _engines.clear()
