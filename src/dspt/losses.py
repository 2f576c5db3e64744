"""Classification losses over logits, one small class per loss, in a registry by name.

Every loss:
- takes ``logits`` ``[B, C]`` and integer ``labels`` ``[B]`` and returns the mean over the batch;
- casts the logits to float32 and runs with autocast disabled, so a robust loss computes the
  same thing under AMP as without it (it is never silently skipped or run in bf16);
- exposes its hyperparameters as keyword arguments with defaults, validated on construction
  (an invalid value raises ``ValueError`` naming the hyperparameter and its valid range);
- offers ``per_sample(logits, labels) -> [B]`` for diagnostics (per-sample losses / gradients).

Use ``get_loss("dspt")`` to build one, ``loss_names()`` to list them, and ``@register_loss(name)``
to add one.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .registries import registrar

__all__ = ["LOSSES", "register_loss", "get_loss", "loss_names", "ClassificationLoss"]

LOSSES: dict[str, type["ClassificationLoss"]] = {}

_T = TypeVar("_T", bound=type)

# Added to a logit norm before dividing by it (the epsilon of the LogitNorm / LogitClip code).
_EPS = 1e-7


def register_loss(name: str) -> Callable[[_T], _T]:
    """Decorator adding a loss class to :data:`LOSSES` under ``name`` (lower case, unique)."""
    return registrar(LOSSES, _normalise(name), "loss")


def loss_names() -> list[str]:
    """Registered loss names, in registration order (ce and dspt first)."""
    return list(LOSSES)


def get_loss(name: str, **hparams: float) -> nn.Module:
    """Build the loss ``name`` with hyperparameters ``hparams``.

    Unknown names and unknown or out-of-range hyperparameters raise ``ValueError`` with the
    valid choices, so a typo in a config never falls back to a default silently.
    """
    key = _normalise(name) if isinstance(name, str) else name
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(loss_names())}")
    cls = LOSSES[key]
    accepted = cls.hparam_names()
    unknown = [k for k in hparams if k not in accepted]
    if unknown:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no hyperparameters"
        raise ConfigError(f"unknown hyperparameter(s) {', '.join(unknown)} for loss '{key}'; {takes}")
    return cls(**hparams)


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def _check(loss: str, hp: str, value: float, lo: float, hi: float,
           lo_open: bool, hi_open: bool) -> float:
    """Return ``value`` as float if it lies in the interval, else raise a ValueError naming it."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    lo_s = "-inf" if lo == -math.inf else f"{lo:g}"
    hi_s = "inf" if hi == math.inf else f"{hi:g}"
    rng = f"{left}{lo_s}, {hi_s}{right}"
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{loss} hyperparameter {hp}={value!r} must be a number in {rng}") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ConfigError(f"{loss} hyperparameter {hp}={value!r} is outside its valid range {rng}")
    return v


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class ClassificationLoss(nn.Module):
    """Base class: float32, autocast-free computation of a per-sample loss, then the mean."""

    name: str = ""

    @classmethod
    def hparam_names(cls) -> list[str]:
        """Keyword hyperparameters of the constructor."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def hparams(self) -> dict[str, float]:
        """Current hyperparameter values (for configs and logs)."""
        return {k: getattr(self, k) for k in self.hparam_names()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of each sample, ``[B]`` float32."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
        with _no_autocast(logits.device):
            return self._per_sample(logits.float(), labels.long())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, labels).mean()

    def _per_sample(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _p_y(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the label, from log-softmax (stable for any logit size)."""
    return F.log_softmax(z, dim=-1).gather(1, y[:, None]).squeeze(1).exp()


@register_loss("ce")
class CrossEntropy(ClassificationLoss):
    """Cross-entropy -log p_y: the CoOp baseline; unbounded, so it fits wrong labels."""

    def _per_sample(self, z, y):
        return F.cross_entropy(z, y, reduction="none")


@register_loss("dspt")
class DoubleSoftmax(ClassificationLoss):
    """Double-Softmax (DSPT, Li et al. ICML 2026): L = -log softmax(softmax(z))_y.

    No hyperparameter; the logit scale stays inside the first softmax. Bounded:
    ``log(C-1+e) - 1 <= L <= log(C-1+e)``. With ``p = softmax(z)`` and ``q = softmax(p)`` the
    gradient is ``dL/dz_m = p_m (q_m - [m=y] - <p,q> + p_y)``, which vanishes like ``p_y`` when
    the model is confident in another class (saturation zone), hence robust to wrong labels.
    """

    def _per_sample(self, z, y):
        return F.cross_entropy(F.softmax(z, dim=-1), y, reduction="none")


@register_loss("mae")
class MAE(ClassificationLoss):
    """MAE (Ghosh et al. 2017; NLPrompt's PromptMAE): ``scale * (1 - p_y)``; symmetric, so robust.

    This is the reduced form used by Active-Passive-Losses' and NLPrompt's code (gradient
    ``p_y (p - e_y)``); the full L1 distance ``||p - e_y||_1 = 2 (1 - p_y)`` is ``scale=2``.
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = _check("mae", "scale", scale, 0.0, math.inf, True, True)

    def _per_sample(self, z, y):
        return self.scale * (1.0 - _p_y(z, y))


@register_loss("gce")
class GCE(ClassificationLoss):
    """Generalized cross-entropy (Zhang & Sabuncu 2018): ``(1 - p_y^q) / q``; q->0 is CE, q=1 MAE."""

    def __init__(self, q: float = 0.7):
        super().__init__()
        self.q = _check("gce", "q", q, 0.0, 1.0, True, False)

    def _per_sample(self, z, y):
        # p_y^q as exp(q log p_y): exact for tiny p_y and a finite gradient (no clamp needed)
        log_p_y = F.log_softmax(z, dim=-1).gather(1, y[:, None]).squeeze(1)
        return (1.0 - torch.exp(self.q * log_p_y)) / self.q


def _rce(z: torch.Tensor, y: torch.Tensor, A: float) -> torch.Tensor:
    """Reverse CE -sum_k p_k log e_y[k] with log 0 := A, i.e. ``-A (1 - p_y)`` (bounded)."""
    return -A * (1.0 - _p_y(z, y))


@register_loss("sce")
class SCE(ClassificationLoss):
    """Symmetric CE (Wang et al. 2019): ``alpha * CE + beta * RCE``; RCE is bounded (log 0 := A).

    Defaults: the paper's CIFAR-10 setting, alpha 0.1, beta 1 (also Active-Passive-Losses'
    ``configs/cifar10/sym/sce.yaml``), and its A = -4 (the reference code's clamp at 1e-4 gives
    A = ln 1e-4 = -9.21). Its CIFAR-100 setting is alpha 6, beta 0.1 (``configs/cifar100/sym/sce.yaml``).
    Kept for CLIP: the CE term's gradient ``p - e_y`` does not shrink with the number of classes or the
    logit scale, so the balance of the terms, ``alpha / (beta |A| p_y)``, is the same for CLIP's logits as
    for a CNN's at the same p_y (unlike NCE's in ``nce_rce``).
    """

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, A: float = -4.0):
        super().__init__()
        self.alpha = _check("sce", "alpha", alpha, 0.0, math.inf, False, True)
        self.beta = _check("sce", "beta", beta, 0.0, math.inf, False, True)
        self.A = _check("sce", "A", A, -math.inf, 0.0, True, True)

    def _per_sample(self, z, y):
        return self.alpha * F.cross_entropy(z, y, reduction="none") + self.beta * _rce(z, y, self.A)


@register_loss("nce_rce")
class NCERCE(ClassificationLoss):
    """NCE+RCE (Ma et al. 2020, Active-Passive Losses): normalised CE (active) + reverse CE (passive).

    NCE = -log p_y / sum_k -log p_k is bounded in [0, 1]; RCE as in ``sce`` with log 0 := A.

    Defaults: the paper's many-class setting, alpha 10, beta 0.1 (its CIFAR-100 runs: the repository's
    README example and ``configs/cifar100/*/nce+rce.yaml``; CIFAR-10 used 1, 1), with A = ln 1e-4 = -9.21,
    the value its code uses (one-hot clamped at 1e-4 in ``ReverseCrossEntropy``), so alpha and beta weigh
    the terms as they did there. CoOp's benchmarks have 10 to 1000 classes (most about 100), and prompt
    tuning starts from CLIP's confident zero-shot prediction: where -log p_y is small, NCE's gradient is
    ``(p - e_y) / sum_k -log p_k`` and RCE's ``|A| p_y (p - e_y)``, a ratio of 1 / (|A| p_y sum_k -log p_k):
    about 0.03 for a network at init on CIFAR-100 (p_y ~ 1/C, sum ~ C ln C), but about 1e-4 for CLIP's
    scale-100 logits on a correctly predicted image at C = 100 (p_y ~ 1, sum ~ 8 C). With alpha = beta = 1
    the active term vanishes and the loss is RCE (MAE) alone, the underfitting the paper raises alpha for;
    (10, 0.1) gives NCE 100 times the share at the same A.
    """

    def __init__(self, alpha: float = 10.0, beta: float = 0.1, A: float = math.log(1e-4)):
        super().__init__()
        self.alpha = _check("nce_rce", "alpha", alpha, 0.0, math.inf, False, True)
        self.beta = _check("nce_rce", "beta", beta, 0.0, math.inf, False, True)
        self.A = _check("nce_rce", "A", A, -math.inf, 0.0, True, True)

    def _per_sample(self, z, y):
        logp = F.log_softmax(z, dim=-1)
        nce = logp.gather(1, y[:, None]).squeeze(1) / logp.sum(dim=-1)
        return self.alpha * nce + self.beta * _rce(z, y, self.A)


@register_loss("ls")
class LabelSmoothing(ClassificationLoss):
    """Label smoothing (Szegedy et al. 2016; Lukasik et al. 2020 on noise): CE to (1-eps) e_y + eps/C."""

    def __init__(self, eps: float = 0.1):
        super().__init__()
        self.eps = _check("ls", "eps", eps, 0.0, 1.0, False, True)

    def _per_sample(self, z, y):
        return F.cross_entropy(z, y, reduction="none", label_smoothing=self.eps)


@register_loss("bootstrap")
class SoftBootstrap(ClassificationLoss):
    """Soft bootstrapping (Reed et al. 2015): CE to ``beta e_y + (1-beta) p``, trusting the model.

    As in the paper, the target's ``p`` is not detached: the ``(1-beta)`` part is an entropy
    penalty that pulls towards the model's own confident prediction.
    """

    def __init__(self, beta: float = 0.95):
        super().__init__()
        self.beta = _check("bootstrap", "beta", beta, 0.0, 1.0, False, False)

    def _per_sample(self, z, y):
        logp = F.log_softmax(z, dim=-1)
        ce = -logp.gather(1, y[:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return self.beta * ce + (1.0 - self.beta) * entropy


@register_loss("logitnorm")
class LogitNorm(ClassificationLoss):
    """LogitNorm (Wei et al. 2022): CE on ``z / (tau ||z||)``; a fixed logit norm caps confidence."""

    def __init__(self, tau: float = 0.04):
        super().__init__()
        self.tau = _check("logitnorm", "tau", tau, 0.0, math.inf, True, True)

    def _per_sample(self, z, y):
        norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True) + _EPS
        return F.cross_entropy(z / (norm * self.tau), y, reduction="none")


@register_loss("logitclip")
class LogitClip(ClassificationLoss):
    """LogitClip (Wei et al. 2023): CE on logits whose L2 norm is clipped to ``1/tau``.

    Bounding the logit norm bounds CE, which limits memorisation of noisy labels. Here the norm is
    clamped at 1/tau, ``z * min(1, 1/(tau ||z||))`` (the paper's "clamps the norm of the logit vector");
    the official code (``algorithms/clip.py``) rescales to norm 1/tau where ||z|| > tau, the same at
    tau = 1.

    Default tau = 0.01 (clip at norm 100), not the code's CIFAR default 1 (``--temp 1.0``; its README runs
    1.5). In the official runs the clip (norm 1/tau <= 1) sits far below the norm of a trained WRN's
    logits, so it is active on every sample and bounds the loss. CLIP's logits are
    100 x cos, with cos 0.2-0.3 for every class, so ||z|| ~ 25 sqrt(C) (about 80 at C = 10, 250 at 100,
    800 at 1000), most of it the common level that the softmax ignores. tau = 1 scales them by 1/||z||
    (0.004 at C = 100): a 5-logit gap becomes 0.02, the clipped prediction is uniform (p_y = 1/C to 1e-3)
    whatever the prompt, and the loss degenerates to a linear one. tau = 0.01 = 1/CLIP's logit scale
    (the norm of one perfect match, cos 1, with the others 0) leaves the logits unclipped up to about 16
    classes (EuroSAT: CE) and clips every sample above: at C = 100 it scales them by ~0.4, taking a
    zero-shot-like 5-logit margin from p_y 0.98 to 0.42 while a 20-logit margin still reaches 0.996; at
    C = 1000 by ~0.13 (a 20-logit margin reaches only p_y ~0.04: tune tau on validation there).
    """

    def __init__(self, tau: float = 0.01):
        super().__init__()
        self.tau = _check("logitclip", "tau", tau, 0.0, math.inf, True, True)

    def _per_sample(self, z, y):
        norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True) + _EPS
        factor = torch.clamp(1.0 / (self.tau * norm), max=1.0)
        return F.cross_entropy(z * factor, y, reduction="none")


#: CoOp's learning rate for cross-entropy: the reference every default rate is matched to.
COOP_LR = 0.002


def matched_lr(name: str, num_classes: int, **hparams: float) -> float:
    """The default learning rate of loss `name` for `num_classes` classes: CoOp's CE rate scaled by
    ||dCE/dz|| / ||dL/dz|| at a flat prediction (all logits equal), so that every loss starts with the step
    CE starts with. A bounded loss such as DSPT has a gradient C times smaller there (C classes), so sharing
    CE's rate would compare a method that barely moves with one that does. Matching the first step is a rule,
    not a tuned value: choose rates on validation data (`dspt report --select lr`) for a comparison."""
    if num_classes < 2:
        return COOP_LR
    # every logit 20 (CLIP's 100 x a typical image-text cosine of 0.2): a flat prediction where a loss that
    # normalises the logits (LogitNorm, LogitClip) is defined
    z = torch.full((1, num_classes), 20.0, dtype=torch.float32, requires_grad=True)
    y = torch.zeros(1, dtype=torch.long)

    def grad_norm(loss: nn.Module) -> float:
        (g,) = torch.autograd.grad(loss.per_sample(z, y).sum(), z)
        return float(g.norm())

    ce, other = grad_norm(get_loss("ce")), grad_norm(get_loss(name, **hparams))
    if not other > 0:
        return COOP_LR
    return COOP_LR * ce / other

