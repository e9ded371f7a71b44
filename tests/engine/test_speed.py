"""The speed options change speed only: channels_last, torch.compile's fallback, the bf16 attention path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.config import load_config
from medssl.data.phantom import write_phantom_dataset
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.trainer import compile_parts, to_channels_last, uncompile
from medssl.models import build_model
from medssl.models.kaf.layer import attention

TINY = ["data.size=32", "model.features=8", "train.batch_size=4", "train.amp=off", "train.threads=1",
        "aug.elastic_prob=0", "split.n_folds=4", "split.val=1", "split.budget=2", "train.deterministic=true"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_cases=8, shape=(32, 32, 16), seed=3)


@pytest.mark.parametrize("backbone", ["unet", "polycl-unet", "kaf-unet"])
def test_channels_last_gives_the_same_outputs_and_gradients(backbone):
    torch.manual_seed(0)
    opts = {"max_keypoints": 16, "kaf_layers": 1, "kaf_dim": 32} if backbone == "kaf-unet" else {}
    a = build_model(backbone, in_channels=1, n_classes=3, features=8, **opts).double()
    b = build_model(backbone, in_channels=1, n_classes=3, features=8, **opts).double()
    b.load_state_dict(a.state_dict())
    a.train(backbone != "polycl-unet"), b.train(backbone != "polycl-unet")  # PolyCL's dropout draws by layout
    to_channels_last(b)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in b.parameters())
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)
    # a channels_last state dict loads into a plain model and back: checkpoints do not care
    c = build_model(backbone, in_channels=1, n_classes=3, features=8, **opts).double()
    c.load_state_dict(b.state_dict())
    torch.testing.assert_close(c.train(a.training)(x), ya)


def test_training_with_and_without_channels_last_ends_alike(tiny_data, tmp_path):
    import json

    from medssl.engine.finetune import finetune

    losses = {}
    for flag in ("true", "false"):
        cfg = load_config("demo", overrides=[*TINY, "train.epochs=2", "train.steps_per_epoch=3", f"name=cl{flag}",
                                             f"train.channels_last={flag}", f"output_dir={tmp_path}",
                                             f"data.cache_dir={tmp_path / 'cache'}", f"data.path={tiny_data}"])
        finetune(cfg, progress=False)
        log = (tmp_path / f"cl{flag}" / "log.jsonl").read_text().splitlines()
        losses[flag] = [json.loads(line)["train_loss"] for line in log]
    # the same training up to float32 rounding (weights are not compared one by one: Adam turns gradients of
    # pure rounding noise, e.g. of a conv bias in front of BatchNorm, into full-size steps of either sign)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-2)


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_data, tmp_path, monkeypatch):
    from medssl.engine import trainer as T
    from medssl.engine.finetune import finetune

    def broken(parts_owner):  # what a missing C compiler looks like: compile "works", the first call fails
        parts = [parts_owner.encoder]

        def boom(*a, **k):
            raise RuntimeError("inductor: no working C compiler")
        for p in parts:
            p._compiled_call_impl = boom
        return parts

    monkeypatch.setattr(T, "compile_parts", broken)
    cfg = load_config("demo", overrides=[*TINY, "train.epochs=1", "train.steps_per_epoch=2", "name=comp",
                                         "train.compile=true", f"output_dir={tmp_path}",
                                         f"data.cache_dir={tmp_path / 'cache'}", f"data.path={tiny_data}"])
    with pytest.warns(UserWarning, match="train.compile: torch.compile failed"):
        finetune(cfg, progress=False)
    assert load_checkpoint(tmp_path / "comp" / "checkpoints" / "last.pt")["meta"]["state"]["step"] == 2


def test_compile_parts_and_uncompile_are_reversible():
    model = build_model("unet", in_channels=1, n_classes=2, features=4)
    parts = compile_parts(model)
    assert parts == [model.encoder, model.decoder]
    assert all(p._compiled_call_impl is not None for p in parts)
    uncompile(parts)
    assert all(p._compiled_call_impl is None for p in parts)
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_attention_matches_sdpa(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 20, 8) for _ in range(3))
    mask = torch.rand(3, 1, 1, 20) > 0.3
    mask[:, ..., 0] = True  # every row keeps a key
    m = {"bool": mask, "additive": torch.where(mask, 0.0, -1e4), "none": None}[mask_kind]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(attention(q, k, v, m), ref)  # float32: the fused kernel itself
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)  # bf16 on CPU: the explicit path
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)
