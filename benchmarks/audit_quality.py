"""How well `dspt audit` finds wrong labels, per score, noise kind and audit loss, on the CIFAR-10N case
(`benchmarks/cifar10n_case.py`: CIFAR-10 images, CIFAR-10N human labels, a miniature CLIP prior).

On one pool of the case (`dev` to choose on; `final` only for the last measurement), per setting:
- `sym`: the clean labels with 40 % injected symmetric noise; `pair`: 40 % pair (class to the next) noise;
- `aggre`, `random1`: CIFAR-10N's human labels (majority vote, ~9 % wrong; one annotator, ~17 % wrong),
and per audit loss (`--losses`, default dspt, ce and ce with `--method dualprompt`, DeFT's detector, which then
ranks by its own score), one `dspt.audit.audit` (5 folds, 10 epochs, the audit's default learning rate, the
case's 10 cached views). Printed and written (`--md`, `--json`):
- per score: AUROC and average precision of ranking the wrong labels first; precision and recall among as many
  top-ranked images as there are wrong labels (the count a perfect estimate would flag);
- the estimated share of wrong labels with its bootstrap interval, against the realised share, for both
  estimators, and the precision and recall of the audit's own flags;
- the image-views each audit encoded (a cold cache encodes each image once per view; later audits of the
  same images, whatever their labels, encode none).
With `--retrain`: per setting and plain loss (dspt, ce), test accuracy of that loss trained on the noisy labels
against trained on the labels its own audit cleaned (`--apply drop`), paired over `--seeds`.

    python benchmarks/audit_quality.py                               # dev pool, all settings, dspt and ce
    python benchmarks/audit_quality.py --pool final --retrain        # the final measurement
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cifar10n_case  # beside this script (python puts its folder on sys.path)
import numpy as np
import pandas as pd

from dspt.errors import DsptError
from dspt.io import atomic_write_text
from dspt.miniature import DEMO_MODEL, VIEWS

SETTINGS = {"sym": ("clean", {"noise": "sym", "noise_rate": 0.4}), "pair": ("clean", {"noise": "pair", "noise_rate": 0.4}),
            "aggre": ("aggre", {"noise": "given"}), "random1": ("random1", {"noise": "given"})}
#: audit losses; "LOSS+METHOD" audits with a method too (dualprompt: DeFT's dual-prompt detector)
LOSSES = ("dspt", "ce", "ce+dualprompt")
EPOCHS = 10
FOLDS = 5


def base_config(case: dict[str, Any], pool: str, setting: str, loss: str, epochs: int, **extra: Any):
    from dspt.config import RunConfig

    table, noise = SETTINGS[setting]
    loss, _, method = loss.partition("+")
    return RunConfig(method=method or "plain", data=str(case["tables"][pool][table]), dataset="csv", test_data=str(case["test"]),
                     model=DEMO_MODEL, pretrained=None, checkpoint=str(case["checkpoint"]), template=case["template"],
                     ctx_init="a photo of a", shots=0, epochs=epochs, views=10, loss=loss, seed=0, progress=False,
                     **VIEWS, **noise, **extra)


def run_audit(case: dict[str, Any], pool: str, setting: str, loss: str, out: Path, epochs: int, folds: int,
              ) -> dict[str, Any]:
    from dspt.audit import audit

    cfg = base_config(case, pool, setting, loss, epochs, results=str(out / "results.csv"))
    t0 = time.perf_counter()
    from dspt.audit_scores import DEFAULT_SCORE

    score = "dual_prompt_clean" if cfg.method == "dualprompt" else DEFAULT_SCORE
    # cleaned labels only where a plain loss retrains on them: a method's flags may empty a class, which --apply
    # drop refuses (and the benchmark would stop on)
    res = audit(cfg, out, folds=folds, review=False, apply="drop" if cfg.method == "plain" else None, score=score)
    summary = json.loads((out / "audit.json").read_text())
    return {"setting": setting, "loss": loss, "seconds": time.perf_counter() - t0, "detection": res.metrics,
            "noise_estimates": summary["noise_estimates"], "noise_estimate": summary["noise_estimate"],
            "ranked_by": summary["ranked_by"], "encoded": summary["features_encoded"], "table": res.table}


def _at_true_count(table: pd.DataFrame, score: str) -> tuple[float, float]:
    noisy = table["wrong_label"].to_numpy(bool)
    k = int(noisy.sum())
    top = np.argsort(table[score].to_numpy(float), kind="stable")[:k]
    return float(noisy[top].mean()) if k else float("nan"), float(noisy[top].sum() / max(k, 1))


def _auroc(noisy: np.ndarray, suspicion: np.ndarray) -> float:
    """AUROC of ranking the wrong labels first (Mann-Whitney, ties averaged)."""
    from scipy.stats import rankdata

    n1 = int(noisy.sum())
    return float((rankdata(suspicion)[noisy].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(noisy) - n1)))


def auroc_gain(noisy: np.ndarray, score: np.ndarray, reference: np.ndarray, draws: int = 1000,
               seed: int = 0) -> tuple[float, float, float]:
    """AUROC of `score` minus AUROC of `reference` (low: suspicious for both) on the same images, with a 95 %
    paired percentile bootstrap interval over images: whether a score beats the zero-shot model or only
    matches it within sampling error."""
    noisy = np.asarray(noisy, dtype=bool)
    a, b = -np.asarray(score, dtype=float), -np.asarray(reference, dtype=float)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        idx = rng.integers(0, len(noisy), len(noisy))
        if noisy[idx].all() or not noisy[idx].any():
            continue
        diffs.append(_auroc(noisy[idx], a[idx]) - _auroc(noisy[idx], b[idx]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return _auroc(noisy, a) - _auroc(noisy, b), float(low), float(high)


def score_table(records: list[dict[str, Any]]) -> str:
    from dspt.audit import SCORES

    lines = ["| setting | loss | wrong | score | AUROC | AUROC - zero-shot [95 % CI] | AP | precision / recall at the "
             "true count |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        d, t = r["detection"], r["table"]
        noisy = t["wrong_label"].to_numpy(bool)
        for score in [s for s in SCORES if s in t.columns]:
            p, rec = _at_true_count(t, score)
            if score == "zeroshot_prob":
                gain = "-"
            else:
                g, low, high = auroc_gain(noisy, t[score].to_numpy(float), t["zeroshot_prob"].to_numpy(float))
                gain = f"{g:+.3f} [{low:+.3f}, {high:+.3f}]"
            lines.append(f"| {r['setting']} | {r['loss']} | {d['flips'] / d['images']:.1%} | {score} | "
                         f"{d[score]['auroc']:.3f} | {gain} | {d[score]['average_precision']:.3f} | {p:.2f} / {rec:.2f} |")
    return "\n".join(lines)


def estimate_table(records: list[dict[str, Any]]) -> str:
    lines = [("| setting | loss | wrong | estimator | estimate [95 % interval] | reads on clean test labels | flags: "
              "count, precision / recall | cleanlab flags: count, precision / recall | image-views encoded |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        d = r["detection"]
        for name, e in r["noise_estimates"].items():
            used = name == r["noise_estimate"]["method"]
            flags = (f"{d['flagged']['count']}, {d['flagged']['precision']:.2f} / {d['flagged']['recall']:.2f}"
                     if used else "-")
            cl = d["cleanlab_flagged"]
            reading = "-" if e.get("clean_reading") is None else f"{e['clean_reading']:.1%}"
            lines.append(f"| {r['setting']} | {r['loss']} | {d['flips'] / d['images']:.1%} | {name}"
                         f"{' (used)' if used else ''} | {e['rate']:.1%} [{e['low']:.1%}, {e['high']:.1%}] | {reading} | "
                         f"{flags} | "
                         f"{cl['count']}, {cl['precision']:.2f} / {cl['recall']:.2f} | {r['encoded']['total']} |")
    return "\n".join(lines)


def retrain(case: dict[str, Any], pool: str, setting: str, loss: str, audit_dir: Path, out: Path,
            seeds: list[int], epochs: int) -> pd.DataFrame:
    """Test accuracy of `loss` trained on the audited (noisy) labels and on the cleaned ones, per seed."""
    from dataclasses import replace

    from dspt.train import train_batch

    table = pd.read_csv(audit_dir / "audit.csv")
    true = dict(zip(table["path"], table["true"]))  # the clean labels ride along, so runs report their noise
    noisy, cleaned = audit_dir / "noisy_labels_as_audited.csv", audit_dir / "cleaned_labels_with_truth.csv"
    atomic_write_text(noisy, pd.DataFrame({"path": table["path"], "label": table["given"],
                                           "clean_label": table["true"]}).to_csv(index=False))
    kept = pd.read_csv(audit_dir / "cleaned_labels.csv")
    atomic_write_text(cleaned, kept.assign(clean_label=kept["path"].map(true)).to_csv(index=False))
    names = audit_dir / "folds" / "classnames.txt"
    rows = []
    for which, data in (("noisy", noisy), ("cleaned", cleaned)):
        base = replace(base_config(case, pool, setting, loss, epochs), data=str(data), noise="given", noise_rate=0.0,
                       classnames=str(names))
        cfgs = [replace(base, seed=s, output=str(out / f"{setting}-{loss}-{which}-seed{s}"),
                        results=str(out / "results.csv")) for s in seeds]
        for s, (status, payload) in zip(seeds, train_batch(cfgs)):
            if status != "ok":
                raise payload
            rows.append({"setting": setting, "loss": loss, "labels": which, "seed": s, "test_acc": payload["test_acc"],
                         "images": payload["noise"]["n"], "wrong": payload["noise"]["realised_rate"]})
    return pd.DataFrame(rows)


def retrain_table(frame: pd.DataFrame) -> str:
    from dspt.compare import t_interval

    lines = [("| setting | loss | noisy labels: images (wrong), test acc | cleaned: images (wrong), test acc | "
              "cleaned - noisy [95 % CI] | seeds |"), "|---|---|---|---|---|---|"]
    for (setting, loss), g in frame.groupby(["setting", "loss"], sort=False):
        a = g[g["labels"] == "noisy"].set_index("seed")["test_acc"]
        b = g[g["labels"] == "cleaned"].set_index("seed")["test_acc"]
        common = a.index.intersection(b.index)
        diff = (b[common] - a[common]).to_numpy()
        mean, (low, high) = float(diff.mean()), t_interval(diff)
        na, nb = g[g["labels"] == "noisy"].iloc[0], g[g["labels"] == "cleaned"].iloc[0]
        lines.append(f"| {setting} | {loss} | {na['images']} ({na['wrong']:.1%}), {a.mean():.1f} | "
                     f"{nb['images']} ({nb['wrong']:.1%}), {b.mean():.1f} | {mean:+.1f} [{low:+.1f}, {high:+.1f}] | "
                     f"{len(common)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", choices=("dev", "final"), default="dev")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"of: {', '.join(SETTINGS)}")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--folds", type=int, default=FOLDS)
    ap.add_argument("--shift", choices=list(cifar10n_case.SHIFTS), default="none",
                    help="the case's shift of the tuning and test images (cifar10n_case.py --shift; default none)")
    ap.add_argument("--retrain", action="store_true", help="also train on noisy vs cleaned labels")
    ap.add_argument("--seeds", default="1,2,3", help="tuning seeds of --retrain")
    ap.add_argument("--out", type=Path, default=None, help="audit folders (default: beside the case)")
    ap.add_argument("--md", type=Path, help="write the tables as Markdown here")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    try:
        case = cifar10n_case.build_case(shift=args.shift)
        out = args.out or Path(case["root"]) / f"audit-scores-{args.pool}"
        records, retrained = [], []
        for setting in args.settings.split(","):
            for loss in args.losses.split(","):
                print(f"audit: {setting}, {loss} ...", flush=True)
                r = run_audit(case, args.pool, setting, loss, out / f"{setting}-{loss}", args.epochs, args.folds)
                print(f"  {r['seconds']:.0f} s, {r['encoded']['total']} image-views encoded", flush=True)
                records.append(r)
                if args.retrain and "+" not in loss:  # each plain loss: audit with it, then train with it
                    retrained.append(retrain(case, args.pool, setting, loss, out / f"{setting}-{loss}",
                                             out / "retrain", [int(s) for s in args.seeds.split(",")], args.epochs))
    except DsptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = [f"## Audit scores on the CIFAR-10N case (shift {args.shift}), {args.pool} pool ({args.folds} folds, "
            f"{args.epochs} epochs)", "",
            score_table(records), "", estimate_table(records)]
    if retrained:
        text += ["", retrain_table(pd.concat(retrained)), ""]
    print("\n".join(text))
    if args.md:
        atomic_write_text(args.md, "\n".join(text) + "\n")
    if args.json:
        atomic_write_text(args.json, json.dumps([{k: v for k, v in r.items() if k != "table"} for r in records]
                                                + ([] if not retrained else [pd.concat(retrained).to_dict("records")]),
                                                indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
