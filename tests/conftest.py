"""Shared pytest fixtures: a tiny phantom CT dataset and the location of the real data.

* ``phantom_root``: an 8-case phantom (32x32x16 voxels, MSD layout), written once per session;
  treat it as read-only (use ``phantom_copy`` to get a private, modifiable copy).
* ``shared_data`` / ``hippocampus_root``: ``../shared/data`` (skip when it is absent).

Tests that read ``../shared/data`` carry the ``integration`` marker (``-m "not integration"`` leaves them out):
tests using one of the fixtures above get it here, automatically; a test that calls ``require_shared`` or opens
the data some other way needs ``@pytest.mark.integration`` (or a module ``pytestmark``). A test without the
marker that opens or lists anything under ``../shared/data`` from Python fails, naming the path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SHARED_DATA = TESTS.parents[0].parent / "shared" / "data"
PHANTOM_CASES = 8
PHANTOM_SHAPE = (32, 32, 16)  # the phantom generator needs every size >= 16

REAL_DATA_FIXTURES = frozenset({"shared_data", "hippocampus_root"})  # a test using one is marked integration

if str(TESTS) not in sys.path:  # ``from synth import ...`` works whatever the rootdir
    sys.path.insert(0, str(TESTS))


def require_shared(*parts: str) -> Path:
    """``../shared/data/<parts>``, or skip the test when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared/data is needed for this test")
    return path


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A read-only 8-case phantom CT dataset (labels 0..3) shared by the whole session."""
    from medssl.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom") / "ds"
    return write_phantom_dataset(root, n_cases=PHANTOM_CASES, shape=PHANTOM_SHAPE)


@pytest.fixture
def phantom_copy(phantom_root, tmp_path) -> Path:
    """A private copy of the phantom that a test may modify."""
    dst = tmp_path / "phantom"
    shutil.copytree(phantom_root, dst)
    return dst


@pytest.fixture
def shared_data() -> Path:
    return require_shared()


@pytest.fixture
def hippocampus_root() -> Path:
    return require_shared("Task04_Hippocampus")


# --- the integration marker -----------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


_RUNNING: list = []  # the test item being set up, run or torn down
_INSTALLED: list = []
_SHARED_ROOTS = tuple({os.path.abspath(SHARED_DATA), os.path.realpath(SHARED_DATA)})
_READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})  # audit events whose first argument is a path


def _under_shared(path) -> bool:
    try:
        p = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):  # a file descriptor, None
        return False
    return any(p == root or p.startswith(root + os.sep) for root in _SHARED_ROOTS)


def _audit(event: str, args: tuple) -> None:
    """Fail a test that reads ../shared/data without the integration marker."""
    if event not in _READ_EVENTS or not _RUNNING or not args:
        return
    item = _RUNNING[-1]
    if item.get_closest_marker("integration") is None and _under_shared(args[0]):
        pytest.fail(f"{item.nodeid} reads {os.fsdecode(args[0])} but is not marked integration: add "
                    "@pytest.mark.integration (or use the shared_data / hippocampus_root fixture)", pytrace=False)


def pytest_configure(config):
    if _audit not in _INSTALLED:  # audit hooks cannot be removed: one per process
        _INSTALLED.append(_audit)
        sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()
