"""What a reviewer checks in a report: multiplicity control against independent formulas, 'identical' where
every paired difference is equal, the bootstrap interval against scipy's, the generated findings, the paper
tables (Markdown, HTML, LaTeX), per-run seconds, 'all' shots and the validation labels the rates were chosen on."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from clirun import run_cli
from dspt import compare
from dspt.errors import DataError
from dspt.report import build_report, report, runs_frame

SEEDS = (1, 2, 3, 4, 5)


def make_runs(means: dict[str, dict[float, float]], spread: float = 1.0, dataset: str = "d", shots: int = 16,
              lrs: tuple[float, ...] = (0.002,), seed_noise: int = 0, **extra) -> pd.DataFrame:
    """One run per method, noise rate, learning rate and seed: test accuracy = the method's mean at that rate
    + a per-seed offset shared by every method (the paired design) + its own small noise."""
    rng = np.random.default_rng(seed_noise)
    shared = {s: rng.normal(0, 3) for s in SEEDS}
    rows = []
    for method, by_rate in means.items():
        for rate, mean in by_rate.items():
            for lr in lrs:
                for s in SEEDS:
                    acc = mean + shared[s] + rng.normal(0, spread) - (0 if lr == lrs[0] else 5)
                    rows.append({"run_id": f"{dataset}-{method}-{rate}-{lr}-{s}", "dataset": dataset, "model": "m",
                                 "weights": "w", "shots": shots, "epochs": 10, "noise": "sym", "noise_rate": rate,
                                 "loss": method, "loss_options": "", "lr": lr, "seed": s, "test_acc": acc,
                                 "val_acc_given": acc - (0 if lr == lrs[0] else 5), "zeroshot_acc": 40.0,
                                 "memorised": 1.0, "train_seconds": 2.0} | extra)
    return runs_frame(pd.DataFrame(rows))


def to_store(runs: pd.DataFrame, path) -> None:
    """Write runs as a results store writes them (the trained method column, not the report's label)."""
    runs.assign(method="plain").to_csv(path, index=False)


# ------------------------------------------------------------------------------------------- statistics

def test_holm_and_benjamini_hochberg_against_their_formulas():
    p = np.array([0.01, 0.04, math.nan, 0.03, 0.005])
    holm = compare.adjust_pvalues(p, "holm")
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 (m = 4, the NaN is no test) -> 4x, 3x, 2x, 1x, running maximum
    assert holm[[4, 0, 3, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert math.isnan(holm[2])
    bh = compare.adjust_pvalues(p, "bh")
    ok = ~np.isnan(p)
    assert bh[ok] == pytest.approx(stats.false_discovery_control(p[ok], method="bh"))
    assert compare.adjust_pvalues(p, "none")[ok] == pytest.approx(p[ok])
    rng = np.random.default_rng(3)
    for _ in range(20):  # Holm never below the raw p, BH never above Holm, both within [0, 1]
        q = rng.uniform(0, 0.2, size=int(rng.integers(1, 12)))
        h, b = compare.adjust_pvalues(q, "holm"), compare.adjust_pvalues(q, "bh")
        assert np.all(h >= q - 1e-15) and np.all(b <= h + 1e-15) and np.all((h <= 1) & (b <= 1))
        assert b == pytest.approx(stats.false_discovery_control(q, method="bh"))
    with pytest.raises(DataError, match="--multiplicity 'bonf' unknown"):
        compare.adjust_pvalues(p, "bonf")


def test_many_comparisons_in_one_table_need_stronger_evidence():
    """Ten methods each 1.2 points above ce with noise: unadjusted, some read 'ahead' by chance spread; Holm
    over the table's ten tests turns the marginal ones into 'no clear difference', and a large effect stays."""
    means = {"ce": {0.4: 50.0}} | {f"m{i}": {0.4: 51.2} for i in range(9)} | {"big": {0.4: 60.0}}
    runs = make_runs(means, spread=1.0, seed_noise=7)
    raw = build_report(runs, multiplicity="none").comparison.set_index("method")
    holm = build_report(runs, multiplicity="holm").comparison.set_index("method")
    assert holm.loc["big", "verdict"] == "ahead"
    assert (holm["p_adj"] >= holm["p"] - 1e-15).all()
    assert (raw["verdict"] == "ahead").sum() > (holm["verdict"] == "ahead").sum()
    for m in holm.index:  # a verdict is 'ahead' exactly when the adjusted p is below 0.05 and the mean positive
        assert (holm.loc[m, "verdict"] == "ahead") == (holm.loc[m, "p_adj"] < 0.05 and holm.loc[m, "mean"] > 0)


def test_equal_differences_on_every_seed_have_no_interval_and_say_so():
    runs = make_runs({"ce": {0.2: 50.0}, "dspt": {0.2: 50.0}}, spread=0.0)
    rows = runs[runs["method"] == "dspt"].copy()
    rows["test_acc"] = runs[runs["method"] == "ce"]["test_acc"].to_numpy()  # identical on every seed
    same = pd.concat([runs[runs["method"] == "ce"], rows])
    c = build_report(same).comparison.iloc[0]
    assert c["verdict"] == "identical" and math.isnan(c["lo"]) and math.isnan(c["p"]) and c["ties"] == 5
    rows["test_acc"] = rows["test_acc"] + 1.0  # +1 point on every seed: a width-0 t-interval would read 'ahead'
    c = build_report(pd.concat([runs[runs["method"] == "ce"], rows])).comparison.iloc[0]
    assert c["verdict"] == "same on every seed" and c["mean"] == pytest.approx(1.0) and math.isnan(c["hi"])
    assert compare.verdict(3, 0.0, 0.0, spread=False, mean=0.0) == "identical"


def test_bootstrap_interval_matches_scipys_percentile_bootstrap_and_is_repeatable():
    d = np.array([3.1, -0.4, 2.2, 5.0, 1.7])
    lo, hi = compare.bootstrap_interval(d)
    assert (lo, hi) == compare.bootstrap_interval(d)  # a fixed seed: the same report twice
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=100_000, confidence_level=0.95,
                          random_state=np.random.default_rng(1)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.1) and hi == pytest.approx(ref.high, abs=0.1)
    assert lo <= d.mean() <= hi
    assert all(math.isnan(x) for x in compare.bootstrap_interval(d[:1]))
    runs = make_runs({"ce": {0.4: 50.0}, "dspt": {0.4: 53.0}}, spread=2.0)
    c = build_report(runs, bootstrap=True).comparison.iloc[0]
    ce = runs[runs["method"] == "ce"].set_index("seed")["test_acc"]
    mine = runs[runs["method"] == "dspt"].set_index("seed")["test_acc"]
    assert (c["boot_lo"], c["boot_hi"]) == pytest.approx(compare.bootstrap_interval((mine - ce).to_numpy()))
    assert "boot_lo" not in build_report(runs).comparison.columns


# ------------------------------------------------------------------------------------------- findings

def test_findings_name_the_best_who_is_level_dspt_against_ce_and_the_floors():
    means = {"ce": {0.0: 60.0, 0.4: 40.0}, "dspt": {0.0: 60.5, 0.4: 55.0}, "gce": {0.0: 50.0, 0.4: 54.6},
             "mae": {0.0: 45.0, 0.4: 30.0}}
    runs = make_runs(means, spread=0.8, lrs=(0.002, 0.02))
    rep = build_report(runs)
    f = rep.findings.table.set_index("noise_rate")
    assert f.loc[0.4, "best"] == "dspt" and f.loc[0.4, "level"] == ["gce"]
    assert sorted(f.loc[0.4, "clearly_below"]) == ["ce", "mae"]
    assert set(f.loc[0.0, "level"]) == {"ce"} and f.loc[0.0, "best"] == "dspt"
    assert f.loc[0.4, "focus"].endswith(" ahead") and f.loc[0.4, "focus"].startswith("+")
    # floors: every run at every rate, the worst; against the chosen-rate mean
    for method, worst, mean in f.loc[0.4, "floors"]:
        sub = runs[(runs["method"] == method) & (runs["noise_rate"] == 0.4)]
        assert worst == sub["test_acc"].min() and worst < mean  # the second rate is 5 points lower
        assert mean == pytest.approx(sub[sub["lr"] == 0.002]["test_acc"].mean())
    text = " ".join(rep.findings.sentences)
    assert "dspt in 2 of 2" in text and "dspt against ce: clearly ahead in 1 of 2 setting(s) (sym 40 %)" in text
    assert "Holm-adjusted within each table" in text and "Floor" in text


def test_findings_open_the_report_and_paper_tables_follow(tmp_path):
    means = {"ce": {0.0: 60.0, 0.4: 40.0, 0.8: 20.0}, "dspt": {0.0: 60.5, 0.4: 55.0, 0.8: 45.0},
             "gce": {0.0: 58.0, 0.4: 54.0, 0.8: 30.0}}
    frames = [make_runs(means, dataset=d, shots=0, seed_noise=i) for i, d in enumerate(("cars", "dtd"))]
    to_store(pd.concat(frames), tmp_path / "results.csv")
    rep, files = report([tmp_path / "results.csv"], tmp_path / "rep", plots=False, formats="md,html,latex")
    md = files["report.md"].read_text()
    assert md.index("## Findings") < md.index("## Paper tables") < md.index("## Paired comparison")
    assert "all shots" in md and "0 shots" not in md
    # the paper table: rows dataset x rate, columns methods (reference first), best bold, clear wins marked
    table = md[md.index("#### Test accuracy (%): sym noise"):]
    assert "| dataset | noise | zero-shot | ce | dspt | gce |" in table
    row = next(line for line in table.splitlines() if line.startswith("| cars | sym 40% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4].startswith("**") and cells[4].endswith("▲**")  # dspt: best and clearly ahead of ce
    assert "▲" not in cells[3] and "(n=" not in cells[3]  # ce, the reference; n is in the caption
    assert "n = 5 seeds" in table and "| average | sym 40% |" in table
    tex = files["tables.tex"].read_text()
    assert tex.count("\\begin{tabular}") == 2 and "\\toprule" in tex and "\\bottomrule" in tex
    assert "$\\pm$" in tex and "\\textbf{" in tex and "$^{\\uparrow}$" in tex and "sym 40\\%" in tex
    page = files["report.html"].read_text()
    assert page.index("id='findings'") < page.index("id='paper'") < page.index("id='evidence'")
    assert "<details><summary>Paired comparison</summary>" in page


def test_seconds_are_per_run_and_validation_labels_are_stated(tmp_path):
    runs = make_runs({"ce": {0.25: 50.0}, "dspt": {0.25: 52.0}}, lrs=(0.002, 0.02), val_labels="noisy",
                     val_realised_rate=0.5, val_why="1 false positive(s) in 2 validation images per class: 50.0%")
    runs.loc[runs["seed"] == 5, ["val_labels", "val_realised_rate"]] = ["clean", 0.0]
    rep = build_report(runs.assign(noise="symflip"))
    v = rep.validation.iloc[0]
    assert v["labels"] == "clean and noisy" and v["realised"] == "50.0 %" and v["clean_runs"] == 4
    assert "1 false positive(s) in 2" in v["why"]
    note = next(n for n in rep.notes if n.startswith("learning rates chosen"))
    assert "noisy like the training labels in 16 runs, clean in 4 runs" in note
    assert "measured against the noisy validation labels" not in " ".join(rep.notes)


def test_cli_formats_bootstrap_and_multiplicity(tmp_path):
    to_store(make_runs({"ce": {0.4: 50.0}, "dspt": {0.4: 53.0}}), tmp_path / "results.csv")
    out = tmp_path / "r"
    code, stdout, err = run_cli(["report", str(tmp_path / "results.csv"), "-o", str(out), "--no-plots",
                                 "--format", "latex", "--bootstrap", "--multiplicity", "bh"])
    assert code == 0, err
    assert stdout.startswith("% dspt report: paper tables") and (out / "tables.tex").is_file()
    assert not (out / "report.md").exists() and not (out / "report.html").exists()
    comp = pd.read_csv(out / "comparison.csv")
    assert {"boot_lo", "boot_hi", "p", "p_adj"} <= set(comp.columns)
    code, _, err = run_cli(["report", str(tmp_path / "results.csv"), "-o", str(tmp_path / "x"), "--format", "pdf"])
    assert code == 2 and err.count("\n") == 1 and "--format 'pdf' unknown" in err
    assert not (tmp_path / "x").exists()
