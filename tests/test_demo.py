"""A shortened `dspt demo`: the table, the plot and the results file are produced; the prior is reused.

The pieces have their own tests: tests/test_miniature.py (digits, rendering), test_selection.py, test_tables.py,
test_plots.py."""
import csv

import pytest

from dspt.cli import main


def test_demo_still_exports_what_its_callers_import():
    """benchmarks/speed.py and older callers import the prior from dspt.demo."""
    from dspt import demo, miniature, selection

    assert demo.pretrained_miniature is miniature.pretrained_miniature and demo.build_world is miniature.build_world
    assert demo.VIEWS is miniature.VIEWS and demo.select_on_validation is selection.select_on_validation
    assert callable(demo.run_demo)


def test_short_demo_writes_table_with_intervals_plot_report(tmp_path, capsys):
    args = ["demo", "--output", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--views", "1", "--noise-rates", "0,0.6", "--lrs", "0.002,0.02", "--seeds", "1,2,3", "--no-progress",
            "--jobs", "2"]
    from dspt import miniature

    orig = miniature.PRETRAIN["epochs"]
    miniature.PRETRAIN["epochs"] = 1  # the full demo pretrains 16 epochs; one is enough to exercise every stage
    try:
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0  # everything reused: prior, features, finished runs
        second = capsys.readouterr().out
        inline = args[:2] + [str(tmp_path / "inline")] + args[3:]
        assert main(inline + ["--jobs", "1"]) == 0  # every run in this process, one after the other
        third = capsys.readouterr().out
    finally:
        miniature.PRETRAIN["epochs"] = orig
    out = tmp_path / "demo"
    assert (out / "accuracy_vs_noise.png").stat().st_size > 1000
    assert (out / "report" / "report.html").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "| 0.0 |" in table and "| 0.6 |" in table and "Zero-shot" in table and "rate sensitivity" in table
    assert "DSPT - CoOp (ce) [95 % CI]" in table and "verdict" in table and " ± " in table
    runs = list(csv.DictReader((out / "demo_runs.csv").open()))
    assert len(runs) == 2 * 2 * 2 * 3  # noise rates x losses x learning rates x seeds
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 24
    for rate in ("0%", "60%"):
        assert any(line.startswith(f"noise {rate}: DSPT ") and "95 % CI [" in line for line in first.splitlines())
    assert first.split("wall time")[0] == second.split("wall time")[0]
    table_of = lambda text: text.split("plot:")[0]  # noqa: E731
    assert table_of(third) == table_of(first)  # worker processes or not, the same numbers
    stored = sorted(float(r["test_acc"]) for r in csv.DictReader((out / "results.csv").open()))
    assert sorted(float(r["test_acc"]) for r in runs) == pytest.approx(stored)  # the table shows the runs' own numbers


def test_demo_on_a_given_clip_and_folder_skips_pretraining(tmp_path, capsys):
    """`--model/--checkpoint/--data`: the comparison on the user's CLIP and images, no miniature built."""
    from safetensors.torch import save_file

    from dspt.backbone import load_backbone
    from imagefolders import make_image_folder

    bb = load_backbone("dspt-tiny", init_seed=3)
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(ckpt))
    data = tmp_path / "data"
    for split, n, seed in (("train", 6, 1), ("val", 3, 2)):
        make_image_folder(data / split, classes=3, per_class=n, seed=seed)
    make_image_folder(tmp_path / "test", classes=3, per_class=4, seed=4)
    cache = tmp_path / "cache"
    base = ["demo", "--model", "dspt-tiny", "--checkpoint", str(ckpt), "--data", str(data), "--test-data",
            str(tmp_path / "test"), "--cache-dir", str(cache), "--shots", "4", "--epochs", "1", "--views", "1",
            "--noise-rates", "0,0.5", "--seeds", "1,2", "--no-progress"]
    assert main(base + ["--output", str(tmp_path / "out"), "--lrs", "0.002,0.02"]) == 0
    out = capsys.readouterr().out
    assert f"Prior: dspt-tiny {ckpt}" in out and "miniature" not in out
    assert not (cache / "demo").exists()  # no digits world, no pretrained miniature
    assert len(list(csv.DictReader((tmp_path / "out" / "demo_runs.csv").open()))) == 2 * 2 * 2 * 2

    # choosing a rate needs validation data: said before any run, in one line
    no_val = tmp_path / "no_val"
    make_image_folder(no_val / "train", classes=3, per_class=6, seed=1)
    args = [a if a != str(data) else str(no_val) for a in base]
    assert main(args + ["--output", str(tmp_path / "out2"), "--lrs", "0.002,0.02"]) == 2
    err = capsys.readouterr().err
    assert "needs validation data" in err and not (tmp_path / "out2" / "runs").exists()
