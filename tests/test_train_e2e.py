"""`dspt train` end to end on generated images with the tiny config: seconds, not minutes."""
import csv
import json

import numpy as np
import pytest

from dspt.cli import main
from dspt.io import read_jsonl

from imagefolders import make_split_folders

RUN_FILES = {"config.yaml", "noisy_labels.csv", "noisy_labels.json", "prompt.safetensors", "metrics.json",
             "log.jsonl", "environment.json", "train_files.csv", "checkpoint.safetensors", "dataset.json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_folders(tmp_path_factory.mktemp("imgs"), classes=3, train=10, test=5)


def _train(data, out, cache, *extra):
    return main(["train", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none", "--shots", "8",
                 "--epochs", "6", "--views", "2", "--lr", "0.05", "--noise", "sym", "--noise-rate", "0.25",
                 "--seed", "0", "--output", str(out), "--cache-dir", str(cache), "--no-progress", *extra])


def test_train_writes_complete_run_and_second_run_hits_cache(data, tmp_path, capsys):
    assert _train(data, tmp_path / "run1", tmp_path / "cache", "--loss", "ce") == 0
    run = tmp_path / "run1"
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = [r for r in read_jsonl(run / "log.jsonl") if r.get("event") == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1]["loss"] < epochs[0]["loss"]  # it learns
    assert metrics["cache_hit"] == {"train": False, "test": False}
    assert metrics["noise"]["n_noisy"] == 6 and metrics["noise"]["realised_rate"] == pytest.approx(0.25)
    assert set(metrics["per_class_acc"]) == {"class 0", "class 1", "class 2"}  # 5 test images per class:
    assert metrics["test_acc"] == pytest.approx(np.mean(list(metrics["per_class_acc"].values())))
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 1 and float(rows[0]["test_acc"]) == pytest.approx(metrics["test_acc"])
    given = np.loadtxt(run / "noisy_labels.csv", delimiter=",", skiprows=1, dtype=int)
    assert (given[:, 1] != given[:, 2]).sum() == 6

    assert _train(data, tmp_path / "run2", tmp_path / "cache", "--loss", "dspt") == 0
    m2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert m2["cache_hit"] == {"train": True, "test": True}
    assert m2["features_encoded"] == {"train": 0, "test": 0}
    err = capsys.readouterr().err
    assert "feature cache miss" in err and "feature cache hit" in err
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 2


def test_a_changed_key_never_reuses_the_cache(data, tmp_path):
    assert _train(data, tmp_path / "a", tmp_path / "cache") == 0
    assert _train(data, tmp_path / "b", tmp_path / "cache", "--views", "3") == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["cache_hit"]["train"] is False and m["cache_hit"]["test"] is True
    # the views the first run encoded are reused; only the new ones are encoded
    views_a, n = 2, a["n_train"]  # the first run: --views 2
    assert m["features_encoded"]["train"] == (3 - views_a) * n and m["features_encoded"]["test"] == 0
    stores = [d for d in (tmp_path / "cache" / "features").iterdir() if d.name != "identities"]
    assert len(stores) == 1 and not list(stores[0].glob("*.tmp"))


def test_predict_writes_csv(data, tmp_path, capsys):
    assert _train(data, tmp_path / "run", tmp_path / "cache") == 0
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tmp_path / "run"), str(data / "test"), "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 15 and {r["prediction"] for r in rows} <= {"class 0", "class 1", "class 2"}
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)


def test_zeroshot_command(data, tmp_path, capsys):
    assert main(["zeroshot", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none",
                 "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "zero-shot accuracy" in capsys.readouterr().out


def test_bad_noise_rate_is_one_line_error(data, tmp_path, capsys):
    assert _train(data, tmp_path / "x", tmp_path / "cache", "--noise-rate", "1.5") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "outside [0, 1)" in err
    assert not (tmp_path / "x").exists()
