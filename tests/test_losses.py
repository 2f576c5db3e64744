"""Tests of dspt.losses: each loss against an independent float64 formula, DSPT's gradient,
bounds and saturation, numerical safety under extreme logits and autocast, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dspt.losses import LOSSES, get_loss, loss_names, register_loss

EXPECTED = ["ce", "dspt", "mae", "gce", "sce", "nce_rce", "ls", "bootstrap", "logitnorm",
            "logitclip"]


# ----------------------------------------------------------------------------------------------
# independent float64 references (numpy only)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def _log_softmax(a: np.ndarray) -> np.ndarray:
    return a - _logsumexp(a)[:, None]


def _ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -_log_softmax(z)[np.arange(len(y)), y]


def _py(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))[np.arange(len(y)), y]


def ref_dspt(z, y):
    p = np.exp(_log_softmax(z))
    # -log q_y with q = softmax(p): log-sum-exp of the probabilities minus p_y
    return _logsumexp(p) - p[np.arange(len(y)), y]


def ref_loss(name: str, z: np.ndarray, y: np.ndarray, **hp) -> np.ndarray:
    if name == "ce":
        return _ce(z, y)
    if name == "dspt":
        return ref_dspt(z, y)
    if name == "mae":
        return hp.get("scale", 1.0) * (1 - _py(z, y))
    if name == "gce":
        q = hp.get("q", 0.7)
        return (1 - _py(z, y) ** q) / q
    if name == "sce":
        a, b, A = hp.get("alpha", 0.1), hp.get("beta", 1.0), hp.get("A", -4.0)
        p = np.exp(_log_softmax(z))
        log_onehot = np.full_like(p, A)
        log_onehot[np.arange(len(y)), y] = 0.0
        rce = -(p * log_onehot).sum(axis=1)
        return a * _ce(z, y) + b * rce
    if name == "nce_rce":
        a, b, A = hp.get("alpha", 10.0), hp.get("beta", 0.1), hp.get("A", math.log(1e-4))
        lp = _log_softmax(z)
        nce = -lp[np.arange(len(y)), y] / -lp.sum(axis=1)
        return a * nce + b * (-A) * (1 - _py(z, y))
    if name == "ls":
        eps = hp.get("eps", 0.1)
        c = z.shape[1]
        target = np.full_like(z, eps / c)
        target[np.arange(len(y)), y] += 1 - eps
        return -(target * _log_softmax(z)).sum(axis=1)
    if name == "bootstrap":
        beta = hp.get("beta", 0.95)
        lp = _log_softmax(z)
        p = np.exp(lp)
        onehot = np.zeros_like(z)
        onehot[np.arange(len(y)), y] = 1
        return -((beta * onehot + (1 - beta) * p) * lp).sum(axis=1)
    if name == "logitnorm":
        tau = hp.get("tau", 0.04)
        return _ce(z / (tau * np.linalg.norm(z, axis=1, keepdims=True)), y)
    if name == "logitclip":
        tau = hp.get("tau", 0.01)
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        return _ce(np.where(norm > 1 / tau, z / (norm * tau), z), y)
    raise KeyError(name)


def _batch(b: int, c: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return z, y


def closed_form_dspt_grad(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_m (q_m - [m=y] - <p,q> + p_y), per sample (no batch averaging)."""
    p = torch.softmax(z, -1)
    q = torch.softmax(p, -1)
    onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
    p_y = p.gather(1, y[:, None])
    pq = (p * q).sum(-1, keepdim=True)
    return p * (q - onehot - pq + p_y)


def per_sample_grad(loss_name: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of each sample's own loss w.r.t. its logits (rows independent)."""
    z = z.clone().requires_grad_(True)
    get_loss(loss_name).per_sample(z, y).sum().backward()
    return z.grad


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_names():
    assert loss_names()[:2] == ["ce", "dspt"]
    assert set(EXPECTED) <= set(loss_names())
    assert set(LOSSES) == set(loss_names())
    for name in EXPECTED:
        assert isinstance(get_loss(name), torch.nn.Module)


def test_defaults_exposed_as_keywords():
    assert get_loss("gce").q == 0.7
    assert get_loss("gce", q=0.5).q == 0.5
    sce = get_loss("sce")
    assert (sce.alpha, sce.beta, sce.A) == (0.1, 1.0, -4.0)
    assert get_loss("nce_rce").hparams() == {"alpha": 10.0, "beta": 0.1, "A": math.log(1e-4)}
    assert get_loss("ls").eps == 0.1
    assert get_loss("bootstrap").beta == 0.95
    assert get_loss("logitnorm").tau == 0.04
    assert get_loss("logitclip").tau == 0.01
    assert get_loss("mae").scale == 1.0
    assert get_loss("dspt").hparams() == {}
    assert get_loss("NCE-RCE").name == "nce_rce"  # case and dash tolerated


def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError, match=r"unknown loss 'x'; choose one of: ce, dspt, "):
        get_loss("x")


@pytest.mark.parametrize("name,hp,needle", [
    ("gce", {"q": 0.0}, r"q=0.0 .*\(0, 1\]"),
    ("gce", {"q": 1.5}, r"q=1.5 .*\(0, 1\]"),
    ("gce", {"q": -0.7}, r"\bq\b.*\(0, 1\]"),
    ("gce", {"q": float("nan")}, r"\bq\b.*\(0, 1\]"),
    ("gce", {"q": "abc"}, r"\bq\b.*\(0, 1\]"),
    ("ls", {"eps": 1.0}, r"eps.*\[0, 1\)"),
    ("ls", {"eps": -0.1}, r"eps.*\[0, 1\)"),
    ("bootstrap", {"beta": 1.2}, r"beta.*\[0, 1\]"),
    ("logitnorm", {"tau": 0.0}, r"tau.*\(0, inf\)"),
    ("logitclip", {"tau": -1.0}, r"tau.*\(0, inf\)"),
    ("sce", {"alpha": -1.0}, r"alpha.*\[0, inf\)"),
    ("sce", {"A": 1.0}, r"\bA\b.*\(-inf, 0\)"),
    ("nce_rce", {"beta": float("inf")}, r"beta.*\[0, inf\)"),
    ("mae", {"scale": 0.0}, r"scale.*\(0, inf\)"),
])
def test_bad_hyperparameter_names_it_and_range(name, hp, needle):
    with pytest.raises(ValueError, match=needle):
        get_loss(name, **hp)


def test_unknown_hyperparameter():
    with pytest.raises(ValueError, match=r"gamma.*gce.*takes: q"):
        get_loss("gce", gamma=2.0)
    with pytest.raises(ValueError, match=r"temperature.*dspt.*no hyperparameters"):
        get_loss("dspt", temperature=1.0)


def test_register_loss_decorator_and_duplicates():
    from dspt.losses import ClassificationLoss

    @register_loss("_test_zero")
    class Zero(ClassificationLoss):
        def _per_sample(self, z, y):
            return z.sum(-1) * 0

    try:
        z, y = _batch(4, 3, 1.0, 0)
        assert get_loss("_test_zero")(z, y).item() == 0.0
        with pytest.raises(ValueError, match="already registered"):
            register_loss("_test_zero")(Zero)
    finally:
        del LOSSES["_test_zero"]


# ----------------------------------------------------------------------------------------------
# DSPT: value, gradient, bounds, saturation


@pytest.mark.parametrize("c", [2, 3, 10, 100, 1000])
@pytest.mark.parametrize("scale", [0.1, 1.0, 14.0, 100.0])
def test_dspt_matches_float64_formula(c, scale):
    z, y = _batch(64, c, scale, seed=c)
    got = get_loss("dspt").per_sample(z, y).double().numpy()
    ref = ref_dspt(z.numpy(), y.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    mean = get_loss("dspt")(z, y).item()
    assert math.isclose(mean, ref.mean(), rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("c", [2, 5, 50])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_dspt_gradient_closed_form(c, scale):
    z, y = _batch(16, c, scale, seed=7 * c)
    closed = closed_form_dspt_grad(z, y) / z.shape[0]  # mean reduction

    # the formula itself in float64
    z64 = z.clone().requires_grad_(True)
    F.cross_entropy(F.softmax(z64, -1), y).backward()
    torch.testing.assert_close(z64.grad, closed, rtol=1e-9, atol=1e-12)

    # the registered module (computes in float32 by design)
    zm = z.clone().requires_grad_(True)
    get_loss("dspt")(zm, y).backward()
    assert zm.grad.dtype == torch.float64
    torch.testing.assert_close(zm.grad, closed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("c", [2, 3, 10, 100])
def test_dspt_bounds(c):
    upper = math.log(c - 1 + math.e)
    lower = upper - 1
    g = torch.Generator().manual_seed(c)
    extreme = torch.zeros(2 * c, c)
    extreme[torch.arange(c), torch.arange(c)] = 1e4      # confident in class i
    extreme[c + torch.arange(c), torch.arange(c)] = -1e4  # confident against class i
    rows = [extreme, torch.zeros(3, c)]
    for scale in (0.01, 1.0, 10.0, 100.0, 1e4):
        rows.append(torch.randn(200, c, generator=g) * scale)
    z = torch.cat(rows)
    y = torch.randint(0, c, (z.shape[0],), generator=g)
    y[: c] = torch.arange(c)  # include exactly-correct confident rows (the lower bound)
    loss = get_loss("dspt").per_sample(z, y).double()
    assert torch.isfinite(loss).all()
    assert (loss >= lower - 1e-5).all() and (loss <= upper + 1e-5).all()
    # both bounds are attained: confident correct -> lower, confident wrong -> upper
    assert loss[:c].sub(lower).abs().max() < 1e-5
    zw = torch.zeros(1, c)
    zw[0, (0 + 1) % c] = 1e4
    assert abs(get_loss("dspt")(zw, torch.tensor([0])).item() - upper) < 1e-5
    # batch size 1 agrees with the per-sample value
    assert abs(get_loss("dspt")(z[:1], y[:1]).item() - loss[0].item()) < 1e-6


@pytest.mark.parametrize("c", [10, 100])
def test_dspt_saturation_zone(c):
    y = torch.tensor([0])
    # confident in a wrong class, as CLIP logits at scale 100 (cosine gap 0.3)
    wrong = torch.zeros(1, c, dtype=torch.float64)
    wrong[0, 3] = 30.0
    g_dspt = per_sample_grad("dspt", wrong, y).norm()
    g_ce = per_sample_grad("ce", wrong, y).norm()
    assert g_ce > 1.3  # ~sqrt(2)
    assert g_dspt < 0.01 * g_ce
    # confident correct: ~0 gradient
    right = torch.zeros(1, c, dtype=torch.float64)
    right[0, 0] = 30.0
    assert per_sample_grad("dspt", right, y).norm() < 1e-9
    # uncertain (flat) sample: keeps a gradient, 1/C of cross-entropy's
    flat = torch.zeros(1, c, dtype=torch.float64)
    g_flat = per_sample_grad("dspt", flat, y)
    g_flat_ce = per_sample_grad("ce", flat, y)
    assert g_flat.norm() > 1e-3
    torch.testing.assert_close(g_flat, g_flat_ce / c, rtol=1e-5, atol=1e-8)


def test_dspt_gradient_vanishes_like_p_y():
    c = 10
    y = torch.tensor([0])
    norms, pys = [], []
    for gap in (10.0, 15.0, 20.0, 30.0):
        z = torch.zeros(1, c, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            z[0, 1] = gap
        F.cross_entropy(F.softmax(z, -1), y).backward()  # the formula, in float64
        norms.append(z.grad.norm().item())
        pys.append(torch.softmax(z, -1)[0, 0].item())
    ratios = [n / p for n, p in zip(norms, pys)]
    assert max(ratios) / min(ratios) < 1.01  # gradient norm proportional to p_y
    # the float32 module keeps it at rounding level (~1e-7), far below CE's ~sqrt(2)
    z = torch.zeros(1, c)
    z[0, 1] = 30.0
    assert per_sample_grad("dspt", z, y).norm() < 1e-6


def test_dspt_prediction_unchanged():
    z, _ = _batch(32, 10, 5.0, 3)
    p = torch.softmax(z, -1)
    assert torch.equal(torch.softmax(p, -1).argmax(-1), z.argmax(-1))


# ----------------------------------------------------------------------------------------------
# every registered loss


HP_VARIANTS = {
    "mae": [{"scale": 2.0}],
    "gce": [{"q": 0.3}, {"q": 1.0}],
    "sce": [{"alpha": 0.5, "beta": 0.7, "A": -9.21}],
    "nce_rce": [{"alpha": 1.0, "beta": 1.0, "A": -4.0}],
    "ls": [{"eps": 0.0}, {"eps": 0.5}],
    "bootstrap": [{"beta": 0.8}],
    "logitnorm": [{"tau": 1.0}],
    "logitclip": [{"tau": 1.0}, {"tau": 0.1}, {"tau": 10.0}],
}
CASES = [(n, {}) for n in EXPECTED] + [(n, hp) for n, v in HP_VARIANTS.items() for hp in v]


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{hp}" for n, hp in CASES])
@pytest.mark.parametrize("scale", [0.5, 5.0])
def test_each_loss_matches_float64_formula(name, hp, scale):
    z, y = _batch(48, 7, scale, seed=11)
    loss = get_loss(name, **hp)
    got = loss.per_sample(z, y).double().numpy()
    ref = ref_loss(name, z.numpy(), y.numpy(), **hp)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    mean = loss(z, y)
    assert mean.dim() == 0 and mean.dtype == torch.float32
    assert math.isclose(mean.item(), ref.mean(), rel_tol=2e-5, abs_tol=2e-5)


@pytest.mark.parametrize("name", EXPECTED)
def test_each_loss_finite_under_extreme_logits(name):
    g = torch.Generator().manual_seed(0)
    c = 10
    z = torch.sign(torch.randn(64, c, generator=g)) * 1e4
    z[0] = 1e4                 # all equal and huge
    z[1] = -1e4
    z[2] = 0.0
    z[3, :] = -1e4
    z[3, 5] = 1e4              # confident, label elsewhere
    y = torch.randint(0, c, (64,), generator=g)
    y[3] = 0
    for dtype in (torch.float32, torch.float64, torch.float16):
        # all-zero logits (row 2) are a singular point of logitnorm (z / ||z||): its float32
        # gradient there is finite but beyond float16's range, so float16 skips that row
        zd = z if dtype != torch.float16 else torch.cat([z[:2], z[3:]])
        yd = y if dtype != torch.float16 else torch.cat([y[:2], y[3:]])
        zz = zd.to(dtype).detach().requires_grad_(True)
        out = get_loss(name)(zz, yd)
        assert torch.isfinite(out), (name, dtype)
        out.backward()
        assert torch.isfinite(zz.grad).all(), (name, dtype)


@pytest.mark.parametrize("name", EXPECTED)
def test_each_loss_float32_under_autocast(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 5)
    x = torch.randn(8, 16)
    y = torch.randint(0, 5, (8,))
    loss_fn = get_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        out = loss_fn(logits, y)
        per = loss_fn.per_sample(logits, y)
    assert out.dtype == torch.float32 and per.dtype == torch.float32
    # identical to the computation on the same bf16 values outside autocast
    ref = loss_fn(logits.detach().float(), y)
    assert torch.equal(out.detach(), ref)
    out.backward()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0
    # bf16 logits given directly, autocast on: still float32 and finite
    with torch.autocast("cpu", dtype=torch.bfloat16):
        extreme = (torch.randn(8, 5) * 1e4).bfloat16()
        out2 = loss_fn(extreme, y)
    assert out2.dtype == torch.float32 and torch.isfinite(out2)


@pytest.mark.parametrize("name", EXPECTED)
def test_each_loss_reaches_its_minimum_on_correct_confident(name):
    """Sanity: a confident correct prediction scores no worse than a confident wrong one."""
    c = 6
    y = torch.arange(c)
    right = torch.eye(c) * 20
    wrong = torch.roll(torch.eye(c), 1, dims=1) * 20
    loss = get_loss(name)
    assert loss(right, y) < loss(wrong, y)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        get_loss("dspt")(torch.zeros(5), torch.zeros(5, dtype=torch.long))


def test_logitclip_default_fits_clip_logits():
    """tau 0.01 clips at norm 100: CLIP-like logits (100 x cos, cos ~0.25) are left alone at 10 classes
    (norm ~80) and clipped to norm 100 at 100 classes (norm ~250), not flattened to norm 1."""
    g = torch.Generator().manual_seed(0)
    for c, clipped in ((10, False), (100, True)):
        z = 100 * (0.25 + 0.03 * torch.randn(64, c, generator=g, dtype=torch.float64))
        y = torch.randint(0, c, (64,), generator=g)
        got = get_loss("logitclip").per_sample(z, y).double()
        ce = F.cross_entropy(z, y, reduction="none")
        if clipped:
            at_100 = F.cross_entropy(100 * z / z.norm(dim=1, keepdim=True), y, reduction="none")
            torch.testing.assert_close(got, at_100, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, ce, rtol=1e-3)
        else:
            torch.testing.assert_close(got, ce, rtol=1e-5, atol=1e-5)
