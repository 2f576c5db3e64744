"""Metrics against hand computations and autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dspt.losses import get_loss
from dspt.metrics import accuracy, logit_gradient_norms, memorisation, per_class_accuracy, predict


def test_memorisation_counts_wrong_labels_predicted_as_given_or_true():
    true = np.array([0, 1, 2, 0, 1, 2])
    given = np.array([0, 2, 0, 0, 0, 2])  # samples 1, 2, 4 mislabeled
    pred = np.array([0, 2, 2, 1, 1, 2])  # 1: memorised; 2: corrected; 4: corrected; clean: 0 ok, 3 wrong, 5 ok
    m = memorisation(pred, given, true)
    assert m["memorised"] == pytest.approx(100 / 3) and m["corrected"] == pytest.approx(200 / 3)
    assert m["clean_fit"] == pytest.approx(200 / 3)
    clean = memorisation(pred, true, true)
    assert np.isnan(clean["memorised"]) and np.isnan(clean["corrected"])


def test_accuracy_and_per_class():
    labels, pred = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    assert accuracy(pred, labels) == pytest.approx(60.0)
    assert per_class_accuracy(pred, labels, ["a", "b", "c", "d"]) == {"a": 50.0, "b": 100.0, "c": 0.0}
    assert np.isnan(accuracy(np.array([]), np.array([])))


def test_predict_is_argmax_of_cosine_in_chunks():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    assert np.array_equal(predict(img, txt, chunk=4), (img @ txt.T).argmax(-1).numpy())


@pytest.mark.parametrize("loss", ["ce", "dspt"])
def test_gradient_norms_match_the_closed_form(loss):
    z = torch.randn(16, 6, dtype=torch.float64) * 5
    y = torch.randint(0, 6, (16,))
    norms = logit_gradient_norms(z.float(), y, get_loss(loss)).double()
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(y, 6).double()
    if loss == "ce":
        expected = (p - onehot).norm(dim=-1)
    else:  # dL/dz_m = p_m (q_m - [m=y] - <p,q> + p_y), q = softmax(p)
        q = torch.softmax(p, -1)
        py = p.gather(1, y[:, None])
        expected = (p * (q - onehot - (p * q).sum(-1, keepdim=True) + py)).norm(dim=-1)
    assert torch.allclose(norms, expected, atol=1e-5)


def test_mean_confidence_is_the_mean_top_class_probability():
    import torch

    from dspt.metrics import mean_confidence

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=-1)
    z = 30.0 * img.double() @ txt.double().t()
    p = torch.exp(z - z.max(-1, keepdim=True).values)
    want = float(100 * (p / p.sum(-1, keepdim=True)).max(-1).values.mean())
    assert abs(mean_confidence(img, txt, 30.0) - want) < 1e-4
    same = txt[:1].expand(3, 5)  # identical class features: every class equally likely
    assert abs(mean_confidence(img, same, 100.0) - 100 / 3) < 1e-4
