"""Named protocol presets (`dspt presets`, `dspt sweep --preset`) and the union of grids (`grids:`) they use.

Presets expand without data on disk (a config checks names and values only); one two-run slice of a preset
runs end to end on a tiny fake CoOp-layout tree with the offline tiny model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from clirun import run_cli
from conftest import write_jpeg

from dspt.errors import ConfigError
from dspt.losses import LOSSES, loss_names
from dspt.methods import method_names
from dspt.presets import PRESETS, count_runs, get_preset, parse_overrides, preset_spec
from dspt.sweep import expand, list_cells

COOP_10 = {"caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
           "dtd", "eurosat", "ucf101"}
PTNL_DATASETS = {"caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "dtd", "ucf101"}
FPS = [2, 4, 6, 8, 10, 12]


def expected(name: str) -> dict:
    """What each preset must be, written out independently of dspt.presets."""
    model = "ViT-B-16" if name.endswith("-vitb16") else "RN50"
    if name.startswith("joapr"):
        settings = ({(d, n, "fp", fp) for d in COOP_10 for n in ("symflip", "pairflip") for fp in FPS}
                    | {(d, n, "rate", fp / 16) for d in COOP_10 for n in ("sym", "pair") for fp in FPS}
                    | {("food101n", "given", None, None)})
        runs = {("plain", loss) for loss in loss_names()} | {(m, "ce") for m in method_names() if m != "plain"}
        return dict(model=model, epochs=200, settings=settings, runs=runs, seeds={1, 2, 3})
    settings = {(d, "symflip", "fp", fp) for d in PTNL_DATASETS for fp in (0, 2, 4, 8)}
    return dict(model=model, epochs=50, settings=settings, runs={("plain", "ce"), ("plain", "gce")}, seeds={1, 2, 3})


def setting(cfg) -> tuple:
    if cfg.noise in ("symflip", "pairflip"):
        return (cfg.dataset, cfg.noise, "fp", cfg.fp)
    if cfg.noise in ("sym", "pair"):
        return (cfg.dataset, cfg.noise, "rate", cfg.noise_rate)
    return (cfg.dataset, cfg.noise, None, None)


# --------------------------------------------------------------------------------------------- the presets

def test_the_presets_are_shipped():
    assert set(PRESETS) == {"joapr", "joapr-vitb16", "ptnl", "ptnl-vitb16", "learners"}
    for preset in PRESETS.values():
        assert preset.description and "\n" not in preset.description and preset.source


def test_learners_preset_is_every_learner_on_its_papers_schedule(tmp_path, monkeypatch):
    """Written out independently of dspt.presets and dspt.learners: the papers' epochs, batch sizes, rates."""
    monkeypatch.delenv("DSPT_DATA", raising=False)
    schedule = {"coop": (200, 32, 0.002), "kgcoop": (100, 128, 0.002), "cocoop": (10, 1, 0.002),
                "vpt": (5, 4, 0.0025), "vpt-deep": (5, 4, 0.0025), "maple": (5, 4, 0.0035),
                "promptsrc": (20, 4, 0.0025)}
    cells = expand(preset_spec("learners", root=str(tmp_path / "not-there")))
    rates = {fp / 16 for fp in FPS}
    assert len(cells) == len(schedule) * len(COOP_10) * len(rates) * 3 * 3 == count_runs(preset_spec("learners"))
    seen = set()
    for cell in cells:
        cfg = cell.config
        assert (cfg.model, cfg.pretrained, cfg.shots, cfg.noise) == ("ViT-B-16", "openai", 16, "sym")
        assert cfg.method == "plain"
        assert cfg.noise_rate in rates and cfg.dataset in COOP_10 and cfg.seed in (1, 2, 3)
        assert (cfg.epochs, cfg.batch_size) == schedule[cfg.learner][:2] and cfg.lr is None
        seen.add((cfg.learner, cfg.loss))
    assert seen == {(learner, loss) for learner in schedule for loss in ("ce", "dspt", "mae")}
    from dspt.loop import resolve_lr

    for learner, (_, _, lr) in schedule.items():  # CE at the paper's rate
        cfg = next(c.config for c in cells if c.config.learner == learner and c.config.loss == "ce")
        assert resolve_lr(cfg, 10) == pytest.approx(lr)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"learners"}))
def test_every_preset_expands_to_its_formula_with_valid_configs(name, tmp_path, monkeypatch):
    monkeypatch.delenv("DSPT_DATA", raising=False)
    want = expected(name)
    spec = preset_spec(name, root=str(tmp_path / "not-there"))  # no data on disk: expand must not need any
    cells = expand(spec)
    n = len(want["settings"]) * len(want["runs"]) * len(want["seeds"])
    assert len(cells) == n == count_runs(spec)
    assert len({c.name for c in cells}) == n
    got = {setting(c.config) for c in cells}
    assert got == want["settings"]
    assert {(c.config.method, c.config.loss) for c in cells} == want["runs"]
    assert {c.config.seed for c in cells} == want["seeds"]
    for cell in cells:
        cfg = cell.config
        assert (cfg.model, cfg.pretrained, cfg.shots, cfg.epochs) == (want["model"], "openai", 16, want["epochs"])
        assert (cfg.n_ctx, cfg.ctx_init, cfg.class_token_position, cfg.csc) == (16, None, "end", False)
        # the source papers' rate for the losses they ran (CoOp's CE, PTNL's GCE), the matched default otherwise
        assert (cfg.lr, cfg.batch_size) == (0.002 if cfg.loss in ("ce", "gce") else None, 32)
        if cfg.noise in ("symflip", "pairflip"):
            assert cfg.noise_rate == cfg.fp / 16
        assert cell.name.startswith(f"dataset={cfg.dataset},noise={cfg.noise}")
        assert cell.name.endswith(f"loss={cfg.loss},seed={cfg.seed}")
        assert ("method=" in cell.name) == name.startswith("joapr")
        assert Path(cfg.output).parent == Path("sweeps") / name
    assert not (tmp_path / "not-there").exists()


def test_joapr_runs_every_loss_registered_when_it_is_expanded(monkeypatch):
    before = count_runs(preset_spec("joapr"))
    monkeypatch.setitem(LOSSES, "late_loss", LOSSES["ce"])  # as a loss added after the preset was written
    spec = preset_spec("joapr")
    plain = [e for e in spec["grids"] if e["method"] == ["plain"]]
    assert all(e["loss"] == loss_names() and e["loss"][-1] == "late_loss" for e in plain)
    per_setting = (len(LOSSES) - 1) + len(method_names()) - 1
    assert count_runs(spec) == before // per_setting * (per_setting + 1)


def test_food101n_is_one_setting_with_its_own_labels(tmp_path):
    cells = expand(preset_spec("joapr", datasets=["food101n"], root=str(tmp_path)))
    assert len(cells) == (len(loss_names()) + len(method_names()) - 1) * 3
    assert {(c.config.noise, c.config.noise_rate, c.config.fp) for c in cells} == {("given", 0.0, None)}
    assert cells[0].name == "dataset=food101n,noise=given,method=plain,loss=ce,seed=1"


# ---------------------------------------------------------------------------------- narrowing a preset

def names(spec: dict) -> list[str]:
    return [c.name for c in expand(spec)]


def test_datasets_keep_a_subset_in_preset_order(tmp_path):
    spec = preset_spec("ptnl", datasets=["dtd", "flowers102"], root=str(tmp_path))  # an alias is fine
    cells = expand(spec)
    assert [d for d in dict.fromkeys(c.config.dataset for c in cells)] == ["oxford_flowers", "dtd"]
    assert len(cells) == 2 * 4 * 2 * 3
    assert all(c.config.root == str(tmp_path) for c in cells)


def test_set_overrides_every_cell_and_selects_noise_settings(tmp_path):
    root = str(tmp_path)
    full = set(names(preset_spec("joapr", datasets=["dtd"], root=root)))
    spec = preset_spec("joapr", datasets=["dtd"], root=root,
                       overrides=parse_overrides(["seed=1", "epochs=2", "loss=ce,dspt", "noise=symflip", "fp=2",
                                                  "method=plain"]))
    cells = expand(spec)
    assert [c.name for c in cells] == ["dataset=dtd,noise=symflip,fp=2,method=plain,loss=ce,seed=1",
                                      "dataset=dtd,noise=symflip,fp=2,method=plain,loss=dspt,seed=1"]
    assert {c.name for c in cells} <= full, "a slice runs into the full preset's folders"
    assert all(c.config.epochs == 2 for c in cells)

    # noise=sym keeps the sym settings only (the symflip/pairflip and given entries list no 'sym')
    sym = expand(preset_spec("joapr", datasets=["dtd", "food101n"], root=root,
                             overrides={"noise": "sym", "seed": "1", "loss": "ce", "method": "plain"}))
    assert {setting(c.config) for c in sym} == {("dtd", "sym", "rate", fp / 16) for fp in FPS}
    # a value no entry lists replaces the lists where the option is crossed, and only there
    fp3 = expand(preset_spec("joapr", datasets=["dtd"], root=root,
                             overrides={"fp": "3", "seed": "1", "loss": "ce", "method": "plain"}))
    assert {c.config.fp for c in fp3 if c.config.noise in ("symflip", "pairflip")} == {3}
    assert sum(c.config.noise in ("sym", "pair") for c in fp3) == 12
    # values are coerced like the command line's: 'none', 'all', numbers in text
    spec = preset_spec("ptnl", datasets=["dtd"], root=root, overrides={"pretrained": "none", "lr": "2e-3"})
    assert spec["pretrained"] is None and spec["lr"] == 0.002


def test_a_preset_keeps_paper_rates_and_gives_other_losses_their_matched_default(tmp_path):
    from dspt.losses import matched_lr

    root = str(tmp_path)
    cells = expand(preset_spec("ptnl", datasets=["dtd"], root=root, overrides={"loss": ["ce", "gce", "dspt", "mae"],
                                                                                "seed": "1", "fp": "2"}))
    rates = {c.config.loss: c.config.lr for c in cells}
    assert rates == {"ce": 0.002, "gce": 0.002, "dspt": None, "mae": None}
    # None is the loss's matched default: DSPT's first step equals CE's at 0.002 x classes (47 DTD classes)
    assert matched_lr("dspt", 47) == pytest.approx(0.002 * 47)
    # --set lr sets every cell's rate, the paper's losses included (choose among them on validation data)
    grid = expand(preset_spec("ptnl", datasets=["dtd"], root=root, overrides={"loss": ["ce", "dspt"], "seed": "1",
                                                                               "fp": "2", "lr": ["0.002", "0.02"]}))
    assert sorted((c.config.loss, c.config.lr) for c in grid) == [("ce", 0.002), ("ce", 0.02), ("dspt", 0.002),
                                                                  ("dspt", 0.02)]
    # a grid file's lr_by_loss is checked like any option
    with pytest.raises(ConfigError, match="lr_by_loss: unknown loss 'nope'"):
        expand({"output": str(tmp_path / "o"), "data": root, "loss": ["ce"], "lr_by_loss": {"nope": 0.1}})
    with pytest.raises(ConfigError, match="lr_by_loss"):
        expand({"output": str(tmp_path / "o"), "data": root, "loss": ["ce"], "lr_by_loss": {"ce": "fast"}})


BAD_NARROWING = [
    ("unknown-preset", dict(name="nope"), ["unknown preset 'nope'", "joapr, joapr-vitb16, ptnl, ptnl-vitb16"]),
    ("dataset-not-in-preset", dict(datasets=["food101"]), ["'food101' is not a dataset of preset 'ptnl'",
                                                          "caltech101, oxford_pets"]),
    ("unknown-dataset", dict(datasets=["nope"]), ["'nope' is not a dataset of preset 'ptnl'"]),
    ("unknown-option", dict(overrides={"foo": "1"}), ["--set foo: unknown option 'foo'"]),
    ("bad-value", dict(overrides={"epochs": "x"}), ["--set epochs", "not an integer"]),
    ("own-flag", dict(overrides={"output": "x"}), ["--set output is not allowed; use -o DIR"]),
    ("dataset-flag", dict(overrides={"dataset": "dtd"}), ["use --datasets"]),
    ("bad-noise", dict(overrides={"noise": "nope"}), ["--set noise=nope: unknown noise type"]),
    ("repeat", dict(overrides={"seed": ["1", "1"]}), ["must list distinct values"]),
]


@pytest.mark.parametrize("case,kwargs,words", BAD_NARROWING, ids=[b[0] for b in BAD_NARROWING])
def test_bad_narrowing_is_one_line_naming_the_fix(case, kwargs, words):
    kwargs = {"name": "ptnl"} | kwargs
    with pytest.raises(ConfigError) as info:
        preset_spec(kwargs.pop("name"), **kwargs)
    line = str(info.value)
    assert "\n" not in line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


def test_set_strings_are_parsed_strictly():
    assert parse_overrides(["seed=1", "loss=ce,dspt", "noise-rate=0.5", "template=a {}, b"]) == {
        "seed": "1", "loss": ["ce", "dspt"], "noise_rate": "0.5", "template": "a {}, b"}
    with pytest.raises(ConfigError, match="must look like KEY=VALUE"):
        parse_overrides(["seed"])
    with pytest.raises(ConfigError, match="given twice; give a comma list"):
        parse_overrides(["seed=1", "seed=2"])
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("JoAPR")


# --------------------------------------------------------------------------------------- union of grids

def union(tmp: Path, **over) -> dict:
    spec = {"dataset": "dtd", "root": str(tmp), "model": "dspt-tiny", "pretrained": "none", "epochs": 1,
            "output": str(tmp / "sweep"), "loss": ["ce", "dspt"],
            "grids": [{"noise": ["symflip", "pairflip"], "fp": [2, 4]},
                      {"noise": "sym", "noise_rate": [0.25]},
                      {"dataset": "food101n", "noise": "given"}]}
    return spec | over


def test_union_of_grids_concatenates_entries_in_order(tmp_path):
    cells = expand(union(tmp_path))
    assert [c.name for c in cells] == [
        "noise=symflip,fp=2,loss=ce", "noise=symflip,fp=2,loss=dspt", "noise=symflip,fp=4,loss=ce",
        "noise=symflip,fp=4,loss=dspt", "noise=pairflip,fp=2,loss=ce", "noise=pairflip,fp=2,loss=dspt",
        "noise=pairflip,fp=4,loss=ce", "noise=pairflip,fp=4,loss=dspt",
        "noise=sym,noise_rate=0.25,loss=ce", "noise=sym,noise_rate=0.25,loss=dspt",
        "dataset=food101n,noise=given,loss=ce", "dataset=food101n,noise=given,loss=dspt"]
    assert cells[-1].config.dataset == "food101n" and cells[0].config.dataset == "dtd", "an entry wins over the base"
    assert cells[8].config.fp is None and cells[8].config.noise_rate == 0.25
    assert count_runs(union(tmp_path)) == 12


def test_union_of_grids_refuses_clashes_and_bad_entries(tmp_path):
    clash = union(tmp_path, grids=[{"noise": "sym", "noise_rate": [0.25, 0.5]}, {"noise": "sym", "noise_rate": 0.5}])
    with pytest.raises(ConfigError) as info:
        expand(clash)
    line = str(info.value)
    assert "would share the folder 'noise=sym,noise_rate=0.5,loss=ce'" in line and "grids[0] and grids[1]" in line
    assert "{'noise': 'sym', 'noise_rate': 0.5, 'loss': 'ce'}" in line and "\n" not in line
    with pytest.raises(ConfigError, match="crossed at the top level and again in grids\\[0\\]"):
        expand(union(tmp_path, grids=[{"loss": ["mae"]}]))
    with pytest.raises(ConfigError, match="non-empty list of mappings"):
        expand(union(tmp_path, grids=[]))
    with pytest.raises(ConfigError, match="grids\\[1\\] must be a mapping"):
        expand(union(tmp_path, grids=[{"seed": 1}, ["seed", 2]]))
    with pytest.raises(ConfigError, match="unknown option 'nois' in the grid \\(grids\\[0\\]\\)"):
        expand(union(tmp_path, grids=[{"nois": "sym"}]))
    with pytest.raises(ConfigError, match="grid cell 'noise=sym,noise_rate=1.5,loss=ce'"):
        expand(union(tmp_path, grids=[{"noise": "sym", "noise_rate": 1.5}]))


def test_union_of_grids_in_a_yaml_file(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(union(tmp_path)))
    assert len(list_cells(grid)) == 12
    code, out, _ = run_cli(["sweep", str(grid), "--list"])
    assert code == 0 and out.count("new ") == 12 and "dataset=food101n,noise=given,loss=dspt" in out


# ------------------------------------------------------------------------------------------------- CLI

def test_presets_command_lists_every_preset(monkeypatch):
    code, out, _ = run_cli(["presets"])
    assert code == 0
    for name, preset in PRESETS.items():
        assert f"{name}: {count_runs(preset_spec(name))} runs into sweeps/{name}/" in out
        assert preset.description in out
    for word in ("models:", "datasets:", "noise:", "seeds:", "source:", "lr:", "ce and gce at 0.002",
                 "every other loss at its matched default", "RN50 (openai)", "ViT-B-16 (openai)",
                 "symflip/pairflip FP 2,4,6,8,10,12", "sym/pair rate 0.125", "given on food101n", "1, 2, 3"):
        assert word in out, word
    assert f"ptnl: {2 * 4 * 6 * 3} runs" in out


def test_presets_name_prints_a_grid_file_that_runs_as_the_preset(tmp_path):
    code, out, _ = run_cli(["presets", "ptnl", "--datasets", "dtd", "--set", "seed=1"])
    assert code == 0 and out.startswith("# ptnl: ")
    spec = yaml.safe_load(out)
    assert spec == preset_spec("ptnl", datasets=["dtd"], overrides={"seed": "1"})
    (tmp_path / "ptnl.yaml").write_text(out)
    code, out, err = run_cli(["sweep", str(tmp_path / "ptnl.yaml"), "--root", str(tmp_path), "--list"])
    assert code == 0, err
    assert out.split() == [w for c in expand(preset_spec("ptnl", datasets=["dtd"], root=str(tmp_path),
                                                         overrides={"seed": "1"})) for w in ("new", str(c.run_dir))]


SWEEP_ERRORS = [
    ([], "give a grid file or --preset NAME"),
    (["grid.yaml", "--preset", "ptnl"], "not both or neither"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "ptnl", "--datasets", "food101"], "'food101' is not a dataset of preset 'ptnl'"),
    (["--preset", "ptnl", "--set", "epochs=x"], "--set epochs"),
    (["--preset", "ptnl", "--set", "epochs"], "must look like KEY=VALUE"),
    (["grid.yaml", "--set", "seed=1"], "narrow a --preset"),
]


@pytest.mark.parametrize("args,words", SWEEP_ERRORS, ids=[" ".join(a) or "none" for a, _ in SWEEP_ERRORS])
def test_sweep_preset_errors_are_one_line(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["sweep", *args])
    lines = [line for line in err.splitlines() if line.startswith("dspt: error:")]
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "sweeps").exists()


# ------------------------------------------------------------------------------------------ end to end

def make_dtd(root: Path, per_class: dict[str, int]) -> None:
    """A tiny DTD in CoOp's layout (images/<class>/..., split_zhou_DescribableTextures.json)."""
    d = root / "dtd"
    split: dict[str, list] = {s: [] for s in per_class}
    for label, cname in enumerate(["banded", "dotted", "zigzagged"]):
        for s, n in per_class.items():
            for i in range(n):
                rel = f"{cname}/{cname}_{s}{i}.jpg"
                write_jpeg(d / "images" / rel, seed=label * 100 + len(split[s]))
                split[s].append([rel, label, cname])
    (d / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))


def test_a_two_run_slice_of_a_preset_runs_end_to_end(tmp_path):
    make_dtd(tmp_path / "data", {"train": 6, "val": 6, "test": 2})
    out = tmp_path / "sweep"
    code, stdout, err = run_cli([
        "sweep", "--preset", "joapr", "--root", str(tmp_path / "data"), "--datasets", "dtd", "-o", str(out),
        "--cache-dir", str(tmp_path / "cache"),
        "--set", "model=dspt-tiny", "--set", "pretrained=none", "--set", "epochs=1", "--set", "seed=1",
        "--set", "loss=ce,dspt", "--set", "noise=symflip", "--set", "fp=2", "--set", "shots=4",
        "--set", "views=1", "--set", "device=cpu", "--set", "method=plain"])
    assert code == 0, err
    assert "2 finished, 0 skipped, 0 failed" in stdout
    runs = ["dataset=dtd,noise=symflip,fp=2,method=plain,loss=ce,seed=1",
            "dataset=dtd,noise=symflip,fp=2,method=plain,loss=dspt,seed=1"]
    for run in runs:
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert metrics["noise"]["realised_rate"] == 0.5  # 2 false positives of 4 shots per class
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["run_id"]) == sorted(str((out / run).resolve()) for run in runs)
    # 6 validation images per class leave room for 3 per class: 2 false positives of 3 (67 %), not 50 %, and said
    assert table["val_realised_rate"].tolist() == pytest.approx([2 / 3, 2 / 3])
    assert all(w.startswith("2 false positive(s) in 3 validation images per class") for w in table["val_why"])
    lrs = dict(zip(table["loss"], table["lr"]))
    assert lrs == {"ce": 0.002, "dspt": pytest.approx(0.002 * 3)}  # CoOp's rate; DSPT's matched one (3 classes)
    note = json.loads((out / "preset.json").read_text())
    assert note["name"] == "joapr" and "ce and gce at 0.002" in note["lr_rule"] and note["runs"] == 2
    code, stdout, err = run_cli(["report", str(out), "--no-plots"])
    assert code == 0, err
    assert "preset 'joapr': learning rate: ce and gce at 0.002" in stdout
    assert "one learning rate per method, fixed by the grid and not chosen: ce 0.002, dspt 0.006" in stdout
    assert "| dtd | symflip 50% | noisy | 66.7 % | 2 false positive(s) in 3 validation images per class" in stdout
