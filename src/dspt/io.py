"""Files: atomic writes (a reader sees the old file or the complete new one, never half of one), file stamps,
cross-platform locks, and dspt's cache folder. The bottom layer of dspt: it imports nothing of dspt."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock

#: what `file_stamp` returns for a file that does not exist (or cannot be stat'ed)
MISSING = "missing"


def default_cache_dir() -> Path:
    """dspt's cache folder: $DSPT_CACHE, else ~/.cache/dspt."""
    return Path(os.environ.get("DSPT_CACHE", Path.home() / ".cache" / "dspt")).expanduser()


def file_stamp(path: str | os.PathLike) -> str:
    """'<size>:<mtime in ns>' of a file, or 'missing': changes when the file is rewritten, without reading it."""
    try:
        st = os.stat(path)
    except OSError:
        return MISSING
    return f"{st.st_size}:{st.st_mtime_ns}"


def _create_temp(path: Path) -> tuple[str, int]:
    """A new, empty, uniquely named file beside `path` and its permission bits: 0o666 less the umask (what
    `open` gives any new file), not `tempfile.mkstemp`'s 0o600, so a shared cache stays readable by the group."""
    while True:
        tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"))
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], durable: bool = True) -> None:
    """Call `write(tmp_path)`, fsync, then rename onto `path` (same folder, so the rename is atomic).

    A killed process never leaves half a file either way (the rename is atomic and the kernel keeps what was
    written); `durable=False` skips the fsync, for files written every epoch that a power cut may cost
    (a checkpoint: the run then starts over), not results.

    The file gets the permissions of any newly created file (0o666 less the umask), also where `write` replaces
    the temp file by one of its own (safetensors' `save_file` writes a 0o600 file and renames it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(path)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        if durable:
            with open(tmp, "rb+") as fh:  # writable: Windows cannot flush a read-only handle
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _native_lock(path: Path) -> filelock.BaseFileLock:
    """An OS lock on `path` (flock on Unix, LockFileEx on Windows): the OS frees it when its process dies."""
    cls = filelock.WindowsFileLock if sys.platform == "win32" else filelock.UnixFileLock
    try:  # filelock >= 4 would otherwise fall back to a soft lock, which outlives a killed holder
        return cls(str(path), fallback_to_soft=False)
    except TypeError:  # filelock 3 has no soft fallback
        return cls(str(path))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock, waiting for it, so parallel runs of a sweep append to one results file safely."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _native_lock(path):
        yield


class LockBusy(BlockingIOError):
    """Another process holds the lock; `holder` is the pid it recorded (or '?')."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"'{path}' is held by process {holder}")
        self.path, self.holder = path, holder


def holder_file(path: str | os.PathLike) -> Path:
    """Where the holder of lock `path` keeps its pid (`<lock>.pid`; the lock file itself may be truncated by
    whoever opens it)."""
    path = Path(path)
    return path.with_name(path.name + ".pid")


@contextlib.contextmanager
def process_lock(path: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Exclusive lock that dies with its process: one process per run folder.

    With `wait=False` a busy lock raises `LockBusy` at once, naming the holder's pid (kept in `holder_file`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _native_lock(path)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        try:
            holder = holder_file(path).read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        raise LockBusy(path, holder or "?") from None
    pid_file = holder_file(path)
    try:
        atomic_write_text(pid_file, str(os.getpid()))
        yield
    finally:
        try:
            with contextlib.suppress(OSError):
                pid_file.unlink()
        finally:
            lock.release()


def stray_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temp files left by writes that a kill interrupted (never read; safe to delete when nothing runs)."""
    root = Path(folder)
    return sorted(p for p in root.rglob(".*.tmp") if p.is_file()) if root.is_dir() else []


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """One line per event; a line cut by a kill is skipped by `read_jsonl`."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
