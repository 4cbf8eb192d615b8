"""The suite leaves nothing behind: one session folder for checkpoints and the checkpoint cache.

The redirect must be in place before any fixture runs, module- and session-scoped ones included,
so that nothing is ever written to the user's real ~/.cache/schp.
"""
import os
import tempfile
from pathlib import Path

import pytest

import conftest
from schp.checkpoint import cached_zip_copy, default_cache_dir


@pytest.fixture(scope="module")
def cache_seen_by_a_module_fixture():
    return default_cache_dir()


def test_cache_is_redirected_before_module_fixtures_run(cache_seen_by_a_module_fixture):
    assert cache_seen_by_a_module_fixture == conftest.SESSION_CACHE
    assert os.environ["SCHP_CACHE_DIR"] == str(conftest.SESSION_CACHE)
    home_cache = Path(os.path.expanduser("~")) / ".cache" / "schp"
    assert conftest.SESSION_CACHE != home_cache
    assert conftest.SESSION.parent == Path(tempfile.gettempdir())


def test_checkpoints_and_their_converted_copies_are_shared_in_the_session_folder(checkpoints):
    legacy = checkpoints("pascal")
    assert legacy.parent == conftest.SESSION / "checkpoints"
    assert checkpoints("pascal") == legacy  # made once
    copy = cached_zip_copy(legacy, default_cache_dir())
    assert copy.parent == conftest.SESSION_CACHE
    assert cached_zip_copy(legacy, default_cache_dir()) == copy  # converted once, then reused


def test_passing_tests_leave_no_temporary_folders(request):
    assert request.config.getini("tmp_path_retention_policy") == "failed"
