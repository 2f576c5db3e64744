"""NLPrompt (Pan et al., CVPR 2025): PromptOT splits the training set, CE on the clean part, PromptMAE on the rest.

What it does, each epoch (in `begin_epoch`, from the prompt as it stands when the epoch begins):

1. **PromptOT.** The class text features of the current prompt are the prototypes. With the similarity
   ``S = logit_scale * X T^T`` (`view.image_features` X ``[N, E]``, `view.text_features[0]` T ``[C, E]``,
   both normalised: CLIP's logits), entropic optimal transport moves uniform mass over the N samples to
   uniform mass over the C classes, ``min_Q <M, Q> - reg * H(Q)``, ``Q 1_C = 1/N``, ``Q^T 1_N = 1/C``,
   solved with POT's log-domain Sinkhorn (``ot.sinkhorn(method="sinkhorn_log")``, float64, on the features'
   device; at most 1000 iterations, stop at a marginal error of 1e-6: the authors' code).
   Cost ``M`` (`cost`); a per-sample constant in ``M`` does not change the plan:
   - ``"prob"`` (default): ``M = -softmax(S)``, what the authors' code computes in effect (its
     ``PMODE='logP'`` takes a ``log_softmax`` of the softmax probabilities, which is ``-p`` up to a
     per-sample constant). With the default ``reg = 0.01`` this is the authors' regime: Gibbs kernel
     ``exp(-M/reg) = exp(100 p)``.
   - ``"logp"``: ``M = -log softmax(S)``, the paper's ``-log`` of the image-text similarity, the similarity
     read as CLIP's class probability (a raw cosine can be <= 0, so its log is undefined); up to per-sample
     constants it is ``logit_scale * (1 - cos)``. `reg` is the entropy weight of this cost as written (logit
     units, not rescaled), so the same ``reg`` makes a harder plan than ``"prob"``: two classes with
     probabilities ``p_a > p_b`` differ by ``log(p_a / p_b)`` here and by ``p_a - p_b`` there, about ``1/p``
     times more for small gaps (2-10x on CLIP-like logits, more in a row's tail). On the CLIP-like features
     of ``tests/test_methods_details.py`` at ``reg = 0.01`` its plan's mean row entropy is 0.039 nats and
     Sinkhorn stops at a marginal error of 3.4e-4 after 1000 iterations, against 0.196 nats and 9.4e-7 for
     ``"prob"``; raise ``reg`` with it (``--method-opt reg=...``) for a softer plan.
   Even the authors' regime is close to a hard assignment on CLIP's logits (``exp(100 p)``: only a sample
   whose best probabilities are within a few hundredths gets a split row), and Sinkhorn can stop short of
   1e-6 in 1000 iterations (on toy CLIP-like features: 1e-5..2e-4 at times). Each epoch logs the error
   reached as ``ot_error``, and a run warns once (`SinkhornWarning`, at the first epoch that stops short)
   with the error, the threshold and the fix (a larger ``reg``, which departs from the authors' plan).
2. **Pseudo-labels and split.** Each sample's pseudo-label is the argmax of its row of the plan. A
   sample whose pseudo-label equals its given label is *clean*; the others are *noisy*.
3. **Training.** A clean sample is trained on its given label with the run's loss (`loss_fn`; the paper
   uses CE: run with ``--loss ce`` for NLPrompt as published), a noisy one with PromptMAE
   (``get_loss("mae")``, ``1 - p_y``) on its given label. The step's loss is the mean over the batch of
   these per-sample losses.

When PromptOT runs: at the start of every epoch, with the current prompt, as the authors' code does
(``before_epoch`` calls ``OT_PL`` every epoch; the paper's curriculum budget is off there:
``CURRICLUM_EPOCH = 0``, so every sample is selected and only the pseudo-label test splits them).

Differences from the paper / authors' code:
- The authors' code trains the clean subset and the noisy subset in separate minibatches (all clean
  batches, then all noisy batches, each a mean over its own batch); here a minibatch holds both and the
  step's loss is the mean of the per-sample losses over the whole batch (each sample weighs the same).
- The similarities come from the cached, unaugmented image features (view 0); the authors' code runs the
  image encoder over its training loader (random crops) once per epoch.
- The authors' MAE is ``GCE(q=1)`` with ``p_y + 1e-6``: ``1 - p_y - 1e-6``, the same gradient as ``mae``.
- The paper writes the cost as the ``-log`` of the similarity; the default cost is the code's ``-p``
  instead, since the code's entropy weight was set for it (``cost="logp"`` is the paper's formula).

Defaults and their source:
- ``reg = 0.01``: the entropy weight of the authors' code (``DATASET.REG_E = 0.01`` in ``train.py``), for
  their cost;
- ``cost = "prob"``: the cost the authors' code computes, so the default plan is theirs (the entropy weight
  0.01 was chosen for it); ``--method-opt cost=logp`` is the paper's written cost at the same ``reg``, a
  harder plan (see above). (dspt's earlier default was ``"logp"`` with this ``reg``: not the authors' plan.)

`epoch_log`: ``noisy_share`` (share of the training set flagged noisy), ``ot_error`` (Sinkhorn's final
marginal error: non-convergence is visible, not silent) and, when the run knows its noisy samples
(`view.is_noisy`, measurement only), ``noisy_precision`` and ``noisy_recall`` of the flag.
"""
from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from ..losses import _check, get_loss
from .registry import register_method
from .base import EpochView, Method

__all__ = ["NLPrompt", "SinkhornWarning", "prompt_ot"]

#: Sinkhorn's iteration cap and stopping threshold (the authors' code: numItermax=1000, stopThr=1e-6)
SINKHORN_ITERATIONS = 1000
SINKHORN_STOP = 1e-6
COSTS = ("prob", "logp")


class SinkhornWarning(RuntimeWarning):
    """PromptOT's Sinkhorn stopped at its iteration cap before the marginal error fell below its threshold."""


def prompt_ot(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
              reg: float = 0.01, cost: str = "prob") -> tuple[torch.Tensor, torch.Tensor, float]:
    """PromptOT: the transport plan ``[N, C]`` (float64), each sample's pseudo-label ``[N]`` (argmax of its
    row) and Sinkhorn's final marginal error. Uniform marginals over samples and over classes."""
    import ot

    x = image_features.detach().to(torch.float64)
    t = text_features.detach().to(device=x.device, dtype=torch.float64)
    s = float(logit_scale) * x @ t.t()
    if cost == "logp":
        m = -torch.log_softmax(s, dim=1)
    elif cost == "prob":
        m = -torch.softmax(s, dim=1)
    else:
        raise ConfigError(f"nlprompt cost {cost!r} unknown; choose one of: {', '.join(COSTS)}")
    n, c = m.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=x.device)
    b = torch.full((c,), 1.0 / c, dtype=torch.float64, device=x.device)
    with warnings.catch_warnings():
        # not converging is reported through the returned error (NLPrompt warns once per run), not per epoch
        warnings.filterwarnings("ignore", message=".*[Ss]inkhorn did not converge.*")
        plan, log = ot.sinkhorn(a, b, m, reg=reg, method="sinkhorn_log", numItermax=SINKHORN_ITERATIONS,
                                stopThr=SINKHORN_STOP, log=True)
    err = log.get("err", [float("nan")])
    error = float(err[-1]) if len(err) else float("nan")
    return plan, plan.argmax(dim=1), error


def flag_measures(flagged: np.ndarray, is_noisy: np.ndarray | None) -> dict[str, float]:
    """Share flagged noisy, and (when the truth is known: measurement only) precision and recall of the flag."""
    out = {"noisy_share": float(flagged.mean()) if flagged.size else 0.0}
    if is_noisy is not None:
        truth = np.asarray(is_noisy, dtype=bool)
        hits = float((flagged & truth).sum())
        out["noisy_precision"] = hits / flagged.sum() if flagged.any() else float("nan")
        out["noisy_recall"] = hits / truth.sum() if truth.any() else float("nan")
    return out


@register_method("nlprompt")
class NLPrompt(Method):
    """PromptOT each epoch: pseudo-label == given label -> the run's loss; else PromptMAE."""

    summary: ClassVar[str] = ("PromptOT (Sinkhorn OT of images to class text features) splits clean/noisy each "
                              "epoch; run's loss (CE) on clean, PromptMAE on noisy")
    paper: ClassVar[str] = ("Pan et al., NLPrompt: Noise-Label Prompt Learning for Vision-Language Models, "
                            "CVPR 2025")

    def __init__(self, loss_fn: torch.nn.Module, num_classes: int, n_train: int,
                 reg: float = 0.01, cost: str = "prob"):
        super().__init__(loss_fn, num_classes, n_train, reg=reg, cost=cost)
        self.reg = _check("nlprompt", "reg", reg, 0.0, float("inf"), True, True)
        if cost not in COSTS:
            raise ConfigError(f"nlprompt cost {cost!r} unknown; choose one of: {', '.join(COSTS)}")
        self.cost = cost
        self.mae = get_loss("mae")
        self.noisy: torch.Tensor | None = None  # [N] bool: flagged noisy this epoch
        self.pseudo: torch.Tensor | None = None  # [N] int64: PromptOT's pseudo-labels
        self._warned = False  # Sinkhorn's non-convergence is warned once per instance (one run), not per epoch

    def begin_epoch(self, view: EpochView) -> None:
        _, pseudo, error = prompt_ot(view.image_features, view.text_features[0], view.logit_scale,
                                     self.reg, self.cost)
        given = view.given.to(pseudo.device)
        self.pseudo = pseudo
        self.noisy = pseudo != given
        self._log = flag_measures(self.noisy.cpu().numpy(), view.is_noisy)
        self._log["ot_error"] = error
        if not error < SINKHORN_STOP and not self._warned:  # NaN included
            self._warned = True
            warnings.warn(f"nlprompt: Sinkhorn stopped after {SINKHORN_ITERATIONS} iterations at marginal error "
                          f"{error:.3g} (epoch {view.epoch}), above its threshold {SINKHORN_STOP:g}, so the plan's "
                          f"class marginals are off by that much; for a plan that converges raise the entropy "
                          f"weight, e.g. --method-opt reg={self.reg * 5:g} (now {self.reg:g}); the epoch log's "
                          f"ot_error tracks it (warned once per run)", SinkhornWarning, stacklevel=2)

    def per_sample(self, logits: torch.Tensor, idx: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """Each sample's loss ``[B]``: the run's loss if PromptOT called it clean, else MAE."""
        if self.noisy is None:
            raise RuntimeError("nlprompt: loss() before begin_epoch(): no PromptOT split yet")
        noisy = self.noisy.to(idx.device)[idx]
        # both losses on every sample, one kept per sample (no host sync; each is finite with a finite gradient)
        return torch.where(noisy, self.mae.per_sample(logits, given), self.loss_fn.per_sample(logits, given))

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        return sum(self.per_sample(logits[j], idx, given).mean() for j in range(logits.shape[0]))

