"""Contrastive pretraining of a small CLIP: a stand-in prior where real CLIP weights cannot be downloaded.

CLIP's symmetric InfoNCE over image-caption pairs, captions drawn from several templates per class. Pairs of
the same class are both positives (a batch of class captions has duplicates), so the targets spread
uniformly over them rather than pretending a same-class caption is a negative. The logit scale is held at
CLIP's clamp value (100) so that the first softmax of DSPT sees the sharp logits it sees on real CLIP.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Captions that say what the image is: handwriting.
DOMAIN_TEMPLATES = ("a handwritten {}.", "digit {}.", "the number {}.", "{} written by hand.")
#: Generic web-style captions: CLIP's pretraining saw "a photo of a ..." everywhere.
GENERIC_TEMPLATES = ("a photo of a {}.", "{}.", "a picture of a {}.", "an image of {}.")
CAPTION_TEMPLATES = DOMAIN_TEMPLATES + GENERIC_TEMPLATES


def template_weights(generic_share: float) -> tuple[float, ...]:
    """Sampling weights over CAPTION_TEMPLATES: `generic_share` of the captions are generic ones."""
    n_d, n_g = len(DOMAIN_TEMPLATES), len(GENERIC_TEMPLATES)
    return tuple([(1 - generic_share) / n_d] * n_d + [generic_share / n_g] * n_g)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Symmetric InfoNCE with every same-class pair counted as a positive."""
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_i = -(target * logits.log_softmax(dim=1)).sum(1).mean()
    loss_t = -(target * logits.t().log_softmax(dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


class _BackboneView:
    """The one attribute TextEncoder reads from a Backbone."""

    def __init__(self, model: torch.nn.Module):
        self.model = model


def pretrain_clip(
    model: torch.nn.Module,
    tokenizer,
    images: torch.Tensor,
    labels: np.ndarray,
    classnames: list[str],
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    logit_scale: float = 100.0,
    start_scale: float = 10.0,
    templates: tuple[str, ...] = CAPTION_TEMPLATES,
    weights: tuple[float, ...] | None = None,
    augment=None,
    progress: bool = True,
) -> list[float]:
    """Train `model` in place on (normalised image tensors, class labels); returns the loss per epoch.

    Each image gets a caption of its class drawn afresh every step from `templates` (uniformly, or by
    `weights`).
    The scale rises geometrically from `start_scale` to `logit_scale` over the first half of the steps
    (starting at 100 from random weights collapses to uniform predictions) and is saved at `logit_scale`.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    from .prompt import TextEncoder, eos_positions, text_parts

    captions = [[t.format(c) for t in templates] for c in classnames]
    tokens = tokenizer([cap for caps in captions for cap in caps])  # [C * T, L]: each distinct caption once
    eos = eos_positions(tokens, model)
    n_t = len(templates)
    probs = torch.ones(n_t) if weights is None else torch.as_tensor(weights, dtype=torch.float)
    if probs.shape != (n_t,) or not bool((probs >= 0).all()) or float(probs.sum()) <= 0:
        raise ValueError(f"template weights must be {n_t} non-negative numbers with a positive sum, got {weights}")
    encoder = TextEncoder(_BackboneView(model))
    y = torch.as_tensor(labels, dtype=torch.long)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.logit_scale.requires_grad_(False)
    # The captions use a few dozen of the 49k tokens: training the whole embedding table only costs time.
    text_parts(model).token_embedding.weight.requires_grad_(False)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    steps = max(1, epochs * math.ceil(len(y) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history = []
    step = 0
    for _ in tqdm(range(epochs), desc="pretrain miniature CLIP", disable=not progress, leave=False):
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for s in range(0, len(y), batch_size):
            idx = perm[s:s + batch_size]
            x = images[idx]
            if augment is not None:
                x = augment(x, gen)
            choice = torch.multinomial(probs, len(idx), replacement=True, generator=gen)
            text = encoder(text_parts(model).token_embedding(tokens), eos)  # causal: cut after the last EOS
            frac = min(1.0, step / max(1, steps // 2))
            scale = start_scale * (logit_scale / start_scale) ** frac
            loss = contrastive_loss(model.encode_image(x), text[y[idx] * n_t + choice], y[idx], scale)
            step += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / len(y))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return history
