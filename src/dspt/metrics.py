"""Evaluation on cached features: accuracy, per-class accuracy, memorisation of wrong labels, gradients.

'Robust' must not be confused with 'inert' (a prompt that never moves cannot memorise a wrong label), so
beside accuracy we measure whether the model learns (gain over zero-shot), whether it memorises wrong labels,
and per-sample gradient norms.
"""
from __future__ import annotations

import numpy as np
import torch


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(pred == labels)) if len(labels) else float("nan")


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, classnames: list[str]) -> dict[str, float]:
    return {name: accuracy(pred[labels == c], labels[labels == c])
            for c, name in enumerate(classnames) if np.any(labels == c)}


def predict(image_features: torch.Tensor, text_features: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    """argmax over classes; the logit scale and the second softmax do not change it."""
    out = []
    tf = text_features.to(image_features.device)
    for i in range(0, len(image_features), chunk):
        out.append((image_features[i:i + chunk] @ tf.t()).argmax(-1).cpu())
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.int64)


def memorisation(pred: np.ndarray, given: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """On the training set: of the mislabeled samples, the % predicted as their wrong given label
    (memorised) and as their true class (corrected); of the clean ones, the % predicted correctly."""
    noisy = given != true
    return {
        "memorised": accuracy(pred[noisy], given[noisy]) if noisy.any() else float("nan"),
        "corrected": accuracy(pred[noisy], true[noisy]) if noisy.any() else float("nan"),
        "clean_fit": accuracy(pred[~noisy], true[~noisy]) if (~noisy).any() else float("nan"),
    }


def logit_gradient_norms(logits: torch.Tensor, labels: torch.Tensor, loss_fn: torch.nn.Module) -> torch.Tensor:
    """Per-sample ||dL_i/dz_i|| (the paper's gradient-suppression diagnostic)."""
    z = logits.detach().float().requires_grad_(True)
    per_sample = loss_fn.per_sample(z, labels) if hasattr(loss_fn, "per_sample") else None
    if per_sample is None:
        raise ValueError("loss has no per-sample form")
    (grad,) = torch.autograd.grad(per_sample.sum(), z)
    return grad.norm(dim=-1)


def mean_confidence(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> float:
    """Mean top-class probability of softmax(scale * cos): how sure the classifier is. With a fixed logit scale,
    the only way a shared prompt can lower it is to pull the class text features together, so it explains a
    text cosine near 1 (an overconfident prior tuned with cross-entropy does exactly that)."""
    if len(image_features) == 0:
        return float("nan")
    z = logit_scale * (image_features.float() @ text_features.to(image_features.device).float().t())
    return float(100.0 * torch.softmax(z, -1).max(-1).values.mean())

