"""Tests of dspt.noise: exact flip counts, protocol semantics, seeding, transition matrix,
save/load and input validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dspt.noise import (NOISE_TYPES, NoisyLabels, flip_count, make_noisy_labels,
                        register_noise)


def _labels(n: int, c: int, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, size=n)


GRID = [(n, c, r) for n in (1, 7, 100, 1000) for c in (2, 3, 10) for r in (0.0, 0.125, 0.2, 0.5, 0.8)]


def _half_up(r: float, n: int) -> int:
    # written independently of flip_count: round half up via Decimal
    from decimal import ROUND_HALF_UP, Decimal
    return int((Decimal(repr(r)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("noise_type", ["sym", "pair"])
@pytest.mark.parametrize("n,c,r", GRID)
def test_exact_counts(noise_type, n, c, r):
    true = _labels(n, c)
    nl = make_noisy_labels(true, c, noise_type, r, seed=1)
    expected = _half_up(r, n)
    assert int(nl.is_noisy.sum()) == expected
    assert nl.realised_rate == expected / n
    assert np.array_equal(nl.true, true)
    assert nl.given.dtype == np.int64 and nl.true.dtype == np.int64
    assert ((nl.given >= 0) & (nl.given < c)).all()


def test_round_half_up_documented():
    assert flip_count(10, 0.25) == 3     # 2.5 -> 3 (Python's round would give 2)
    assert flip_count(10, 0.35) == 4     # 3.5 -> 4
    assert flip_count(4, 0.125) == 1     # 0.5 -> 1 (round() -> 0)
    assert flip_count(1000, 0.4) == 400
    assert flip_count(7, 0.0) == 0


def test_sym_never_keeps_true_class_and_is_spread():
    c, n = 10, 20000
    true = _labels(n, c)
    nl = make_noisy_labels(true, c, "sym", 0.6, seed=3)
    flipped = nl.is_noisy
    assert (nl.given[flipped] != nl.true[flipped]).all()
    assert (nl.given[~flipped] == nl.true[~flipped]).all()
    # the wrong label is uniform over the other C-1 classes: offsets 1..C-1 all about equally often
    offsets = (nl.given[flipped] - nl.true[flipped]) % c
    counts = np.bincount(offsets, minlength=c)
    assert counts[0] == 0
    expected = flipped.sum() / (c - 1)
    assert np.all(np.abs(counts[1:] - expected) < 5 * math.sqrt(expected))


def test_sym_binary_flips_to_the_other_class():
    true = _labels(500, 2)
    nl = make_noisy_labels(true, 2, "sym", 0.3, seed=0)
    assert np.array_equal(nl.given[nl.is_noisy], 1 - nl.true[nl.is_noisy])


def test_pair_maps_to_next_class():
    c = 5
    true = _labels(1000, c)
    nl = make_noisy_labels(true, c, "pair", 0.4, seed=2)
    f = nl.is_noisy
    assert np.array_equal(nl.given[f], (nl.true[f] + 1) % c)
    assert np.array_equal(nl.given[~f], nl.true[~f])
    assert (nl.true[f] == c - 1).any()  # wrap-around exercised: C-1 -> 0
    assert (nl.given[f & (nl.true == c - 1)] == 0).all()


def test_none_and_rate_zero_keep_labels():
    true = _labels(50, 4)
    for kind in ("none", "sym", "pair"):
        nl = make_noisy_labels(true, 4, kind, 0.0, seed=5)
        assert np.array_equal(nl.given, true)
        assert nl.realised_rate == 0.0 and not nl.is_noisy.any()
    with pytest.raises(ValueError, match="'none' takes rate 0"):
        make_noisy_labels(true, 4, "none", 0.4, seed=5)


@pytest.mark.parametrize("noise_type", ["sym", "pair"])
def test_seeding(noise_type):
    true = _labels(500, 10)
    a = make_noisy_labels(true, 10, noise_type, 0.4, seed=7)
    b = make_noisy_labels(true, 10, noise_type, 0.4, seed=7)
    c = make_noisy_labels(true, 10, noise_type, 0.4, seed=8)
    assert np.array_equal(a.given, b.given) and a == b
    assert not np.array_equal(a.given, c.given)
    # seed 0 is a real seed: works, is reproducible, and differs from seed 1
    z0 = make_noisy_labels(true, 10, noise_type, 0.4, seed=0)
    z0b = make_noisy_labels(true, 10, noise_type, 0.4, seed=0)
    s1 = make_noisy_labels(true, 10, noise_type, 0.4, seed=1)
    assert z0.seed == 0 and np.array_equal(z0.given, z0b.given)
    assert not np.array_equal(z0.given, s1.given)
    assert int(z0.is_noisy.sum()) == 200
    # numpy integer seeds are accepted
    assert make_noisy_labels(true, 10, noise_type, 0.4, seed=np.int64(7)) == a


def test_input_not_modified():
    true = _labels(100, 3)
    before = true.copy()
    nl = make_noisy_labels(true, 3, "sym", 0.5, seed=1)
    assert np.array_equal(true, before)
    nl.given[0] = (nl.given[0] + 1) % 3
    assert np.array_equal(true, before)


@pytest.mark.parametrize("noise_type", ["sym", "pair"])
def test_transition_matrix(noise_type):
    c = 6
    true = _labels(600, c)
    true[true == 4] = 3  # class 4 empty
    nl = make_noisy_labels(true, c, noise_type, 0.3, seed=4)
    t = nl.transition_matrix()
    assert t.shape == (c, c) and t.dtype == np.float64
    present = np.bincount(true, minlength=c) > 0
    np.testing.assert_allclose(t[present].sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (t[~present] == 0).all()
    for k in np.flatnonzero(present):
        in_k = nl.true == k
        flip_frac = nl.is_noisy[in_k].mean()
        assert math.isclose(t[k, k], 1 - flip_frac, abs_tol=1e-12)
    if noise_type == "pair":
        off = t.copy()
        np.fill_diagonal(off, 0)
        for k in range(c):
            nxt = (k + 1) % c
            assert off[k].sum() == pytest.approx(off[k, nxt])


def test_summary_json_serialisable():
    true = _labels(200, 4)
    nl = make_noisy_labels(true, 4, "sym", 0.25, seed=0)
    s = nl.summary()
    again = json.loads(json.dumps(s))
    assert again["noise_type"] == "sym" and again["rate"] == 0.25 and again["seed"] == 0
    assert again["n"] == 200 and again["n_noisy"] == 50
    assert again["realised_rate"] == 0.25
    np.testing.assert_array_equal(np.array(again["transition_matrix"]), nl.transition_matrix())


@pytest.mark.parametrize("noise_type,rate,seed", [("sym", 0.4, 0), ("pair", 0.2, 3), ("none", 0.0, 1)])
def test_save_load_round_trip(tmp_path, noise_type, rate, seed):
    true = _labels(300, 7)
    nl = make_noisy_labels(true, 7, noise_type, rate, seed=seed)
    path = tmp_path / "sub" / "noisy_labels.csv"
    nl.save(path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    lines = path.read_text().splitlines()
    assert lines[0] == "index,true,given,is_noisy" and len(lines) == 301
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["noise_type"] == noise_type and meta["seed"] == seed and meta["num_classes"] == 7
    back = NoisyLabels.load(path)
    assert back == nl
    assert np.array_equal(back.true, nl.true) and np.array_equal(back.given, nl.given)
    assert back.rate == rate and back.seed == seed and back.noise_type == noise_type
    assert back.given.dtype == np.int64
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["noisy_labels.csv", "noisy_labels.json"]
    # overwriting in place works (os.replace)
    nl2 = make_noisy_labels(true, 7, "sym", 0.5, seed=9)
    nl2.save(path)
    assert NoisyLabels.load(path) == nl2


def test_load_detects_inconsistency(tmp_path):
    nl = make_noisy_labels(_labels(20, 3), 3, "sym", 0.5, seed=1)
    path = tmp_path / "n.csv"
    nl.save(path)
    text = path.read_text().splitlines()
    i, t, g, f = text[1].split(",")
    text[1] = ",".join([i, t, g, "0" if f == "1" else "1"])
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="is_noisy"):
        NoisyLabels.load(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata"):
        NoisyLabels.load(path)
    with pytest.raises(ValueError, match=r"\.json"):
        nl.save(tmp_path / "x.json")


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match=r"noise rate .* \[0, 1\); pass a fraction such as 0.4"):
        make_noisy_labels(_labels(10, 3), 3, "sym", rate, seed=1)


def test_bad_rate_message_exact():
    with pytest.raises(ValueError) as e:
        make_noisy_labels(_labels(10, 3), 3, "sym", 1.5, seed=1)
    assert str(e.value) == "noise rate 1.5 is outside [0, 1); pass a fraction such as 0.4"


def test_bad_num_classes_and_labels():
    with pytest.raises(ValueError, match="num_classes"):
        make_noisy_labels(np.zeros(5, dtype=int), 1, "sym", 0.2, seed=1)
    with pytest.raises(ValueError, match=r"label 7 at index 2 is outside \[0, 5\)"):
        make_noisy_labels(np.array([0, 1, 7, 2]), 5, "sym", 0.2, seed=1)
    with pytest.raises(ValueError, match=r"label -1 .* outside \[0, 5\)"):
        make_noisy_labels(np.array([0, -1]), 5, "pair", 0.2, seed=1)
    with pytest.raises(ValueError, match="integer class indices"):
        make_noisy_labels(np.array([0.5, 1.0]), 5, "pair", 0.2, seed=1)
    with pytest.raises(ValueError, match="1-D"):
        make_noisy_labels(np.zeros((2, 2), dtype=int), 5, "pair", 0.2, seed=1)
    # plain Python lists and integral floats are fine
    nl = make_noisy_labels([0, 1, 2, 3], 4, "pair", 0.5, seed=1)
    assert nl.given.dtype == np.int64 and int(nl.is_noisy.sum()) == 2


def test_unknown_type_lists_choices():
    with pytest.raises(ValueError, match=r"unknown noise type 'asymm'; choose one of: none, sym, pair"):
        make_noisy_labels(_labels(10, 3), 3, "asymm", 0.2, seed=1)


def test_bad_seed():
    for seed in (-1, None, 1.5):
        with pytest.raises(ValueError, match="seed"):
            make_noisy_labels(_labels(10, 3), 3, "sym", 0.2, seed=seed)


def test_empty_labels():
    nl = make_noisy_labels(np.array([], dtype=np.int64), 3, "sym", 0.5, seed=1)
    assert len(nl) == 0 and nl.realised_rate == 0.0
    assert (nl.transition_matrix() == 0).all()


def test_register_noise_extension():
    @register_noise("_test_all_to_zero")
    def _all_zero(true, num_classes, rate, rng, target=0):
        given = true.copy()
        given[:] = target
        return given

    try:
        nl = make_noisy_labels(np.array([0, 1, 2]), 3, "_test_all_to_zero", 0.5, seed=0, target=2)
        assert nl.given.tolist() == [2, 2, 2] and nl.noise_type == "_test_all_to_zero"
        with pytest.raises(ValueError, match="already registered"):
            register_noise("_test_all_to_zero")(_all_zero)
    finally:
        del NOISE_TYPES["_test_all_to_zero"]
