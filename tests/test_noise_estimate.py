"""The estimated share of wrong labels that sizes an audit's flags: both estimators on inputs whose share is
known, the bootstrap interval, the exact flag count, and the in-sample score a run records."""
from __future__ import annotations

import numpy as np
import pytest

from dspt.noise_estimate import (Reference, clean_reading, estimate_noise_rate, fit_temperature, flag_top,
                                 transition_em)


def _scores(n: int, rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """p(given) of a separable case: wrong labels low, right ones high (logit-normal)."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < rate
    logit = np.where(wrong, rng.normal(-2.5, 0.8, n), rng.normal(2.0, 0.8, n))
    return 1 / (1 + np.exp(-logit)), wrong


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_mixture_recovers_a_separable_share_and_its_interval_covers_it(rate):
    score, wrong = _scores(3000, rate)
    e = estimate_noise_rate(score, method="mixture", bootstrap=100)
    assert abs(e.rate - wrong.mean()) < 0.02 and e.low <= wrong.mean() <= e.high
    assert e.high - e.low < 0.06 and e.method == "mixture" and e.images == 3000
    assert "bootstrap interval" in e.text()


def test_confident_joint_recovers_symmetric_noise_of_confident_probabilities():
    rng = np.random.default_rng(1)
    n, c = 2000, 4
    true = rng.integers(0, c, n)
    flip = rng.random(n) < 0.3
    given = np.where(flip, (true + rng.integers(1, c, n)) % c, true)
    probs = np.full((n, c), 0.02)
    probs[np.arange(n), true] = 1 - 0.02 * (c - 1)  # a model that knows the true class
    e = estimate_noise_rate(probs[np.arange(n), given], given, probs, method="confident_joint", bootstrap=50)
    assert abs(e.rate - flip.mean()) < 0.02 and e.low <= flip.mean() <= e.high


def test_same_seed_same_interval_and_unknown_estimator_is_refused():
    score, _ = _scores(500, 0.3, seed=2)
    a = estimate_noise_rate(score, bootstrap=40, seed=0)
    assert a == estimate_noise_rate(score, bootstrap=40, seed=0)
    with pytest.raises(ValueError, match="unknown; choose one of: reference, mixture, confident_joint"):
        estimate_noise_rate(score, method="guess")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _world(n: int, k: int, rate: float, kind: str, seed: int, scale: float = 1.5, temperature: float = 2.0):
    """Images whose true class is drawn from softmax(z); labels flipped at `rate` (sym: to another class at
    random; pair: to the next class); the classifier's logits are z * temperature (miscalibrated)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, k))
    p = _softmax(z)
    true = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    flip = rng.random(n) < rate
    shift = rng.integers(1, k, n) if kind == "sym" else np.ones(n, dtype=np.int64)
    return z * temperature, true, np.where(flip, (true + shift) % k, true)


def test_temperature_is_recovered_from_labels_drawn_at_it():
    logits, true, _ = _world(20000, 6, 0.0, "sym", seed=3, temperature=2.5)  # labels ~ softmax(logits / 2.5)
    assert abs(fit_temperature(logits, true) - 2.5) < 0.1


def test_em_with_a_classifier_that_knows_the_true_class_gives_the_realised_share_and_confusion():
    """One-hot probabilities: the posterior is the true class whatever T, so the share is the realised one exactly
    and T is the confusion matrix of (true, given) counts plus the smoothing."""
    rng = np.random.default_rng(4)
    n, k = 1000, 4
    true = rng.integers(0, k, n)
    given = np.where(rng.random(n) < 0.3, (true + 1) % k, true)
    t, clean = transition_em(np.eye(k)[true], given, smoothing=0.0)
    assert np.array_equal(clean, (true == given).astype(float))
    confusion = np.zeros((k, k))
    np.add.at(confusion, (true, given), 1)
    assert np.allclose(t, confusion / confusion.sum(1, keepdims=True))


def test_em_ends_at_the_maximum_likelihood_transition_matrix():
    """The likelihood is concave in T: no random row-stochastic matrix, and no small move from the result along
    the simplex, has a higher log-likelihood."""
    logits, _, given = _world(600, 3, 0.3, "pair", seed=5)
    q = _softmax(logits / 2.0)
    t, _ = transition_em(q, given, smoothing=0.0, iterations=5000, tol=1e-12)

    def ll(m):
        return float(np.log((q * m[:, given].T).sum(1)).sum())

    best = ll(t)
    rng = np.random.default_rng(6)
    for _ in range(200):
        assert ll(rng.dirichlet(np.ones(3), size=3)) <= best + 1e-9
        step = rng.normal(0, 1e-3, (3, 3))
        moved = np.clip(t + step - step.mean(1, keepdims=True), 1e-12, None)
        assert ll(moved / moved.sum(1, keepdims=True)) <= best + 1e-6


@pytest.mark.parametrize("kind", ["sym", "pair"])
@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_reference_estimator_follows_the_true_share_of_a_calibratable_classifier(kind, rate):
    """Miscalibrated logits (x2), calibrated on clean reference labels, then EM over T: sym and pair noise alike."""
    logits, true, given = _world(4000, 10, rate, kind, seed=7)
    ref_logits, ref_labels, _ = _world(2000, 10, 0.0, kind, seed=8)
    e = estimate_noise_rate(np.ones(len(given)), given, method="reference", bootstrap=20,
                            reference=Reference(logits, ref_logits, ref_labels))
    assert abs(e.rate - float((true != given).mean())) < 0.05, e
    assert e.low <= e.rate <= e.high and e.identified and e.reliable and e.method == "reference"


def test_the_clean_reading_tells_a_calibratable_classifier_from_a_confidently_wrong_one():
    """What `reference` reads among right labels: small for a classifier one temperature calibrates, large for one
    that is confidently wrong on half the images (the second: the same logits, true and another class's logit
    swapped on a seeded half); an estimate reading above CLEAN_READING is not reliable."""
    from dspt.noise_estimate import CLEAN_READING

    logits, true, _ = _world(2000, 10, 0.0, "sym", seed=8)
    good = clean_reading(logits, true)
    rng = np.random.default_rng(1)
    rows = np.arange(len(true))
    other = (true + rng.integers(1, 10, len(true))) % 10
    swap = rng.random(len(true)) < 0.5
    bad_logits = logits * 1.5
    a, b = bad_logits[rows, true].copy(), bad_logits[rows, other].copy()
    bad_logits[rows[swap], true[swap]], bad_logits[rows[swap], other[swap]] = b[swap], a[swap]
    bad = clean_reading(bad_logits, true)
    assert good < 0.1 < CLEAN_READING < 0.2 < bad, (good, bad)
    e = estimate_noise_rate(np.ones(len(true)), true, method="reference", bootstrap=5,
                            reference=Reference(bad_logits, bad_logits, true))
    assert e.clean_reading == bad and e.identified and not e.reliable and "UNRELIABLE" in e.text()


def test_reference_estimator_says_when_its_classifier_cannot_pin_the_share():
    """A classifier that knows nothing (constant logits): every T explains the labels equally, EM stays near its
    start, and the estimate says it is not identified, its interval spanning both starts."""
    rng = np.random.default_rng(9)
    given = rng.integers(0, 5, 500)
    flat = np.zeros((500, 5))
    e = estimate_noise_rate(np.ones(500), given, method="reference", bootstrap=10,
                            reference=Reference(flat, np.zeros((100, 5)), rng.integers(0, 5, 100)))
    assert not e.identified and "NOT IDENTIFIED" in e.text()
    assert e.low <= min(e.starts) and e.high >= max(e.starts) and abs(e.starts[1] - e.starts[0]) > 0.3
    with pytest.raises(ValueError, match="needs the classifier's logits"):
        estimate_noise_rate(np.ones(500), given, method="reference")


def test_flags_are_the_lowest_scores_and_exactly_as_many_as_the_share_says():
    score = np.array([0.9, 0.1, 0.5, 0.1, 0.8, 0.3])
    flags = flag_top(score, 0.5)
    assert flags.sum() == 3 and flags.tolist() == [False, True, False, True, False, True]
    assert flag_top(score, 0.0).sum() == 0 and flag_top(score, 1.0).all()


def test_a_run_records_each_images_in_sample_probability_of_its_given_label(tmp_path):
    """One epoch: the in-sample average is the probability of the given label under the final prompt."""
    import pandas as pd
    import torch
    from imagefolders import make_split_folders

    from dspt.config import RunConfig
    from dspt.train import load_prompt, prepare, train

    data = make_split_folders(tmp_path / "d", classes=3, train=6, test=2)
    cfg = RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=0, views=1, n_ctx=4, epochs=1,
                    noise="sym", noise_rate=0.3, seed=0, device="cpu", cache_dir=str(tmp_path / "cache"),
                    output=str(tmp_path / "run"), progress=False)
    train(cfg)
    got = pd.read_csv(tmp_path / "run" / "in_sample.csv")["mean_given_prob"].to_numpy()
    p = prepare(cfg.resolved())
    clf = load_prompt(tmp_path / "run", backbone=p.backbone)
    with torch.no_grad():
        logits = p.backbone.logit_scale * p.train_feats[0] @ clf.text_features().t()
        want = torch.softmax(logits.double(), -1)[torch.arange(len(got)), torch.as_tensor(p.labels.given)].numpy()
    assert len(got) == 18 and np.allclose(got, want, atol=1e-5)


def test_dual_prompt_loss_and_clean_probability_against_their_formulas():
    """float64 reference: the binary term averages the given class's and the other classes' BCE separately;
    its gradient reaches both prompts."""
    import torch

    from dspt.methods.dualprompt import clean_probability, dual_loss

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    m = (pos - neg).detach().numpy()
    sig = 1 / (1 + np.exp(-m))
    own = np.mean([-np.log(sig[i, y[i]]) for i in range(5)])
    other = np.mean([-np.log(1 - sig[i, c]) for i in range(5) for c in range(4) if c != y[i]])
    got = dual_loss(pos, neg, y)
    assert abs(got.item() - (own + other)) < 1e-6
    got.backward()
    assert pos.grad.abs().sum() > 0 and torch.allclose(pos.grad, -neg.grad)
    p = clean_probability(pos.detach(), neg.detach(), y).numpy()
    assert np.allclose(p, sig[np.arange(5), y.numpy()], atol=1e-6)


def test_dualprompt_audit_scores_out_of_sample_with_both_prompts(tmp_path):
    from imagefolders import make_split_folders

    from dspt.audit import audit
    from dspt.config import RunConfig
    from dspt.errors import ConfigError

    data = make_split_folders(tmp_path / "d", classes=3, train=12, test=3)
    cfg = RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=0, views=1, n_ctx=4, epochs=3,
                    batch_size=8, noise="sym", noise_rate=0.25, loss="ce", method="dualprompt", seed=0, device="cpu",
                    cache_dir=str(tmp_path / "cache"), progress=False)
    res = audit(cfg, tmp_path / "audit", folds=3, review=False, score="dual_prompt_clean")
    t = res.table
    assert t["dual_prompt_clean"].between(0, 1).all() and t["dual_prompt_clean"].is_monotonic_increasing
    assert "dual_prompt_clean" in res.metrics and 0 <= res.metrics["dual_prompt_clean"]["auroc"] <= 1
    with pytest.raises(ConfigError, match="needs --method dualprompt"):
        audit(RunConfig(**{**cfg.to_dict(), "method": "plain"}), tmp_path / "x", folds=3, score="dual_prompt_clean")
