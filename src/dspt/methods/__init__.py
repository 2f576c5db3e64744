"""Training methods, in a registry by name (`--method NAME`; `dspt methods` lists them).

A method changes what a training step does (sample selection, relabelling, mixing, two learners); a plain
loss stays `--loss NAME`. See `dspt.methods.base` for the contract with the training loop.
"""
from __future__ import annotations

from . import coteaching, dualprompt, joapr, nlprompt  # noqa: F401 - importing registers the methods
from .base import EpochView, Method
from .registry import METHODS, check_method, get_method, method_names, register_method

__all__ = ["METHODS", "EpochView", "Method", "register_method", "get_method", "method_names", "check_method"]
