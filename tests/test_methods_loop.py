"""Methods on the training loop: every method trains end to end on the tiny config, resumes to identical
numbers, keeps each learner of a multi-learner method in the checkpoint, and batches with plain runs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dspt.config import RunConfig
from dspt.methods import METHODS, Method, method_names
from dspt.rundir import load_checkpoint
from dspt.train import train, train_batch

from crashes import Crash, crash_before_checkpoint

VOLATILE = ("seconds", "cache_hit", "features_encoded", "memory")  # memory: the default budget is a share of the free RAM


class Twin(Method):
    """Two learners, each trained on every sample with the run's loss: learner 0 must be the plain run."""

    learners = 2


def _cfg(images, out, cache, **over) -> RunConfig:
    opts = dict(data=str(images), model="dspt-tiny", pretrained=None, shots=4, views=2, n_ctx=4, batch_size=4,
                epochs=5, noise_rate=0.4, loss="ce", lr=0.01, seed=1, device="cpu", cache_dir=str(cache),
                output=str(out), progress=False)
    opts.update(over)
    return RunConfig(**opts)


def _stable(run) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in VOLATILE}


@pytest.fixture
def twin(monkeypatch):
    monkeypatch.setitem(METHODS, "twin", Twin)
    return "twin"


def test_learner_zero_of_a_two_learner_method_is_the_plain_run(images, tmp_path, twin):
    plain = train(_cfg(images, tmp_path / "plain", tmp_path / "cache"))
    two = train(_cfg(images, tmp_path / "twin", tmp_path / "cache", method=twin))
    assert two["test_acc"] == plain["test_acc"]
    a = load_file(str(tmp_path / "plain" / "prompt.safetensors"))["ctx"]
    b = load_file(str(tmp_path / "twin" / "prompt.safetensors"))["ctx"]
    assert torch.allclose(a, b, atol=1e-4)  # one text-tower pass over two prompts: float rounding only
    ckpt = load_checkpoint(tmp_path / "twin")
    assert set(ckpt["extra"]) == {"ctx_1", "momentum_1", "insample_sum", "insample_epochs"}  # the audit's in-sample score
    assert not torch.allclose(ckpt["extra"]["ctx_1"], ckpt["ctx"])  # the second learner has its own init


def test_methods_batch_with_plain_runs_and_keep_their_numbers(images, tmp_path, twin):
    cfgs = [_cfg(images, tmp_path / f"b{i}", tmp_path / "cache", method=m, loss=loss)
            for i, (m, loss) in enumerate([("plain", "ce"), (twin, "dspt"), ("plain", "dspt")])]
    out = train_batch(cfgs)
    assert [s for s, _ in out] == ["ok"] * 3
    alone = train(_cfg(images, tmp_path / "alone", tmp_path / "cache", method=twin, loss="dspt"))
    assert out[1][1]["test_acc"] == pytest.approx(alone["test_acc"], abs=1e-9)


# nlprompt's Sinkhorn stops at ~5e-6 on the tiny backbone's logits (its warning has a test below)
@pytest.mark.filterwarnings("ignore::dspt.methods.nlprompt.SinkhornWarning")
@pytest.mark.parametrize("method", [m for m in method_names()])
def test_every_method_trains_and_resumes_to_identical_numbers(images, tmp_path, monkeypatch, method):
    """A crash after epoch 2's log line, before its checkpoint: the resumed run ends with the metrics of an
    uninterrupted one (a method's per-epoch decisions follow from the checkpointed state and the seed)."""
    cfg = dict(method=method, epochs=5)
    reference = train(_cfg(images, tmp_path / "ref", tmp_path / "cache", **cfg))
    assert 0 <= reference["test_acc"] <= 100 and reference["method"] == method
    with crash_before_checkpoint(2), pytest.raises(Crash):
        train(_cfg(images, tmp_path / "run", tmp_path / "cache", **cfg))
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1
    train(_cfg(images, tmp_path / "run", tmp_path / "cache", **cfg))
    got, want = _stable(tmp_path / "run"), _stable(tmp_path / "ref")
    assert got == want
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("event") == "epoch"] == list(range(5))


def test_unknown_method_or_option_is_one_line(images, tmp_path):
    from dspt.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'nope'; choose one of: plain"):
        _cfg(images, tmp_path / "x", tmp_path / "cache", method="nope").resolved()
    with pytest.raises(ConfigError, match="unknown option"):
        _cfg(images, tmp_path / "x", tmp_path / "cache", method_options={"zzz": 1.0}).resolved()


def test_nlprompt_warns_once_per_run_and_logs_ot_error_every_epoch(images, tmp_path):
    """A Sinkhorn that stops short (a tiny entropy weight) is one warning per run, not one per epoch; each epoch's
    log line keeps its error."""
    import warnings

    from dspt.methods.nlprompt import SINKHORN_STOP, SinkhornWarning

    cfg = _cfg(images, tmp_path / "run", tmp_path / "cache", method="nlprompt", method_options={"reg": 1e-4},
               epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    ours = [w for w in caught if issubclass(w.category, SinkhornWarning)]
    assert len(ours) == 1 and "--method-opt reg=" in str(ours[0].message)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    errors = [r["method_ot_error"] for r in log if r.get("event") == "epoch"]
    assert len(errors) == 3 and sum(e > SINKHORN_STOP for e in errors) >= 2  # measured: 2.8e-4, 2.8e-4, 8e-14
    assert f"{errors[0]:.3g}" in str(ours[0].message)
