"""Collapse: a run whose predictions fall onto one class, detected every epoch from what the loop already has.

A bounded loss such as DSPT or MAE has a saturation zone: a sample the model confidently assigns to another
class gets almost no gradient. When the model predicts one class for nearly every sample, with full
confidence, every sample is in that zone, the loss sits at its one-class value and nothing can pull the run
out: the *one-class trap*. Cross-entropy can end in one class too, but keeps a gradient there (*one-class*).

Per epoch, on the training samples' unaugmented view (never the test set: the optional guard acts on it):
- `pred_classes`, `dominant_share` (the most predicted class's share), `pred_entropy` (of the predicted
  classes, normalised: 0 for one class, 1 for a uniform spread);
- `saturated_share`: the share of samples whose per-sample logit-gradient norm is below `SATURATION`, and
  the same among clean and mislabeled samples where the truth is known (measurement only);
- `loss_train` against `loss_one_class`, the loss every prediction gets when it is the dominant class with
  full confidence (for DSPT with balanced labels: log(C - 1 + e) - 1/C).
A collapse: with 3 classes or more, one class takes at least `DOMINANT` of the predictions although it holds
less than half of the given labels. Its kind is 'one-class trap' when at least `TRAPPED` of the samples are
saturated, else 'one-class'. The run logs one warning line when a collapse begins, and its metrics say when
the run ended collapsed (`collapsed_at_epoch`, epochs counted from 1), or that it recovered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: a per-sample logit-gradient norm below this is "saturated" (CE's norm on a wrong confident sample: ~1.4)
SATURATION = 1e-3
#: the share of predictions one class must take for a collapse
DOMINANT = 0.95
#: the share of saturated samples that makes a one-class collapse a trap
TRAPPED = 0.9
#: logit of the dominant class for the one-class loss value (softmax(50 e_k) is one-hot to float precision)
_CONFIDENT = 50.0
KINDS = ("one-class trap", "one-class")


def spread(pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """How predictions spread over the classes: classes covered, the dominant class and its share, entropy."""
    pred = np.asarray(pred)
    if pred.size == 0:
        return {"pred_classes": 0, "dominant": -1, "dominant_share": math.nan, "pred_entropy": math.nan}
    counts = np.bincount(pred, minlength=num_classes).astype(float)
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(num_classes)) if num_classes > 1 else 0.0
    return {"pred_classes": int((counts > 0).sum()), "dominant": int(counts.argmax()),
            "dominant_share": float(share.max()), "pred_entropy": entropy}


def one_class_loss(loss_fn: torch.nn.Module, given: torch.Tensor, num_classes: int, cls: int) -> float:
    """The mean loss when every sample is predicted as `cls` with full confidence. The losses treat the other
    classes alike, so two rows suffice (a label equal to `cls`, and one not), weighted by their shares: no
    [N, C] tensor at any scale."""
    if len(given) == 0:
        return math.nan
    z = torch.zeros(2, num_classes, device=given.device)
    z[:, cls] = _CONFIDENT
    y = torch.tensor([cls, (cls + 1) % num_classes], device=given.device)
    with torch.no_grad():
        same, other = (float(v) for v in loss_fn.per_sample(z, y))
    share = float((given == cls).float().mean())
    return share * same + (1 - share) * other


def epoch_record(train_logits: torch.Tensor, given: torch.Tensor, norms: np.ndarray, losses: np.ndarray,
                 is_noisy: np.ndarray | None, loss_fn: torch.nn.Module,
                 held_out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The epoch's collapse measurements (see the module docstring) and `collapse`: its kind, or None.
    `held_out`: predictions on other splits ({"val": pred, "test": pred}), recorded, never decided on."""
    c = train_logits.shape[-1]
    pred = train_logits.argmax(-1).cpu().numpy()
    labels = given.cpu().numpy()
    s = spread(pred, c)
    saturated = np.asarray(norms) < SATURATION
    out: dict[str, Any] = {"pred_classes": s["pred_classes"], "dominant_share": s["dominant_share"],
                           "pred_entropy": s["pred_entropy"], "saturated_share": float(saturated.mean()),
                           "loss_train": float(np.mean(losses)),
                           "loss_one_class": one_class_loss(loss_fn, given, c, s["dominant"])}
    if is_noisy is not None:
        noisy = np.asarray(is_noisy, dtype=bool)
        out["saturated_clean"] = float(saturated[~noisy].mean()) if (~noisy).any() else math.nan
        out["saturated_noisy"] = float(saturated[noisy].mean()) if noisy.any() else math.nan
    for name, held in (held_out or {}).items():
        hs = spread(held, c)
        out[f"pred_classes_{name}"], out[f"pred_entropy_{name}"] = hs["pred_classes"], hs["pred_entropy"]
    label_share = float(np.mean(labels == s["dominant"])) if len(labels) else 0.0
    collapsed = c >= 3 and s["dominant_share"] >= DOMINANT and label_share < 0.5
    out["collapse"] = (KINDS[0] if out["saturated_share"] >= TRAPPED else KINDS[1]) if collapsed else None
    return out


@dataclass
class CollapseTracker:
    """A run's collapses over its epochs: when each began, whether the run ended in one, guard restores."""

    first_epoch: int | None = None  # 0-based epoch of the first collapse
    streak_start: int | None = None  # 0-based first epoch of the collapse the run is in now
    kind: str | None = None
    epochs: int = 0  # epochs that ended collapsed
    restores: int = 0  # times the guard restored the last healthy prompt
    last: dict[str, Any] = field(default_factory=dict)  # the last epoch's record

    def update(self, epoch: int, record: dict[str, Any]) -> bool:
        """Take an epoch's record; True when a collapse begins at this epoch (warn then, once)."""
        self.last = record
        kind = record.get("collapse")
        if kind is None:
            self.streak_start, self.kind = None, None
            return False
        self.epochs += 1
        self.kind = kind
        if self.first_epoch is None:
            self.first_epoch = epoch
        begins = self.streak_start is None
        if begins:
            self.streak_start = epoch
        return begins

    def restored(self) -> None:
        """The guard put the last healthy prompt back: the run is no longer in its collapse."""
        self.restores += 1
        self.streak_start, self.kind = None, None

    @classmethod
    def from_log(cls, records: list[dict[str, Any]]) -> "CollapseTracker":
        """Rebuild the tracker of a resumed run from the epoch lines its log kept."""
        tracker = cls()
        for rec in sorted((r for r in records if r.get("event") == "epoch"), key=lambda r: r["epoch"]):
            tracker.update(rec["epoch"], rec)
            if rec.get("guard"):
                tracker.restored()
        return tracker

    def summary(self, lr_scale: float = 1.0) -> dict[str, Any]:
        """What metrics.json records (epochs counted from 1)."""
        last = self.last
        return {
            "collapsed_at_epoch": None if self.streak_start is None else self.streak_start + 1,
            "kind": self.kind,
            "first_collapse_epoch": None if self.first_epoch is None else self.first_epoch + 1,
            "collapsed_epochs": self.epochs,
            "recovered": self.first_epoch is not None and self.streak_start is None,
            "guard_restores": self.restores, "lr_scale": lr_scale,
            **{k: last[k] for k in ("saturated_share", "saturated_clean", "saturated_noisy", "pred_classes",
                                    "dominant_share", "pred_entropy", "loss_train", "loss_one_class",
                                    "pred_classes_val", "pred_classes_test") if k in last},
        }


def warning_line(kind: str, epoch: int, record: dict[str, Any], guard: bool) -> str:
    """The one line a run logs when a collapse begins."""
    what = (f"{kind} at epoch {epoch + 1}: {record['dominant_share']:.0%} of the training samples predicted as "
            f"one class, {record['saturated_share']:.0%} with no gradient left (loss {record['loss_train']:.3f}, "
            f"one-class value {record['loss_one_class']:.3f})")
    if guard:
        return what + "; --collapse-guard restores the last healthy prompt and halves the learning rate"
    fix = "it cannot recover: no gradient is left" if kind == KINDS[0] else "it may still recover"
    return what + f"; {fix} (a smaller --lr, or --collapse-guard)"
