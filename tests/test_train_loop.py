"""The loop's parts: lr schedule, view sampling, loss scaling, safe checkpoints, what a run records."""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dspt.config import RunConfig
from dspt.rundir import CHECKPOINT, load_checkpoint, save_checkpoint
from dspt.train import (epoch_generator, grad_scaler, lr_at, needs_loss_scaling, optimizer_step, resolve_lr,
                        train)

from imagefolders import make_split_folders


def test_lr_schedule_is_warmup_then_cosine():
    cfg = RunConfig(data="x", lr=0.01, warmup_lr=1e-5, warmup_epochs=2, epochs=10).resolved()
    lrs = [lr_at(cfg, e) for e in range(10)]
    assert lrs[:2] == [1e-5, 1e-5]
    assert lrs[2] == pytest.approx(0.01)  # the cosine starts at the full rate right after warm-up
    for e in range(2, 10):  # CoOp/Dassl: cosine over `epochs`, counted from the end of the warm-up
        assert lrs[e] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * (e - 2) / 10)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    ce = RunConfig(data="x", loss="ce", warmup_epochs=0, epochs=4).resolved()
    assert lr_at(ce, 0, resolve_lr(ce, 10)) == pytest.approx(0.002)  # CoOp's rate for CE


def test_default_rate_takes_ces_first_step():
    """lr none: CE gets CoOp's 0.002; another loss gets the rate whose first step (at a flat prediction) is CE's:
    DSPT's logit gradient there is 1/C of CE's, so its rate is C times CoOp's."""
    from dspt.losses import get_loss, matched_lr

    for c in (2, 10, 100):
        dspt = RunConfig(data="x", loss="dspt").resolved()
        assert resolve_lr(dspt, c) == pytest.approx(0.002 * c, rel=1e-5)
        assert resolve_lr(RunConfig(data="x", loss="dspt", lr=0.05).resolved(), c) == 0.05  # a given rate wins
        for name in ("gce", "mae", "sce", "logitnorm"):
            z = torch.full((1, c), 20.0, dtype=torch.float64, requires_grad=True)
            y = torch.zeros(1, dtype=torch.long)
            norms = {}
            for loss in ("ce", name):
                (g,) = torch.autograd.grad(get_loss(loss).per_sample(z.float(), y).sum(), z)
                norms[loss] = float(g.norm())
            step = matched_lr(name, c) * norms[name]
            assert step == pytest.approx(0.002 * norms["ce"], rel=1e-4)


def test_each_epoch_draws_its_own_order_and_views_reproducibly():
    def draw(seed, epoch, n=50, views=4):
        gen = epoch_generator(seed, epoch)
        return torch.randperm(n, generator=gen), torch.randint(1, views + 1, (n,), generator=gen)

    perm, view = draw(3, 0)
    assert sorted(perm.tolist()) == list(range(50)) and view.min() >= 1 and view.max() <= 4
    assert set(view.tolist()) == {1, 2, 3, 4}  # view 0 (un-augmented) is never a training view
    assert all(torch.equal(a, b) for a, b in zip(draw(3, 0), (perm, view)))
    assert not torch.equal(draw(3, 1)[0], perm) and not torch.equal(draw(4, 0)[0], perm)


def test_fp16_uses_a_gradient_scaler_and_small_gradients_survive():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert needs_loss_scaling("fp16", cuda)
    assert not needs_loss_scaling("bf16", cuda) and not needs_loss_scaling("fp32", cuda)
    assert not needs_loss_scaling("fp16", cpu)  # the CPU path never casts
    assert not grad_scaler(types.SimpleNamespace(precision="fp32", device=cpu)).is_enabled()

    # What the scaler is for, on the CPU's fp16 autocast: a DSPT-sized gradient (1e-8) underflows in fp16.
    def grad(scaler):
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD([w], lr=1.0)
        with torch.autocast("cpu", dtype=torch.float16):
            y = w[None] @ torch.ones(4, 2)
        loss = y.float().sum() * 1e-8
        optimizer_step(loss, opt, scaler)
        return w.grad  # unscaled by the scaler before the step

    assert torch.all(grad(torch.amp.GradScaler("cpu", enabled=False)) == 0)  # lost without scaling
    assert torch.allclose(grad(torch.amp.GradScaler("cpu", enabled=True)), torch.full((4,), 2e-8), rtol=1e-2)


def test_checkpoint_round_trip_is_safetensors_only(tmp_path):
    ctx, mom = torch.randn(4, 8), torch.randn(4, 8)
    save_checkpoint(tmp_path, 5, ctx, mom, {"scale": 1024.0})
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 5 and torch.equal(state["ctx"], ctx) and torch.equal(state["momentum"], mom)
    assert torch.equal(state["torch_rng"], torch.get_rng_state()) and state["scaler"] == {"scale": 1024.0}
    assert (tmp_path / CHECKPOINT).read_bytes()[:8] != b"\x80\x02\x8a\nl\xfc\x9cF"  # not a pickle


class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(_Payload.marker), "code ran"))


def test_a_planted_pickle_in_a_run_folder_never_runs(tmp_path, images):
    """A shared run folder must not be able to execute code on resume: an old-style checkpoint.pt whose
    pickle would write a file is ignored (the run starts over), never unpickled."""
    _Payload.marker = str(tmp_path / "pwned")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 3, "ctx": torch.zeros(4, 8), "evil": _Payload()}, run / "checkpoint.pt")
    cfg = RunConfig(data=str(images), model="dspt-tiny", pretrained=None, shots=4, views=1, n_ctx=4, epochs=2,
                    batch_size=4, device="cpu", cache_dir=str(tmp_path / "cache"), output=str(run), progress=False)
    metrics = train(cfg)
    assert not (tmp_path / "pwned").exists()
    starts = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"start"' in l]
    assert starts[0]["epoch"] == 0 and metrics["n_train"] == 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_folders(tmp_path_factory.mktemp("imgs"), classes=3, train=10, test=5)


def test_run_records_what_ran(data, tmp_path):
    cfg = RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=4, views=1, ctx_init="a photo of a",
                    epochs=2, batch_size=4, device="cpu", cache_dir=str(tmp_path / "cache"), seed=0,
                    output=str(tmp_path / "run"), progress=False)
    metrics = train(cfg)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["n_ctx"] == 4 and recorded["seed"] == 0 and recorded["split_seed"] == 1
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert {"dspt", "torch", "torchvision", "open_clip_torch", "numpy", "python"} <= set(env)
    dataset = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert dataset["seeds"] == metrics["seeds"] and set(dataset["seeds"]) >= {"shots", "noise", "init", "epochs"}
    assert np.isnan(metrics["train"]["memorised"])  # no wrong label: nothing to memorise


def test_epoch_log_has_the_loss_of_clean_and_mislabeled_samples(data, tmp_path):
    """The mechanism curves: the last epoch's mean per-sample loss of clean vs mislabeled samples equals the
    loss recomputed in float64 from the final prompt (CE: -log softmax(z)_y)."""
    from dspt.train import load_prompt, prepare

    cfg = RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=6, views=1, n_ctx=4, epochs=2,
                    batch_size=6, device="cpu", cache_dir=str(tmp_path / "cache"), seed=3, loss="ce", lr=0.05,
                    noise="sym", noise_rate=0.5, output=str(tmp_path / "run"), progress=False)
    train(cfg)
    last = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
            if json.loads(x).get("event") == "epoch"][-1]
    p = prepare(cfg.resolved())
    clf = load_prompt(tmp_path / "run", backbone=p.backbone)
    with torch.no_grad():
        z = (p.backbone.logit_scale * p.train_feats[0] @ clf.text_features().t()).double()
    given = torch.as_tensor(p.labels.given)
    per = -torch.log_softmax(z, -1).gather(1, given[:, None]).squeeze(1).numpy()
    noisy = p.labels.is_noisy
    assert noisy.sum() == 9  # half of 18 labels
    assert last["loss_noisy"] == pytest.approx(per[noisy].mean(), rel=1e-4)
    assert last["loss_clean"] == pytest.approx(per[~noisy].mean(), rel=1e-4)


def test_a_finished_run_is_not_reused_when_its_label_table_changed(tmp_path):
    """A run's identity includes the contents of the files its config names (here a label table): the same
    command after the labels changed is refused in one line instead of returning the old run's numbers."""
    from dspt.errors import TrainingError
    from imagefolders import make_image_folder

    make_image_folder(tmp_path / "img", classes=3, per_class=6, size=16)
    images = sorted((tmp_path / "img").rglob("*.png"))
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    cfg = RunConfig(data=str(table), model="dspt-tiny", pretrained=None, shots=0, views=1, n_ctx=4, epochs=1,
                    batch_size=4, loss="ce", device="cpu", cache_dir=str(tmp_path / "cache"),
                    output=str(tmp_path / "run"), progress=False)
    first = train(cfg)
    assert train(cfg) == first  # unchanged inputs: the finished run is returned
    assert json.loads((tmp_path / "run" / "inputs.json").read_text())["data"]
    text = table.read_text().splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + "," + images[-1].parent.name  # one label corrected
    table.write_text("\n".join(text) + "\n")
    with pytest.raises(TrainingError, match="was trained on other contents of .*labels.csv") as info:
        train(cfg)
    assert "\n" not in str(info.value)
