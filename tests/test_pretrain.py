"""The demo's stand-in prior: CLIP's contrastive loss and caption sampling (the digits and their rendering:
tests/test_miniature.py)."""
import numpy as np
import pytest
import torch

from dspt.pretrain import (
    CAPTION_TEMPLATES,
    GENERIC_TEMPLATES,
    contrastive_loss,
    pretrain_clip,
    template_weights,
)


def _reference_loss(img: np.ndarray, txt: np.ndarray, labels: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE, same-class pairs as equal positives, in float64 with explicit loops."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = scale * img @ txt.T
    n = len(labels)
    total = 0.0
    for direction in (logits, logits.T):
        for i in range(n):
            row = direction[i]
            logz = np.log(np.exp(row - row.max()).sum()) + row.max()
            pos = [j for j in range(n) if labels[j] == labels[i]]
            total += -np.mean([row[j] - logz for j in pos]) / n
    return total / 2


def test_contrastive_loss_matches_float64_reference():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    labels = np.array([0, 1, 0, 2, 1, 0])
    got = contrastive_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(labels), 7.0).item()
    assert got == pytest.approx(_reference_loss(img, txt, labels, 7.0), rel=1e-6)  # targets are float32


def test_template_weights_give_the_generic_share():
    w = np.array(template_weights(0.3))
    assert len(w) == len(CAPTION_TEMPLATES) and w.sum() == pytest.approx(1.0)
    assert w[-len(GENERIC_TEMPLATES):].sum() == pytest.approx(0.3)
    assert "a photo of a {}." in GENERIC_TEMPLATES


def test_pretraining_lowers_the_loss_and_rejects_bad_weights():
    from dspt.backbone import load_backbone

    bb = load_backbone("dspt-tiny", init_seed=0)
    torch.manual_seed(0)
    labels = np.repeat(np.arange(4), 8)
    x = torch.randn(len(labels), 3, 32, 32) * 0.1 + torch.as_tensor(labels, dtype=torch.float)[:, None, None, None]
    names = ["zero", "one", "two", "three"]
    with pytest.raises(ValueError, match="template weights"):
        pretrain_clip(bb.model, bb.tokenizer, x, labels, names, epochs=1, weights=(1.0,), progress=False)
    history = pretrain_clip(bb.model, bb.tokenizer, x, labels, names, epochs=6, batch_size=16, lr=2e-3,
                            weights=template_weights(0.3), progress=False)
    assert history[-1] < history[0]
    assert not any(p.requires_grad for p in bb.model.parameters())  # frozen again, as prompt tuning expects

