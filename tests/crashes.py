"""A kill in the middle of a run, for resume tests: the run stops after an epoch's log line, before its checkpoint."""
from __future__ import annotations

import contextlib
import sys

import pytest


class Crash(BaseException):
    """Stands in for a kill."""


@contextlib.contextmanager
def crash_before_checkpoint(epoch: int):
    """Inside the block, training raises Crash when it would save the checkpoint of `epoch` (0-based)."""
    loop = sys.modules["dspt.loop"]  # the training loop saves the checkpoints
    save = loop.save_checkpoint

    def crash(run_dir, at, *state):
        if at == epoch:
            raise Crash()
        save(run_dir, at, *state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "save_checkpoint", crash)
        yield
