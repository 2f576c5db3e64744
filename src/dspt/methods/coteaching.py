"""Co-teaching (Han et al., NeurIPS 2018): two prompt learners teach each other on their small-loss samples.

What it does, each step (`loss`, logits ``[2, B, C]``):

1. each learner ranks the batch by its own per-sample loss on the given labels (the run's loss,
   `loss_fn.per_sample`, without gradient; ties keep batch order) and keeps its ``R(T)`` smallest-loss
   samples, ``n_keep = round(R(T) * B)`` (at least 1);
2. learner 0 is trained on learner 1's kept samples and learner 1 on learner 0's: the step's loss is
   ``loss_fn(z_0[keep_1], y[keep_1]) + loss_fn(z_1[keep_0], y[keep_0])`` (each a mean over its kept
   samples), so each learner's gradient comes from its own term only.

Keep rate, from the epoch (`begin_epoch`): the paper's ``R(T) = 1 - min(T * tau / T_k, tau)``, with ``T``
the 0-based epoch here, i.e. the forget rate grows linearly from 0 at epoch 0 to ``tau`` (`forget_rate`) at
epoch ``t_k`` and stays there. (The paper updates ``R`` at the end of epoch ``T`` for the next one, which is
the same schedule; the authors' code, ``linspace(0, tau, T_k)``, reaches ``tau`` one epoch earlier.)

Defaults and their source:
- ``forget_rate = 0.2``: the paper sets ``tau`` to the noise rate, assumed known (its code: ``forget_rate =
  noise_rate`` unless given). A user rarely knows it; 0.2 is the paper's lowest symmetric setting
  (Symmetry-20 %). Set it to the expected noise rate of the data.
- ``t_k = 10`` epochs: the paper's ``T_k = 10`` (of 200 epochs, the CoOp schedule at 8-16 shots). It is a
  count of epochs, not a fraction: shorter schedules reach ``tau`` at the same epoch.

Differences from the paper: the two learners are two prompts on the same frozen CLIP (learner 0 is the run's
prompt, learner 1 a second prompt with its own initialisation seed), not two networks; the paper's loss is CE,
here it is the run's loss (``--loss ce`` for the paper's). The paper's kept count is ``int(R * B)`` in its code (floor);
here it is rounded half up, with at least one sample.

`epoch_log`: ``forget_rate`` and ``keep_rate`` (the schedule: ``1 - forget_rate(epoch)``), ``kept_share``
(the share of the epoch's samples each learner kept, from the counts) and, when the run knows its noisy
samples (measurement only), ``label_precision``: the share of kept samples (both learners) whose label is
clean, as the paper reports it.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from ..losses import _check
from .registry import register_method
from .base import EpochView, Method

__all__ = ["CoTeaching", "forget_rate_at", "keep_count"]


def forget_rate_at(epoch: int, forget_rate: float, t_k: int) -> float:
    """The forget rate of a (0-based) epoch: ``forget_rate * min(epoch / t_k, 1)``; ``forget_rate`` if t_k = 0."""
    if t_k <= 0:
        return float(forget_rate)
    return float(forget_rate) * min(epoch / t_k, 1.0)


def keep_count(keep_rate: float, batch: int) -> int:
    """How many samples a learner keeps of a batch: ``keep_rate * batch`` rounded half up, at least 1."""
    return max(1, min(batch, math.floor(keep_rate * batch + 0.5)))


@register_method("coteaching")
class CoTeaching(Method):
    """Two learners; each is trained on the other's small-loss samples; forget rate ramps up over t_k epochs."""

    summary: ClassVar[str] = ("two prompts; each trains on the other's small-loss (1 - forget rate) share of the "
                              "batch; forget rate ramps 0 -> forget_rate over t_k epochs")
    paper: ClassVar[str] = ("Han et al., Co-teaching: Robust Training of Deep Neural Networks with Extremely "
                            "Noisy Labels, NeurIPS 2018")
    learners: ClassVar[int] = 2

    def __init__(self, loss_fn: torch.nn.Module, num_classes: int, n_train: int,
                 forget_rate: float = 0.2, t_k: int = 10):
        super().__init__(loss_fn, num_classes, n_train, forget_rate=forget_rate, t_k=t_k)
        self.forget_rate = _check("coteaching", "forget_rate", forget_rate, 0.0, 1.0, False, True)
        try:
            ok = not isinstance(t_k, bool) and float(t_k).is_integer() and float(t_k) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"coteaching hyperparameter t_k={t_k!r} must be a whole number of epochs >= 0")
        self.t_k = int(float(t_k))
        self.rate = 0.0  # this epoch's forget rate
        self._is_noisy: torch.Tensor | None = None  # [N] bool, measurement only (label_precision)
        self._seen = self._kept = 0
        self._kept_clean: torch.Tensor | int = 0

    def begin_epoch(self, view: EpochView) -> None:
        self.rate = forget_rate_at(view.epoch, self.forget_rate, self.t_k)
        self._is_noisy = None if view.is_noisy is None else torch.as_tensor(
            np.asarray(view.is_noisy, dtype=bool), device=view.logits.device)
        self._seen = self._kept = 0
        self._kept_clean = 0

    def selections(self, logits: torch.Tensor, given: torch.Tensor) -> list[torch.Tensor]:
        """Each learner's kept samples (batch positions, smallest loss first)."""
        n_keep = keep_count(1.0 - self.rate, given.shape[0])
        out = []
        with torch.no_grad():
            for j in range(logits.shape[0]):
                per = self.loss_fn.per_sample(logits[j].detach(), given)
                out.append(torch.argsort(per, stable=True)[:n_keep])
        return out

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != 2:
            raise ValueError(f"coteaching trains 2 learners; got logits of {logits.shape[0]}")
        keep0, keep1 = self.selections(logits, given)
        batch = given.shape[0]
        self._seen += 2 * batch
        self._kept += keep0.numel() + keep1.numel()
        if self._is_noisy is not None:  # counted on the device: no host sync per step
            clean = ~self._is_noisy.to(idx.device)[idx]
            self._kept_clean = self._kept_clean + clean[keep0].sum() + clean[keep1].sum()
        return self.loss_fn(logits[0][keep1], given[keep1]) + self.loss_fn(logits[1][keep0], given[keep0])

    def epoch_log(self) -> dict[str, float]:
        log = {"forget_rate": self.rate, "keep_rate": 1.0 - self.rate}
        if self._seen:
            log["kept_share"] = self._kept / self._seen
            if self._is_noisy is not None:
                log["label_precision"] = float(self._kept_clean) / self._kept
        return log
