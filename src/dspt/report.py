"""`dspt report STORE... -o DIR`: the comparison of methods over seeds, from one or more results stores.

A store is a results CSV, a folder holding `results.csv` (a sweep, a demo), or a run folder (or a folder of
run folders) with `metrics.json`. The report (numbers from `dspt.compare`):
- tables in the papers' layout (rows: dataset; column groups: noise type and rate; a column per method), each
  cell mean ± std over seeds with the seed count, the best per setting in bold, an average row, and the
  learning rates chosen on validation data;
- each method minus a reference method, paired by seed, with a 95 % t-interval and a verdict;
- the robustness view: worst run and spread over every learning rate and seed tried;
- the cells a complete grid would hold and the store lacks;
- plots: accuracy vs noise (band over seeds, zero-shot line), accuracy vs learning rate, and the mechanism
  (gradient norm and loss of clean vs mislabeled samples per epoch, from each run's log.jsonl).
Written to DIR as report.md, report.html (self-contained: images embedded), CSV files and PNGs.
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
from .compare import CELL, PROTOCOL
from .errors import DataError
from .io import atomic_write_text, read_jsonl
from .results import read_results

#: Columns a store must have for a report.
REQUIRED = ["loss", "seed", "lr", "test_acc", "noise", "noise_rate"]
#: Columns filled in where an older store lacks them.
OPTIONAL = {"dataset": "data", "model": "?", "weights": "?", "shots": -1, "epochs": -1, "loss_options": "",
            "val_acc_given": math.nan, "val_acc": math.nan, "zeroshot_acc": math.nan, "memorised": math.nan,
            "train_seconds": math.nan, "run_id": "", "val_labels": ""}


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
    robustness: pd.DataFrame
    missing: pd.DataFrame
    reference: str
    select: str
    select_on: str
    notes: list[str] = field(default_factory=list)


def build_report(runs: pd.DataFrame, reference: str = "ce", select: str = "lr", select_on: str = "noisy",
                 methods: Sequence[str] | None = None) -> Report:
    """The numbers of a report. `select='lr'` picks each method's rate per setting on validation accuracy
    (`select_on` noisy or clean labels) averaged over seeds; `select='none'` keeps every rate as a method of
    its own (`ce@lr0.002`)."""
    runs = runs.copy()
    notes = []
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
    comparison = compare.paired_differences(chosen, reference)
    if select == "lr" and (choices.groupby(CELL)["lr"].nunique() > 1).any():
        labels = "noisy" if select_on == "noisy" else "clean"
        notes.append(f"learning rates chosen per method and setting on mean validation accuracy over seeds, "
                     f"measured against the {labels} validation labels; test accuracy took no part")
    return Report(runs=runs, choices=choices, chosen=chosen, stats=stats, average=compare.dataset_average(stats),
                  comparison=comparison, robustness=compare.robustness(runs),
                  missing=compare.missing_cells(runs, choices, stats), reference=reference, select=select,
                  select_on=select_on, notes=notes)


# ---------------------------------------------------------------------------------------------- rendering

def setting_label(noise: str, rate: float) -> str:
    return "given" if noise == "given" else f"{noise} {rate * 100:g}%"


def cell_text(mean: float, std: float, n: int) -> str:
    if n < 2 or not math.isfinite(std):
        return f"{mean:.1f} (n={n})"
    return f"{mean:.1f} ± {std:.1f} (n={n})"


def signed(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:+.1f}"


def protocol_title(key: tuple) -> str:
    model, weights, shots, epochs = key
    return f"{model} ({weights}), {shots} shots, {epochs} epochs"


@dataclass
class Table:
    """A rendered table: header, rows of cell texts, and which cells are bold."""

    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)

    def markdown(self) -> str:
        def fmt(i: int, j: int, text: str) -> str:
            return f"**{text}**" if (i, j) in self.bold else text

        lines = [f"#### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(fmt(i, j, t) for j, t in enumerate(r)) + " |" for i, r in enumerate(self.rows)]
        return "\n".join(lines)

    def html(self) -> str:
        def td(i: int, j: int, text: str) -> str:
            body = html.escape(text)
            return f"<td><b>{body}</b></td>" if (i, j) in self.bold else f"<td>{body}</td>"

        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(td(i, j, t) for j, t in enumerate(r)) + "</tr>"
                       for i, r in enumerate(self.rows))
        return f"<h4>{html.escape(self.title)}</h4><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def main_tables(rep: Report) -> list[Table]:
    """Per protocol and noise type: rows dataset (+ average), columns (rate, method): mean ± std (n), best bold;
    then the same layout with the chosen learning rates."""
    tables = []
    s = rep.stats
    for proto, pst in s.groupby(PROTOCOL, sort=True):
        methods = sorted(pst["method"].unique(), key=lambda m: (m != rep.reference, m))
        for noise, nst in pst.groupby("noise", sort=True):
            rates = sorted(nst["noise_rate"].unique())
            cols = [(r, m) for r in rates for m in methods]
            header = ["dataset", "zero-shot"] + [f"{setting_label(noise, r)} {m}" for r, m in cols]
            by = nst.set_index(["dataset", "noise_rate", "method"])
            acc, lrs = Table(f"{protocol_title(proto)}: {noise} noise, test accuracy (%)", header, []), \
                Table(f"{protocol_title(proto)}: {noise} noise, learning rate chosen on validation", header, [])
            for dataset in sorted(nst["dataset"].unique()):
                zs = nst[nst["dataset"] == dataset]["zeroshot_acc"].mean()
                row, lrow = [dataset, f"{zs:.1f}" if math.isfinite(zs) else "-"], [dataset, ""]
                for j, (r, m) in enumerate(cols):
                    if (dataset, r, m) in by.index:
                        c = by.loc[(dataset, r, m)]
                        row.append(cell_text(c["mean"], c["std"], int(c["n"])))
                        lrow.append(f"{c['lr']:g}")
                        if c["best"]:
                            acc.bold.add((len(acc.rows), j + 2))
                    else:
                        row.append("missing")
                        lrow.append("-")
                acc.rows.append(row)
                lrs.rows.append(lrow)
            avg = rep.average
            for col, val in zip(PROTOCOL, proto):
                avg = avg[avg[col] == val]
            avg = avg[avg["noise"] == noise].set_index(["noise_rate", "method"])["mean"]
            if nst["dataset"].nunique() > 1:
                acc.rows.append(["average", ""] + [f"{avg[(r, m)]:.1f}" if (r, m) in avg.index and
                                                   math.isfinite(avg[(r, m)]) else "-" for r, m in cols])
            tables += [acc, lrs] if rep.select == "lr" else [acc]
    return tables


def _drop_protocol(rep: Report, table: Table) -> Table:
    """With a single protocol its column says nothing: it moves into the title."""
    protos = rep.runs[PROTOCOL].drop_duplicates()
    if len(protos) == 1 and table.header[:1] == ["protocol"]:
        table.title += f"; {protocol_title(tuple(protos.iloc[0]))}"
        table.header = table.header[1:]
        table.rows = [r[1:] for r in table.rows]
    return table


def comparison_table(rep: Report) -> Table:
    c = rep.comparison
    header = ["protocol", "dataset", "noise", "method", f"minus {rep.reference}", "95 % t-interval", "seeds",
              "wins / ties / losses", "verdict"]
    rows = [[protocol_title(tuple(r[k] for k in PROTOCOL)), r["dataset"], setting_label(r["noise"], r["noise_rate"]),
             r["method"], signed(r["mean"]), f"[{signed(r['lo'])}, {signed(r['hi'])}]", str(r["n"]),
             f"{r['wins']} / {r['ties']} / {r['losses']}", r["verdict"]] for _, r in c.iterrows()]
    return _drop_protocol(rep, Table(f"Each method minus {rep.reference}, paired by seed (test accuracy points)",
                                     header, rows))


def robustness_table(rep: Report) -> Table:
    r = rep.robustness.merge(rep.stats[CELL + ["mean", "lr"]], on=CELL, how="left")
    header = ["protocol", "dataset", "noise", "method", "runs (rates x seeds)", "worst run", "worst rate: mean",
              "median", "best run", "chosen rate: mean"]
    rows = [[protocol_title(tuple(x[k] for k in PROTOCOL)), x["dataset"], setting_label(x["noise"], x["noise_rate"]),
             x["method"], f"{x['runs']} ({x['lrs']} x {x['seeds']})", f"{x['worst']:.1f}",
             f"{x['worst_lr_mean']:.1f} (lr {x['worst_lr']:g})", f"{x['median']:.1f}", f"{x['best']:.1f}",
             f"{x['mean']:.1f} (lr {x['lr']:g})" if math.isfinite(x["mean"]) else "-"] for _, x in r.iterrows()]
    return _drop_protocol(rep, Table("Robustness: every learning rate and seed tried (test accuracy %)", header, rows))


def details_table(rep: Report) -> Table:
    """One row per cell: accuracy, the share of wrong training labels the tuned model predicts (memorised),
    the chosen rate and the training seconds (of the run's batch, when runs trained together)."""
    header = ["protocol", "dataset", "noise", "method", "test acc", "memorised", "lr", "train s"]
    rows = [[protocol_title(tuple(x[k] for k in PROTOCOL)), x["dataset"], setting_label(x["noise"], x["noise_rate"]),
             x["method"], cell_text(x["mean"], x["std"], int(x["n"])),
             f"{x['memorised']:.1f}" if math.isfinite(x["memorised"]) else "-", f"{x['lr']:g}",
             f"{x['train_seconds']:.1f}" if math.isfinite(x["train_seconds"]) else "-"]
            for _, x in rep.stats.iterrows()]
    return _drop_protocol(rep, Table("Per cell: test accuracy, memorised wrong labels (%), chosen rate, seconds",
                                     header, rows))


def missing_table(rep: Report) -> Table:
    header = ["protocol", "dataset", "noise", "method", "why"]
    rows = [[protocol_title(tuple(x[k] for k in PROTOCOL)), x["dataset"], setting_label(x["noise"], x["noise_rate"]),
             x["method"], x["reason"]] for _, x in rep.missing.iterrows()]
    return _drop_protocol(rep, Table("Missing or incomplete cells", header, rows))


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
        proto, dataset, noise = key[:4], key[4], key[5]
        title = f"{dataset}, {noise} noise; {protocol_title(proto)}"
        stem = _slug(*key)
        path = out / f"accuracy_vs_noise_{stem}.png"
        plots.accuracy_vs_noise(st, st["zeroshot_acc"].mean(), path, title, f"{noise} label noise (%)")
        written.append(path)
        sel = rep.runs
        for col, val in zip(PROTOCOL + ["dataset", "noise"], key):
            sel = sel[sel[col] == val]
        if sel["lr"].nunique() > 1:
            path = out / f"accuracy_vs_lr_{stem}.png"
            plots.accuracy_vs_lr(sel, path, title)
            written.append(path)
        chosen = rep.chosen
        for col, val in zip(PROTOCOL + ["dataset", "noise"], key):
            chosen = chosen[chosen[col] == val]
        curves = _curves(chosen[chosen["noise_rate"] > 0])
        if not curves.empty:
            path = out / f"mechanism_{stem}.png"
            plots.mechanism(curves, path, title + " (chosen rates, mean over seeds)")
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- files

CSS = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}"
       "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
       "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}")


def _sections(rep: Report) -> list[tuple[str, list[Table]]]:
    parts = [("Test accuracy at the chosen learning rate, mean ± std over seeds", main_tables(rep))]
    if len(rep.comparison):
        parts.append(("Paired comparison", [comparison_table(rep)]))
    parts.append(("Per cell", [details_table(rep)]))
    parts.append(("Robustness", [robustness_table(rep)]))
    if len(rep.missing):
        parts.append(("Missing cells", [missing_table(rep)]))
    return parts


def _intro(rep: Report, stores: Sequence[str | Path]) -> list[str]:
    lines = [f"Stores: {', '.join(str(s) for s in stores)}; {len(rep.runs)} runs, "
             f"{rep.runs['method'].nunique()} methods, seeds {sorted(int(s) for s in rep.runs['seed'].unique())}.",
             "Cells: mean ± sample std over seeds (n = seeds); bold: the best mean among the methods of a setting. "
             "Paired differences: same seed, so the same shots and noise draw for both methods; 95 % t-interval "
             "over seeds; 'ahead'/'behind' only when the interval excludes 0."]
    return lines + [f"Note: {n}." for n in rep.notes]


def write_report(rep: Report, out: str | Path, stores: Sequence[str | Path], plots: bool = True) -> dict[str, Path]:
    """Write report.md, report.html (self-contained), the CSV files and the plots into `out`; the files of an
    earlier report there that this one does not rewrite (plots of settings gone) are removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        earlier = set(json.loads((out / "report.json").read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        earlier = set()
    files = {}
    csvs = {"cells.csv": rep.stats, "comparison.csv": rep.comparison, "robustness.csv": rep.robustness,
            "lr_choices.csv": rep.choices, "missing.csv": rep.missing, "runs.csv": rep.runs}
    for name, frame in csvs.items():
        atomic_write_text(out / name, frame.to_csv(index=False))
        files[name] = out / name
    images = write_plots(rep, out) if plots and len(rep.stats) else []
    sections = _sections(rep)
    md = ["# dspt report", ""] + _intro(rep, stores) + [""]
    for title, tables in sections:
        md += [f"## {title}", ""] + [t.markdown() + "\n" for t in tables]
    if images:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    atomic_write_text(out / "report.md", "\n".join(md))
    files["report.md"] = out / "report.md"
    body = ["<h1>dspt report</h1>"] + [f"<p>{html.escape(line)}</p>" for line in _intro(rep, stores)]
    for title, tables in sections:
        body += [f"<h2>{html.escape(title)}</h2>"] + [t.html() for t in tables]
    if images:
        body.append("<h2>Plots</h2>")
        for p in images:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}"></figure>')
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dspt report</title><style>{CSS}</style>"
            f"</head><body>{''.join(body)}</body></html>")
    atomic_write_text(out / "report.html", page)
    files["report.html"] = out / "report.html"
    for p in images:
        files[p.name] = p
    files["report.json"] = out / "report.json"
    atomic_write_text(out / "report.json", json.dumps({"stores": [str(s) for s in stores], "reference": rep.reference,
                                                       "select": rep.select, "select_on": rep.select_on,
                                                       "runs": len(rep.runs), "notes": rep.notes,
                                                       "files": sorted(files)}, indent=1))
    for name in earlier - set(files):
        if "/" not in name and (out / name).is_file():
            (out / name).unlink()
    return files


def report(stores: Sequence[str | Path], output: str | Path | None = None, reference: str = "ce",
           select: str = "lr", select_on: str = "noisy", methods: Sequence[str] | None = None,
           plots: bool = True) -> tuple[Report, dict[str, Path]]:
    """Load the stores, compute the report and write it (default folder: `<store>/report` for one store
    folder, else `report/`)."""
    runs = load_runs(stores)
    rep = build_report(runs, reference, select, select_on, methods)
    if output is None:
        first = Path(stores[0])
        output = first / "report" if len(stores) == 1 and first.is_dir() else Path("report")
    return rep, write_report(rep, output, stores, plots)
