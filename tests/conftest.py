"""Test-wide settings: a private schedule cache per test session, never the user's."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_schedule_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TIERSIM_CACHE_DIR", str(tmp_path_factory.mktemp("tiersim-cache")))
    yield
    mp.undo()
