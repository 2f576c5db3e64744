"""Collapse detection (dspt.collapse): the measurements against hand-built predictions and the loss's formula,
a run constructed to collapse is caught at the epoch it happens, a healthy run never is, the optional guard
puts the last healthy prompt back (and resumes exactly), and the report names collapsed runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dspt.collapse import KINDS, CollapseTracker, epoch_record, spread
from dspt.config import RunConfig
from dspt.losses import LOSSES, ClassificationLoss, get_loss
from dspt.metrics import logit_gradient_norms
from dspt.train import train

from crashes import Crash, crash_before_checkpoint


def _record(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> dict:
    fn = get_loss(loss)
    norms = logit_gradient_norms(logits, labels, fn).numpy()
    losses = fn.per_sample(logits, labels).numpy()
    return epoch_record(logits, labels, norms, losses, None, fn)


def test_one_confident_class_is_a_trap_for_dspt_and_not_for_ce():
    c, n = 10, 200
    labels = torch.arange(n) % c  # balanced: class 3 holds 10 % of the labels
    logits = torch.zeros(n, c)
    logits[:, 3] = 60.0  # every sample: class 3, with full confidence
    dspt = _record(logits, labels, "dspt")
    assert dspt["collapse"] == "one-class trap" and dspt["saturated_share"] == 1.0
    assert dspt["pred_classes"] == 1 and dspt["dominant_share"] == 1.0 and dspt["pred_entropy"] == 0.0
    # DSPT's one-class value, in float64 by its formula: log(C - 1 + e) - (share of labels that are the class)
    want = math.log(c - 1 + math.e) - 0.1
    assert dspt["loss_one_class"] == pytest.approx(want, abs=1e-5)
    assert dspt["loss_train"] == pytest.approx(want, abs=1e-5)  # pinned at it: the trap
    ce = _record(logits, labels, "ce")
    assert ce["collapse"] == "one-class" and ce["saturated_share"] == pytest.approx(0.1)  # only class-3 labels


def test_spread_or_rightful_predictions_are_not_a_collapse():
    c, n = 10, 200
    labels = torch.arange(n) % c
    healthy = torch.nn.functional.one_hot(labels, c).float() * 60.0  # confident and right: saturated, not collapsed
    r = _record(healthy, labels, "dspt")
    assert r["collapse"] is None and r["saturated_share"] == 1.0 and r["pred_classes"] == 10
    assert r["pred_entropy"] == pytest.approx(1.0)
    majority = torch.zeros(n, dtype=torch.long)  # one class holds most labels: predicting it is right
    one = torch.zeros(n, c)
    one[:, 0] = 60.0
    assert _record(one, majority, "dspt")["collapse"] is None
    two = torch.zeros(n, 2)
    two[:, 0] = 60.0
    assert _record(two, torch.arange(n) % 2, "dspt")["collapse"] is None  # two classes: a split, not a collapse
    s = spread(np.array([0, 0, 1, 1]), 4)
    assert s["pred_classes"] == 2 and s["pred_entropy"] == pytest.approx(math.log(2) / math.log(4))


def test_tracker_counts_streaks_and_rebuilds_from_a_log():
    seq = [None, KINDS[0], KINDS[0], None, KINDS[1], KINDS[1]]
    t = CollapseTracker()
    begins = [t.update(e, {"collapse": k, "saturated_share": 0.5}) for e, k in enumerate(seq)]
    assert begins == [False, True, False, False, True, False]
    s = t.summary()
    assert (s["collapsed_at_epoch"], s["first_collapse_epoch"], s["collapsed_epochs"], s["kind"]) == (5, 2, 4, KINDS[1])
    assert s["recovered"] is False
    log = [{"event": "epoch", "epoch": e, "collapse": k, "saturated_share": 0.5} for e, k in enumerate(seq)]
    assert CollapseTracker.from_log(log[::-1]).summary() == s
    back = CollapseTracker.from_log(log[:4])
    assert back.summary()["collapsed_at_epoch"] is None and back.summary()["recovered"] is True


# ------------------------------------------------------------------------------------------- in a run

class TowardClassZero(ClassificationLoss):
    """A constructed failure: every sample is pushed to class 0 (cross-entropy against label 0)."""

    name = "toward_zero"

    def _per_sample(self, z, y):
        return F.cross_entropy(z, torch.zeros_like(y), reduction="none")


@pytest.fixture
def toward_zero(monkeypatch):
    monkeypatch.setitem(LOSSES, "toward_zero", TowardClassZero)
    return "toward_zero"


def _cfg(images, out, cache, **over) -> RunConfig:
    opts = dict(data=str(images), model="dspt-tiny", pretrained=None, shots=0, views=1, n_ctx=4, batch_size=4,
                epochs=8, loss="ce", lr=0.01, seed=1, device="cpu", cache_dir=str(cache), output=str(out),
                progress=False, warmup_epochs=0)
    return RunConfig(**(opts | over))


def _epochs(run) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"event": "epoch"' in x]


def test_a_run_driven_onto_one_class_is_caught_at_that_epoch_and_a_healthy_one_never(images, tmp_path,
                                                                                     toward_zero, caplog):
    with caplog.at_level("WARNING", logger="dspt.loop"):  # the loop logs each epoch
        m = train(_cfg(images, tmp_path / "bad", tmp_path / "cache", loss=toward_zero, lr=2.0))
    log = _epochs(tmp_path / "bad")
    # independent check of each epoch's verdict: the logged spread of the training predictions
    first = next(r["epoch"] for r in log if r["dominant_share"] >= 0.95)
    assert all(r["collapse"] is not None for r in log[first:]) and all(r["collapse"] is None for r in log[:first])
    c = m["collapse"]
    assert c["collapsed_at_epoch"] == c["first_collapse_epoch"] == first + 1 and not c["recovered"]
    # and the final prompt itself, rebuilt from its folder, predicts one class for (nearly) every image
    from dspt.predict import predict_probabilities

    _, probs, _ = predict_probabilities(tmp_path / "bad", [str(images)], device="cpu")
    top = np.bincount(probs.argmax(1), minlength=3)
    assert top.max() / top.sum() >= 0.95 and c["pred_classes"] <= 2
    warned = [r.getMessage() for r in caplog.records if "at epoch" in r.getMessage()]
    assert len(warned) == 1 and f"at epoch {first + 1}:" in warned[0]
    rows = pd.read_csv(tmp_path / "results.csv")
    assert rows["collapsed_at_epoch"].tolist() == [first + 1] and rows["collapse_kind"].tolist() == [c["kind"]]
    healthy = train(_cfg(images, tmp_path / "ok", tmp_path / "cache"))
    assert healthy["collapse"]["collapsed_at_epoch"] is None and healthy["collapse"]["first_collapse_epoch"] is None
    assert all(r["collapse"] is None for r in _epochs(tmp_path / "ok"))


def test_the_guard_restores_the_last_healthy_prompt_halves_the_rate_and_resumes_exactly(images, tmp_path,
                                                                                        toward_zero):
    cfg = dict(loss=toward_zero, lr=2.0, collapse_guard=True)
    m = train(_cfg(images, tmp_path / "ref", tmp_path / "cache", **cfg))
    c = m["collapse"]
    log = _epochs(tmp_path / "ref")
    restored = [r for r in log if r.get("guard")]
    assert c["guard_restores"] == len(restored) >= 1 and c["lr_scale"] == 0.5 ** len(restored)
    assert c["collapsed_at_epoch"] is None  # the run ends on a healthy prompt
    first = restored[0]["epoch"]
    from dspt.train import lr_at

    resolved = _cfg(images, tmp_path / "x", tmp_path / "cache", **cfg).resolved()
    assert log[first + 1]["lr"] == pytest.approx(lr_at(resolved, first + 1, 2.0 * 0.5))
    # the guard is off by default: the same run without it ends collapsed
    off = train(_cfg(images, tmp_path / "off", tmp_path / "cache", loss=toward_zero, lr=2.0))
    assert off["collapse"]["collapsed_at_epoch"] is not None and off["collapse"]["guard_restores"] == 0
    # a kill after a restore resumes to the same numbers (the halved rate is in the checkpoint)
    with crash_before_checkpoint(first + 1), pytest.raises(Crash):
        train(_cfg(images, tmp_path / "run", tmp_path / "cache", **cfg))
    resumed = train(_cfg(images, tmp_path / "run", tmp_path / "cache", **cfg))
    assert resumed["collapse"] == c and resumed["test_acc"] == m["test_acc"]


def test_the_report_names_collapsed_runs_and_counts_them_per_method(tmp_path):
    from dspt.report import build_report, runs_frame

    rows = []
    for loss in ("ce", "dspt"):
        for lr in (0.02, 0.2):
            for seed in (1, 2, 3):
                bad = (loss, lr, seed) in {("dspt", 0.2, 3), ("ce", 0.2, 1), ("ce", 0.2, 2)}
                rows.append({"run_id": f"{loss}-{lr}-{seed}", "dataset": "d", "model": "m", "weights": "w",
                             "shots": 16, "epochs": 10, "noise": "sym", "noise_rate": 0.8, "loss": loss,
                             "loss_options": "", "lr": lr, "seed": seed, "test_acc": 10.0 if bad else 40.0 + seed,
                             "val_acc_given": 10.0 if bad else 30.0, "zeroshot_acc": 26.0,
                             "collapsed_at_epoch": 5 if bad else None,
                             "collapse_kind": ("one-class trap" if loss == "dspt" else "one-class") if bad else None})
    rep = build_report(runs_frame(pd.DataFrame(rows)))
    col = rep.collapses.set_index(["method", "lr"])
    assert col.loc[("ce", 0.2), "collapsed"] == 2 and col.loc[("dspt", 0.2), "collapsed"] == 1
    assert col.loc[("ce", 0.02), "collapsed"] == 0 and (col["runs"] == 3).all()
    text = " ".join(rep.findings.sentences)
    assert "Collapsed runs" in text and "ce 2 of 6" in text and "dspt 1 of 6" in text
    assert "one-class trap at epoch 5 (lr 0.2, seed 3" in text
    robust = rep.robustness.set_index("method")
    assert robust.loc["ce", "collapsed"] == 2 and robust.loc["dspt", "collapsed"] == 1
    assert np.isfinite(robust.loc["ce", "worst"])


def test_in_a_batch_each_run_is_watched_on_its_own(images, tmp_path, toward_zero):
    """A run driven onto one class and a healthy one trained as one batch: the first is flagged at the epoch it is
    flagged alone, the second never."""
    from dspt.train import train_batch

    bad = _cfg(images, tmp_path / "bad", tmp_path / "cache", loss=toward_zero, lr=2.0)
    good = _cfg(images, tmp_path / "good", tmp_path / "cache")
    (s1, m1), (s2, m2) = train_batch([bad, good])
    assert (s1, s2) == ("ok", "ok") and m1["batch_runs"] == 2
    alone = train(_cfg(images, tmp_path / "alone", tmp_path / "cache", loss=toward_zero, lr=2.0))
    assert m1["collapse"]["collapsed_at_epoch"] == alone["collapse"]["collapsed_at_epoch"] is not None
    assert m2["collapse"]["first_collapse_epoch"] is None


@pytest.mark.parametrize("loss", ["ce", "dspt", "mae", "gce", "sce", "logitnorm"])
def test_the_one_class_value_equals_the_loss_of_every_row(loss):
    """Computed from two rows and the label shares; equal to the mean over every sample's own row."""
    from dspt.collapse import one_class_loss

    fn = get_loss(loss)
    labels = torch.tensor([0, 1, 2, 2, 3, 2, 1, 4])
    z = torch.zeros(len(labels), 5)
    z[:, 2] = 50.0
    want = float(fn.per_sample(z, labels).double().mean())
    assert one_class_loss(fn, labels, 5, 2) == pytest.approx(want, rel=1e-5, abs=1e-6)
