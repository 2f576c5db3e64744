"""A dual-prompt noisy-label detector in the manner of DeFT (Wei et al., NeurIPS 2024, "Vision-Language Models
are Strong Noisy Label Detectors"), its detection stage: every class has a positive and a negative prompt, and the
negative one is a learned, per-class, per-image threshold. A label is judged clean when the image is closer to
its class's positive prompt than to its negative one.

Here the two prompts are two learners on the same frozen CLIP (learner 0, the positive prompt, is the run's
prompt and classifies; learner 1 is the negative prompt, with its own initialisation). Each step, with
`z+` and `z-` the two learners' logits ``[B, C]`` and `y` the given labels:

    loss = loss_fn(z+, y)
           + weight * ( mean_i BCE(z+_iy - z-_iy, 1) + mean_{i, c != y_i} BCE(z+_ic - z-_ic, 0) )

the run's loss on the positive prompts (the paper's CE: `--loss ce`; any loss works), and a binary loss per
class: at the given class the positive prompt should win, at every other class the negative one. The clean
probability of a label is ``sigmoid(z+_y - z-_y)``; `dspt audit --method dualprompt` scores every image with it,
out of sample (`dual_prompt_clean`).

Differences from DeFT: DeFT also adapts the image encoder (PEFT) and runs a second, model-training stage on the
samples it keeps; this is only its detector, on CoOp-style prompts over cached image features. Its paper's
binary term is written for the given class against the others in a softmax; the per-class sigmoid here is the
same decision rule (positive beats negative) with the classes' terms averaged separately, so that C - 1 negative
classes do not outweigh the one positive.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import EpochView, Method
from .registry import register_method

__all__ = ["DualPrompt", "clean_probability", "dual_loss"]


def dual_loss(pos: torch.Tensor, neg: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """The binary term: the given class's positive prompt over its negative one, every other class's negative
    prompt over its positive one; the two parts averaged separately."""
    margin = pos.float() - neg.float()
    target = F.one_hot(given, margin.shape[-1]).bool()
    bce = F.binary_cross_entropy_with_logits(margin, target.float(), reduction="none")
    own = bce[target].mean()
    return own + bce[~target].mean() if margin.shape[-1] > 1 else own


def clean_probability(pos: torch.Tensor, neg: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """sigmoid(z+_y - z-_y) per sample: the probability that its given label is clean."""
    idx = given[:, None]
    return torch.sigmoid(pos.float().gather(1, idx) - neg.float().gather(1, idx)).squeeze(1)


@register_method("dualprompt")
class DualPrompt(Method):
    name: ClassVar[str] = "dualprompt"
    summary: ClassVar[str] = ("a positive and a negative prompt per class, the negative one a learned threshold: a "
                              "label is clean when its positive prompt wins (DeFT's detector)")
    paper: ClassVar[str] = "Wei et al., NeurIPS 2024 (DeFT), detection stage"
    learners: ClassVar[int] = 2

    def __init__(self, loss_fn: torch.nn.Module, num_classes: int, n_train: int, weight: float = 1.0):
        if not weight >= 0:
            raise ConfigError(f"dualprompt weight must be >= 0 (got {weight}); --method-opt weight=1")
        super().__init__(loss_fn, num_classes, n_train, weight=weight)
        self.weight = float(weight)

    def begin_epoch(self, view: EpochView) -> None:
        clean = clean_probability(view.logits[0], view.logits[1], view.given).cpu().numpy() > 0.5
        self._log = {"clean_share": float(clean.mean())}
        if view.is_noisy is not None and clean.any():  # measured, never used to decide
            self._log["clean_precision"] = float((~view.is_noisy[clean]).mean())
            noisy = np.asarray(view.is_noisy, dtype=bool)
            if noisy.any():
                self._log["noisy_recall"] = float((~clean[noisy]).mean())

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits[0], given) + self.weight * dual_loss(logits[0], logits[1], given)
