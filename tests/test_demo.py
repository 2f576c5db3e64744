"""A shortened `dspt demo`: the table, the plot and the results file are produced; the prior is reused."""
import csv


from dspt.cli import main
from dspt.demo import _split_digits, select_on_validation


def test_digit_split_is_disjoint_stratified_and_seeded():
    images, labels, *parts = _split_digits(0)
    assert sum(len(p) for p in parts) == len(labels) == 1797
    assert len(set().union(*map(set, parts))) == 1797
    again = _split_digits(0)[2:]
    assert all((a == b).all() for a, b in zip(parts, again))
    assert any((a != b).any() for a, b in zip(parts, _split_digits(1)[2:]) if len(a) == len(b))
    for p in parts:
        assert set(labels[p]) == set(range(10))


def test_lr_is_chosen_on_noisy_validation_never_test():
    import pandas as pd

    runs = pd.DataFrame([
        {"noise_rate": 0.4, "loss": "ce", "lr": 0.02, "val_acc_given": 30.0, "test_acc": 90.0},
        {"noise_rate": 0.4, "loss": "ce", "lr": 0.002, "val_acc_given": 35.0, "test_acc": 50.0},
        {"noise_rate": 0.4, "loss": "dspt", "lr": 0.02, "val_acc_given": 40.0, "test_acc": 60.0},
        {"noise_rate": 0.4, "loss": "dspt", "lr": 0.002, "val_acc_given": 40.0, "test_acc": 70.0},
    ])
    chosen = select_on_validation(runs).set_index("loss")
    assert chosen.loc["ce", "lr"] == 0.002  # best validation, although its test accuracy is worse
    assert chosen.loc["dspt", "lr"] == 0.002  # a tie goes to the smaller rate


def test_short_demo_writes_table_plot_results(tmp_path, capsys):
    args = ["demo", "--output", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--views", "1", "--noise-rates", "0,0.6", "--lrs", "0.002,0.02", "--no-progress", "--jobs", "2"]
    from dspt import demo

    orig = demo.PRETRAIN["epochs"]
    demo.PRETRAIN["epochs"] = 1  # the full demo pretrains 16 epochs; one is enough to exercise every stage
    try:
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0  # everything reused: prior, features, finished runs
        second = capsys.readouterr().out
        inline = args[:2] + [str(tmp_path / "inline")] + args[3:]
        assert main(inline + ["--jobs", "1"]) == 0  # every run in this process, one after the other
        third = capsys.readouterr().out
    finally:
        demo.PRETRAIN["epochs"] = orig
    out = tmp_path / "demo"
    assert (out / "accuracy_vs_noise.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "| 0.0 |" in table and "| 0.6 |" in table and "zero-shot" in table and "rate sensitivity" in table
    runs = list(csv.DictReader((out / "demo_runs.csv").open()))
    assert len(runs) == 2 * 2 * 2  # noise rates x losses x learning rates
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 8
    assert "DSPT acc" in first and first.split("wall time")[0] == second.split("wall time")[0]
    table_of = lambda text: text.split("plot:")[0]  # noqa: E731
    assert table_of(third) == table_of(first)  # worker processes or not, a seed gives the same numbers
    assert all(0 <= float(r["test_acc"]) <= 100 for r in runs)


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
            "--noise-rates", "0,0.5", "--no-progress"]
    assert main(base + ["--output", str(tmp_path / "out"), "--lrs", "0.002,0.02"]) == 0
    out = capsys.readouterr().out
    assert f"Prior: dspt-tiny {ckpt}" in out and "miniature" not in out
    assert not (cache / "demo").exists()  # no digits world, no pretrained miniature
    assert len(list(csv.DictReader((tmp_path / "out" / "demo_runs.csv").open()))) == 2 * 2 * 2

    # choosing a rate needs validation data: said before any run, in one line
    no_val = tmp_path / "no_val"
    make_image_folder(no_val / "train", classes=3, per_class=6, seed=1)
    args = [a if a != str(data) else str(no_val) for a in base]
    assert main(args + ["--output", str(tmp_path / "out2"), "--lrs", "0.002,0.02"]) == 2
    err = capsys.readouterr().err
    assert "needs validation data" in err and not (tmp_path / "out2" / "runs").exists()
