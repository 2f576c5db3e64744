"""What a training method is: the part of a training step beyond "the loss of the given labels".

A plain loss (`--loss NAME`) trains every sample on its given label. A method (`--method NAME`) may select
samples, relabel them, mix them or train two learners, on the same loop, feature cache, run folder, resume
and metrics. The loop calls, per run:

- `begin_epoch(epoch, view)` once per epoch, before its first step, with what the method may look at: the
  current predictions of every learner on every training sample (view 0, no augmentation), the image
  features, the class text features, the given labels. Whatever it decides here (a partition, pseudo-labels)
  must follow from these inputs, the config and `view.gen` only, so a resumed run decides the same.
- `inputs(feats, idx, gen)` before the logits of a step: may change the step's image features (mixup);
- `loss(logits, idx, given)` for the step: `logits` `[L, B, C]` (one row per learner), `idx` the samples'
  indices in the training set, `given` their given labels. Returns the scalar to minimise (a sum over
  learners: each learner's gradient is its own part).
- `epoch_log()`: numbers for the epoch's log line (the selected share, the precision of a partition...).

Methods never see the true labels (the run's `is_noisy` flags): `epoch_log` may be given them only to
*measure* a partition, through `view.is_noisy`, and must not use them to decide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass
class EpochView:
    """What a method may look at when an epoch begins."""

    epoch: int
    epochs: int
    logits: torch.Tensor  # [L, N, C] float32: each learner's logits of every training sample (view 0), no grad
    image_features: torch.Tensor  # [N, E] normalised image features (view 0)
    text_features: torch.Tensor  # [L, C, E] normalised class text features of each learner
    given: torch.Tensor  # [N] int64 given (possibly noisy) labels
    logit_scale: float
    gen: torch.Generator  # this epoch's generator (CPU): any randomness of the method draws from it
    is_noisy: np.ndarray | None = None  # [N] bool: for epoch_log's measurements only, never for decisions


class Method:
    """Base class: train every sample on its given label with the run's loss (plain prompt tuning)."""

    name: ClassVar[str] = "plain"
    #: one line for `dspt methods`: what it does
    summary: ClassVar[str] = ""
    #: the paper, for `dspt methods`
    paper: ClassVar[str] = ""
    #: how many prompt learners the method trains (co-teaching: 2); learner 0 is the run's prompt
    learners: ClassVar[int] = 1

    def __init__(self, loss_fn: torch.nn.Module, num_classes: int, n_train: int, **hparams: Any):
        self.loss_fn, self.num_classes, self.n_train = loss_fn, num_classes, n_train
        self.hparams = hparams
        self._log: dict[str, float] = {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The hyperparameters and their defaults (the keyword arguments of __init__ after n_train)."""
        import inspect

        sig = inspect.signature(cls.__init__)
        return {k: p.default for k, p in sig.parameters.items()
                if k not in ("self", "loss_fn", "num_classes", "n_train") and p.default is not inspect.Parameter.empty}

    @classmethod
    def check_loss(cls, loss: str) -> None:
        """Refuse, with a ConfigError naming the fix, a `--loss` this method cannot train with (every loss is
        fine for plain tuning); called when a config is checked, before any data is read."""

    def begin_epoch(self, view: EpochView) -> None:
        """Decide what this epoch trains on (nothing to decide for plain tuning)."""

    def inputs(self, feats: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The step's image features `[B, E]` as the learners see them (unchanged by default)."""
        return feats

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """The step's loss from `logits` `[L, B, C]`: the run's loss of the given labels, per learner."""
        return sum(self.loss_fn(logits[j], given) for j in range(logits.shape[0]))

    def epoch_log(self) -> dict[str, float]:
        """Numbers for this epoch's log line."""
        return dict(self._log)


@dataclass
class MethodInfo:
    """A registered method as `dspt methods` lists it."""

    name: str
    cls: type[Method]
    defaults: dict[str, Any] = field(default_factory=dict)
