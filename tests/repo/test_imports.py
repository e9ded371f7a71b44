"""Guard: medssl never imports torchvision or timm, and the environment does not contain them."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import medssl


def test_torchvision_not_installed():
    assert importlib.util.find_spec("torchvision") is None, (
        "torchvision is installed: the only build for torch 2.13.0 is a CUDA one that breaks imports")


def test_no_module_pulls_torchvision_or_timm():
    code = (
        "import pkgutil, importlib, sys, medssl\n"
        "for m in pkgutil.walk_packages(medssl.__path__, 'medssl.'):\n"
        "    if m.name != 'medssl.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "bad = [n for n in ('torchvision', 'timm', 'lightly', 'segment_anything') if n in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(medssl.__path__, "medssl.")]
    assert "medssl.cli" in names and "medssl.engine.trainer" in names
    for name in names:
        if name == "medssl.__main__":
            continue
        importlib.import_module(name)
