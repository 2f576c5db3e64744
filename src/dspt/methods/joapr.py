"""JoAPR (Guo & Gu, CVPR 2024): joint adaptive partitioning of the training set, then label refurbishment + mixup.

**Loss: CE only.** JoAPR takes ``--loss ce`` and refuses any other loss with a one-line `ConfigError` when the
config is checked (`RunConfig.validate` calls `JoAPR.check_loss`; the constructor checks too), before any data
is read. After its warm-up every step is a soft-target cross-entropy against refurbished labels, which are CE
targets (sharpened mixtures of the given label and the prediction), so another loss has no place there; and a
non-CE run's default learning rate is matched to *that* loss's gradients (about C times CoOp's 0.002 for
``dspt``), so the soft CE would train at a rate neither the paper nor this loss was tuned for.

What it does:

- **Warm-up** (epochs ``0 .. warmup-1``): every sample on its given label with CE (the run's loss, which is
  CE), plus ``warmup_penalty * mean_i sum_c p_ic log p_ic`` (a confidence penalty:
  minimising it raises the entropy of the predictions), as the authors' code does (``ALPHA1``).
- **Partition**, at the start of every later epoch (`begin_epoch`), from the current predictions on every
  training sample (`view.logits[0]`, unaugmented):
  1. per-sample loss ``CE(z_i, y_i) + H(softmax(z_i))`` (the authors' code adds the prediction's entropy
     after warm-up), min-max normalised to [0, 1];
  2. a two-component 1-D Gaussian mixture on it (scikit-learn ``GaussianMixture``; ``max_iter=10,
     tol=1e-2, reg_covar=5e-4`` as the authors' code, ``random_state`` drawn from `view.gen`, so the fit is
     deterministic); the clean probability ``w_i`` is the posterior of the component with the smaller mean;
  3. two adaptive thresholds, joined by OR (the paper's "joint adaptive thresholds"): a sample is clean if
     its normalised loss is below the point where the two Gaussian densities cross (between the means), or
     if ``w_i`` exceeds the estimated noise rate ``tau`` = the share of samples with ``w_i <= 0.5``.
- **Label refurbishment.** With ``p_i`` the current prediction (softmax of `view.logits[0]`) and
  ``Sharpen(q) = q^(1/temperature) / sum(q^(1/temperature))``:
  clean samples: ``Sharpen(c_i e_{y_i} + (1 - c_i) p_i)`` with ``c_i = w_i`` in the first epoch after
  warm-up and ``c_i = w_i * p_i[y_i]`` afterwards (the authors' code); noisy samples: ``Sharpen(p_i)`` (their
  given label is dropped).
- **Training step.** `inputs()` mixes the step's image features: ``lambda ~ Beta(mix_alpha, mix_alpha)``,
  ``lambda = max(lambda, 1 - lambda)``, a permutation of the batch, both drawn from the step's generator;
  the mixed feature ``lambda f_i + (1 - lambda) f_perm(i)`` is re-normalised to unit length (the features
  are CLIP's normalised image features and the logits are cosines; the authors mix the *images* and
  encode the mixture, whose feature the encoder then normalises). `loss()` is the soft-target
  cross-entropy against ``lambda t_i + (1 - lambda) t_perm(i)`` plus ``prior_penalty * KL(u || mean_i
  softmax(z_i))`` with ``u`` uniform (the authors' code, ``ALPHA2``; DivideMix's prior penalty).

Differences from the authors' code:
- The code trains a clean loader and a noisy loader side by side (MixMatch style, one batch of each per
  step, mixed together); here each minibatch of the run holds clean and noisy samples as drawn, and each
  sample's refurbished target is fixed at the start of the epoch from that epoch's predictions (the code
  recomputes it at every step with the current prompt, averaging over augmented views).
- The code averages each sample's normalised loss over the last 5 epochs before the GMM
  (``AVERAGE_LOSS``) and carries the threshold ``tau`` from one epoch to the next (starting at 0.5). A
  method here must decide from the epoch's inputs only (a resumed run decides the same), so the GMM sees
  this epoch's losses and ``tau`` is re-estimated each epoch from 0.5 (one step of the code's update).
- The code's density-crossing point uses the GMM's variances where standard deviations are meant and a
  factor 2 inside the log; here it is the exact crossing of the two fitted (unweighted) Gaussian densities.
- Mixing is in feature space (see above), not pixel space.

Defaults and their source (the authors' code, ``configs/trainers/JoAPR/rn50.yaml`` used by
``scripts/main.sh``, else ``train.py``'s ``extend_cfg``):
- ``warmup = 1`` epoch (rn50.yaml ``WARMUP_EPOCH: 1``; extend_cfg's 20 is overridden there);
- ``warmup_penalty = 0.5`` (``ALPHA1``), ``prior_penalty = 0.5`` (rn50.yaml ``ALPHA2``);
- ``mix_alpha = 0.001`` (``BETA``): with ``lambda = max(lambda, 1 - lambda)`` this makes ``lambda`` ~ 1, i.e.
  almost no mixing (DivideMix used 4);
- ``temperature = 0.5`` (``TEMP = 2`` with Dassl's ``sharpen_prob``, which raises to the power 2).

`epoch_log`: during warm-up ``warmup = 1``; afterwards ``clean_share``, ``loss_threshold`` (the density
crossing, on the normalised loss), ``prob_threshold`` (``tau``) and, when the run knows its noisy samples
(measurement only), ``noisy_precision`` / ``noisy_recall`` of the noisy flag (not clean).
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import _check, _no_autocast
from .registry import register_method
from .base import EpochView, Method

__all__ = ["JoAPR", "gaussian_crossing", "mix_draw", "partition", "sharpen"]

#: the losses (`--loss`) JoAPR trains with: its steps after the warm-up are soft-target CE
LOSSES_TAKEN = ("ce",)

#: the authors' GaussianMixture settings
GMM_OPTIONS = {"n_components": 2, "max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}


def _count(method: str, hp: str, value: object) -> int:
    """A whole number >= 0 (epochs), or a ConfigError naming the hyperparameter."""
    try:
        ok = not isinstance(value, bool) and float(value).is_integer() and float(value) >= 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{method} hyperparameter {hp}={value!r} must be a whole number of epochs >= 0")
    return int(float(value))  # type: ignore[arg-type]


def gaussian_crossing(m_clean: float, v_clean: float, m_noisy: float, v_noisy: float) -> float:
    """Where the densities N(m_clean, v_clean) and N(m_noisy, v_noisy) (variances) cross, on the side that
    separates them: the root of ``(x-m_c)^2/v_c - (x-m_n)^2/v_n = log(v_n/v_c)`` beyond the mean of the
    narrower component, towards the other one (the midpoint when the variances are equal)."""
    a = 1.0 / v_clean - 1.0 / v_noisy
    b = -2.0 * (m_clean / v_clean - m_noisy / v_noisy)
    c = m_clean ** 2 / v_clean - m_noisy ** 2 / v_noisy - math.log(v_noisy / v_clean)
    if abs(a) < 1e-12 * max(1.0 / v_clean, 1.0 / v_noisy):
        return 0.5 * (m_clean + m_noisy) if abs(b) < 1e-300 else -c / b
    disc = max(b * b - 4.0 * a * c, 0.0)  # >= 0 in exact arithmetic when the variances differ
    r1, r2 = (-b - math.sqrt(disc)) / (2.0 * a), (-b + math.sqrt(disc)) / (2.0 * a)
    lo, hi = min(r1, r2), max(r1, r2)
    # narrower clean component: the crossing past m_clean; narrower noisy one: the crossing before m_noisy
    return hi if v_clean < v_noisy else lo


def partition(logits: torch.Tensor, given: torch.Tensor, seed: int) -> dict[str, np.ndarray | float]:
    """JoAPR's joint adaptive partition from logits ``[N, C]`` and given labels ``[N]``.

    Returns ``prob_clean`` ``[N]`` (GMM posterior of the low-loss component), ``clean`` ``[N]`` bool,
    ``loss`` ``[N]`` (the normalised loss), ``loss_threshold`` and ``prob_threshold``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    z = logits.detach().to("cpu", torch.float64)
    y = given.detach().to("cpu", torch.long)
    logp = F.log_softmax(z, dim=1)
    loss = -logp.gather(1, y[:, None]).squeeze(1) - (logp.exp() * logp).sum(1)  # CE + entropy
    loss = loss.numpy()
    span = float(loss.max() - loss.min()) if loss.size else 0.0
    if loss.size < 2 or not span > 1e-12:  # nothing to separate: every sample is as clean as the others
        n = loss.size
        return {"prob_clean": np.ones(n), "clean": np.ones(n, dtype=bool), "loss": np.zeros(n),
                "loss_threshold": float("nan"), "prob_threshold": 0.0}
    norm = (loss - loss.min()) / span
    gmm = GaussianMixture(random_state=seed, **GMM_OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=10 (the authors') often stops before tol
        gmm.fit(norm[:, None])
    means = gmm.means_.reshape(-1)
    variances = gmm.covariances_.reshape(-1)
    k_clean, k_noisy = int(means.argmin()), int(means.argmax())
    prob = gmm.predict_proba(norm[:, None])[:, k_clean]
    if k_clean == k_noisy:  # both components at the same mean: no split by loss
        thr = float("inf")
    else:
        thr = gaussian_crossing(float(means[k_clean]), float(variances[k_clean]),
                                float(means[k_noisy]), float(variances[k_noisy]))
    tau = float(np.mean(prob <= 0.5))  # the estimated noise rate at threshold 0.5 becomes the threshold
    clean = (norm < thr) | (prob > tau)
    return {"prob_clean": prob, "clean": clean, "loss": norm, "loss_threshold": float(thr),
            "prob_threshold": tau}


def sharpen(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``q^(1/T)`` renormalised over the last axis (computed in log space)."""
    logq = torch.log(q.clamp_min(1e-300)) / temperature
    return torch.softmax(logq, dim=-1)


def mix_draw(batch: int, alpha: float, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """One step's mixup draw from ``gen``: ``lambda = max(l, 1-l)``, ``l ~ Beta(alpha, alpha)``, and a
    permutation of the batch."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(batch, generator=gen)
    return lam, perm


@register_method("joapr")
class JoAPR(Method):
    """Warm-up, then per epoch: GMM + joint adaptive thresholds -> refurbished soft labels; mixup steps."""

    summary: ClassVar[str] = ("GMM on per-sample losses + joint adaptive thresholds split clean/noisy each epoch; "
                              "refurbished soft labels, mixup, soft CE (after a warm-up); --loss ce only")
    paper: ClassVar[str] = ("Guo & Gu, JoAPR: Cleaning the Lens of Prompt Learning for Vision-Language Models, "
                            "CVPR 2024")

    def __init__(self, loss_fn: torch.nn.Module, num_classes: int, n_train: int,
                 warmup: int = 1, warmup_penalty: float = 0.5, mix_alpha: float = 0.001,
                 temperature: float = 0.5, prior_penalty: float = 0.5):
        super().__init__(loss_fn, num_classes, n_train, warmup=warmup, warmup_penalty=warmup_penalty,
                         mix_alpha=mix_alpha, temperature=temperature, prior_penalty=prior_penalty)
        self.check_loss(getattr(loss_fn, "name", None) or type(loss_fn).__name__)
        self.warmup = _count("joapr", "warmup", warmup)
        self.warmup_penalty = _check("joapr", "warmup_penalty", warmup_penalty, 0.0, math.inf, False, True)
        self.mix_alpha = _check("joapr", "mix_alpha", mix_alpha, 0.0, math.inf, True, True)
        self.temperature = _check("joapr", "temperature", temperature, 0.0, math.inf, True, True)
        self.prior_penalty = _check("joapr", "prior_penalty", prior_penalty, 0.0, math.inf, False, True)
        self.warming = True
        self.targets: torch.Tensor | None = None  # [N, C] refurbished targets of this epoch
        self.clean: torch.Tensor | None = None  # [N] bool
        self.prob_clean: torch.Tensor | None = None  # [N]
        self._mix: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (idx, perm, lambda) of the step

    @classmethod
    def check_loss(cls, loss: str) -> None:
        """Refuse a `--loss` other than CE (a registered loss name), with the fix: see the module docstring."""
        if str(loss).strip().lower().replace("-", "_") not in LOSSES_TAKEN:
            raise ConfigError(f"--method joapr trains soft-target cross-entropy on refurbished labels, so it takes "
                              f"--loss ce only, not '{loss}'; pass --loss ce (or --method plain to train with "
                              f"--loss {loss})")

    # ------------------------------------------------------------------------------------------
    def begin_epoch(self, view: EpochView) -> None:
        self._mix = None
        self.warming = view.epoch < self.warmup
        if self.warming:
            self._log = {"warmup": 1.0}
            return
        logits = view.logits[0]
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=view.gen).item())
        part = partition(logits, view.given, seed)
        dev = logits.device
        z = logits.detach().to(torch.float64)
        p = torch.softmax(z, dim=1)
        given = view.given.to(dev)
        w = torch.as_tensor(part["prob_clean"], dtype=torch.float64, device=dev)
        if view.epoch > self.warmup:  # the code: w * p[y] after the first post-warm-up epoch
            w = w * p.gather(1, given[:, None]).squeeze(1)
        onehot = F.one_hot(given, self.num_classes).to(torch.float64)
        clean = torch.as_tensor(part["clean"], device=dev)
        refurbished = w[:, None] * onehot + (1.0 - w[:, None]) * p
        targets = torch.where(clean[:, None], refurbished, p)
        self.targets = sharpen(targets, self.temperature).to(torch.float32)
        self.clean, self.prob_clean = clean, w.to(torch.float32)
        flagged = ~np.asarray(part["clean"], dtype=bool)
        log = {"clean_share": float(1.0 - flagged.mean()), "loss_threshold": float(part["loss_threshold"]),
               "prob_threshold": float(part["prob_threshold"])}
        if view.is_noisy is not None:
            truth = np.asarray(view.is_noisy, dtype=bool)
            hits = float((flagged & truth).sum())
            log["noisy_precision"] = hits / flagged.sum() if flagged.any() else float("nan")
            log["noisy_recall"] = hits / truth.sum() if truth.any() else float("nan")
        self._log = log

    def inputs(self, feats: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.warming:
            self._mix = None
            return feats
        lam, perm = mix_draw(feats.shape[0], self.mix_alpha, gen)
        f = feats.float()
        mixed = lam * f + (1.0 - lam) * f[perm.to(feats.device)]
        mixed = mixed / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self._mix = (idx.detach().to("cpu").clone(), perm, lam)
        return mixed.to(feats.dtype)

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        with _no_autocast(logits.device):
            z = logits.float()
            if self.warming:
                total = 0.0
                for j in range(z.shape[0]):
                    logp = F.log_softmax(z[j], dim=-1)
                    neg_entropy = (logp.exp() * logp).sum(-1).mean()
                    total = total + self.loss_fn(z[j], given) + self.warmup_penalty * neg_entropy
                return total
            if self.targets is None:
                raise RuntimeError("joapr: loss() before begin_epoch(): no partition yet")
            if self._mix is None or not torch.equal(self._mix[0], idx.detach().to("cpu")):
                raise RuntimeError("joapr: loss() for a batch that inputs() did not mix")
            _, perm, lam = self._mix
            t = self.targets.to(z.device)[idx]
            target = lam * t + (1.0 - lam) * t[perm.to(z.device)]
            prior = torch.full((self.num_classes,), 1.0 / self.num_classes, device=z.device)
            total = 0.0
            for j in range(z.shape[0]):
                logp = F.log_softmax(z[j], dim=-1)
                lx = -(target * logp).sum(-1).mean()
                mean_pred = logp.exp().mean(0)
                penalty = (prior * torch.log(prior / mean_pred)).sum()
                total = total + lx + self.prior_penalty * penalty
            return total
