"""`dspt report`: its numbers against an independent recomputation, selection blind to test accuracy, missing
cells listed, files and plots written, and the command line."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from clirun import run_cli
from dspt import compare
from dspt.report import build_report, load_runs, report

LRS = (0.002, 0.02)
SEEDS = (1, 2, 3)


def _store(tmp_path, rng_seed=0, with_logs=True):
    """Two datasets, sym 0 and 0.4, ce and dspt, two rates, three seeds; dspt has no runs on b at 0.4 (a
    missing cell) and ce on b at 0 has one seed only. Each run has a folder with a log.jsonl."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for dataset in ("a", "b"):
        for rate in (0.0, 0.4):
            for loss in ("ce", "dspt"):
                if (dataset, rate, loss) == ("b", 0.4, "dspt"):
                    continue
                for lr in LRS:
                    for seed in SEEDS:
                        if (dataset, rate, loss) == ("b", 0.0, "ce") and seed != 1:
                            continue
                        run = tmp_path / "runs" / f"{dataset}-{rate}-{loss}-{lr}-{seed}"
                        run.mkdir(parents=True)
                        if with_logs:
                            lines = [{"event": "epoch", "epoch": e, "grad_norm_clean": 1.0 / (e + 1),
                                      "grad_norm_noisy": 2.0 / (e + 1), "loss_clean": 1.0, "loss_noisy": 3.0}
                                     for e in range(3)]
                            (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
                        rows.append({
                            "run_id": str(run), "dataset": dataset, "model": "dspt-tiny", "weights": "random",
                            "loss": loss, "loss_options": "", "noise": "sym", "noise_rate": rate,
                            "realised_rate": rate, "shots": 4, "seed": seed, "epochs": 3, "lr": lr,
                            "test_acc": float(rng.uniform(30, 70)), "val_acc_given": float(rng.uniform(20, 60)),
                            "val_acc": float(rng.uniform(20, 60)), "zeroshot_acc": 40.0 if dataset == "a" else 30.0,
                            "memorised": float(rng.uniform(0, 20)), "train_seconds": 1.0})
    table = pd.DataFrame(rows)
    path = tmp_path / "results.csv"
    table.to_csv(path, index=False)
    return path, table


def _reference(table: pd.DataFrame, metric="val_acc_given"):
    """The report's numbers recomputed by hand, with plain loops, numpy and scipy."""
    cells = {}
    for (dataset, rate, loss), grp in table.groupby(["dataset", "noise_rate", "loss"]):
        means = {lr: np.mean(g[metric].to_numpy()) for lr, g in grp.groupby("lr")}
        best = max(means.values())
        lr = min(lr for lr, v in means.items() if v == best)
        acc = grp[grp["lr"] == lr].set_index("seed")["test_acc"]
        cells[(dataset, rate, loss)] = {"lr": lr, "acc": acc}
    return cells


def test_means_stds_intervals_and_verdicts_match_an_independent_recomputation(tmp_path):
    path, table = _store(tmp_path)
    rep = build_report(load_runs([path]))
    want = _reference(table)
    got = rep.stats.set_index(["dataset", "noise_rate", "method"])
    assert len(got) == len(want) == 7
    for key, cell in want.items():
        row = got.loc[key]
        assert row["lr"] == cell["lr"]
        assert row["n"] == len(cell["acc"])
        assert row["mean"] == pytest.approx(cell["acc"].mean(), abs=1e-12)
        if len(cell["acc"]) > 1:
            assert row["std"] == pytest.approx(np.std(cell["acc"].to_numpy(), ddof=1), abs=1e-12)
        else:
            assert math.isnan(row["std"])  # one seed: no spread, not a spread of 0
    comp = rep.comparison.set_index(["dataset", "noise_rate"])
    assert set(comp.index) == {("a", 0.0), ("a", 0.4), ("b", 0.0)}  # b/0.4 has no dspt, so no pair
    # Holm by hand over the table's family (one protocol and noise type: all three pairs with two seeds or more)
    pvals = {}
    for key in comp.index:
        d = (want[key + ("dspt",)]["acc"] - want[key + ("ce",)]["acc"]).dropna()
        if len(d) > 1:
            pvals[key] = stats.ttest_1samp(d.to_numpy(), 0.0).pvalue
    m, holm, running = len(pvals), {}, 0.0
    for i, (key, pv) in enumerate(sorted(pvals.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (m - i) * pv))
        holm[key] = running
    for key in comp.index:
        d = (want[key + ("dspt",)]["acc"] - want[key + ("ce",)]["acc"]).dropna()
        row = comp.loc[key]
        assert row["n"] == len(d) and row["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert (row["wins"], row["ties"], row["losses"]) == ((d > 0).sum(), (d == 0).sum(), (d < 0).sum())
        if len(d) < 2:
            assert row["verdict"] == "too few seeds" and math.isnan(row["lo"])
            assert row["unpaired"] == 2  # dspt's seeds 2 and 3 have no ce partner
            continue
        ci = stats.ttest_1samp(d.to_numpy(), 0.0).confidence_interval(0.95)
        assert (row["lo"], row["hi"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert row["p"] == pytest.approx(pvals[key], rel=1e-9) and row["p_adj"] == pytest.approx(holm[key], rel=1e-9)
        clear = holm[key] < 0.05
        expect = "no clear difference" if not clear else "ahead" if ci.low > 0 else "behind"
        assert row["verdict"] == expect
        unadjusted = build_report(load_runs([path]), multiplicity="none").comparison.set_index(
            ["dataset", "noise_rate"]).loc[key]
        assert unadjusted["verdict"] == ("ahead" if ci.low > 0 else "behind" if ci.high < 0 else "no clear difference")
    best = rep.stats[rep.stats["best"]]
    for (dataset, rate), grp in rep.stats.groupby(["dataset", "noise_rate"]):
        top = grp.loc[grp["mean"].idxmax(), "method"]
        assert top in set(best[(best["dataset"] == dataset) & (best["noise_rate"] == rate)]["method"])


def test_verdicts_follow_the_interval_not_the_mean():
    assert compare.verdict(3, 0.1, 5.0) == "ahead"
    assert compare.verdict(3, -5.0, -0.1) == "behind"
    assert compare.verdict(3, -0.1, 9.0) == "no clear difference"
    assert compare.verdict(1, math.nan, math.nan) == "too few seeds"


def test_missing_and_one_seed_cells_are_listed_never_dropped(tmp_path):
    path, _ = _store(tmp_path)
    rep = build_report(load_runs([path]))
    missing = {(r.dataset, r.noise_rate, r.method): r.reason for r in rep.missing.itertuples()}
    assert missing == {("b", 0.4, "dspt"): "no runs", ("b", 0.0, "ce"): "1 of 3 seeds"}
    avg = rep.average.set_index(["noise_rate", "method"])["mean"]
    assert math.isnan(avg[(0.4, "dspt")])  # dspt lacks b at 0.4: no average over one dataset
    a, b = (rep.stats.set_index(["dataset", "noise_rate", "method"]).loc[(d, 0.4, "ce"), "mean"] for d in "ab")
    assert avg[(0.4, "ce")] == pytest.approx((a + b) / 2)
    md = (report([path], tmp_path / "rep", plots=False)[1]["report.md"]).read_text()
    assert "| b | sym 0% | 30.0 |" in md and "missing" in md and "1 of 3 seeds" in md


def test_selection_never_reads_test_columns(tmp_path):
    path, table = _store(tmp_path)
    runs = load_runs([path])
    choices, _ = compare.select_lr(runs)
    picked = choices[choices["chosen"]][compare.CELL + ["lr"]].reset_index(drop=True)
    # test accuracy rewritten to favour the other rate in every cell: the choice stays
    flipped = runs.copy()
    flipped["test_acc"] = np.where(flipped["lr"].isin(picked["lr"]), 0.0, 100.0)
    assert compare.select_lr(flipped)[0][lambda c: c["chosen"]][compare.CELL + ["lr"]].reset_index(
        drop=True).equals(picked)
    # and without any test column at all, the same choice
    blind = runs.drop(columns=["test_acc", "val_acc", "zeroshot_acc"])
    assert compare.select_lr(blind)[0][lambda c: c["chosen"]][compare.CELL + ["lr"]].reset_index(
        drop=True).equals(picked)


def test_clean_validation_labels_on_request(tmp_path):
    path, table = _store(tmp_path)
    rep = build_report(load_runs([path]), select_on="clean")
    want = _reference(table, metric="val_acc")
    got = rep.stats.set_index(["dataset", "noise_rate", "method"])["lr"]
    assert {k: v["lr"] for k, v in want.items()} == got.to_dict()
    assert "clean validation labels" in rep.notes[-1]


def test_without_validation_a_single_rate_is_kept_and_several_are_not_chosen(tmp_path):
    path, table = _store(tmp_path)
    runs = load_runs([path]).assign(val_acc_given=math.nan)
    rep = build_report(runs)
    assert rep.stats.empty and (rep.missing["reason"].str.contains("no validation accuracy")).sum() == 7
    one = build_report(runs[runs["lr"] == 0.02])
    assert len(one.stats) == 7 and (one.stats["lr"] == 0.02).all()


def test_robustness_is_over_every_rate_and_seed(tmp_path):
    path, table = _store(tmp_path)
    rep = build_report(load_runs([path]))
    r = rep.robustness.set_index(["dataset", "noise_rate", "method"]).loc[("a", 0.4, "ce")]
    sub = table[(table["dataset"] == "a") & (table["noise_rate"] == 0.4) & (table["loss"] == "ce")]
    assert r["runs"] == 6 and r["worst"] == sub["test_acc"].min() and r["best"] == sub["test_acc"].max()
    assert r["worst_lr_mean"] == pytest.approx(sub.groupby("lr")["test_acc"].mean().min())


def test_every_rate_as_its_own_method(tmp_path):
    path, _ = _store(tmp_path)
    rep = build_report(load_runs([path]), select="none", reference="ce@lr0.002")
    assert set(rep.stats["method"]) == {f"{m}@lr{lr:g}" for m in ("ce", "dspt") for lr in LRS}
    assert set(rep.comparison["reference"]) == {"ce@lr0.002"}


def test_files_and_plots_are_written(tmp_path):
    path, _ = _store(tmp_path)
    _, files = report([path], tmp_path / "out")
    for name in ("report.md", "report.html", "cells.csv", "comparison.csv", "robustness.csv", "missing.csv"):
        assert files[name].stat().st_size > 0
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["accuracy_vs_lr_dspt-tiny_random_4_3_a_sym.png", "accuracy_vs_lr_dspt-tiny_random_4_3_b_sym.png",
                    "accuracy_vs_noise_dspt-tiny_random_4_3_a_sym.png",
                    "accuracy_vs_noise_dspt-tiny_random_4_3_b_sym.png",
                    "mechanism_dspt-tiny_random_4_3_a_sym.png", "mechanism_dspt-tiny_random_4_3_b_sym.png"]
    for p in (tmp_path / "out").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = files["report.html"].read_text()
    assert page.count("data:image/png;base64,") == 6 and "src=\"http" not in page  # self-contained
    cells = pd.read_csv(files["cells.csv"])
    assert len(cells) == 7


def test_a_second_report_into_the_same_folder_removes_the_first_ones_stale_plots(tmp_path):
    path, table = _store(tmp_path)
    report([path], tmp_path / "out")
    table[table["dataset"] == "a"].to_csv(tmp_path / "only_a.csv", index=False)
    _, files = report([tmp_path / "only_a.csv"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(n for n in files if n.endswith(".png"))
    assert not any("_b_" in p.name for p in (tmp_path / "out").glob("*.png"))
    (tmp_path / "out" / "mine.txt").write_text("kept")  # a file the report did not write is never touched
    report([path], tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").is_file()


def test_a_run_folder_and_a_duplicate_store_count_each_run_once(tmp_path):
    path, table = _store(tmp_path)
    runs = load_runs([path, path])
    assert len(runs) == len(table)


def test_runs_pooled_from_different_options_are_refused(tmp_path):
    path, table = _store(tmp_path)
    other = table.assign(run_id=table["run_id"] + "-other")
    other.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(Exception, match="report their stores separately"):
        build_report(load_runs([path, tmp_path / "other.csv"]))


def test_cli_prints_the_tables_and_names_a_bad_store(tmp_path):
    path, _ = _store(tmp_path)
    code, out, err = run_cli(["report", str(path), "-o", str(tmp_path / "r"), "--no-plots"])
    assert code == 0, err
    assert "Paired comparison" in out and any(v in out for v in ("no clear difference", "ahead", "behind"))
    code, out, err = run_cli(["report", str(tmp_path / "nope")])
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    code, out, err = run_cli(["report", str(path), "--reference", "gce", "-o", str(tmp_path / "r2"), "--no-plots"])
    assert code == 0 and "'gce' is not in the store" in out


def test_an_exact_validation_tie_goes_to_the_smaller_rate_whatever_the_row_order():
    """Two rates whose mean validation accuracies are equal: a float mean can still differ in its last bit with
    the order of the rows (a demo's own table and a report of its store once chose different rates this
    way). The tie must go to the smaller rate in every order."""
    vals = {  # recorded by the demo (prior 2, CE, 20 % noise): 0.002 and 0.02 both sum to 236.87 over 5 seeds
        0.0002: [52.02020202020202, 44.44444444444444, 44.44444444444444, 41.41414141414141, 49.494949494949495],
        0.002: [44.44444444444444, 48.484848484848484, 45.45454545454545, 45.45454545454545, 53.03030303030303],
        0.02: [46.464646464646464, 46.464646464646464, 48.484848484848484, 48.98989898989899, 46.464646464646464],
        0.2: [37.37373737373738, 37.878787878787875, 39.8989898989899, 48.98989898989899, 38.88888888888889]}
    rows = [{"run_id": f"{lr}-{s}", "dataset": "d", "model": "m", "weights": "w", "shots": 16, "epochs": 30,
             "noise": "sym", "noise_rate": 0.2, "loss": "ce", "loss_options": "", "lr": lr, "seed": s,
             "val_acc_given": v, "test_acc": 50.0 + 10 * lr}
            for lr, vs in vals.items() for s, v in enumerate(vs, start=1)]
    from dspt.report import runs_frame

    plain_ties = []
    for k in range(12):
        frame = pd.DataFrame(rows)
        runs = runs_frame(frame if k == 0 else frame.sample(frac=1.0, random_state=k))
        means = runs.groupby("lr")["val_acc_given"].mean()
        plain_ties.append(means[0.002] == means[0.02])
        choices, chosen = compare.select_lr(runs)
        assert set(chosen["lr"]) == {0.002}
    assert not all(plain_ties)  # the trap is real: a plain mean breaks the tie in some order
