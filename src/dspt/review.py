"""The review page of `dspt audit`: one self-contained HTML file to fix wrong labels in a browser.

`write_review_page(table, classnames, out)` renders the audit table (one row per training image, most
suspicious first) with Jinja2 from the package file `templates/review.html`. The page shows thumbnails of the
suspects (the flagged rows, optionally also the `top` most suspicious), grouped by `given -> suggested` class
pair, with their scores. Per image the reviewer keeps the label (the default), takes the suggestion, picks
another class from a list (filled when first opened, so a page of many classes stays small) or drops the
image; a button downloads the corrected labels of EVERY row of the table as a CSV that `dspt train --data
corrected_labels.csv` reads (dspt.data.table):

    path,label
    /abs/path/img1.jpg,cat
    "/abs/path/with, comma.jpg",dog

`path` as in the table (absolute), `label` the given class name, or the suggested or chosen one where the reviewer
changed it; dropped images are left out; fields with a comma, a quote or a line break are quoted as RFC 4180 says.

Nothing is fetched from anywhere: CSS and JS are inline, thumbnails are embedded as base64 JPEG (`embed=True`)
or referenced by paths relative to the page's folder (`embed=False`). An image that cannot be read becomes a
placeholder. The reviewer's choices are kept in the browser's localStorage, so a reload does not lose them.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

#: Columns the table must have.
REQUIRED = ("path", "given", "suggested", "flagged")
#: The scores the audit writes, in display order, with what they mean (one line each on the page).
SCORE_MEANINGS = {
    "label_quality": "cleanlab's label quality of the given label, 0-1: low means the label is likely wrong",
    "given_prob": "dspt's probability of the given label (out of sample), 0-1: low means the model doubts it",
    "suggested_prob": "dspt's probability of the suggested class, 0-1: high means a confident suggestion",
    "zeroshot_prob": "the untuned (zero-shot) model's probability of the given label, 0-1",
    "combined_prob": "geometric mean of the tuned and the zero-shot probability of the given label, 0-1",
}
#: Columns that are not scores to show (the page's own fields, or the audit's bookkeeping).
NOT_SCORES = {"path", "given", "suggested", "flagged", "rank", "true"}
CSV_NAME = "corrected_labels.csv"
THUMB_PX = 96


def thumbnail_data_uri(path: str | os.PathLike, size: int = THUMB_PX) -> str:
    """A base64 JPEG data URI of the image shrunk to fit `size` x `size` (EXIF rotation applied).

    Raises OSError (or ValueError, Image.DecompressionBombError...) when the file cannot be read as an image.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale (fast for large photos)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        else:
            im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _check_readable(path: str) -> None:
    """Raise when `path` is not an image file PIL can open (a cheap check: header and structure, no decode)."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


def relative_src(path: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """The image's URL relative to the page's folder (percent-encoded; a file:// URI across drives)."""
    try:
        rel = os.path.relpath(path, page_dir)
    except ValueError:  # Windows: another drive
        return Path(path).resolve().as_uri()
    return quote(Path(rel).as_posix(), safe="/")


def _json_for_script(obj: Any) -> str:
    """JSON safe inside <script type="application/json">: no '</script>', no HTML comment, no U+2028/9."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _fmt(value: Any) -> str:
    """A score for display: 3 decimals, integers as they are, booleans as yes/no, missing as a dash."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–" if value is None else str(value)
    return "–" if math.isnan(number) else f"{number:.3f}"


def score_columns(table: pd.DataFrame) -> list[str]:
    """The audit's scores present in `table` (in SCORE_MEANINGS order), then any further numeric or boolean
    columns, in table order."""
    known = [c for c in SCORE_MEANINGS if c in table.columns]
    extra = [c for c in table.columns if c not in NOT_SCORES and c not in SCORE_MEANINGS
             and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))]
    return known + extra


def _template():
    import jinja2

    text = resources.files("dspt").joinpath("templates").joinpath("review.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env.from_string(text)


def write_review_page(table: pd.DataFrame, classnames: Sequence[str], out: str | os.PathLike, embed: bool = True,
                      max_items: int | None = None, *, top: int = 0, thumb_px: int = THUMB_PX,
                      csv_name: str = CSV_NAME, title: str = "dspt audit: review the labels") -> Path:
    """Write the review page of an audit table to `out` (an .html file, or a folder: `out/review.html`).

    table: one row per training image, most suspicious first; columns path (absolute), given, suggested,
        flagged, rank and scores (label_quality, given_prob, suggested_prob; further numeric columns are shown
        as extra scores).
    classnames: the classes; every given and suggested label must be one of them.
    embed: thumbnails embedded as base64 JPEG (a page that works anywhere); False: the page references the
        images by paths relative to its folder (small page, full-size images, only on this machine).
    max_items: show at most this many suspects (the most suspicious); None: all.
    top: also show the `top` most suspicious images that are not flagged.
    Returns the path written. Unreadable images become placeholders; the page never fails on an image.
    """
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(f"review table lacks column(s) {', '.join(missing)}; it needs {', '.join(REQUIRED)}")
    classes = [str(c) for c in classnames]
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError("review: class names are not unique")
    t = table.reset_index(drop=True)
    given = [str(x) for x in t["given"]]
    suggested = [str(x) for x in t["suggested"]]
    unknown = sorted({x for x in given + suggested if x not in index})
    if unknown:
        raise ValueError(f"review: label(s) {unknown[:3]} are not among the {len(classes)} class names")
    n = len(t)
    ranks = [int(r) for r in t["rank"]] if "rank" in t.columns else list(range(1, n + 1))
    flagged = [bool(f) for f in t["flagged"].fillna(False)]
    paths = [os.path.abspath(os.path.expanduser(str(p))) for p in t["path"]]

    out = Path(out)
    if out.is_dir():
        out = out / "review.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    page_dir = out.parent.resolve()

    order = sorted(range(n), key=lambda i: (ranks[i], i))
    shown = [i for i in order if flagged[i] or ranks[i] <= top]
    candidates = len(shown)
    if max_items is not None:
        shown = shown[:max(0, int(max_items))]

    scores = score_columns(t)
    values = {c: t[c].tolist() for c in scores}
    has_true = "true" in t.columns
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    unreadable = 0
    for i in shown:
        item: dict[str, Any] = {
            "row": i, "rank": ranks[i], "path": paths[i], "name": os.path.basename(paths[i]) or paths[i],
            "given": given[i], "suggested": suggested[i], "same": given[i] == suggested[i],
            "flagged": flagged[i], "src": None, "problem": None, "detail": None,
            "scores": [(c, _fmt(values[c][i])) for c in scores],
            "true": str(t["true"].iloc[i]) if has_true else None,
        }
        try:
            if embed:
                item["src"] = thumbnail_data_uri(paths[i], thumb_px)
            else:
                _check_readable(paths[i])
                item["src"] = relative_src(paths[i], page_dir)
        except Exception as exc:  # noqa: BLE001 - any failure to read an image becomes a placeholder
            item["problem"] = "file not found" if isinstance(exc, FileNotFoundError) else "unreadable image"
            item["detail"] = f"{paths[i]}: {type(exc).__name__}: {exc}"
            unreadable += 1
        groups.setdefault((index[given[i]], index[suggested[i]]), []).append(item)
    # groups in the order of their most suspicious image (items are in rank order), not by size: the most
    # confident suspects come first whichever pair they belong to
    group_list = [{"id": f"g{k}", "given": classes[g], "suggested": classes[s], "items": items}
                  for k, ((g, s), items) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0]["rank"]))]

    key = hashlib.sha1("\n".join([str(out.resolve())] + [f"{p}\t{g}" for p, g in zip(paths, given)])
                       .encode("utf-8")).hexdigest()[:16]
    data = {"classes": classes, "rows": [[p, index[g], index[s]] for p, g, s in zip(paths, given, suggested)],
            "csv_name": csv_name, "key": key}
    legend = [(c, SCORE_MEANINGS.get(c, "a further column of the audit table")) for c in scores]
    n_flagged = sum(flagged)
    text = _template().render(
        title=title, n=n, n_classes=len(classes), n_flagged=n_flagged,
        pct_flagged=f"{100 * n_flagged / n:.1f}" if n else "0", n_shown=len(shown), n_candidates=candidates,
        top=top, max_items=max_items, unreadable=unreadable, groups=group_list, legend=legend,
        thumb_px=thumb_px, embed=embed, csv_name=csv_name, data_json=_json_for_script(data),
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out

