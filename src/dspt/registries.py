"""The one way dspt registers a class by name (losses, methods): a decorator that refuses a name twice."""
from __future__ import annotations

from typing import Callable, TypeVar

_T = TypeVar("_T", bound=type)


def registrar(table: dict[str, type], key: str, kind: str) -> Callable[[_T], _T]:
    """Decorator adding a class to `table` under `key` (and as its `name`); a taken key is a ValueError."""

    def deco(cls: _T) -> _T:
        if key in table:
            raise ValueError(f"{kind} '{key}' is already registered (by {table[key].__name__})")
        table[key] = cls
        cls.name = key  # type: ignore[attr-defined]
        return cls

    return deco
