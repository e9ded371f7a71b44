"""How LiteMedSAM's image encoder runs: the ``sam.engine`` setting (docs/sam.md#encoder-engines).

The encoder (TinyViT, once per slice) is most of a refined slice's time; the mask decoder always runs in
eager PyTorch. Engines:

* ``eager``: plain PyTorch (fp32, or bf16 autocast with ``precision="bf16"``); today's behaviour;
* ``compile``: ``torch.compile`` (inductor, frozen weights); compiles at the first slice (about a minute on
  2 cores; artefacts cached under ``TORCHINDUCTOR_CACHE_DIR``, default ``~/.cache/medssl/inductor``);
* ``int8``: dynamic int8 quantisation of the encoder's ``nn.Linear`` layers
  (``torch.ao.quantization.quantize_dynamic``: deprecated in favour of torchao, still shipped with the pinned
  torch, so no new dependency); CPU and fp32 only;
* ``onnx``: the encoder exported once to ONNX (cached, see :func:`onnx_path`) and run by ONNX Runtime on the
  CPU (graph optimisation level ALL, intra-op threads = torch's); needs ``pip install 'medssl[onnx]'``;
* ``auto``: the engine :data:`AUTO_ENGINE` names for this CPU's kind (:func:`cpu_kind`); ``eager`` where that
  engine cannot run (bf16 precision for int8/onnx, onnxruntime not installed).

Importing this module imports no torch (``RefineConfig.validate`` uses it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable

from medssl.errors import ConfigError, DataError

ENGINES = ("auto", "eager", "compile", "int8", "onnx")
CPU_ONLY = ("int8", "onnx")  # no accelerator path here
FP32_ONLY = ("int8", "onnx")  # precision="bf16" (autocast) applies to eager and compile only
ENGINE_BACKENDS = ("litemedsam",)  # segmenter backends that take an ``engine`` option
INSTALL_ONNX = "pip install 'medssl[onnx]'"

# ------------------------------------------------------------------------------------------------------------
# auto: the engine per CPU kind, from the measurement (`python benchmarks/bench_sam.py`, the sam_refine_speed
# section of BENCHMARKS.md): per kind, the fastest engine whose masks keep Dice >= 0.98 against fp32 eager.
# Kinds not measured yet keep eager.
AUTO_ENGINE: dict[str, str] = {
    "amx": "eager",  # not measured yet (Intel Sapphire Rapids and later: AMX tiles)
    "avx512_bf16": "eager",  # not measured yet (e.g. AMD Zen 4 / EPYC Genoa, Intel Cooper Lake)
    "avx512": "eager",  # not measured yet
    # measured 2026-12-01 on a 2-core AMD EPYC (AVX2, benchmarks/bench_sam.py, BENCHMARKS.md): ONNX Runtime gives the
    # same masks as fp32 eager with the encoder 24-26 % faster (1.23 vs 1.66 s; a second run, 4 slices x 3 calls:
    # 1.34 vs 1.76 s) and 15-18 % less CPU time; int8 fails the mask check (min Dice 0.962 / 0.943). Without
    # onnxruntime installed, auto falls back to eager.
    "avx2": "onnx",
    "other": "eager",  # not measured yet (ARM, older x86)
}
ACCELERATOR_ENGINE = "eager"  # device cuda/mps: int8 and onnx are CPU-only here
# ------------------------------------------------------------------------------------------------------------


def check_engine(engine: object, key: str = "sam.engine") -> str:
    """``engine`` if it is one of :data:`ENGINES`, else a one-line ConfigError naming ``key``."""
    if engine not in ENGINES:
        raise ConfigError(f"{key} must be one of {', '.join(ENGINES)}, got {engine!r}")
    return str(engine)


def engine_options(backend: str, engine: str, key: str = "sam.engine") -> dict:
    """Keyword arguments for ``build_segmenter(backend, ...)``: ``{"engine": ...}`` for backends that have one;
    another backend accepts only ``auto`` (one-line ConfigError otherwise)."""
    check_engine(engine, key)
    if str(backend).strip().lower() in ENGINE_BACKENDS:
        return {"engine": engine}
    if engine != "auto":
        raise ConfigError(f"{key}={engine} applies to the litemedsam backend only, got backend {backend!r}")
    return {}


def cpu_kind() -> str:
    """This CPU's kind for :data:`AUTO_ENGINE`: amx, avx512_bf16, avx512, avx2 or other (torch's own detection)."""
    import torch

    with contextlib.suppress(AttributeError, RuntimeError):
        if torch.cpu._is_amx_tile_supported():
            return "amx"
        if torch.cpu._is_avx512_bf16_supported():
            return "avx512_bf16"
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else "other"


def resolve_engine(engine: str, device: object = "cpu", precision: str = "fp32") -> str:
    """The concrete engine (never ``auto``) for ``device`` and ``precision``; one-line ConfigError if impossible."""
    import torch

    name = check_engine(engine)
    kind = torch.device(device or "cpu").type
    if name == "auto":
        name = AUTO_ENGINE[cpu_kind()] if kind == "cpu" else ACCELERATOR_ENGINE
        if (precision != "fp32" and name in FP32_ONLY) or (name == "onnx" and not _has_onnxruntime()):
            return "eager"
        return name
    if name in CPU_ONLY and kind != "cpu":
        raise ConfigError(f"sam.engine={name} runs on the CPU only, got device {kind!r} (use eager or compile)")
    if name in FP32_ONLY and precision != "fp32":
        raise ConfigError(f"sam.engine={name} runs the encoder in fp32, got precision {precision!r} "
                          f"(bf16 autocast works with eager and compile)")
    if name == "onnx":
        import_onnxruntime()  # a missing install is an error before the model is loaded
    return name


def _has_onnxruntime() -> bool:
    try:
        import_onnxruntime()
    except ConfigError:
        return False
    return True


def build_encoder(encoder, engine: str, *, image_size: int = 256,
                  cache_dir: str | os.PathLike | None = None) -> Callable:
    """A callable ``x (1×3×S×S float) -> embedding`` running ``encoder`` with the concrete ``engine``.

    ``encoder`` is not modified (int8 quantises a copy; compile and onnx wrap it). Call the result under
    ``torch.inference_mode()`` (and the bf16 autocast, for eager/compile).
    """
    if engine == "eager":
        return encoder
    if engine == "compile":
        return CompiledEncoder(encoder)
    if engine == "int8":
        return quantize_int8(encoder)
    if engine == "onnx":
        return OnnxEncoder(encoder, image_size=image_size, cache_dir=cache_dir)
    raise ConfigError(f"sam.engine: no encoder for {engine!r} (expected a concrete engine, not auto)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ compile
class CompiledEncoder:
    """``torch.compile(encoder)`` (inductor, frozen weights); a failure at the first call is a one-line error."""

    def __init__(self, encoder) -> None:
        import torch

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/medssl/inductor"))
        self.fn = torch.compile(encoder, dynamic=False)
        self.compiled = False

    def __call__(self, x):
        if self.compiled:
            return self.fn(x)
        try:
            import torch._inductor.config as inductor_config

            freezing = inductor_config.patch(freezing=True)  # weights as constants: inference only
        except (ImportError, AttributeError):
            freezing = contextlib.nullcontext()
        try:
            with freezing:
                y = self.fn(x)
        except Exception as exc:  # noqa: BLE001 - inductor/dynamo raise many types; all mean "cannot compile"
            raise ConfigError(f"sam.engine=compile: torch.compile failed ({_first_line(exc)}); "
                              f"use sam.engine=eager") from None
        self.compiled = True
        return y


# ------------------------------------------------------------------------------------------------ int8
def quantize_int8(encoder):
    """A copy of ``encoder`` with every ``nn.Linear`` dynamically quantised to int8 (weights int8, activations
    quantised per call); convolutions, norms and the attention bias stay fp32."""
    import torch
    from torch import nn

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ConfigError(f"sam.engine=int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                          f"{torch.__version__} no longer has (use eager or onnx)") from None
    engines = [e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in torch.backends.quantized.supported_engines]
    if not engines:
        raise ConfigError(f"sam.engine=int8: this torch build has no quantized CPU engine "
                          f"({torch.backends.quantized.supported_engines})")
    if torch.backends.quantized.engine not in engines:
        torch.backends.quantized.engine = engines[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao.quantization deprecation notice
        return quantize_dynamic(encoder, {nn.Linear}, dtype=torch.qint8, inplace=False).eval()


# ------------------------------------------------------------------------------------------------ onnx
def import_onnxruntime():
    """``onnxruntime``, or a one-line ConfigError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"sam.engine=onnx needs onnxruntime, which is not installed ({INSTALL_ONNX})") from None
    return onnxruntime


def onnx_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MEDSSL_ONNX_CACHE``, else ``~/.cache/medssl/onnx``."""
    return Path(cache_dir or os.environ.get("MEDSSL_ONNX_CACHE") or "~/.cache/medssl/onnx").expanduser()


def weights_sha256(module) -> str:
    """SHA-256 of a module's state dict as it is in memory (names, dtypes, shapes, values in logical order)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_path(encoder, image_size: int = 256, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the export of ``encoder`` lives: keyed by the SHA-256 of its weights (as loaded, after BatchNorm
    folding) and the input size, so other weights or sizes never reuse a file."""
    return onnx_cache_dir(cache_dir) / f"litemedsam_encoder_{weights_sha256(encoder)[:24]}_{int(image_size)}.onnx"


def export_onnx(encoder, path: str | os.PathLike, image_size: int = 256) -> str:
    """Export ``encoder`` (input ``image`` 1×3×S×S, output ``embedding``) to ``path``, written atomically.

    Uses torch's default (torch.export-based) exporter when ``onnxscript`` is installed, else, or when that
    fails, the TorchScript exporter. Both need the ``onnx`` package. Returns the exporter used.
    """
    import torch

    from medssl.data.atomic import atomic_path

    if importlib.util.find_spec("onnx") is None:
        raise ConfigError(f"sam.engine=onnx needs the onnx package to export the encoder ({INSTALL_ONNX})")
    x = torch.zeros(1, 3, int(image_size), int(image_size))
    kw = dict(input_names=["image"], output_names=["embedding"], verbose=False)
    errors = []
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("onnxscript") is not None:
            try:
                torch.onnx.export(encoder, (x,), str(tmp), dynamo=True, external_data=False, **kw)
                return "dynamo"
            except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter
                errors.append(f"dynamo exporter: {_first_line(exc)}")
        try:
            torch.onnx.export(encoder, (x,), str(tmp), dynamo=False, opset_version=17, **kw)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"TorchScript exporter: {_first_line(exc)}")
            raise ConfigError(f"sam.engine=onnx: exporting the image encoder failed ({'; '.join(errors)})") from None
    return "torchscript"


class OnnxEncoder:
    """The encoder as an ONNX Runtime CPU session (exported once to :func:`onnx_path`, then reused)."""

    def __init__(self, encoder, *, image_size: int = 256, cache_dir: str | os.PathLike | None = None) -> None:
        import torch

        ort = import_onnxruntime()
        self.path = onnx_path(encoder, image_size, cache_dir)
        if not self.path.is_file():
            export_onnx(encoder, self.path, image_size)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a cached file ONNX Runtime cannot read
            raise DataError(f"{self.path}: ONNX Runtime cannot load the cached encoder ({_first_line(exc)}); "
                            f"delete the file to export it again") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        import torch

        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])
