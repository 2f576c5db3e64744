"""Validation labels follow the training protocol; fixed test split; independent random streams."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dspt.config import RunConfig
from dspt.data import ImageDataset
from dspt.noise import flip_count
from dspt.seeds import STREAMS, stream_seeds
from dspt.train import load_splits, prepare, validation_labels

from imagefolders import make_image_folder


def _pool(per_class: int, classes: int = 5, noisy: np.ndarray | None = None) -> ImageDataset:
    labels = np.repeat(np.arange(classes), per_class)
    return ImageDataset([f"img{i}.png" for i in range(len(labels))], labels, [f"c{c}" for c in range(classes)],
                        noisy_labels=noisy)


def _cfg(**over) -> RunConfig:
    return RunConfig(data="x", model="dspt-tiny", pretrained=None, **over).resolved()


SEEDS = stream_seeds(1)


@pytest.mark.parametrize("noise", ["sym", "pair"])
def test_label_flip_protocols_corrupt_validation_at_the_training_rate(noise):
    val, labels, info = validation_labels(_cfg(noise=noise, noise_rate=0.4), _pool(10), SEEDS)
    assert len(val) == 50 and info["protocol"] == noise and info["labels"] == "noisy"
    assert labels.is_noisy.sum() == flip_count(50, 0.4)
    if noise == "pair":
        assert np.all(labels.given[labels.is_noisy] == (labels.true[labels.is_noisy] + 1) % 5)
    _, clean, info = validation_labels(_cfg(noise=noise, noise_rate=0.4, val_labels="clean"), _pool(10), SEEDS)
    assert clean.is_noisy.sum() == 0 and info["labels"] == "clean"


@pytest.mark.parametrize("noise", ["symflip", "pairflip"])
def test_false_positive_protocols_draw_false_positives_into_validation(noise):
    cfg = _cfg(noise=noise, shots=4, fp=2)  # rate 0.5
    val, labels, info = validation_labels(cfg, _pool(10), SEEDS)
    k = info["shots"]
    assert k == 4 and info["fp"] == 2 and info["protocol"] == noise  # the training K
    assert len(val) == 5 * k
    for c in range(5):  # exactly FP of the K images labelled c are from another class
        given_c = labels.given == c
        assert given_c.sum() == k and (labels.true[given_c] != c).sum() == 2
        if noise == "pairflip":
            assert set(labels.true[given_c & labels.is_noisy]) == {(c + 1) % 5}
    assert labels.realised_rate == pytest.approx(0.5)
    _, big, info = validation_labels(_cfg(noise=noise, shots=16, fp=8), _pool(10), SEEDS)
    assert info["shots"] == 5 and info["fp"] == 3  # half the smallest class at most: room for false positives
    _, clean, _ = validation_labels(_cfg(noise=noise, shots=4, fp=2, val_labels="clean"), _pool(10), SEEDS)
    assert clean.realised_rate == 0


def test_given_noise_uses_the_shipped_validation_labels_or_says_clean():
    shipped = np.repeat(np.arange(5), 10)
    shipped[:7] = 4  # seven wrong labels shipped with the data
    cfg = _cfg(noise="given")
    _, labels, info = validation_labels(cfg, _pool(10, noisy=shipped), SEEDS)
    assert info["protocol"] == "given" and labels.is_noisy.sum() == 7
    _, labels, info = validation_labels(cfg, _pool(10), SEEDS)
    assert labels.is_noisy.sum() == 0 and info["labels"] == "clean" and "ships no noisy labels" in info["why"]


def test_coop_validation_subset_is_min_k_4_per_class():
    cfg = _cfg(noise="sym", noise_rate=0.2, shots=16, val_shots="coop")
    assert cfg.val_shots == 4
    val, labels, _ = validation_labels(cfg, _pool(10), SEEDS)
    assert np.bincount(val.labels).tolist() == [4] * 5 and labels.is_noisy.sum() == flip_count(20, 0.2)
    assert _cfg(shots=2, val_shots="coop").val_shots == 2


def test_streams_are_independent_and_seed_zero_is_a_seed():
    a, b, zero = stream_seeds(1), stream_seeds(2), stream_seeds(0)
    assert list(a) == list(STREAMS) and len(set(a.values())) == len(STREAMS)
    assert a == stream_seeds(1) and a != b and zero != a
    with pytest.raises(ValueError, match="0 is valid"):
        stream_seeds(-1)


@pytest.fixture(scope="module")
def val_world(tmp_path_factory) -> Path:
    """train/ and val/ of the same size and classes: one shared generator would flip the same positions."""
    root = tmp_path_factory.mktemp("valworld")
    make_image_folder(root / "train", classes=3, per_class=10, size=16, seed=1)
    make_image_folder(root / "val", classes=3, per_class=10, size=16, seed=2)
    make_image_folder(root / "test", classes=3, per_class=4, size=16, seed=3)
    return root


def test_training_and_validation_noise_come_from_different_streams(val_world, tmp_path):
    cfg = RunConfig(data=str(val_world), model="dspt-tiny", pretrained=None, shots=0, views=0, noise="sym",
                    noise_rate=0.5, device="cpu", cache_dir=str(tmp_path / "cache"), seed=0).resolved()
    p = prepare(cfg)
    assert len(p.labels) == len(p.val_labels) == 30 and p.val_info["realised_rate"] == pytest.approx(0.5)
    assert p.labels.is_noisy.sum() == p.val_labels.is_noisy.sum() == 15
    assert not np.array_equal(p.labels.is_noisy, p.val_labels.is_noisy)
    assert p.seeds == stream_seeds(0)


def test_test_split_is_fixed_across_run_seeds(tmp_path):
    """Folder data without a test folder: the held-out test images depend on split_seed, not the run seed."""
    make_image_folder(tmp_path / "imgs", classes=3, per_class=10, size=8)
    tests = {seed: load_splits(RunConfig(data=str(tmp_path / "imgs"), seed=seed).resolved()).test.paths
             for seed in (0, 1, 2)}
    assert tests[0] == tests[1] == tests[2]
    other = load_splits(RunConfig(data=str(tmp_path / "imgs"), split_seed=7).resolved()).test.paths
    assert other != tests[0] and sorted(other) != sorted(tests[0])


def test_too_small_a_validation_split_falls_back_to_clean_and_says_why():
    _, labels, info = validation_labels(_cfg(noise="symflip", shots=4, fp=2), _pool(3), SEEDS)
    assert labels.realised_rate == 0 and info["labels"] == "clean" and "too few" in info["why"]


def test_a_coarse_validation_rate_is_recorded_with_its_reason(caplog):
    """16 shots at FP 8 (50 %) with 5 validation images per class: 3 of 5, i.e. 60 %, the nearest 5 images allow;
    the run says so in its validation info (the report's 'Validation labels' table) and in a warning."""
    with caplog.at_level("WARNING", logger="dspt.prepare"):
        _, labels, info = validation_labels(_cfg(noise="symflip", shots=16, fp=8), _pool(10), SEEDS)
    assert labels.realised_rate == pytest.approx(0.6) and info["labels"] == "noisy"
    assert info["why"].startswith("3 false positive(s) in 5 validation images per class: 60.0%")
    assert any("validation labels: 3 false positive(s)" in r.getMessage() for r in caplog.records)
    _, exact, info = validation_labels(_cfg(noise="symflip", shots=4, fp=2), _pool(10), SEEDS)
    assert exact.realised_rate == pytest.approx(0.5) and "why" not in info  # exact: nothing to say
