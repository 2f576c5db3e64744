"""`--plan`: what a run or a grid will cost, before it runs. The figures themselves (time, memory) are checked
against real runs by benchmarks/plan_check.py; here, the plan's structure, its arithmetic and its refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dspt.config import RunConfig
from dspt.errors import ConfigError
from dspt.memory import OVERHEAD, PEAK_PER_SAVED
from dspt.plan import PLACEHOLDER_NAME, check_plan, format_plan, plan_runs, run_shape

from clirun import run_cli
from imagefolders import make_split_folders


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folders(tmp_path_factory.mktemp("plan") / "imgs", classes=4, train=10, test=3)


def _cfg(data: Path, root: Path, **over) -> RunConfig:
    base = dict(data=str(data), model="dspt-tiny", pretrained=None, shots=8, epochs=3, views=2, batch_size=4,
                n_ctx=4, device="cpu", cache_dir=str(root / "cache"), output=str(root / "run"), progress=False)
    return RunConfig(**(base | over)).resolved()


def test_a_benchmark_is_planned_from_the_registry_before_its_download():
    cfg = RunConfig(dataset="imagenet", model="dspt-tiny", pretrained=None, shots=16).resolved(need_data=False)
    shape = run_shape(cfg)
    assert (shape.classes, shape.n_train, shape.n_test) == (1000, 16000, 50000)
    assert shape.names == (PLACEHOLDER_NAME,) * 1000 and shape.learners == 1
    with pytest.raises(ConfigError, match="no data root for imagenet"):
        RunConfig(dataset="imagenet", model="dspt-tiny").resolved()  # a real run still needs it


def test_a_grids_plan_batches_as_the_sweep_does_and_counts_its_steps(data, tmp_path):
    cfgs = [_cfg(data, tmp_path, loss=loss, seed=seed, output=str(tmp_path / f"{loss}{seed}"))
            for loss in ("ce", "dspt") for seed in (1, 2)]
    cfgs.append(_cfg(data, tmp_path, shots=4, output=str(tmp_path / "k4"), method="coteaching"))
    plan = plan_runs(cfgs, [Path(c.output).name for c in cfgs], batch_runs=None)
    assert plan.runs == 5 and [len(b.names) for b in plan.batches] == [4, 1]
    big, small = plan.batches
    assert (big.shape.classes, big.shape.n_train, big.rows) == (4, 32, 16)
    assert big.steps == 32 // 4 * 3
    assert small.shape.learners == 2 and small.rows == 2 * 4 and small.steps == 16 // 4 * 3
    for b in plan.batches:
        t = b.timing
        assert t.step_s > 0 and t.eval_s > 0 and t.bookkeeping_s > 0 and t.encode_s_per_image > 0
        assert t.chunk_rows is None
        per_epoch = b.steps / b.cfg.epochs * t.step_s + t.eval_s + b.at_once * t.bookkeeping_s
        assert b.train_s == pytest.approx(b.cfg.epochs * per_epoch)
        assert b.peak_bytes == t.model_bytes + b.feature_bytes(b.at_once) + t.step_peak_bytes
    # training views per distinct (shots, seed): 2 seeds x 32 images x 3 views, 16 x 3 for the 4-shot run;
    # test images once
    assert plan.encodings == 2 * 32 * 3 + 16 * 3 + 12
    assert plan.total_s == pytest.approx(plan.train_s + plan.encode_s)
    assert "5 runs in 2 batches" in format_plan(plan)
    check_plan(plan)


def test_the_plan_derives_chunks_from_the_budget_and_refuses_one_too_small(data, tmp_path):
    cfg = _cfg(data, tmp_path, max_memory=OVERHEAD / 2**30 + 1e-4)
    plan = plan_runs([cfg])
    assert plan.problems and "cannot hold one prompt row" in plan.problems[0]
    with pytest.raises(ConfigError, match="raise --max-memory"):
        check_plan(plan)
    probe = plan_runs([_cfg(data, tmp_path)]).batches[0].timing
    rows = 3  # of the 4 classes
    budget = (OVERHEAD + (rows + 0.5) * probe.per_row_bytes * PEAK_PER_SAVED) / 2**30
    b = plan_runs([_cfg(data, tmp_path, max_memory=budget)]).batches[0]
    assert b.timing.chunk_rows == rows
    assert b.timing.step_peak_bytes == int(OVERHEAD + rows * b.timing.per_row_bytes * PEAK_PER_SAVED)


def test_train_plan_prints_the_plan_and_writes_nothing(data, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["train", "--plan", "--data", str(data), "--model", "dspt-tiny", "--pretrained",
                                    "none", "--shots", "8", "--epochs", "2", "--n-ctx", "4", "--device", "cpu",
                                    "--cache-dir", str(tmp_path / "cache"), "-o", str(out)])
    assert code == 0, stderr
    assert "rows/chunk" in stdout and "plan: 1 runs in 1 batches on cpu" in stdout
    assert not out.exists()
    code, _, stderr = run_cli(["train", "--plan", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none",
                               "--device", "cpu", "--max-memory", "0.00001", "-o", str(out)])
    errors = [line for line in stderr.splitlines() if line.startswith("dspt: error:")]
    assert code != 0 and len(errors) == 1 and "cannot hold one prompt row" in errors[0]
    assert not out.exists()
    code, _, stderr = run_cli(["train", "--plan", "--data", str(data), "--model", "ViT-B-99", "-o", str(out)])
    assert code != 0 and "ViT-B-99" in stderr and len(stderr.strip().splitlines()) == 1


def test_sweep_plan_plans_every_cell_and_runs_none(data, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"data": str(data), "model": "dspt-tiny", "pretrained": None, "shots": 8,
                                    "epochs": 2, "n_ctx": 4, "device": "cpu", "cache_dir": str(tmp_path / "cache"),
                                    "output": str(tmp_path / "sweep"), "loss": ["ce", "dspt"], "seed": [1, 2, 3]}))
    code, stdout, stderr = run_cli(["sweep", str(grid), "--plan", "--batch-runs", "2"])
    assert code == 0, stderr
    assert "plan: 6 runs in 3 batches" in stdout
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())
