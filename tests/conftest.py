"""Shared pytest fixtures: a tiny phantom CT dataset and the location of the real data.

* ``phantom_root``: an 8-case phantom (32x32x16 voxels, MSD layout), written once per session;
  treat it as read-only (use ``phantom_copy`` to get a private, modifiable copy).
* ``shared_data`` / ``hippocampus_root``: ``../shared/data`` (skip when it is absent).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SHARED_DATA = TESTS.parents[0].parent / "shared" / "data"
PHANTOM_CASES = 8
PHANTOM_SHAPE = (32, 32, 16)  # the phantom generator needs every size >= 16

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
