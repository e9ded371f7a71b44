"""Self-supervised pretraining methods. Importing this package registers every method."""

from medssl.methods import gcl, gcl_full, kaf, pcl, polycl, simclr  # noqa: F401  (registration)
from medssl.methods.registry import available_methods, build_method, register_method

__all__ = ["available_methods", "build_method", "register_method"]
