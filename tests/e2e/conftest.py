import pytest


@pytest.fixture(autouse=True, scope="session")
def _prefect(prefect_harness):
    """Integration tests run flows and tasks against the session's Prefect test server."""
    yield
