"""`dspt sweep`: grid expansion, deterministic run folders, skip-done, reconcile, failures, bad grids.

Kills of a running sweep are in test_reliability.py. Tiny random-weight model on generated images, CPU, one
torch thread, no network.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from clirun import run_cli
from imagefolders import make_image_folder

from dspt.config import ConfigError
from dspt.io import read_jsonl
from dspt.sweep import cell_name, expand, list_cells, plan_batches, run_sweep


def base(images: Path, tmp: Path, **over) -> dict:
    spec = {"data": str(images), "model": "dspt-tiny", "pretrained": "none", "shots": 2, "views": 1, "n_ctx": 4,
            "batch_size": 2, "epochs": 2, "device": "cpu", "cache_dir": str(tmp / "cache"),
            "output": str(tmp / "sweep")}
    spec.update(over)
    return spec


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dspt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------- expansion

def test_lists_are_crossed_in_order_with_deterministic_names(images, tmp_path):
    spec = base(images, tmp_path, loss=["ce", "dspt"], noise_rate=[0, 0.4], seed=[1, 2, 3], shots="all")
    cells = expand(spec)
    assert len(cells) == 12
    assert [c.name for c in cells[:4]] == ["loss=ce,noise_rate=0,seed=1", "loss=ce,noise_rate=0,seed=2",
                                          "loss=ce,noise_rate=0,seed=3", "loss=ce,noise_rate=0.4,seed=1"]
    assert [c.name for c in expand(spec)] == [c.name for c in cells], "same grid, same folders"
    cfg = cells[3].config
    assert (cfg.loss, cfg.noise_rate, cfg.seed) == ("ce", 0.4, 1)
    assert cfg.output == str(tmp_path / "sweep" / "loss=ce,noise_rate=0.4,seed=1")
    assert cfg.results == str(tmp_path / "sweep" / "results.csv")
    assert cfg.pretrained is None and cfg.shots == 0 and cfg.epochs == 2 and cfg.progress is False
    assert expand(base(images, tmp_path))[0].name == "run"  # nothing crossed: one run


def test_grid_section_and_loss_option_lists(images, tmp_path):
    spec = base(images, tmp_path, loss="gce", grid={"loss_options": [{"q": 0.7}, {"q": 0.5}], "seed": [0]})
    cells = expand(spec, output=tmp_path / "elsewhere", results=tmp_path / "r.csv")
    assert [c.name for c in cells] == ["loss_options=q0.7,seed=0", "loss_options=q0.5,seed=0"]
    assert cells[1].config.loss_options == {"q": 0.5} and cells[1].config.seed == 0
    assert cells[0].config.output.startswith(str(tmp_path / "elsewhere"))
    assert cells[0].config.results == str(tmp_path / "r.csv")
    assert cell_name({"template": "a {} / photo"}) == "template=a_photo"


BAD_GRIDS = [
    ("unknown-key", dict(los=["ce"]), ["unknown option 'los'"]),
    ("duplicate", dict(seed=[1, 1]), ["lists a value twice"]),
    ("empty", dict(seed=[]), ["empty list"]),
    ("bad-cell", dict(noise_rate=[0, 1.5]), ["grid cell 'noise_rate=1.5'", "outside [0, 1)"]),
    ("bad-loss", dict(loss=["ce", "nope"]), ["grid cell 'loss=nope'", "unknown loss"]),
    ("no-output", dict(output=None), ["no 'output:' folder"]),
    ("both", dict(seed=[1, 2], grid={"seed": [3]}), ["both at the top level and under 'grid:'"]),
]


@pytest.mark.parametrize("name,change,words", BAD_GRIDS, ids=[b[0] for b in BAD_GRIDS])
def test_bad_grid_fails_before_anything_runs(images, tmp_path, name, change, words):
    spec = {k: v for k, v in (base(images, tmp_path) | change).items() if v is not None}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(["sweep", str(tmp_path / "grid.yaml")])
    assert code == 2
    line = error_line(err)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()


def test_grid_file_problems(tmp_path):
    code, _, err = run_cli(["sweep", str(tmp_path / "missing.yaml")])
    assert code == 2 and "not found" in error_line(err)
    (tmp_path / "bad.yaml").write_text("loss: [ce, dspt\n")
    code, _, err = run_cli(["sweep", str(tmp_path / "bad.yaml")])
    assert code == 2 and "not valid YAML" in error_line(err)
    (tmp_path / "list.yaml").write_text("- ce\n- dspt\n")
    code, _, err = run_cli(["sweep", str(tmp_path / "list.yaml")])
    assert code == 2 and "mapping" in error_line(err)
    code, _, err = run_cli(["sweep", str(tmp_path / "list.yaml"), "--jobs", "0"])
    assert code == 2 and "--jobs 0" in error_line(err)


def test_ray_backend_is_optional_with_a_clear_error(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as where ray is not installed: `import ray` fails
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(base(images, tmp_path, seed=[1, 2])))
    code, _, err = run_cli(["sweep", str(tmp_path / "grid.yaml"), "--backend", "ray"])
    assert code == 2
    line = error_line(err)
    assert "optional package 'ray'" in line and "--backend local" in line
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------------------------ running

def rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_pool_runs_each_cell_once_skips_done_and_restores_lost_rows(images, tmp_path):
    spec = base(images, tmp_path, loss=["ce", "dspt"], seed=[1, 2])
    res = run_sweep(spec, jobs=2, echo=lambda s: None)  # worker processes from the fork server
    assert res.ok, res.failed
    assert sorted(res.finished) == sorted(c.name for c in res.cells) and not res.skipped
    results = tmp_path / "sweep" / "results.csv"
    table = rows(results)
    assert sorted(table["run_id"]) == sorted(str(c.run_dir.resolve()) for c in res.cells)
    for cell in res.cells:
        assert (cell.run_dir / "metrics.json").is_file() and (cell.run_dir / "environment.json").is_file()
    assert [c.status() for c in list_cells(spec)] == ["done"] * 4

    again = run_sweep(spec, jobs=2, echo=lambda s: None)
    assert sorted(again.skipped) == sorted(res.finished) and not again.finished
    assert rows(results).equals(table), "a finished sweep run again changes nothing"

    # A kill between a run's metrics.json and its results row: the next sweep adds the row, once.
    lost = str(res.cells[1].run_dir.resolve())
    table[table["run_id"] != lost].to_csv(results, index=False)
    run_sweep(spec, jobs=1, echo=lambda s: None)
    restored = rows(results)
    assert sorted(restored["run_id"]) == sorted(table["run_id"]) and restored["run_id"].is_unique

    # The grid grows: only the new cells run, into the same results file.
    bigger = run_sweep(base(images, tmp_path, loss=["ce", "dspt"], seed=[1, 2, 3]), echo=lambda s: None)
    assert sorted(bigger.finished) == ["loss=ce,seed=3", "loss=dspt,seed=3"] and len(bigger.skipped) == 4
    assert len(rows(results)) == 6 and rows(results)["run_id"].is_unique

    code, out, _ = run_cli(["sweep", str(_write(tmp_path, spec)), "--list"])
    assert code == 0 and out.count("done ") == 4


def _write(tmp: Path, spec: dict) -> Path:
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_failed_cell_is_reported_and_the_others_finish(images, tmp_path):
    grid = _write(tmp_path, base(images, tmp_path, lr=[0.002, 1e30]))
    code, out, err = run_cli(["sweep", str(grid)])
    assert code == 1
    line = error_line(err)
    assert "run lr=1e+30 failed" in line and "non-finite" in line
    assert "1 finished, 0 skipped, 1 failed" in out
    table = rows(tmp_path / "sweep" / "results.csv")
    assert list(table["run_id"]) == [str((tmp_path / "sweep" / "lr=0.002").resolve())]
    assert not (tmp_path / "sweep" / "lr=1e+30" / "metrics.json").exists()


def test_changed_base_config_stops_before_running(images, tmp_path):
    spec = base(images, tmp_path, seed=[1, 2])
    assert run_sweep(spec, echo=lambda s: None).ok
    before = (tmp_path / "sweep" / "results.csv").read_bytes()
    code, _, err = run_cli(["sweep", str(_write(tmp_path, spec | {"epochs": 3}))])
    assert code == 3
    line = error_line(err)
    assert "holds a different run" in line and "epochs" in line
    assert (tmp_path / "sweep" / "results.csv").read_bytes() == before


def test_bad_jobs_and_backend_values():
    with pytest.raises(ConfigError, match="--jobs 0"):
        run_sweep({"output": "x"}, jobs=0)
    with pytest.raises(ConfigError, match="backend 'slurm' unknown"):
        run_sweep({"output": "x"}, backend="slurm")


BAD_OPTIONS = [
    (["--batch-runs", "-1"], "--batch-runs -1"),
    (["--backend", "ray", "--cpus-per-run", "0"], "--cpus-per-run 0"),
    (["--backend", "ray", "--gpus-per-run", "-1"], "--gpus-per-run -1"),
    (["--backend", "ray", "--gpus-per-run", "1.5"], "whole number"),
    (["--gpus-per-run", "1"], "are for --backend ray"),
]


@pytest.mark.parametrize("args,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_batch_and_resource_options_fail_before_anything_runs(images, tmp_path, args, words):
    code, _, err = run_cli(["sweep", str(_write(tmp_path, base(images, tmp_path, seed=[1, 2]))), *args])
    assert code == 2 and words in error_line(err)
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------------------------ batches

def test_batches_never_mix_models_shots_or_data(images, tmp_path):
    other = make_image_folder(tmp_path / "other")
    spec = base(images, tmp_path, model=["dspt-tiny", "RN50"], shots=[2, 4], data=[str(images), str(other)],
                loss=["ce", "dspt"], lr=[0.002, 0.01], seed=[1, 2])
    cells = expand(spec)
    units = plan_batches(cells, 64)
    assert len(units) == 8 and all(len(u) == 8 for u in units), "2 models x 2 shots x 2 data; the rest batches"
    for unit in units:
        assert len({(c.config.model, c.config.shots, c.config.data) for c in unit}) == 1
        assert len({(c.config.loss, c.config.lr, c.config.seed) for c in unit}) == 8
    assert sorted(c.name for u in units for c in u) == sorted(c.name for c in cells), "each cell once"
    assert [[c] for c in cells] == plan_batches(cells, 1) == plan_batches(cells, 0), "0 or 1: no batching"


def sizes(units: list) -> list[int]:
    return [len(u) for u in units]


def test_batch_cap_and_split_over_workers(images, tmp_path):
    cells = expand(base(images, tmp_path, seed=list(range(40))))  # 40 compatible runs
    assert sizes(plan_batches(cells, 64)) == [40]
    assert sizes(plan_batches(cells, 64, workers=2)) == [20, 20]
    assert sizes(plan_batches(cells, 64, workers=3)) == [14, 13, 13]
    assert sizes(plan_batches(cells, 16)) == [14, 13, 13], "at most the cap, as even as can be"
    assert sizes(plan_batches(cells, 16, workers=2)) == [14, 13, 13], "enough batches for the workers already"
    assert sizes(plan_batches(cells[:3], 64, workers=8)) == [1, 1, 1], "never an empty batch"
    assert [c.name for u in plan_batches(cells, 16, workers=5) for c in u] == [c.name for c in cells]
    # two groups (epochs differ): the larger one is split first
    mixed = expand(base(images, tmp_path, epochs=[2, 3], seed=list(range(6))))[:9]  # 6 + 3 runs
    assert sizes(plan_batches(mixed, 64)) == [6, 3]
    assert sizes(plan_batches(mixed, 64, workers=3)) == [3, 3, 3]
    assert sizes(plan_batches(mixed, 64, workers=4)) == [2, 2, 2, 3]
    assert sizes(plan_batches(mixed, lambda cell: 2 if cell.config.epochs == 2 else 64)) == [2, 2, 2, 3]


def test_batched_sweep_reports_each_run_once(images, tmp_path):
    spec = base(images, tmp_path, loss=["ce", "dspt"], seed=[1, 2, 3])
    lines: list[str] = []
    res = run_sweep(spec, jobs=2, echo=lines.append)  # automatic: 6 compatible runs, 2 workers: 3 + 3
    assert res.ok, res.failed
    assert [len(b) for b in res.batches] == [3, 3] and "2 batches of runs trained together" in lines[0]
    names = sorted(c.name for c in res.cells)
    assert sorted(res.finished) == names and sorted(itertools.chain(*res.batches)) == names
    assert sorted(line.split("] ")[1].split(":")[0] for line in lines if line.startswith("[")) == names
    table = rows(tmp_path / "sweep" / "results.csv")
    assert sorted(table["run_id"]) == sorted(str(c.run_dir.resolve()) for c in res.cells)
    for cell in res.cells:
        assert [r["epoch"] for r in read_jsonl(cell.run_dir / "log.jsonl") if r["event"] == "epoch"] == [0, 1]

    # inline (jobs=1), one batch of all: a grown grid runs only its new cells, in one batch
    bigger = run_sweep(base(images, tmp_path, loss=["ce", "dspt"], seed=[1, 2, 3, 4]), echo=lambda s: None)
    assert bigger.batches == [["loss=ce,seed=4", "loss=dspt,seed=4"]] and len(bigger.skipped) == 6
    assert bigger.ok and len(rows(tmp_path / "sweep" / "results.csv")) == 8
    assert rows(tmp_path / "sweep" / "results.csv")["run_id"].is_unique


def _killed(cfgs):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_batch_worker_fails_every_run_of_its_batch(images, tmp_path, monkeypatch):
    import dspt.train  # noqa: F401 - the module (the package's `dspt.train` attribute is the function)

    monkeypatch.setattr(sys.modules["dspt.train"], "train_batch", _killed)  # forked workers inherit it
    spec = base(images, tmp_path, loss=["ce", "dspt"], seed=[1, 2])
    res = run_sweep(spec, jobs=2, start_method="fork", echo=lambda s: None)
    assert sorted(res.failed) == sorted(c.name for c in res.cells) and not res.finished
    assert set(res.failed.values()) == {f"worker died (exit code {-signal.SIGKILL})"}
    assert [len(b) for b in res.batches] == [2, 2]

    monkeypatch.undo()
    again = run_sweep(spec, jobs=2, echo=lambda s: None)
    assert again.ok and sorted(again.finished) == sorted(c.name for c in res.cells)
    assert len(rows(tmp_path / "sweep" / "results.csv")) == 4
