"""Which image a path holds: a content digest, memoised by the file's stamp, so the feature cache and the
augmented views follow the image, not the list it came in.

A path is identified by its bytes (the first 16 bytes of their SHA-256), so a subset, a fold, a CSV listing,
a relabelled file or a copy of images already encoded finds them. Reading every file on every run would cost
as much as decoding it, so the digest is memoised per (path, size, mtime): a file rewritten in place gets a new
stamp and is read again. The memo is a folder of small CSV files, each written atomically and never changed;
concurrent writers each add their own file, and readers ignore a file that a compaction removed meanwhile.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError
from .io import atomic_write_text, file_lock

__all__ = ["DIGEST_BYTES", "image_digests", "image_view_seeds"]

DIGEST_BYTES = 16
_COMPACT_AT = 32  # memo files; beyond this many, they are merged into one
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"image '{path}' not found or unreadable; check the path or remove it from the list") from None
    return st.st_size, st.st_mtime_ns


def _content_digest(path: str) -> bytes:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        raise DataError(f"image '{path}' cannot be read; check its permissions or remove it from the list") from None
    return h.digest()[:DIGEST_BYTES]


def _read_memo(folder: Path) -> pd.DataFrame:
    frames = []
    for f in sorted(folder.glob("*.csv")):
        try:
            frames.append(pd.read_csv(f, dtype={"path": str, "size": "int64", "mtime_ns": "int64", "digest": str},
                                      keep_default_na=False))
        except (FileNotFoundError, pd.errors.EmptyDataError, ValueError):
            continue  # removed by a compaction meanwhile, or not ours: its images are hashed again
    if not frames:
        return pd.DataFrame({"path": [], "size": [], "mtime_ns": [], "digest": []})
    return pd.concat(frames, ignore_index=True).drop_duplicates(["path", "size", "mtime_ns"])


def _stamp_keys(paths: list[str], sizes: np.ndarray, mtimes: np.ndarray) -> pd.Index:
    return pd.Index([f"{p}\0{s}\0{m}" for p, s, m in zip(paths, sizes.tolist(), mtimes.tolist())])


def _compact(folder: Path) -> None:
    with file_lock(folder / ".lock"):
        files = sorted(folder.glob("*.csv"))
        if len(files) <= _COMPACT_AT:
            return
        merged = _read_memo(folder)
        atomic_write_text(folder / f"{uuid.uuid4().hex}.csv", merged.to_csv(index=False))
        for f in files:
            f.unlink(missing_ok=True)


def image_digests(paths: list[str], cache_dir: str | os.PathLike) -> np.ndarray:
    """[N, 16] uint8 content digests of `paths` (absolute paths are memoised; a file is read only when its
    size or mtime is new to the memo)."""
    folder = Path(cache_dir) / "features" / "identities"
    absolute = [os.path.abspath(p) for p in paths]
    stats = np.array([_stat(p) for p in absolute], dtype=np.int64).reshape(-1, 2)
    keys = _stamp_keys(absolute, stats[:, 0], stats[:, 1])
    memo = _read_memo(folder)
    found = _stamp_keys(memo["path"].tolist(), memo["size"].to_numpy(np.int64), memo["mtime_ns"].to_numpy(np.int64))
    at = found.get_indexer(keys) if len(found) else np.full(len(keys), -1)
    out = np.zeros((len(paths), DIGEST_BYTES), dtype=np.uint8)
    known = at >= 0
    if known.any():
        hexes = memo["digest"].to_numpy()[at[known]]
        out[known] = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    new = np.flatnonzero(~known)
    if len(new):
        rows = {}
        for i in new.tolist():
            digest = _content_digest(absolute[i])
            out[i] = np.frombuffer(digest, dtype=np.uint8)
            rows[(absolute[i], int(stats[i, 0]), int(stats[i, 1]))] = digest.hex()
        frame = pd.DataFrame([(p, s, m, d) for (p, s, m), d in rows.items()],
                             columns=["path", "size", "mtime_ns", "digest"])
        atomic_write_text(folder / f"{uuid.uuid4().hex}.csv", frame.to_csv(index=False))
        if len(list(folder.glob("*.csv"))) > _COMPACT_AT:
            _compact(folder)
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX[1])
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX[2])
        return x ^ (x >> np.uint64(31))


def image_view_seeds(digests: np.ndarray, seed: int, view: int) -> np.ndarray:
    """[N] int64 seeds of augmented view `view` for images with `digests`: a function of the image's content,
    the augmentation seed and the view only, so an image gets the same views in any list, at any position,
    on any machine."""
    words = np.ascontiguousarray(digests, dtype=np.uint8).view(np.uint64).reshape(len(digests), -1)
    with np.errstate(over="ignore"):
        x = _mix64(np.uint64(seed % 2**64) * np.uint64(_MIX[0]) + np.uint64(view % 2**64))
        for k in range(words.shape[1]):
            x = _mix64(x ^ words[:, k] + np.uint64(_MIX[0]) * np.uint64(k + 1))
    return (x >> np.uint64(33)).astype(np.int64)  # < 2**31: torch.manual_seed takes it as is
