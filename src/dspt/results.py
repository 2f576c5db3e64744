"""Results store: one CSV row per finished run, keyed by run id, written atomically under a lock."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .io import atomic_write_text, file_lock


def append_result(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Insert or replace the row with the same `run_id` (a re-run never duplicates a row)."""
    path = Path(path)
    with file_lock(path.with_name(path.name + ".lock")):
        old = read_results(path)
        new = pd.DataFrame([row])
        if not old.empty and "run_id" in old:
            old = old[old["run_id"] != row["run_id"]]
        table = pd.concat([old, new], ignore_index=True) if not old.empty else new
        buf = io.StringIO()
        table.to_csv(buf, index=False)
        atomic_write_text(path, buf.getvalue())


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)
