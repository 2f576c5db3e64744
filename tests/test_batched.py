"""Batched prompt tuning: R runs as one model, each with the numbers it has alone."""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from dspt.backbone import load_backbone
from dspt.config import RunConfig
from dspt.errors import ConfigError, TrainingError
from dspt.optim import RunwiseSGD
from dspt.prompt import PromptBatch, PromptClassifier, PromptLearner
from dspt.train import batch_key, train, train_batch

from imagefolders import make_split_folders

NAMES = ["cat", "dog", "sea lion", "red car", "tree"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("dspt-tiny")


def _learners(tiny, n=3, **kw):
    out = []
    for seed in range(n):
        learner = PromptLearner(tiny, NAMES, n_ctx=4, seed=seed, **kw)
        with torch.no_grad():
            learner.ctx.add_(torch.randn_like(learner.ctx))
        out.append(learner)
    return out


@pytest.mark.parametrize("layout", [{}, {"class_token_position": "middle"}, {"csc": True},
                                    {"class_token_position": "front"}])
@pytest.mark.parametrize("chunk", [None, 4])
def test_batch_features_and_gradients_equal_each_run_alone(tiny, layout, chunk):
    learners = _learners(tiny, **layout)
    batch = PromptBatch(tiny, learners, row_chunk=chunk)
    weights = torch.randn(3, len(NAMES), tiny.model.text_projection.shape[1])
    got = batch.text_features()
    (got * weights).sum().backward()
    for k, learner in enumerate(learners):
        alone = PromptClassifier(tiny, learner).text_features()
        (alone * weights[k]).sum().backward()
        torch.testing.assert_close(got[k], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.ctx.grad[k], learner.ctx.grad, atol=1e-5, rtol=1e-4)


def test_ten_thousand_prompt_rows_in_bounded_slices(tiny):
    """R x C = 10,000 rows: the text tower runs in checkpointed slices, and every run still gets its own
    features (spot-checked against runs computed alone)."""
    names = [f"class {i}" for i in range(100)]
    learners = [PromptLearner(tiny, names, n_ctx=2, seed=s) for s in range(100)]
    batch = PromptBatch(tiny, learners, row_chunk=2048)
    feats = batch.text_features()
    feats[:, :, 0].sum().backward()
    assert feats.shape[:2] == (100, 100) and batch.ctx.grad.abs().sum() > 0
    for k in (0, 57, 99):
        torch.testing.assert_close(feats[k].detach(), PromptClassifier(tiny, learners[k]).text_features().detach(),
                                   atol=1e-5, rtol=1e-5)


def test_runwise_sgd_is_torch_sgd_per_run():
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    hyper = dict(lr=[0.1, 0.02, 0.3], momentum=[0.9, 0.0, 0.5], weight_decay=[5e-4, 0.0, 1e-2])
    stacked = torch.nn.Parameter(start.clone())
    opt = RunwiseSGD(stacked, **hyper)
    alone = [torch.nn.Parameter(start[k].clone()) for k in range(3)]
    opts = [torch.optim.SGD([alone[k]], lr=hyper["lr"][k], momentum=hyper["momentum"][k],
                            weight_decay=hyper["weight_decay"][k]) for k in range(3)]
    for step in range(6):
        grad = torch.randn(3, 4, 5)
        if step == 3:  # run 1 stops (diverged): it keeps its parameters, the others go on
            opt.active[1] = False
        stacked.grad = grad.clone()
        opt.step()
        for k in range(3):
            if step >= 3 and k == 1:
                continue
            alone[k].grad = grad[k].clone()
            opts[k].step()
    for k in range(3):
        torch.testing.assert_close(stacked[k], alone[k].detach(), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_folders(tmp_path_factory.mktemp("batched"), classes=3, train=10, test=6)


def _cfg(data, root, name, **over):
    base = dict(data=str(data), model="dspt-tiny", pretrained=None, shots=8, epochs=6, views=2, batch_size=4,
                n_ctx=4, device="cpu", cache_dir=str(root / "cache"), output=str(root / name),
                results=str(root / "results.csv"), progress=False)
    return RunConfig(**(base | over))


VARIANTS = [dict(loss="ce", lr=0.05, noise_rate=0.0, seed=1),
            dict(loss="dspt", lr=0.2, noise_rate=0.5, seed=2),
            dict(loss="gce", lr=0.02, noise_rate=0.25, seed=0, momentum=0.5, weight_decay=0.0),
            dict(loss="mae", lr=0.1, noise_rate=0.25, seed=3, noise="pair", views=1, ctx_init="a photo of a")]


def _history(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()
            if '"epoch"' in line and json.loads(line).get("event") == "epoch"]


def test_a_batch_of_runs_equals_each_run_trained_alone(data, tmp_path):
    batched = [_cfg(data, tmp_path / "b", f"r{k}", **v) for k, v in enumerate(VARIANTS)]
    assert len({batch_key(c.resolved()) for c in batched}) == 1  # one batch
    outcome = train_batch(batched)
    assert [status for status, _ in outcome] == ["ok"] * 4
    rows = pd.read_csv(tmp_path / "b" / "results.csv")
    assert sorted(rows["run_id"]) == sorted(str((tmp_path / "b" / f"r{k}").resolve()) for k in range(4))
    for k, v in enumerate(VARIANTS):
        alone = train(_cfg(data, tmp_path / "a", f"r{k}", **v))
        run_b, run_a = tmp_path / "b" / f"r{k}", tmp_path / "a" / f"r{k}"
        np.testing.assert_allclose(_history(run_b), _history(run_a), atol=1e-4)
        assert abs(outcome[k][1]["test_acc"] - alone["test_acc"]) <= 0.5
        for name in ("config.yaml", "noisy_labels.csv", "prompt.safetensors", "checkpoint.safetensors",
                     "dataset.json", "environment.json"):
            assert (run_b / name).is_file(), name
        assert (run_b / "noisy_labels.csv").read_text() == (run_a / "noisy_labels.csv").read_text()


def test_a_diverging_run_fails_alone_and_the_others_finish(data, tmp_path):
    cfgs = [_cfg(data, tmp_path, "ok", loss="ce", lr=0.05), _cfg(data, tmp_path, "boom", loss="ce", lr=1e30)]
    (status_ok, metrics), (status_bad, error) = train_batch(cfgs)
    assert status_ok == "ok" and status_bad == "error" and isinstance(error, TrainingError)
    assert "non-finite" in str(error) and not (tmp_path / "boom" / "metrics.json").exists()
    alone = train(_cfg(data, tmp_path / "alone", "ok", loss="ce", lr=0.05))
    np.testing.assert_allclose(_history(tmp_path / "ok"), _history(tmp_path / "alone" / "ok"), atol=1e-4)
    assert abs(metrics["test_acc"] - alone["test_acc"]) <= 0.5


def test_runs_resumed_at_different_epochs_each_finish_as_if_uninterrupted(data, tmp_path):
    """A killed batch leaves runs at different epochs; the next call trains each from its own checkpoint."""
    T = sys.modules["dspt.loop"]  # the training loop saves the checkpoints

    cfgs = [_cfg(data, tmp_path / "b", f"r{k}", **v) for k, v in enumerate(VARIANTS[:3])]
    save = T.save_checkpoint
    calls = {"n": 0}

    class Kill(BaseException):
        pass

    def kill_midway(run_dir, epoch, *state):
        calls["n"] += 1
        if calls["n"] == 8:  # at run 1's 3rd checkpoint: run 0 has 3 epochs saved, runs 1 and 2 have 2
            raise Kill()
        save(run_dir, epoch, *state)

    T.save_checkpoint = kill_midway
    try:
        with pytest.raises(Kill):
            train_batch(cfgs)
    finally:
        T.save_checkpoint = save
    assert [st for st, _ in train_batch(cfgs)] == ["ok"] * 3
    for k, v in enumerate(VARIANTS[:3]):
        train(_cfg(data, tmp_path / "a", f"r{k}", **v))
        np.testing.assert_allclose(_history(tmp_path / "b" / f"r{k}"), _history(tmp_path / "a" / f"r{k}"),
                                   atol=1e-4)
        starts = [json.loads(line)["epoch"] for line in (tmp_path / "b" / f"r{k}" / "log.jsonl").read_text()
                  .splitlines() if '"start"' in line]
        assert starts == [0, 3 if k == 0 else 2]


def test_runs_that_cannot_share_a_batch_are_keyed_apart(data, tmp_path):
    base = _cfg(data, tmp_path, "x").resolved()
    assert batch_key(base) == batch_key(_cfg(data, tmp_path, "y", lr=0.5, loss="ce", seed=9).resolved())
    for change in (dict(shots=4), dict(epochs=3), dict(batch_size=8), dict(n_ctx=2), dict(csc=True),
                   dict(class_token_position="front"), dict(path="reference"), dict(precision="fp16")):
        assert batch_key(_cfg(data, tmp_path, "z", **change).resolved()) != batch_key(base), change


def test_a_group_larger_than_memory_trains_in_batches_that_fit(data, tmp_path, monkeypatch):
    """Half the free memory holds two runs' features here: three compatible runs train as 2 + 1."""
    T = sys.modules["dspt.batching"]  # where train_batch's groups look up _fit and free_memory
    cfgs = [_cfg(data, tmp_path / "b", f"r{k}", **v) for k, v in enumerate(VARIANTS[:3])]
    sizes, fit = [], T._fit
    monkeypatch.setattr(T, "_fit", lambda batch: (sizes.append(len(batch)), fit(batch)))
    monkeypatch.setattr(T, "free_memory", lambda device: 4 * T._run_bytes(_prepared(cfgs[0])) + 1)
    assert [st for st, _ in train_batch(cfgs)] == ["ok"] * 3
    assert sizes == [2, 1]
    for k, v in enumerate(VARIANTS[:3]):
        train(_cfg(data, tmp_path / "a", f"r{k}", **v))
        np.testing.assert_allclose(_history(tmp_path / "b" / f"r{k}"), _history(tmp_path / "a" / f"r{k}"),
                                   atol=1e-4)


def _prepared(cfg):
    from dspt.train import prepare

    return prepare(cfg.resolved())


def _exclude_file(path, images):
    path.write_text("# left out of training\n" + "".join(f"{p}\n" for p in images))
    return str(path)


def test_training_sets_of_different_sizes_batch_when_their_epochs_take_equal_steps(data, tmp_path):
    """Cross-fitting folds differ in size by a few images: with 30, 29 and 28 images and batches of 4 every
    epoch takes 7 steps, so the three runs train as one batch, each as it would alone; with 27 images (6 steps)
    a run trains in a batch of its own."""
    images = sorted((data / "train").rglob("*.png"))
    dropped = {30: [], 29: images[:1], 28: [images[3], images[25]], 27: images[10:13]}
    cfgs = {n: _cfg(data, tmp_path / "b", f"n{n}", shots=0, batch_size=4, loss="ce", lr=0.05, seed=n,
                    exclude=_exclude_file(tmp_path / f"ex{n}.txt", gone)) for n, gone in dropped.items()}
    assert len({batch_key(c.resolved()) for c in cfgs.values()}) == 1  # one group: the same data
    outcome = dict(zip(cfgs, train_batch(list(cfgs.values()))))
    assert all(status == "ok" for status, _ in outcome.values())
    assert {n: m["batch_runs"] for n, (_, m) in outcome.items()} == {30: 3, 29: 3, 28: 3, 27: 1}
    for _, m in outcome.values():  # a run's training time is its share of its batch's wall time
        assert m["seconds"]["train"] == pytest.approx(m["seconds"]["batch"] / m["batch_runs"], rel=1e-12)
    assert len({m["seconds"]["batch"] for n, (_, m) in outcome.items() if n != 27}) == 1
    for n, gone in dropped.items():
        run_b = tmp_path / "b" / f"n{n}"
        trained = [r["path"] for r in csv.DictReader((run_b / "train_files.csv").open())]
        assert len(trained) == n and not set(map(str, gone)) & set(trained)
        assert json.loads((run_b / "dataset.json").read_text())["excluded_training_images"] == 30 - n
        alone = train(replace(cfgs[n], output=str(tmp_path / "a" / f"n{n}"), results=None))
        assert alone["batch_runs"] == 1
        np.testing.assert_allclose(_history(run_b), _history(tmp_path / "a" / f"n{n}"), atol=1e-4)
        assert abs(outcome[n][1]["test_acc"] - alone["test_acc"]) <= 0.5


def test_exclude_names_what_is_wrong(data, tmp_path):
    images = sorted((data / "train").rglob("*.png"))
    rel = tmp_path / "rel.txt"  # relative lines are resolved against the file's folder; blank lines are skipped
    rel.write_text(f"\n{os.path.relpath(images[0], tmp_path)}\n")
    metrics = train(_cfg(data, tmp_path, "rel", shots=0, epochs=1, exclude=str(rel)))
    assert json.loads((tmp_path / "rel" / "dataset.json").read_text())["excluded_training_images"] == 1
    assert metrics["batch_runs"] == 1
    bad = {"missing": (str(tmp_path / "nope.txt"), "cannot be read"),
           "unknown": (_exclude_file(tmp_path / "u.txt", [tmp_path / "elsewhere.png"]), "not in the training split"),
           "all": (_exclude_file(tmp_path / "all.txt", images), "leaves no training image")}
    for name, (file, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            train(_cfg(data, tmp_path, name, shots=0, epochs=1, exclude=file))
        assert not (tmp_path / name).exists(), name  # nothing half-written
    with pytest.raises(ConfigError, match="--exclude cannot be combined with --noise-file"):
        RunConfig(data=str(data), noise="given", noise_file=str(rel), exclude=str(rel)).resolved()
