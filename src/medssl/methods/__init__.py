"""Self-supervised pretraining methods. Importing this package imports every module in it, and so registers every
method: a new method is a new file here with ``@register_method(name)`` (docs/extending.md)."""

import importlib
import pkgutil

from medssl.methods.registry import available_methods, build_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["available_methods", "build_method", "register_method"]
