"""Every prompt learner through `dspt train` on the tiny model: run folder, save/load round trip, `dspt predict`,
resume after a crash, KgCoOp against CoOp, and learning above zero-shot on the demo's miniature."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crashes import Crash, crash_before_checkpoint
from dspt.cli import main
from dspt.io import read_jsonl
from imagefolders import make_split_folders

MODULE_LEARNERS = ["cocoop", "vpt", "vpt-deep", "maple", "promptsrc"]
OPTIONS = {"maple": ["--learner-opt", "depth=2"], "vpt": ["--learner-opt", "length=4"],
           "promptsrc": ["--learner-opt", "depth=2", "--learner-opt", "gpa_mean=2"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_folders(tmp_path_factory.mktemp("imgs"), classes=3, train=10, test=5)


def _train(data, out, cache, learner, *extra):
    return main(["train", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none", "--shots", "8",
                 "--epochs", "3", "--views", "2", "--lr", "0.05", "--batch-size", "8", "--noise", "sym",
                 "--noise-rate", "0.25", "--seed", "0", "--output", str(out), "--cache-dir", str(cache),
                 "--no-progress", "--learner", learner, *OPTIONS.get(learner, []), *extra])


def _accuracy(paths, probs, classnames):
    truth = [classnames.index(Path(p).parent.name.replace("_", " ")) for p in paths]
    return 100.0 * float(np.mean(probs.argmax(1) == np.array(truth)))


@pytest.mark.parametrize("learner", MODULE_LEARNERS + ["kgcoop"])
def test_learner_run_round_trips_through_its_prompt_file(data, tmp_path, learner, capsys):
    from dspt.predict import predict_probabilities
    from dspt.prompt_file import load_prompt

    run = tmp_path / "run"
    assert _train(data, run, tmp_path / "cache", learner) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = [r for r in read_jsonl(run / "log.jsonl") if r.get("event") == "epoch"]
    assert len(epochs) == 3 and all(np.isfinite(r["loss"]) for r in epochs)
    assert "collapse" in epochs[-1] and "pred_entropy" in epochs[-1]  # the collapse diagnostics run for it too
    row = next(iter(csv.DictReader((tmp_path / "results.csv").open())))
    assert row["learner"] == learner
    # the saved prompt rebuilds the run's classifier: `dspt predict` on the test images gives its test accuracy
    paths, probs, names = predict_probabilities(run, [str(data / "test")], device="cpu")
    assert len(paths) == 15 and probs.shape == (15, 3)
    assert _accuracy(paths, probs, names) == pytest.approx(metrics["test_acc"])
    loaded = load_prompt(run)
    saved = load_file(str(run / "prompt.safetensors"))
    own = loaded.trainable() if hasattr(loaded, "trainable") else {"ctx": loaded.learner.ctx}
    assert set(saved) == set(own) and all(torch.equal(saved[k], own[k].detach().cpu()) for k in saved)
    if learner in MODULE_LEARNERS:  # one line: export writes CoOp-style classifiers only
        capsys.readouterr()
        assert main(["export", str(run), "-o", str(tmp_path / "c.safetensors")]) != 0
        err = capsys.readouterr().err.strip()
        assert f"learner '{learner}'" in err and "dspt predict" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("learner", ["cocoop", "vpt", "promptsrc"])
def test_crash_then_resume_ends_with_the_numbers_of_an_uninterrupted_run(data, tmp_path, learner):
    assert _train(data, tmp_path / "whole", tmp_path / "cache", learner) == 0
    with crash_before_checkpoint(1), pytest.raises(Crash):
        _train(data, tmp_path / "cut", tmp_path / "cache", learner)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert _train(data, tmp_path / "cut", tmp_path / "cache", learner) == 0
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for key in ("test_acc", "final_loss", "first_loss", "ctx_drift"):
        assert a[key] == b[key], key
    pa, pb = load_file(str(tmp_path / "whole" / "prompt.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                       "prompt.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    logged = [r["epoch"] for r in read_jsonl(tmp_path / "cut" / "log.jsonl") if r.get("event") == "epoch"]
    assert logged == [0, 1, 2]  # each epoch logged once


@pytest.mark.parametrize("learner, method, logged", [
    ("vpt", "coteaching", "method_kept_share"), ("cocoop", "coteaching", "method_kept_share"),
    ("maple", "nlprompt", "method_ot_error"), ("cocoop", "joapr", "method_noisy_recall"),
])
def test_methods_train_the_module_learners_and_resume(data, tmp_path, learner, method, logged):
    """A method's learners are modules of the run's learner (co-teaching: two), its epoch view their own
    predictions; a crash and a resume end with the numbers of an uninterrupted run."""
    extra = ["--method", method, "--loss", "ce"] + (["--method-opt", "warmup=1"] if method == "joapr" else [])
    assert _train(data, tmp_path / "whole", tmp_path / "cache", learner, *extra) == 0
    log = [r for r in read_jsonl(tmp_path / "whole" / "log.jsonl") if r.get("event") == "epoch"]
    assert logged in log[-1], sorted(log[-1])
    with crash_before_checkpoint(1), pytest.raises(Crash):
        _train(data, tmp_path / "cut", tmp_path / "cache", learner, *extra)
    assert _train(data, tmp_path / "cut", tmp_path / "cache", learner, *extra) == 0
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert (a["test_acc"], a["final_loss"]) == (b["test_acc"], b["final_loss"])
    if method == "coteaching":  # the second learner's parameters are checkpointed beside the first's
        from dspt.rundir import load_checkpoint

        ckpt = load_checkpoint(tmp_path / "cut")
        assert ckpt["extra"]["ctx_1"].shape == ckpt["ctx"].shape
        assert not torch.equal(ckpt["extra"]["ctx_1"], ckpt["ctx"])


def test_promptsrc_final_prompt_is_the_gaussian_average_of_the_epochs(data, tmp_path, monkeypatch):
    import dspt.learner_loop as learner_loop

    seen = []
    original = learner_loop._end_epoch

    def record(run, epoch, ctx, *args, **kwargs):
        seen.append(ctx.detach().clone())
        return original(run, epoch, ctx, *args, **kwargs)

    monkeypatch.setattr(learner_loop, "_end_epoch", record)
    assert _train(data, tmp_path / "run", tmp_path / "cache", "promptsrc") == 0
    w = np.exp(-0.5 * (np.arange(1, 4) - 2.0) ** 2)
    w /= w.sum()
    expected = sum(float(wi) * v for wi, v in zip(w, seen))
    saved = load_file(str(tmp_path / "run" / "prompt.safetensors"))
    from dspt.prompt_file import load_prompt

    got = torch.cat([t.reshape(-1) for t in load_prompt(tmp_path / "run").trainable().values()]).detach()
    assert len(seen) == 3 and set(saved) == {"prompt.ctx", "deep.0", "vision.0", "vision.1"}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - seen[-1]).abs().max() > 1e-4  # the average, not the last epoch


def test_kgcoop_at_weight_zero_is_coop_and_its_penalty_keeps_the_prompt_near_the_template(data, tmp_path):
    from dspt.learner_models import kg_penalty
    from dspt.prepare import zeroshot_text_features
    from dspt.prompt_file import load_prompt

    ctx = ["--ctx-init", "a photo of a", "--epochs", "6", "--lr", "0.5"]
    assert _train(data, tmp_path / "coop", tmp_path / "cache", "coop", *ctx) == 0
    assert _train(data, tmp_path / "kg0", tmp_path / "cache", "kgcoop", "--learner-opt", "weight=0", *ctx) == 0
    assert _train(data, tmp_path / "kg8", tmp_path / "cache", "kgcoop", *ctx) == 0
    coop, kg0, kg8 = (load_file(str(tmp_path / r / "prompt.safetensors"))["ctx"] for r in ("coop", "kg0", "kg8"))
    assert torch.equal(coop, kg0)  # the penalty is the only difference
    assert not torch.equal(coop, kg8)

    def penalty(run):
        clf = load_prompt(tmp_path / run)
        with torch.no_grad():
            ref = zeroshot_text_features(clf.backbone, clf.learner.classnames, "a photo of a {}.")
            return float(kg_penalty(clf.text_features(), ref))

    assert penalty("kg8") < 0.5 * penalty("coop")


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """The demo's prior, pretrained 4 epochs (not the demo's 16): enough for tuning to have something to learn."""
    from dspt.miniature import pretrained_miniature

    return pretrained_miniature(0, tmp_path_factory.mktemp("mini"), progress=False, pretrain_epochs=4)


@pytest.mark.parametrize("learner", ["coop", "kgcoop", "cocoop", "vpt", "vpt-deep", "maple", "promptsrc"])
def test_every_learner_learns_above_zero_shot_on_clean_labels(miniature, tmp_path, learner):
    """20 epochs at batch 32 and each learner's paper rate; CoCoOp at its paper's batch 1 (at batch 32 its 100
    steps leave it below zero-shot here). Gains on this project's CPU (1 and 2 threads alike): coop +4.8,
    kgcoop +2.9, cocoop +2.6, vpt +5.9, vpt-deep +5.9, maple +4.2, promptsrc +5.7 points."""
    options = {"maple": ["--learner-opt", "depth=3"], "promptsrc": ["--learner-opt", "depth=3"]}.get(learner, [])
    schedule = ["--epochs", "20", "--batch-size", "1" if learner == "cocoop" else "32"]
    assert main(["train", "--data", str(miniature["tune"] / "train"), "--test-data", str(miniature["test"]),
                 "--model", "dspt-tiny", "--checkpoint", str(miniature["checkpoint"]), "--shots", "16",
                 *schedule, "--views", "4", "--crop-scale", "0.8", "--no-hflip", "--noise-rate", "0",
                 "--loss", "ce", "--seed", "0", "--output", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--no-progress", "--learner", learner, *options]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["gain_over_zeroshot"] > 1.0, metrics["gain_over_zeroshot"]


@pytest.mark.parametrize("args, words", [
    (["--learner", "coopp"], "unknown learner 'coopp'"),
    (["--learner", "vpt", "--learner-opt", "depth=9"], "depth 9 is beyond the image tower's 4 layers"),
    (["--learner", "vpt", "--method", "dualprompt"], "method 'dualprompt' does not train learner 'vpt'"),
    (["--learner", "kgcoop", "--learner-opt", "weight=x"], "is not a number"),
])
def test_bad_learner_input_is_one_line_nonzero_and_leaves_nothing(data, tmp_path, capsys, args, words):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none", "--shots", "2",
                 "--epochs", "1", "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_learners_command_lists_every_learner_and_audit_refuses_a_module_learner(data, tmp_path, capsys):
    assert main(["learners"]) == 0
    text = capsys.readouterr().out
    for name in ("coop", "kgcoop", "cocoop", "vpt", "vpt-deep", "maple"):
        assert f"  {name} " in text
    assert "image tower (with gradients) on every step's images, no feature cache; trains alone" in text
    assert main(["audit", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none", "--learner", "vpt",
                 "-o", str(tmp_path / "audit"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learner 'vpt'" in err[0] and not (tmp_path / "audit").exists()
