"""No preset flips an axis along which its dataset's classes are told apart by side (flips would swap labels)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from medssl.config import load_config, preset_names
from medssl.data.check import flip_warnings

pytestmark = pytest.mark.integration  # the presets' datasets are in ../shared/data


@lru_cache(maxsize=None)
def _warnings(path: str, axis: int, flips: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(flip_warnings(path, axis=axis, flip_axes=flips))


@pytest.mark.parametrize("name", preset_names())
def test_preset_does_not_flip_a_side_dependent_axis(name):
    cfg = load_config(name)
    path = Path(cfg.data.path).expanduser() if cfg.data.path else None
    if path is None or not path.is_dir():
        pytest.skip(f"preset {name}: its dataset ({cfg.data.path or 'none'}) is not here (../shared/data)")
    flips = tuple(sorted(set(cfg.aug.flip_axes) | set(cfg.pretrain.views.flip_axes)))
    assert _warnings(str(path.resolve()), cfg.data.axis, flips) == ()
