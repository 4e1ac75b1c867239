"""Shared test fixtures: one cache of toy target models for the whole session, so the small toy
world is trained once and reused by every test file; and RAVEL's data from ../shared when
$RAVEL_DATA is not set (the cache `python ravel_data.py download` fills is used otherwise)."""
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent / "shared" / "ravel" / "data.tgz"
if not os.environ.get("RAVEL_DATA") and SHARED.is_file():
    os.environ["RAVEL_DATA"] = str(SHARED)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")
