"""`dspt audit`: out-of-sample scores rank planted flips first, cross-fitting never scores an image with prompts
that saw it, and the command writes its table, summary and plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clirun import run_cli
from dspt.audit import audit, fold_assignment
from dspt.config import RunConfig
from imagefolders import make_split_folders


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folders(tmp_path_factory.mktemp("audit"), classes=3, train=20, test=5)


def _cfg(data: Path, cache: Path, **over) -> RunConfig:
    opts = dict(data=str(data), model="dspt-tiny", pretrained=None, shots=0, views=1, n_ctx=4, epochs=20,
                batch_size=8, noise="sym", noise_rate=0.3, loss="ce", seed=1, device="cpu", cache_dir=str(cache),
                progress=False)
    opts.update(over)
    return RunConfig(**opts)


@pytest.fixture(scope="module")
def audited(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("audited")
    return audit(_cfg(data, out / "cache"), out / "audit", folds=4), out / "audit"


def test_planted_flips_rank_above_clean_samples(audited):
    res, _ = audited
    m = res.metrics
    assert m["flips"] == 18 and m["images"] == 60  # exactly 30 % of 60 labels were flipped
    for score in ("label_quality", "given_prob"):
        assert m[score]["auroc"] >= 0.9, (score, m[score])
    assert m["flagged"]["precision"] >= 0.8 and m["flagged"]["recall"] >= 0.8
    table = res.table
    assert list(table["rank"]) == list(range(1, 61))
    assert table["combined_prob"].is_monotonic_increasing  # most suspicious first, by the default score
    e = res.noise_estimate  # the flags are as many as the estimated share of wrong labels says, the lowest scores
    assert e.low <= e.rate <= e.high and int(table["flagged"].sum()) == round(e.rate * 60)
    assert table["flagged"].to_numpy().tolist() == [True] * int(table["flagged"].sum()) + [False] * (
        60 - int(table["flagged"].sum()))
    top = table.head(m["flips"])
    assert top["wrong_label"].mean() >= 0.8
    fixed = top[top["wrong_label"]]
    assert (fixed["suggested"] == fixed["true"]).mean() >= 0.8  # the suggestion is the true class


def test_cross_fitting_never_scores_an_image_with_prompts_that_saw_it(audited):
    res, out = audited
    table = res.table
    for k in range(4):
        trained = {r["path"] for r in csv.DictReader((out / "folds" / f"fold{k}" / "train_files.csv").open())}
        held = set(table.loc[table["fold"] == k, "path"])
        assert held and not (held & trained)
        assert trained | held == set(table["path"])  # each fold run saw every other image
    assert np.bincount(table["fold"], minlength=4).min() >= 14  # balanced folds
    # one shared table, each fold's images left out by --exclude, so the 4 fold runs trained as one batch
    for k in range(4):
        metrics = json.loads((out / "folds" / f"fold{k}" / "metrics.json").read_text())
        assert metrics["batch_runs"] == 4
        excluded = json.loads((out / "folds" / f"fold{k}" / "dataset.json").read_text())["excluded_training_images"]
        assert excluded == int((table["fold"] == k).sum())


def test_probabilities_and_scores_are_what_the_csv_says(audited):
    res, out = audited
    written = pd.read_csv(out / "audit.csv")
    assert list(written["path"]) == list(res.table["path"])
    assert np.allclose(written["given_prob"], res.table["given_prob"])
    assert ((written["suggested_prob"] >= written["given_prob"] - 1e-12)).all()  # the suggestion is the argmax
    summary = json.loads((out / "audit.json").read_text())
    assert summary["true_labels_known"] and summary["flagged"] == int(written["flagged"].sum())
    assert (out / "precision_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "review.html").read_text()  # the review page shows every flagged image, embedded
    assert page.count("<img") >= int(written["flagged"].sum()) and "http://" not in page


def test_folds_are_stratified_and_seeded():
    given = np.repeat(np.arange(3), [10, 7, 4])
    a, b = fold_assignment(given, 4, 5), fold_assignment(given, 4, 5)
    assert (a == b).all() and not (a == fold_assignment(given, 4, 6)).all()
    for c in range(3):
        counts = np.bincount(a[given == c], minlength=4)
        assert counts.max() - counts.min() <= 1


def test_audit_a_run_folder_from_the_command_line(data, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none",
                              "--shots", "all", "--views", "1", "--n-ctx", "4", "--epochs", "20", "--batch-size", "8",
                              "--noise-rate", "0.3", "--loss", "ce", "--seed", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "-o", str(run),
                              "--no-progress"])
    assert code == 0, err
    code, out, err = run_cli(["audit", str(run), "--folds", "3", "--no-review", "--no-progress", "--apply", "drop"])
    assert code == 0, err
    assert "most suspicious first" in out and "AUROC" in out and "--apply drop" in out
    assert "estimated share of wrong labels" in out and "0 image-view(s) encoded" in out  # all in the cache
    assert (run / "audit" / "audit.csv").is_file() and (run / "audit" / "folds" / "fold2" / "metrics.json").is_file()
    table = pd.read_csv(run / "audit" / "audit.csv")
    cleaned = pd.read_csv(run / "audit" / "cleaned_labels.csv")
    assert list(cleaned.columns) == ["path", "label"] and len(cleaned) == int((~table["flagged"]).sum())
    assert not set(cleaned["path"]) & set(table.loc[table["flagged"], "path"])
    code, _, err = run_cli(["train", "--data", str(run / "audit" / "cleaned_labels.csv"), "--test-data",
                            str(data / "test"), "--model", "dspt-tiny", "--pretrained", "none", "--shots", "all",
                            "--views", "1", "--n-ctx", "4", "--epochs", "1", "--device", "cpu", "--cache-dir",
                            str(tmp_path / "cache"), "-o", str(tmp_path / "clean_run"), "--no-progress"])
    assert code == 0, err  # the cleaned table trains as it is
    code, out, err = run_cli(["audit", str(tmp_path / "nope")])
    assert code == 2 and err.count("\n") == 1 and "not a dspt run folder" in err


def test_audit_names_images_by_the_paths_the_user_gave(data, tmp_path):
    """Through a symbolic link to the data: audit.csv lists the link's paths, not the resolved targets."""
    link = tmp_path / "my_images"
    link.symlink_to(data, target_is_directory=True)
    res = audit(_cfg(link, tmp_path / "cache", epochs=1), tmp_path / "audit", folds=2, review=False)
    paths = list(pd.read_csv(tmp_path / "audit" / "audit.csv")["path"])
    assert len(paths) == 60 and all(p.startswith(str(link) + "/") for p in paths)
    assert set(paths) == set(res.table["path"])


def test_a_second_audit_after_corrections_never_scores_an_image_with_a_model_that_saw_it(tmp_path):
    """Audit a label table, correct two labels, audit again into the same folder (and once more with fewer
    folds): every fold run is retrained on the new table, none is reused from the first audit."""
    from imagefolders import make_image_folder

    make_image_folder(tmp_path / "img", classes=3, per_class=8, size=16, seed=4)
    images = sorted((tmp_path / "img").rglob("*.png"))
    rows = [(str(p), p.parent.name) for p in images]
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    cfg = _cfg(table, tmp_path / "cache", epochs=1, noise_rate=0.0, dataset="csv")
    audit(cfg, tmp_path / "audit", folds=3, review=False)
    first = {k: json.loads((tmp_path / "audit" / "folds" / f"fold{k}" / "metrics.json").read_text())
             for k in range(3)}
    rows[0], rows[9] = (rows[0][0], rows[9][1]), (rows[9][0], rows[0][1])  # two corrections (a swap of labels)
    table.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    res = audit(cfg, tmp_path / "audit", folds=3, review=False)
    given = dict(zip(res.table["path"], res.table["given"]))
    shown = {c: c.replace("_", " ") for _, c in rows}  # class names are displayed with spaces
    assert given[rows[0][0]] == shown[rows[0][1]] and given[rows[9][0]] == shown[rows[9][1]]
    classes = sorted(set(shown.values()))
    for k in range(3):
        run = tmp_path / "audit" / "folds" / f"fold{k}"
        assert json.loads((run / "metrics.json").read_text())["seconds"] != first[k]["seconds"]  # retrained
        trained = {(r["path"], classes[int(r["given"])]) for r in csv.DictReader((run / "train_files.csv").open())}
        held = set(res.table.loc[res.table["fold"] == k, "path"])
        assert not held & {p for p, _ in trained}
        assert {(p, given[p]) for p, _ in trained} == trained  # trained on the corrected labels
    res2 = audit(cfg, tmp_path / "audit", folds=2, review=False)
    assert sorted(p.name for p in (tmp_path / "audit" / "folds").glob("fold*")) == ["fold0", "fold1"]
    for k in range(2):
        run = tmp_path / "audit" / "folds" / f"fold{k}"
        trained = {r["path"] for r in csv.DictReader((run / "train_files.csv").open())}
        assert not set(res2.table.loc[res2.table["fold"] == k, "path"]) & trained


def test_folds_that_cannot_cross_fit_are_refused_in_one_line_before_anything_is_written(data, tmp_path):
    from dspt.audit import check_folds
    from dspt.errors import ConfigError

    given = np.array([0, 0, 0, 1, 1, 1, 2])
    with pytest.raises(ConfigError, match="class 'c' has 1 image\\(s\\), fewer than --folds 3") as info:
        check_folds(given, ["a", "b", "c"], 3)
    assert "\n" not in str(info.value) and "lower --folds" in str(info.value)
    with pytest.raises(ConfigError, match="leaves a fold empty"):
        check_folds(np.array([0, 1]), ["a", "b"], 3)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        check_folds(given, ["a", "b", "c"], 1)
    check_folds(given[:6], ["a", "b"], 3)  # 3 images per class, 3 folds: fine
    # from the command line: one line, exit 2, no output folder
    code, _, err = run_cli(["audit", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none",
                            "--shots", "all", "--views", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
                            "--folds", "25", "-o", str(tmp_path / "audit"), "--no-progress"])
    errors = [line for line in err.splitlines() if line.startswith("dspt: error:")]
    assert code == 2 and len(errors) == 1 and "fewer than --folds 25" in errors[0]
    assert not (tmp_path / "audit").exists()


def test_every_score_is_its_formula_and_is_measured(audited):
    from dspt.audit import SCORES, score_labels

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=40)
    zs = rng.dirichlet(np.ones(4), size=40)
    given = np.tile(np.arange(4), 10)
    s = score_labels(given, probs, zs)
    for i in range(40):
        others = [probs[i, c] for c in range(4) if c != given[i]]  # cleanlab's label quality is the margin
        assert s["label_quality"][i] == pytest.approx((probs[i, given[i]] - max(others) + 1) / 2)
        assert s["zeroshot_prob"][i] == pytest.approx(zs[i, given[i]])
        assert s["combined_prob"][i] == pytest.approx(np.sqrt(probs[i, given[i]] * zs[i, given[i]]))
    res, out = audited
    plain = set(SCORES) - {"dual_prompt_clean"}  # that one needs --method dualprompt (test_noise_estimate.py)
    assert plain <= set(res.table.columns) and plain <= set(res.metrics)
    assert "dual_prompt_clean" not in res.table.columns
    assert ((res.table["zeroshot_prob"] >= 0) & (res.table["zeroshot_prob"] <= 1)).all()


def test_apply_drops_or_relabels_exactly_the_flagged_images():
    from dspt.audit import apply_flags

    table = pd.DataFrame({"path": ["a", "b", "c", "d"], "given": ["x", "y", "x", "x"], "suggested": ["y", "y", "z", "x"],
                          "flagged": [True, False, True, False]})
    assert apply_flags(table, "drop").to_dict("list") == {"path": ["b", "d"], "label": ["y", "x"]}
    assert apply_flags(table, "relabel").to_dict("list") == {"path": ["a", "b", "c", "d"],
                                                             "label": ["y", "y", "z", "x"]}


def test_dropping_every_image_of_a_class_is_refused_in_one_line():
    from dspt.audit import apply_flags
    from dspt.errors import DataError

    table = pd.DataFrame({"path": list("abcd"), "given": ["x", "x", "y", "y"], "suggested": ["y", "y", "x", "y"],
                          "flagged": [True, True, True, False]})
    with pytest.raises(DataError, match="leave class 'x' without images .all 2 of its images flagged"):
        apply_flags(table, "drop")
    relabelled = apply_flags(table, "relabel")
    assert list(relabelled["label"]) == ["y", "y", "x", "y"]


def test_a_refused_apply_keeps_the_audit_and_writes_no_cleaned_labels(data, tmp_path, monkeypatch):
    """Flags that would empty a class (here: an estimate of 100 % wrong) refuse --apply drop in one line, after
    the audit's own files are complete; no cleaned_labels.csv is written."""
    import dspt.audit as A
    from dspt.errors import DataError
    from dspt.noise_estimate import NoiseEstimate

    monkeypatch.setattr(A, "estimate_noise_rate", lambda *a, method="mixture", **k: NoiseEstimate(
        1.0, 1.0, 1.0, method, 60))
    with pytest.raises(DataError, match="without images .* the audit itself is written to"):
        audit(_cfg(data, tmp_path / "cache", epochs=1), tmp_path / "audit", folds=2, review=False, apply="drop")
    assert (tmp_path / "audit" / "audit.csv").is_file() and (tmp_path / "audit" / "audit.json").is_file()
    assert not (tmp_path / "audit" / "cleaned_labels.csv").exists()


def test_the_estimator_is_chosen_by_what_the_test_labels_and_the_zero_shot_model_can_say(audited, data, tmp_path):
    """auto: `reference` needs clean test labels (injected noise here) and a zero-shot model that pins the share;
    the tiny random model knows nothing of these images, so the audit falls back to the mixture and says why."""
    from dspt.audit import choose_estimate, trusted_test_labels
    from dspt.errors import ConfigError
    from dspt.noise_estimate import NoiseEstimate

    res, out = audited
    summary = json.loads((out / "audit.json").read_text())
    ref = summary["noise_estimates"]["reference"]
    assert set(summary["noise_estimates"]) == {"reference", "mixture", "confident_joint"}
    assert not ref["identified"] and summary["noise_estimate"]["method"] == "mixture"
    assert "not identified" in summary["estimator_chosen"] and res.noise_estimate.method == "mixture"
    # an identified reference estimate is taken; without clean test labels there is none, and mixture sizes the flags
    good = NoiseEstimate(0.3, 0.25, 0.35, "reference", 60, starts=(0.30, 0.31), clean_reading=0.05)
    weak = NoiseEstimate(0.3, 0.25, 0.35, "reference", 60, starts=(0.30, 0.31), clean_reading=0.4)
    mix = NoiseEstimate(0.2, 0.1, 0.3, "mixture", 60)
    assert choose_estimate("auto", {"reference": good, "mixture": mix})[0] is good
    assert choose_estimate("auto", {"mixture": mix})[0] is mix
    chosen, why = choose_estimate("auto", {"reference": weak, "mixture": mix})
    assert chosen is mix and "reads 40.0% wrong among the clean test labels" in why
    assert choose_estimate("mixture", {"reference": good, "mixture": mix})[0] is mix
    # which test labels are trusted
    given_csv = RunConfig(data="x.csv", dataset="csv", noise="given")
    assert not trusted_test_labels(given_csv)
    assert trusted_test_labels(RunConfig(data="x.csv", dataset="csv", noise="given", test_data="test/"))
    assert trusted_test_labels(RunConfig(data=str(data), noise="sym", noise_rate=0.3))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted((data / "train").glob("*/*"))))
    with pytest.raises(ConfigError, match="--estimator reference calibrates on the test split's labels"):
        audit(_cfg(labels, tmp_path / "cache", dataset="csv", noise="given", noise_rate=0.0), tmp_path / "a",
              folds=2, estimator="reference")
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_a_given_flag_rate_sizes_the_flags_and_the_estimates_stay_beside_it(data, tmp_path, caplog):
    """--flag-rate R flags round(R * N) of the lowest scores (a spot check's rate or a review budget), records that
    it did, and keeps every estimate in audit.json; a rate outside [0, 1) is refused in one line before anything
    is written. --apply on flags counted by an estimate that is not a measurement (the mixture here) warns."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dspt.audit"):
        res = audit(_cfg(data, tmp_path / "cache", epochs=1), tmp_path / "audit", folds=2, review=False, apply="relabel")
    assert any("not a measurement of the noise" in r.getMessage() for r in caplog.records)
    res = audit(_cfg(data, tmp_path / "cache", epochs=1), tmp_path / "audit", folds=2, review=False,
                flag_rate=0.25, apply="relabel")
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert int(res.table["flagged"].sum()) == summary["flagged"] == 15  # 0.25 x 60
    assert summary["flag_rate"] == 0.25 and summary["estimator_chosen"].startswith("--flag-rate 0.25")
    assert set(summary["noise_estimates"]) == {"reference", "mixture", "confident_joint"}
    lowest = res.table.sort_values("combined_prob", kind="stable")["path"][:15]
    assert set(lowest) == set(res.table.loc[res.table["flagged"], "path"])
    cleaned = pd.read_csv(tmp_path / "audit" / "cleaned_labels.csv").set_index("path")["label"]
    flagged = res.table.set_index("path")
    assert len(cleaned) == 60 and (cleaned[flagged.index[flagged["flagged"]]] ==
                                   flagged.loc[flagged["flagged"], "suggested"]).all()
    for bad in ("1.0", "-0.1", "nan"):
        code, _, err = run_cli(["audit", "--data", str(data), "--model", "dspt-tiny", "--pretrained", "none",
                                "--shots", "all", "--views", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
                                "--folds", "2", "--flag-rate", bad, "-o", str(tmp_path / "refused"), "--no-progress"])
        errors = [line for line in err.splitlines() if line.startswith("dspt: error:")]
        assert code == 2 and len(errors) == 1 and "--flag-rate" in errors[0] and "[0, 1)" in errors[0], err
    assert not (tmp_path / "refused").exists()
