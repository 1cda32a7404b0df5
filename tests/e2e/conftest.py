import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from tasks.settings import Settings
from tests.conftest import REDIS_URL


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
