"""Shared test fixtures: one cache of toy target models for the whole session, so the small toy
world is trained once and reused by every test file."""
import pytest


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")
