"""The method registry: name -> Method subclass (`--method NAME`)."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from ..errors import ConfigError
from ..registries import registrar
from .base import Method

METHODS: dict[str, type[Method]] = {"plain": Method}

_T = TypeVar("_T", bound=type)


def register_method(name: str) -> Callable[[_T], _T]:
    """Decorator adding a Method subclass to :data:`METHODS` under `name`."""
    return registrar(METHODS, name, "method")


def method_names() -> list[str]:
    return list(METHODS)


def check_method(name: str, options: dict[str, Any]) -> None:
    """Refuse an unknown method or hyperparameter before any work, naming the valid ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)} (`dspt methods` lists them)")
    accepted = METHODS[name].defaults()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no options"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for method '{name}'; {takes}")
    from ..losses import get_loss

    try:  # a value out of its range is refused now, not at the first epoch
        METHODS[name](get_loss("ce"), 2, 2, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method '{name}': {exc}") from None


def get_method(name: str, loss_fn: torch.nn.Module, num_classes: int, n_train: int, **options: Any) -> Method:
    check_method(name, options)
    return METHODS[name](loss_fn, num_classes, n_train, **options)
