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
