"""The one name -> object registry behind pretraining methods, their option sections, backbones, SAM backends and
propagations: ``@REG.register(name)`` (another object under a taken name is a ValueError at import) and
``REG.get(name, what="model.backbone")`` (an unknown name is a one-line ConfigError listing the names). Tests that
register throw-away entries swap in ``REG.copy()``.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from medssl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` names the entries in messages; ``message`` is the unknown-name error, formatted with ``what`` (the
    config key or option), ``kind``, ``name`` (repr) and ``names`` (the registered ones)."""

    def __init__(self, kind: str, message: str = "{what}: unknown {kind} {name}; available: {names}"):
        self.kind, self.message, self._entries = kind, message, {}

    def add(self, name: str, obj: T) -> T:
        old = self._entries.setdefault(name, obj)
        if old is not obj and old != obj:
            raise ValueError(f"{self.kind} {name!r} is already registered (with {getattr(old, '__name__', old)})")
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated function or class under ``name``."""
        return lambda obj: self.add(name, obj)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, what: str | None = None) -> T:
        if name not in self._entries:
            raise ConfigError(self.message.format(what=what or self.kind, kind=self.kind, name=repr(name),
                                                  names=", ".join(self.names())))
        return self._entries[name]

    def copy(self) -> Registry[T]:
        new = Registry(self.kind, self.message)
        new._entries = dict(self._entries)
        return new

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
