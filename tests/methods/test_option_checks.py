"""Method options that cannot work are one-line ConfigErrors naming their ``pretrain.<section>.<key>``, raised when
the configuration is loaded or example selection starts, never half-way through a run."""

from __future__ import annotations

import numpy as np
import pytest

import medssl.methods  # noqa: F401  (registers the methods, so that their option sections are checked)
from medssl.config import AugConfig, DataConfig, PretrainConfig, load_config
from medssl.errors import ConfigError
from medssl.methods import build_method
from medssl.methods.gcl import GCLOptions
from medssl.models import build_model


@pytest.mark.parametrize("kw, key", [({"local_regions": 14}, "pretrain.gcl.local_regions"),
                                     ({"local_regions": 1}, "pretrain.gcl.local_regions"),
                                     ({"local_neg": 13}, "pretrain.gcl.local_neg"),
                                     ({"local_regions": 4, "local_neg": 4}, "pretrain.gcl.local_neg"),
                                     ({"local_neg": 0}, "pretrain.gcl.local_neg"),
                                     ({"local_region_size": 0}, "pretrain.gcl.local_region_size")])
def test_gcl_local_options_are_checked_up_front(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GCLOptions(**kw)


def test_gcl_local_options_fail_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"'pretrain\.gcl\.local_neg'"):
        load_config("demo", ["pretrain.gcl.local_neg=20"])
    with pytest.raises(ConfigError, match=r"'pretrain\.gcl\.local_neg'"):
        load_config("demo", ["pretrain.gcl_local_neg=20"])  # the flat key of earlier releases too
    assert load_config("demo", ["pretrain.gcl.local_regions=4", "pretrain.gcl.local_neg=3"]).pretrain.options[
        "gcl"].local_neg == 3


@pytest.fixture(scope="module")
def cache(phantom_root, tmp_path_factory):
    from medssl.data.cache import prepare

    return prepare(DataConfig(path=str(phantom_root), size=32, cache_dir=str(tmp_path_factory.mktemp("c"))),
                   progress=False)


@pytest.mark.parametrize("labels", [[9], [-1], [0], [1, 4]])
def test_polycl_target_labels_outside_the_classes(cache, labels):
    enc = build_model("polycl-unet", in_channels=1, n_classes=cache.n_classes, features=4).encoder
    method = build_method("polycl-o", enc, PretrainConfig(options={"polycl": {"target_labels": labels}}), AugConfig())
    with pytest.raises(ConfigError, match=r"pretrain\.polycl\.target_labels"):
        method.select_rows(cache, np.arange(len(cache.case_ids)))


def test_polycl_target_labels_inside_the_classes(cache):
    enc = build_model("polycl-unet", in_channels=1, n_classes=cache.n_classes, features=4).encoder
    opts = {"polycl": {"target_labels": [1], "slab_fraction": 0.5}}
    method = build_method("polycl-o", enc, PretrainConfig(options=opts), AugConfig())
    assert len(method.select_rows(cache, np.arange(len(cache.case_ids)))) > 0
