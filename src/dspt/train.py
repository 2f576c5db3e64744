"""`dspt train`: one configuration trained (or resumed, or its finished result returned) through the stages of
training, each in its own module.

Data flows one way: dataset -> noise -> feature cache -> training -> metrics -> run directory + results row.

- `dspt.prepare`: preparing a run's data: splits, K-shot subset, noisy training and validation labels, backbone
  and cached image features (`prepare`), and the zero-shot reference (`zeroshot`).
- `dspt.loop`: the training loop of one batch of runs: prompt tuning on cached image features, with
  checkpoint/resume and evaluation.
- `dspt.batching`: batched runs: which runs train together (`batch_key`) and `train_batch`.
- `dspt.coop_reference`: CoOp's reference path (every step's images encoded anew).
- `dspt.prompt_file`: a finished run's learned prompt (`save_prompt`, `load_prompt`).

Every source of randomness is derived from the run seed (`dspt.seeds`: one independent stream each for the
shots, the noise, the validation subset and its noise, the context init, the augmented views and the
epochs), so a run killed at any point and resumed from its last checkpoint ends with exactly the numbers of
an uninterrupted run (on the CPU).

This module keeps `train` and re-exports the stages' names that code imports from `dspt.train`, so
`from dspt.train import X` keeps working. To replace a function the stages call (a test's monkeypatch), patch
the module that calls it (e.g. `dspt.loop.save_checkpoint`), not this one.
"""
from __future__ import annotations

from typing import Any

from .batching import batch_key, train_batch
from .config import RunConfig
from .coop_reference import _ReferenceBatches  # noqa: F401 - tests import it from here
from .loop import (epoch_generator, evaluate, grad_scaler, learner_seed, lr_at,
                   method_generator, needs_loss_scaling, optimizer_step, resolve_lr)
from .prepare import (Prepared, _drop_bad, csv_text, exclude_images, load_splits, prepare,  # noqa: F401 - _drop_bad
                      validation_labels, versions, zeroshot, zeroshot_text_features)
from .prompt_file import load_prompt, save_prompt

# the stages' names that code imports from `dspt.train` (the private `_drop_bad` and `_ReferenceBatches`
# are re-exported above too)
__all__ = [
    "Prepared", "batch_key", "csv_text", "epoch_generator", "evaluate", "exclude_images",
    "grad_scaler", "learner_seed", "load_prompt", "load_splits", "lr_at", "method_generator",
    "needs_loss_scaling", "optimizer_step", "prepare", "resolve_lr", "save_prompt", "train", "train_batch",
    "validation_labels", "versions", "zeroshot", "zeroshot_text_features",
]


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) one configuration; returns its metrics.

    A batch of one: `train_batch([cfg])`, whose error, if any, is raised here.
    """
    status, payload = train_batch([cfg])[0]
    if status != "ok":
        raise payload
    return payload
