"""The tables of a report, rendered: Markdown, HTML and LaTeX (booktabs) from one `Table`.

The first tables a reader meets are the findings (one row per setting) and the paper tables (rows: dataset
and noise rate; columns: methods; mean ± std over seeds; the best in bold; a clear difference from the
reference marked). The rest (paired comparison, per cell, robustness, validation labels, missing cells) are
the evidence behind them. The numbers come from `dspt.compare` and `dspt.findings`; nothing here computes.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .compare import CELL, PROTOCOL

#: `dspt.report.Report` (not imported: `dspt.report` imports this module).
Report = Any

#: Marks of a cell whose method is clearly ahead of / behind the reference (after the multiplicity control).
MARKS = {"ahead": "▲", "behind": "▼"}
LATEX_MARKS = {"▲": r"$^{\uparrow}$", "▼": r"$^{\downarrow}$"}


def setting_label(noise: str, rate: float) -> str:
    return "given" if noise == "given" else f"{noise} {rate * 100:g}%"


def shots_text(shots: int) -> str:
    """'all' for the full training split (stored as 0, or -1 where an old store lacks the column)."""
    return "all" if int(shots) <= 0 else str(int(shots))


def cell_text(mean: float, std: float, n: int, show_n: bool = True) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:.1f}" if n < 2 or not math.isfinite(std) else f"{mean:.1f} ± {std:.1f}"
    return text + (f" (n={n})" if show_n or n < 2 else "")


def signed(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:+.1f}"


def interval_text(lo: float, hi: float) -> str:
    return f"[{signed(lo)}, {signed(hi)}]" if math.isfinite(lo) else "-"


def protocol_title(key: tuple) -> str:
    model, weights, learner, shots, epochs = key
    tuned = "" if learner == "coop" else f", learner {learner}"  # CoOp's context: the tables as they always were
    return f"{model} ({weights}){tuned}, {shots_text(shots)} shots, {epochs} epochs"


def _latex_escape(text: str) -> str:
    out = text
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        out = out.replace(a, b)
    out = out.replace("±", r"$\pm$")
    for mark, tex in LATEX_MARKS.items():
        out = out.replace(mark, tex)
    return out


@dataclass
class Table:
    """A rendered table: header, rows of cell texts, which cells are bold, and a caption under it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    caption: str = ""
    anchor: str = ""  # the HTML id of the table's block

    def markdown(self) -> str:
        def fmt(i: int, j: int, text: str) -> str:
            return f"**{text}**" if (i, j) in self.bold else text

        lines = [f"#### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(fmt(i, j, t) for j, t in enumerate(r)) + " |" for i, r in enumerate(self.rows)]
        return "\n".join(lines + (["", self.caption] if self.caption else []))

    def html(self) -> str:
        def td(i: int, j: int, text: str) -> str:
            body = html.escape(text)
            return f"<td><b>{body}</b></td>" if (i, j) in self.bold else f"<td>{body}</td>"

        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(td(i, j, t) for j, t in enumerate(r)) + "</tr>"
                       for i, r in enumerate(self.rows))
        cap = f"<p class='caption'>{html.escape(self.caption)}</p>" if self.caption else ""
        ident = f" id='{html.escape(self.anchor)}'" if self.anchor else ""
        return (f"<div class='table'{ident}><h4>{html.escape(self.title)}</h4><div class='scroll'><table><thead><tr>"
                f"{head}</tr></thead><tbody>{body}</tbody></table></div>{cap}</div>")

    def latex(self) -> str:
        """A booktabs table (needs \\usepackage{booktabs}); bold as \\textbf, marks as arrows."""
        def cell(i: int, j: int, text: str) -> str:
            body = _latex_escape(text)
            return f"\\textbf{{{body}}}" if (i, j) in self.bold else body

        spec = "l" * 2 + "r" * (len(self.header) - 2) if len(self.header) > 2 else "l" * len(self.header)
        lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
                 " & ".join(_latex_escape(h) for h in self.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(cell(i, j, t) for j, t in enumerate(r)) + " \\\\" for i, r in enumerate(self.rows)]
        caption = _latex_escape(self.title + (". " + self.caption if self.caption else ""))
        lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\end{table}"]
        return "\n".join(lines)


def _protocols(rep: Report) -> int:
    return len(rep.runs[PROTOCOL].drop_duplicates())


def _select(frame: pd.DataFrame, cols: list[str], values: tuple) -> pd.DataFrame:
    for col, val in zip(cols, values):
        frame = frame[frame[col] == val]
    return frame


def _methods(rep: Report, frame: pd.DataFrame) -> list[str]:
    return sorted(frame["method"].unique(), key=lambda m: (m != rep.reference, m))


# ---------------------------------------------------------------------------------------------- first screen

def findings_table(rep: Report) -> Table:
    """One row per setting: the best method, who is level with it, DSPT against the reference, the floors."""
    f = rep.findings.table
    focus = f"dspt - {rep.reference}"
    has_focus = len(f) and (f["focus"] != "").any()
    header = ["setting", "best (mean ± std)", "not clearly different from the best"] + \
        ([focus + " [95 % CI]"] if has_focus else []) + ["floor: worst run / chosen-rate mean"]
    rows = []
    for r in f.itertuples():
        spread = f" ± {r.best_std:.1f}" if math.isfinite(r.best_std) else ""
        best = f"{r.best} ({r.best_mean:.1f}{spread})"
        floors = sorted(r.floors, key=lambda x: x[1] - x[2])
        floor_text = ", ".join(f"{m} {w:.1f} / {mean:.1f}" for m, w, mean in floors[:4])
        if len(floors) > 4:
            floor_text += f", {len(floors) - 4} more (Robustness)"
        level = ", ".join(r.level) or ("none: the best is clearly ahead" if r.clearly_below else "(only method)")
        rows.append([r.setting, best, level]
                    + ([r.focus or "-"] if has_focus else []) + [floor_text])
    return Table("Findings per setting", header, rows, anchor="findings-table",
                 caption="Floors: the largest gap first; a worst run far below its mean is a run that collapsed "
                         "(a rate that diverged, or a seed that fell into a bad state).")


def paper_tables(rep: Report) -> list[Table]:
    """Per protocol and noise type: rows dataset x noise rate, columns zero-shot and the methods; mean ± std over
    seeds at the chosen rate; the best of a row in bold; ▲/▼ where the method is clearly ahead of / behind the
    reference; then an average row per rate over datasets (only where a method has every dataset)."""
    tables = []
    s, comp = rep.stats, rep.comparison
    marks = {}
    for r in comp.itertuples():
        if r.verdict in MARKS:
            marks[tuple(getattr(r, k) for k in CELL)] = MARKS[r.verdict]
    for proto, pst in s.groupby(PROTOCOL, sort=True):
        methods = _methods(rep, pst)
        for noise, nst in pst.groupby("noise", sort=True):
            n_values = set(nst["n"].astype(int))
            show_n = len(n_values) > 1
            by = nst.set_index(["dataset", "noise_rate", "method"])
            title = f"Test accuracy (%): {noise} noise; {protocol_title(proto)}"
            header = ["dataset", "noise", "zero-shot"] + methods
            t = Table(title, header, [], anchor=f"paper-{len(tables)}")
            for (dataset, rate), grp in nst.groupby(["dataset", "noise_rate"], sort=True):
                zs = grp["zeroshot_acc"].mean()
                row = [dataset, setting_label(noise, rate), f"{zs:.1f}" if math.isfinite(zs) else "-"]
                for j, m in enumerate(methods):
                    if (dataset, rate, m) in by.index:
                        c = by.loc[(dataset, rate, m)]
                        mark = marks.get(tuple(proto) + (dataset, noise, rate, m), "")
                        row.append(cell_text(c["mean"], c["std"], int(c["n"]), show_n) + mark)
                        if c["best"]:
                            t.bold.add((len(t.rows), j + 3))
                    else:
                        row.append("missing")
                t.rows.append(row)
            if nst["dataset"].nunique() > 1:
                avg = _select(rep.average, PROTOCOL, proto)
                avg = avg[avg["noise"] == noise].set_index(["noise_rate", "method"])["mean"]
                for rate in sorted(nst["noise_rate"].unique()):
                    t.rows.append(["average", setting_label(noise, rate), ""] + [
                        f"{avg[(rate, m)]:.1f}" if (rate, m) in avg.index and math.isfinite(avg[(rate, m)]) else "-"
                        for m in methods])
            seeds = f"n = {n_values.pop()} seeds" if not show_n else "n: seeds per cell"
            t.caption = (f"Mean ± std over seeds ({seeds}) at the learning rate chosen on validation data; bold: the "
                         f"best mean of a row; ▲/▼: clearly ahead of / behind {rep.reference} (paired by seed, "
                         f"{MULTIPLICITY_TEXT[rep.multiplicity]}).")
            tables.append(t)
    return tables


MULTIPLICITY_TEXT = {"holm": "Holm-adjusted within the table", "bh": "Benjamini-Hochberg-adjusted within the table",
                     "none": "not adjusted for multiplicity"}


def lr_tables(rep: Report) -> list[Table]:
    """The learning rate each cell of the paper tables was run at (chosen on validation, or the only one)."""
    tables = []
    for proto, pst in rep.stats.groupby(PROTOCOL, sort=True):
        methods = _methods(rep, pst)
        for noise, nst in pst.groupby("noise", sort=True):
            by = nst.set_index(["dataset", "noise_rate", "method"])["lr"]
            rows = [[d, setting_label(noise, r)] + [f"{by[(d, r, m)]:g}" if (d, r, m) in by.index else "-"
                                                   for m in methods]
                    for (d, r), _ in nst.groupby(["dataset", "noise_rate"], sort=True)]
            tables.append(Table(f"Learning rate: {noise} noise; {protocol_title(proto)}",
                                ["dataset", "noise"] + methods, rows))
    return tables


# ---------------------------------------------------------------------------------------------- evidence

def _drop_protocol(rep: Report, table: Table) -> Table:
    """With a single protocol its column says nothing: it moves into the title."""
    protos = rep.runs[PROTOCOL].drop_duplicates()
    if len(protos) == 1 and table.header[:1] == ["protocol"]:
        table.title += f"; {protocol_title(tuple(protos.iloc[0]))}"
        table.header = table.header[1:]
        table.rows = [r[1:] for r in table.rows]
    return table


def _where(x: pd.Series) -> list[str]:
    return [protocol_title(tuple(x[k] for k in PROTOCOL)), x["dataset"], setting_label(x["noise"], x["noise_rate"])]


def comparison_table(rep: Report) -> Table:
    c = rep.comparison
    boot = "boot_lo" in c.columns
    header = ["protocol", "dataset", "noise", "method", f"minus {rep.reference}", "95 % t-interval"] + \
        (["95 % bootstrap"] if boot else []) + ["p", "p adjusted", "seeds", "wins / ties / losses", "verdict"]
    rows = [_where(r) + [r["method"], signed(r["mean"]), interval_text(r["lo"], r["hi"])]
            + ([interval_text(r["boot_lo"], r["boot_hi"])] if boot else [])
            + [_p(r["p"]), _p(r["p_adj"]), str(r["n"]), f"{r['wins']} / {r['ties']} / {r['losses']}", r["verdict"]]
            for _, r in c.iterrows()]
    return _drop_protocol(rep, Table(f"Each method minus {rep.reference}, paired by seed (test accuracy points)",
                                     header, rows, caption=f"p: paired t-test; adjusted: "
                                     f"{MULTIPLICITY_TEXT[rep.multiplicity]} (one table: a protocol and noise type)."))


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def robustness_table(rep: Report) -> Table:
    r = rep.robustness.merge(rep.stats[CELL + ["mean", "lr"]], on=CELL, how="left")
    header = ["protocol", "dataset", "noise", "method", "runs (rates x seeds)", "worst run", "worst rate: mean",
              "median", "best run", "chosen rate: mean", "collapsed runs"]
    rows = [_where(x) + [x["method"], f"{x['runs']} ({x['lrs']} x {x['seeds']})", f"{x['worst']:.1f}",
                         f"{x['worst_lr_mean']:.1f} (lr {x['worst_lr']:g})", f"{x['median']:.1f}", f"{x['best']:.1f}",
                         f"{x['mean']:.1f} (lr {x['lr']:g})" if math.isfinite(x["mean"]) else "-",
                         f"{x['collapsed']}: {x['collapses']}" if x["collapsed"] else "0"]
            for _, x in r.iterrows()]
    return _drop_protocol(rep, Table("Robustness: every learning rate and seed tried (test accuracy %)", header, rows))


def details_table(rep: Report) -> Table:
    """One row per cell: accuracy, the share of wrong training labels the tuned model predicts (memorised),
    the chosen rate and the training seconds per run (a batch's wall time shared among its runs)."""
    header = ["protocol", "dataset", "noise", "method", "test acc", "memorised", "lr", "train s per run"]
    rows = [_where(x) + [x["method"], cell_text(x["mean"], x["std"], int(x["n"])),
                         f"{x['memorised']:.1f}" if math.isfinite(x["memorised"]) else "-", f"{x['lr']:g}",
                         f"{x['train_seconds']:.1f}" if math.isfinite(x["train_seconds"]) else "-"]
            for _, x in rep.stats.iterrows()]
    return _drop_protocol(rep, Table("Per cell: test accuracy, memorised wrong labels (%), chosen rate, seconds",
                                     header, rows, caption="Seconds: training time per run; runs that trained "
                                     "together as one batch share its wall time equally."))


def validation_table(rep: Report) -> Table:
    """Per setting: the validation labels the learning rates were chosen on, as the runs recorded them."""
    v = rep.validation
    header = ["protocol", "dataset", "noise", "validation labels", "realised noise (min-max over runs)", "note"]
    rows = [_where(x) + [x["labels"], x["realised"], x["why"]] for _, x in v.iterrows()]
    return _drop_protocol(rep, Table("Validation labels the learning rates were chosen on", header, rows))


def collapse_table(rep: Report) -> Table:
    """Per method and learning rate, over every setting and seed: how many runs ended collapsed."""
    c = rep.collapses
    rows = [[x["method"], f"{x['lr']:g}", str(x["runs"]), f"{x['collapsed']} ({x['rate']:.0%})", str(x["traps"])]
            for _, x in c.iterrows()]
    return Table("Runs that ended collapsed (predicting one class), per method and learning rate",
                 ["method", "lr", "runs", "collapsed", "of them one-class traps"], rows,
                 caption="A collapse: one class takes 95 % of the training predictions though it holds under half of "
                         "the labels; a trap: 90 % of the samples have no gradient left, so the run cannot recover.")


def missing_table(rep: Report) -> Table:
    header = ["protocol", "dataset", "noise", "method", "why"]
    rows = [_where(x) + [x["method"], x["reason"]] for _, x in rep.missing.iterrows()]
    return _drop_protocol(rep, Table("Missing or incomplete cells", header, rows))


def latex_document(rep: Report) -> str:
    """The paper tables (and their learning rates) as LaTeX, one booktabs table each, ready to \\input."""
    parts = ["% dspt report: paper tables (needs \\usepackage{booktabs}); generated, do not edit by hand"]
    parts += [t.latex() for t in paper_tables(rep)]
    if rep.select == "lr":
        parts += [t.latex() for t in lr_tables(rep)]
    return "\n\n".join(parts) + "\n"
