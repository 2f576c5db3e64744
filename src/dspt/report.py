"""`dspt report STORE... -o DIR`: the comparison of methods over seeds, from one or more results stores.

A store is a results CSV, a folder holding `results.csv` (a sweep, a demo), or a run folder (or a folder of
run folders) with `metrics.json`. The report opens with what the numbers say (`dspt.findings`: per setting the
best method and who is level with it, DSPT against the reference, each method's floor), then:
- paper tables (rows: dataset and noise rate; columns: methods; mean ± std over seeds at the learning rate
  chosen on validation data; the best in bold; ▲/▼ where a method is clearly ahead of / behind the reference,
  multiplicity-controlled within the table) and the chosen learning rates;
- plots: accuracy vs noise (band over seeds, zero-shot line), accuracy vs learning rate, and the mechanism
  (gradient norm and loss of clean vs mislabeled samples per epoch, from each run's log.jsonl);
- the evidence: each method minus the reference paired by seed (t-interval, optional bootstrap interval,
  p-values raw and adjusted, verdict), per-cell details, robustness over every rate and seed, the validation
  labels the rates were chosen on, and the cells a complete grid would hold and the store lacks.
Written to DIR as report.md, report.html (self-contained: images embedded), CSV files and PNGs; with
`formats` including "latex", tables.tex (booktabs) too. Numbers: `dspt.compare`; rendering:
`dspt.report_tables`.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import compare
from . import report_tables as rt
from .compare import CELL, PROTOCOL, SETTING
from .errors import DataError
from .findings import Findings, findings
from .io import atomic_write_text, read_jsonl
from .results import read_results

#: Columns a store must have for a report.
REQUIRED = ["loss", "seed", "lr", "test_acc", "noise", "noise_rate"]
#: Columns filled in where an older store lacks them.
OPTIONAL = {"dataset": "data", "model": "?", "weights": "?", "learner": "coop", "shots": -1, "epochs": -1,
            "loss_options": "",
            "val_acc_given": math.nan, "val_acc": math.nan, "zeroshot_acc": math.nan, "memorised": math.nan,
            "train_seconds": math.nan, "run_id": "", "val_labels": "", "val_realised_rate": math.nan,
            "val_why": "", "collapsed_at_epoch": math.nan, "collapse_kind": ""}
#: What `write_report` can write beside the CSV files.
FORMATS = ("md", "html", "latex")
#: A sweep folder's note of the preset it ran (`dspt sweep --preset`), stated by the report.
PRESET_NOTE = "preset.json"


def _run_folder_row(run_dir: Path) -> dict:
    from .config import RunConfig
    from .io import read_json
    from .rundir import result_row

    cfg = RunConfig.load(run_dir / "config.yaml")
    return result_row(cfg, read_json(run_dir / "metrics.json"), run_dir)


def load_runs(stores: Sequence[str | Path]) -> pd.DataFrame:
    """Every finished run of the stores, one row each (a run found twice is kept once), with a `method`
    column (the loss and its non-default options) and a short `weights` name."""
    if not stores:
        raise DataError("no results store given; pass a results.csv, a sweep or demo folder, or a run folder")
    frames = []
    for store in stores:
        path = Path(store)
        if path.is_file():
            table = read_results(path)
        elif (path / "results.csv").is_file():
            table = read_results(path / "results.csv")
        elif path.is_dir():
            folders = sorted(p.parent for p in path.rglob("metrics.json") if (p.parent / "config.yaml").is_file())
            table = pd.DataFrame([_run_folder_row(f) for f in folders])
        else:
            raise DataError(f"results store '{path}' not found; pass a results.csv, a sweep or demo folder, or a "
                            "run folder")
        if table.empty:
            raise DataError(f"results store '{path}' holds no finished run; run a sweep into it first")
        lacking = [c for c in REQUIRED if c not in table.columns]
        if lacking:
            raise DataError(f"'{path}' is not a dspt results store (no column {', '.join(lacking)}); pass the "
                            "results.csv a sweep or a run wrote")
        frames.append(table)
    return runs_frame(pd.concat(frames, ignore_index=True))


def runs_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Results rows made ready for a report: missing optional columns filled, one row per run id, a short
    `weights` name and the `method` column."""
    runs = runs.copy()
    for col, default in OPTIONAL.items():
        if col not in runs.columns:
            runs[col] = default
    runs = runs[runs["run_id"].eq("") | ~runs["run_id"].duplicated(keep="last")].copy()
    runs["weights"] = runs["weights"].fillna("?").astype(str).map(lambda w: Path(w).stem if "/" in w else w)
    for col in ("dataset", "model", "noise"):
        runs[col] = runs[col].fillna("?").astype(str)
    runs["learner"] = runs["learner"].fillna("coop").astype(str)  # stores from before learners: CoOp
    runs["loss_options"] = runs["loss_options"].astype(object).where(runs["loss_options"].notna(), "")
    trained = runs["method"].fillna("plain").astype(str) if "method" in runs.columns else ["plain"] * len(runs)
    runs["method"] = [compare.method_label(l, o, m) for l, o, m in zip(runs["loss"], runs["loss_options"], trained)]
    return runs.reset_index(drop=True)


@dataclass
class Report:
    """Everything `write_report` renders; the frames are also what the CSV files hold."""

    runs: pd.DataFrame
    choices: pd.DataFrame
    chosen: pd.DataFrame
    stats: pd.DataFrame
    average: pd.DataFrame
    comparison: pd.DataFrame
    versus_best: pd.DataFrame
    robustness: pd.DataFrame
    missing: pd.DataFrame
    validation: pd.DataFrame
    collapses: pd.DataFrame
    findings: Findings
    reference: str
    select: str
    select_on: str
    multiplicity: str = "holm"
    notes: list[str] = field(default_factory=list)


def build_report(runs: pd.DataFrame, reference: str = "ce", select: str = "lr", select_on: str = "noisy",
                 methods: Sequence[str] | None = None, multiplicity: str = "holm", bootstrap: bool = False,
                 presets: Sequence[dict] = ()) -> Report:
    """The numbers of a report. `select='lr'` picks each method's rate per setting on validation accuracy
    (`select_on` noisy or clean labels) averaged over seeds; `select='none'` keeps every rate as a method of
    its own (`ce@lr0.002`). `multiplicity` adjusts the verdicts of each table (holm, bh, none); `bootstrap` adds a
    bootstrap interval beside the t-interval; `presets` are the notes of the presets the stores ran."""
    runs = runs.copy()
    notes = []
    compare.adjust_pvalues(pd.Series(dtype=float).to_numpy(), multiplicity)  # an unknown name fails first
    if select == "none":
        runs["method"] = [f"{m}@lr{lr:g}" for m, lr in zip(runs["method"], runs["lr"])]
    elif select != "lr":
        raise DataError(f"--select '{select}' unknown; choose 'lr' (on validation data) or 'none'")
    if methods:
        unknown = sorted(set(methods) - set(runs["method"]))
        if unknown:
            raise DataError(f"method(s) {', '.join(unknown)} not in the store; it has: "
                            f"{', '.join(sorted(set(runs['method'])))}")
        runs = runs[runs["method"].isin(methods)]
    choices, chosen = compare.select_lr(runs, select_on)
    stats = compare.cell_stats(chosen) if len(chosen) else pd.DataFrame(columns=CELL + ["n", "mean", "std", "best"])
    if reference not in set(runs["method"]):
        notes.append(f"the reference method '{reference}' is not in the store, so there is no paired comparison "
                     f"(--reference one of: {', '.join(sorted(set(runs['method'])))})")
    comparison = compare.paired_differences(chosen, reference, multiplicity, bootstrap)
    vbest = compare.versus_best(chosen, stats, multiplicity)
    robust = compare.robustness(runs)
    validation = validation_summary(runs)
    notes += [preset_note(p) for p in presets]
    notes += lr_notes(choices, select, select_on, validation)
    return Report(runs=runs, choices=choices, chosen=chosen, stats=stats, average=compare.dataset_average(stats),
                  comparison=comparison, versus_best=vbest, robustness=robust,
                  missing=compare.missing_cells(runs, choices, stats), validation=validation,
                  collapses=compare.collapses(runs),
                  findings=findings(stats, vbest, comparison, robust, reference, multiplicity, runs),
                  reference=reference,
                  select=select, select_on=select_on, multiplicity=multiplicity, notes=notes)


def validation_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per protocol and setting: which validation labels the runs had (noisy, clean, or some of each), the
    realised noise rate of the noisy ones (min-max over runs) and why any were clean. A protocol such as
    symflip draws its validation noise into few images per class, so its realised rate is coarse and can fall
    back to clean labels: a rate chosen on them is chosen on other labels than the setting's name says."""
    keys = PROTOCOL + SETTING
    rows = []
    has_val = runs[runs["val_acc_given"].notna() | runs["val_acc"].notna()]
    for key, grp in has_val.groupby(keys, sort=True):
        labels = pd.Series([x if isinstance(x, str) else "" for x in grp["val_labels"]], index=grp.index)
        rate = pd.to_numeric(grp["val_realised_rate"], errors="coerce")
        noisy = rate[labels == "noisy"].dropna()
        realised = "-" if noisy.empty else (f"{noisy.min() * 100:.1f} %" if noisy.min() == noisy.max() else
                                            f"{noisy.min() * 100:.1f}-{noisy.max() * 100:.1f} %")
        whys = sorted({x for x in grp["val_why"] if isinstance(x, str) and x})
        rows.append(dict(zip(keys, key), labels=" and ".join(sorted(set(labels) - {""})) or "not recorded",
                         realised=realised, why="; ".join(whys) or "-", clean_runs=int((labels == "clean").sum()),
                         noisy_runs=int((labels == "noisy").sum()), runs=len(grp)))
    return pd.DataFrame(rows, columns=keys + ["labels", "realised", "why", "noisy_runs", "clean_runs", "runs"])


def validation_counts(validation: pd.DataFrame) -> dict[str, int]:
    """How many runs had noisy, clean and unrecorded validation labels."""
    if validation.empty:
        return {"noisy": 0, "clean": 0, "unknown": 0}
    return {"noisy": int(validation["noisy_runs"].sum()), "clean": int(validation["clean_runs"].sum()),
            "unknown": int((validation["runs"] - validation["noisy_runs"] - validation["clean_runs"]).sum())}


def lr_notes(choices: pd.DataFrame, select: str, select_on: str, validation: pd.DataFrame) -> list[str]:
    """How each method's learning rate came about: one rate (fixed by the grid: not chosen) or chosen on
    validation among several, and on which validation labels."""
    if select != "lr" or choices.empty:
        return []
    per_method = choices.groupby("method")["lr"].agg(lambda v: sorted(set(v)))
    fixed = {m: v[0] for m, v in per_method.items() if len(v) == 1}
    tuned = {m: v for m, v in per_method.items() if len(v) > 1}
    notes = []
    if fixed:
        notes.append("one learning rate per method, fixed by the grid and not chosen: " + ", ".join(
            f"{m} {lr:g}" for m, lr in sorted(fixed.items())))
    if tuned:
        if select_on == "clean":
            labels = "the clean validation labels (--select-on clean)"
        else:
            kinds = validation_counts(validation)
            labels = "the validation labels the runs had (" + ", ".join(
                f"{text} in {kinds[k]} runs" for k, text in (("noisy", "noisy like the training labels"),
                                                            ("clean", "clean"), ("unknown", "not recorded"))
                if kinds[k]) + ": see 'Validation labels')"
        notes.append("learning rates chosen per method and setting on mean validation accuracy over seeds, against "
                     f"{labels}; test accuracy took no part; tried: " + ", ".join(
                         f"{m} {'/'.join(f'{x:g}' for x in v)}" for m, v in sorted(tuned.items())))
    return notes


def preset_note(info: dict) -> str:
    """The sentence a report states for a sweep that ran a preset: its name, learning-rate rule and source."""
    return (f"preset '{info.get('name', '?')}': {info.get('lr_rule', 'learning-rate rule not recorded')} "
            f"(source: {info.get('source', 'not recorded')})")


def read_presets(stores: Sequence[str | Path]) -> list[dict]:
    """The preset notes (`preset.json`) of the store folders that have one."""
    out = []
    for store in stores:
        path = Path(store)
        note = (path if path.is_dir() else path.parent) / PRESET_NOTE
        if note.is_file():
            try:
                info = json.loads(note.read_text(encoding="utf-8"))
            except ValueError:
                continue
            if isinstance(info, dict) and info not in out:
                out.append(info)
    return out


# ---------------------------------------------------------------------------------------------- plots

def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def _curves(chosen: pd.DataFrame) -> pd.DataFrame:
    """Per method, noise rate and epoch: the mechanism columns of log.jsonl averaged over the chosen runs."""
    keep = ["grad_norm_clean", "grad_norm_noisy", "loss_clean", "loss_noisy"]
    rows = []
    for _, run in chosen.iterrows():
        log = Path(str(run["run_id"])) / "log.jsonl"
        if not run["run_id"] or not log.is_file():
            continue
        for rec in read_jsonl(log):
            if rec.get("event") == "epoch":
                rows.append({"method": run["method"], "noise_rate": run["noise_rate"], "epoch": rec["epoch"]} |
                            {k: rec.get(k, math.nan) for k in keep})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).groupby(["method", "noise_rate", "epoch"], sort=False).mean().reset_index()


def write_plots(rep: Report, out: Path) -> list[Path]:
    """Per protocol, dataset and noise type: accuracy vs noise, accuracy vs learning rate (when several were
    tried), and the mechanism (when the run folders and their logs are there)."""
    from . import plots

    written = []
    for key, st in rep.stats.groupby(PROTOCOL + ["dataset", "noise"], sort=True):
        n = len(PROTOCOL)
        proto, dataset, noise = key[:n], key[n], key[n + 1]
        title = f"{dataset}, {noise} noise; {rt.protocol_title(proto)}"
        learner = PROTOCOL.index("learner")  # CoOp's plots keep their names
        stem = _slug(*(k for i, k in enumerate(key) if i != learner or k != "coop"))
        path = out / f"accuracy_vs_noise_{stem}.png"
        plots.accuracy_vs_noise(st, st["zeroshot_acc"].mean(), path, title, f"{noise} label noise (%)")
        written.append(path)
        sel = rt._select(rep.runs, PROTOCOL + ["dataset", "noise"], key)
        if sel["lr"].nunique() > 1:
            path = out / f"accuracy_vs_lr_{stem}.png"
            plots.accuracy_vs_lr(sel, path, title)
            written.append(path)
        chosen = rt._select(rep.chosen, PROTOCOL + ["dataset", "noise"], key)
        curves = _curves(chosen[chosen["noise_rate"] > 0])
        if not curves.empty:
            path = out / f"mechanism_{stem}.png"
            plots.mechanism(curves, path, title + " (chosen rates, mean over seeds)")
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- files

CSS = ("body{font-family:sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}"
       "h1{margin:0 0 0.3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
       "#findings{background:#f5f8ff;border:1px solid #c9d6f2;border-radius:6px;padding:0.6em 1em;margin:0.8em 0}"
       "#findings ul{margin:0.3em 0 0.6em;padding-left:1.2em}#findings li{margin:0.2em 0}"
       ".scroll{overflow-x:auto}table{border-collapse:collapse;margin:0.3em 0 0.3em;font-size:13px}"
       "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
       "td:first-child,th:first-child{text-align:left;white-space:nowrap}"
       "#findings-table td,#findings-table th{text-align:left}.caption{font-size:12px;color:#555;margin:0 0 1.2em}"
       "details{margin:0.8em 0}summary{cursor:pointer;font-weight:bold}"
       "figure{display:inline-block;margin:0.5em;vertical-align:top}img{max-width:560px;width:100%}"
       ".notes{font-size:13px;color:#444}")


def _evidence(rep: Report) -> list[tuple[str, list[rt.Table]]]:
    parts = []
    if len(rep.comparison):
        parts.append(("Paired comparison", [rt.comparison_table(rep)]))
    parts.append(("Per cell", [rt.details_table(rep)]))
    parts.append(("Robustness", [rt.robustness_table(rep)]))
    if len(rep.validation):
        parts.append(("Validation labels", [rt.validation_table(rep)]))
    if len(rep.collapses):
        parts.append(("Collapses", [rt.collapse_table(rep)]))
    if len(rep.missing):
        parts.append(("Missing cells", [rt.missing_table(rep)]))
    return parts


def _intro(rep: Report, stores: Sequence[str | Path]) -> str:
    return (f"Stores: {', '.join(str(s) for s in stores)}; {len(rep.runs)} runs, {rep.runs['method'].nunique()} "
            f"methods, seeds {sorted(int(s) for s in rep.runs['seed'].unique())}.")


def _paper(rep: Report) -> list[rt.Table]:
    return rt.paper_tables(rep) + (rt.lr_tables(rep) if rep.select == "lr" else [])


def _markdown(rep: Report, stores: Sequence[str | Path], images: list[Path]) -> str:
    md = ["# dspt report", "", _intro(rep, stores), "", "## Findings", ""]
    md += [f"- {s}" for s in rep.findings.sentences] + [""]
    if len(rep.findings.table):
        md += [rt.findings_table(rep).markdown(), ""]
    md += ["## Paper tables", ""] + [t.markdown() + "\n" for t in _paper(rep)]
    if images:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    for title, tables in _evidence(rep):
        md += [f"## {title}", ""] + [t.markdown() + "\n" for t in tables]
    if rep.notes:
        md += ["## Notes", ""] + [f"- {n}." for n in rep.notes] + [""]
    return "\n".join(md)


def _html(rep: Report, stores: Sequence[str | Path], images: list[Path]) -> str:
    esc = html.escape
    body = ["<h1>dspt report</h1>", f"<p class='notes'>{esc(_intro(rep, stores))}</p>",
            "<section id='findings'><h2 style='border:0;margin-top:0.2em'>Findings</h2><ul>"
            + "".join(f"<li>{esc(s)}</li>" for s in rep.findings.sentences) + "</ul>"
            + (rt.findings_table(rep).html() if len(rep.findings.table) else "") + "</section>",
            "<section id='paper'><h2>Paper tables</h2>" + "".join(t.html() for t in _paper(rep)) + "</section>"]
    if images:
        figs = []
        for p in images:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            figs.append(f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption class='notes'>{esc(p.stem)}</figcaption></figure>")
        body.append("<section id='plots'><h2>Plots</h2>" + "".join(figs) + "</section>")
    body.append("<section id='evidence'>")
    for title, tables in _evidence(rep):
        body.append(f"<details><summary>{esc(title)}</summary>" + "".join(t.html() for t in tables) + "</details>")
    body.append("</section>")
    if rep.notes:
        body.append("<section id='notes'><h2>Notes</h2><ul class='notes'>"
                    + "".join(f"<li>{esc(n)}.</li>" for n in rep.notes) + "</ul></section>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>dspt report</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def _formats(formats: str | Sequence[str]) -> list[str]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise DataError(f"--format '{','.join(bad) or formats}' unknown; choose from: {', '.join(FORMATS)} (a comma "
                        "list, e.g. md,html,latex)")
    return items


def write_report(rep: Report, out: str | Path, stores: Sequence[str | Path], plots: bool = True,
                 formats: str | Sequence[str] = ("md", "html")) -> dict[str, Path]:
    """Write the CSV files, the plots and `formats` (md: report.md, html: report.html, self-contained; latex:
    tables.tex) into `out`; the files of an earlier report there that this one does not rewrite (plots of
    settings gone) are removed."""
    kinds = _formats(formats)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        earlier = set(json.loads((out / "report.json").read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        earlier = set()
    files = {}
    csvs = {"cells.csv": rep.stats, "comparison.csv": rep.comparison, "robustness.csv": rep.robustness,
            "lr_choices.csv": rep.choices, "missing.csv": rep.missing, "runs.csv": rep.runs,
            "findings.csv": rep.findings.table, "versus_best.csv": rep.versus_best, "validation.csv": rep.validation,
            "collapses.csv": rep.collapses}
    for name, frame in csvs.items():
        atomic_write_text(out / name, frame.to_csv(index=False))
        files[name] = out / name
    images = write_plots(rep, out) if plots and len(rep.stats) else []
    if "md" in kinds:
        atomic_write_text(out / "report.md", _markdown(rep, stores, images))
        files["report.md"] = out / "report.md"
    if "html" in kinds:
        atomic_write_text(out / "report.html", _html(rep, stores, images))
        files["report.html"] = out / "report.html"
    if "latex" in kinds:
        atomic_write_text(out / "tables.tex", rt.latex_document(rep))
        files["tables.tex"] = out / "tables.tex"
    for p in images:
        files[p.name] = p
    files["report.json"] = out / "report.json"
    atomic_write_text(out / "report.json", json.dumps({"stores": [str(s) for s in stores], "reference": rep.reference,
                                                       "select": rep.select, "select_on": rep.select_on,
                                                       "multiplicity": rep.multiplicity, "runs": len(rep.runs),
                                                       "findings": rep.findings.sentences, "notes": rep.notes,
                                                       "files": sorted(files)}, indent=1))
    for name in earlier - set(files):
        if "/" not in name and (out / name).is_file():
            (out / name).unlink()
    return files


def report(stores: Sequence[str | Path], output: str | Path | None = None, reference: str = "ce",
           select: str = "lr", select_on: str = "noisy", methods: Sequence[str] | None = None,
           plots: bool = True, multiplicity: str = "holm", bootstrap: bool = False,
           formats: str | Sequence[str] = ("md", "html")) -> tuple[Report, dict[str, Path]]:
    """Load the stores, compute the report and write it (default folder: `<store>/report` for one store
    folder, else `report/`)."""
    _formats(formats)
    runs = load_runs(stores)
    rep = build_report(runs, reference, select, select_on, methods, multiplicity, bootstrap, read_presets(stores))
    if output is None:
        first = Path(stores[0])
        output = first / "report" if len(stores) == 1 and first.is_dir() else Path("report")
    return rep, write_report(rep, output, stores, plots, formats)
