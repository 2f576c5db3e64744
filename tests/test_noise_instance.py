"""Instance-dependent noise (`--noise instance`): Xia et al.'s generator on image features, with an exact
flip count; seeding, dependence on the features, the recorded noise, and a tiny end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from imagefolders import make_image_folder, make_split_folders

from dspt.config import ConfigError, RunConfig
from dspt.noise import NoisyLabels, flip_count, instance_noise_model, make_noisy_labels
from dspt.seeds import stream_seeds


def _world(n: int, c: int, e: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, c, size=n), rng.normal(size=(n, e))


@pytest.mark.parametrize("n", [7, 50, 160, 1000])
@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("r", [0.0, 0.2, 0.4, 0.6, 0.8])
def test_exactly_round_rate_n_samples_flip_and_never_to_their_class(n, c, r):
    true, x = _world(n, c)
    nl = make_noisy_labels(true, c, "instance", r, seed=1, features=x)
    assert int(nl.is_noisy.sum()) == flip_count(n, r)
    if n >= 50:
        assert abs(nl.realised_rate - r) <= 0.01
    assert np.array_equal(nl.true, true) and nl.given.dtype == np.int64
    assert ((nl.given >= 0) & (nl.given < c)).all()
    flipped = nl.is_noisy
    assert (nl.given[flipped] != true[flipped]).all()  # a flipped label never stays the true class
    assert (nl.given[~flipped] == true[~flipped]).all()


def test_deterministic_for_a_seed_and_seed_zero_is_a_seed():
    true, x = _world(300, 10)
    draws = {s: make_noisy_labels(true, 10, "instance", 0.4, seed=s, features=x) for s in (0, 1, 2)}
    assert make_noisy_labels(true, 10, "instance", 0.4, seed=0, features=x) == draws[0]
    assert np.array_equal(make_noisy_labels(true, 10, "instance", 0.4, seed=0, features=x).given, draws[0].given)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(draws[a].given, draws[b].given)
        assert not np.array_equal(draws[a].is_noisy, draws[b].is_noisy)
    assert draws[0].seed == 0 and draws[0].noise_type == "instance"


def test_where_a_sample_flips_to_depends_on_its_features():
    true, x = _world(400, 10)
    _, other = _world(400, 10, seed=5)
    a = make_noisy_labels(true, 10, "instance", 0.5, seed=3, features=x)
    b = make_noisy_labels(true, 10, "instance", 0.5, seed=3, features=other)
    # same seed: the same flip rates pick the same samples (Xia et al.'s flip rate does not depend on x) ...
    assert np.array_equal(a.is_noisy, b.is_noisy)
    # ... but other images flip to other classes
    assert (a.given[a.is_noisy] != b.given[b.is_noisy]).mean() > 0.5
    # the features' length does not matter (rows are normalised)
    c = make_noisy_labels(true, 10, "instance", 0.5, seed=3, features=7.0 * x)
    assert np.array_equal(a.given, c.given)


def test_equal_features_and_class_give_the_same_flip_distribution():
    c, n = 5, 4000
    rng = np.random.default_rng(0)
    image, another = rng.normal(size=16), rng.normal(size=16)
    x = np.stack([image] * (n // 2) + [another] * (n // 2))
    true = np.zeros(n, dtype=np.int64)
    flip_rate, flip_to = instance_noise_model(x, true, c, 0.5, seed=4)
    assert flip_to.shape == (n, c) and np.allclose(flip_to.sum(axis=1), 1.0) and (flip_to[:, 0] == 0).all()
    np.testing.assert_array_equal(flip_to[: n // 2], np.broadcast_to(flip_to[0], (n // 2, c)))
    assert np.abs(flip_to[0] - flip_to[-1]).max() > 0.01  # another image, another distribution
    assert ((flip_rate >= 0) & (flip_rate <= 1)).all() and abs(flip_rate.mean() - 0.5) < 0.01
    assert 0.09 < flip_rate.std() < 0.11  # N(0.5, 0.1^2) truncated to [0, 1]
    # the draw follows the model: the copies of `image` that flip land on its distribution
    nl = make_noisy_labels(true, c, "instance", 0.5, seed=4, features=x)
    first = nl.given[: n // 2][nl.is_noisy[: n // 2]]
    seen = np.bincount(first, minlength=c) / len(first)
    assert np.abs(seen - flip_to[0]).max() < 0.05


def test_samples_with_higher_flip_rates_flip_more_often():
    true, x = _world(5000, 10)
    flip_rate, _ = instance_noise_model(x, true, 10, 0.3, seed=2)
    nl = make_noisy_labels(true, 10, "instance", 0.3, seed=2, features=x)
    assert flip_rate[nl.is_noisy].mean() > flip_rate[~nl.is_noisy].mean() + 0.03


def test_validation_can_share_the_training_projection():
    true, x = _world(200, 6)
    _, train_model = instance_noise_model(x, true, 6, 0.4, seed=11)
    _, shared = instance_noise_model(x, true, 6, 0.4, seed=12, projection_seed=11)
    _, own = instance_noise_model(x, true, 6, 0.4, seed=12)
    np.testing.assert_array_equal(shared, train_model)
    assert not np.allclose(own, train_model)


def test_transition_matrix_and_realised_rate_are_recorded(tmp_path):
    true, x = _world(500, 4)
    nl = make_noisy_labels(true, 4, "instance", 0.4, seed=0, features=torch.as_tensor(x, dtype=torch.float32))
    t = nl.transition_matrix()
    assert np.allclose(t.sum(axis=1), 1.0)
    per_class = np.array([(nl.given[true == k] != k).mean() for k in range(4)])
    np.testing.assert_allclose(np.diag(t), 1.0 - per_class)
    s = json.loads(json.dumps(nl.summary()))
    assert s["noise_type"] == "instance" and s["realised_rate"] == 0.4 and s["n_noisy"] == 200
    nl.save(tmp_path / "noisy_labels.csv")
    meta = json.loads((tmp_path / "noisy_labels.json").read_text())
    assert meta["realised_rate"] == 0.4 and NoisyLabels.load(tmp_path / "noisy_labels.csv") == nl


def test_missing_or_bad_features_are_config_errors():
    true, x = _world(20, 3)
    with pytest.raises(ConfigError, match="features"):
        make_noisy_labels(true, 3, "instance", 0.2, seed=0)
    with pytest.raises(ConfigError, match=r"\[N=20, E\]"):
        make_noisy_labels(true, 3, "instance", 0.2, seed=0, features=x[:5])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        make_noisy_labels(true, 3, "instance", 0.2, seed=0, features=bad)


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_a_bad_rate_is_a_one_line_config_error(rate, tmp_path):
    with pytest.raises(ConfigError) as info:
        RunConfig(data=str(tmp_path), model="dspt-tiny", pretrained=None, noise="instance", noise_rate=rate).resolved()
    assert "outside [0, 1)" in str(info.value) and "\n" not in str(info.value)
    true, x = _world(10, 3)
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        make_noisy_labels(true, 3, "instance", rate, seed=0, features=x)


def test_instance_is_a_valid_noise_choice(tmp_path):
    cfg = RunConfig(data=str(tmp_path), model="dspt-tiny", pretrained=None, noise="instance",
                    noise_rate=0.4).resolved()
    assert cfg.noise == "instance" and cfg.noise_rate == 0.4


# ------------------------------------------------------------------------------------------------
# in a run


def test_train_with_instance_noise_records_the_realised_rate(tmp_path):
    from dspt import train

    data = make_split_folders(tmp_path / "imgs", classes=3, train=10, test=4, size=16)
    cfg = RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=8, epochs=2, views=1, lr=0.05,
                    noise="instance", noise_rate=0.25, seed=0, device="cpu", output=str(tmp_path / "run"),
                    cache_dir=str(tmp_path / "cache"), progress=False)
    metrics = train(cfg)
    run = tmp_path / "run"
    meta = json.loads((run / "noisy_labels.json").read_text())
    assert meta["noise_type"] == "instance" and meta["n"] == 24 and meta["n_noisy"] == 6
    assert meta["realised_rate"] == pytest.approx(0.25)
    labels = NoisyLabels.load(run / "noisy_labels.csv")
    assert labels.realised_rate == pytest.approx(0.25) and (labels.given[labels.is_noisy] !=
                                                            labels.true[labels.is_noisy]).all()
    assert metrics["noise"]["realised_rate"] == pytest.approx(0.25)
    assert len(metrics["noise"]["transition_matrix"]) == 3
    # the labels were drawn from the cached training features (view 0) of the run
    from dspt.backbone import load_backbone
    from dspt.data import select_training
    from dspt.features import cached_features
    from dspt.train import load_splits

    c = RunConfig(**{**cfg.to_dict(), "output": str(tmp_path / "other")}).resolved()
    seeds = stream_seeds(0)
    sel = select_training(load_splits(c).train, 8, seeds["shots"], "instance", cache_dir=c.cache_dir)
    feats = cached_features(load_backbone("dspt-tiny", None, None, "cpu", c.precision), sel.train, "train", 1,
                            seeds["views"], c.cache_dir)
    assert feats.hit
    again = make_noisy_labels(sel.train.labels, 3, "instance", 0.25, seeds["noise"], features=feats.features[0])
    assert np.array_equal(again.given, labels.given)


def test_validation_labels_are_drawn_from_the_validation_images(tmp_path):
    from dspt.train import prepare

    root = tmp_path / "valworld"
    make_image_folder(root / "train", classes=3, per_class=10, size=16, seed=1)
    make_image_folder(root / "val", classes=3, per_class=10, size=16, seed=2)
    make_image_folder(root / "test", classes=3, per_class=4, size=16, seed=3)
    cfg = RunConfig(data=str(root), model="dspt-tiny", pretrained=None, shots=0, views=0, noise="instance",
                    noise_rate=0.4, device="cpu", cache_dir=str(tmp_path / "cache"), seed=0).resolved()
    p = prepare(cfg)
    assert p.labels.noise_type == "instance" and p.labels.is_noisy.sum() == 12
    assert p.val_info["protocol"] == "instance" and p.val_labels.noise_type == "instance"
    assert p.val_labels.is_noisy.sum() == flip_count(30, 0.4) and p.val_info["realised_rate"] == pytest.approx(0.4)
    again = make_noisy_labels(p.val.labels, 3, "instance", 0.4, p.seeds["val_noise"],
                              features=p.val_feats.cpu(), projection_seed=p.seeds["noise"])
    assert np.array_equal(again.given, p.val_labels.given)
    clean = prepare(RunConfig(**{**cfg.to_dict(), "val_labels": "clean"}).resolved())
    assert clean.val_labels.is_noisy.sum() == 0
