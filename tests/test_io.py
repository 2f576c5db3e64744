"""dspt.io: atomic writes that respect the umask, file stamps, and locks that work without fcntl (Windows) and
die with their process."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dspt.io import (LockBusy, atomic_write, atomic_write_json, atomic_write_text, default_cache_dir, file_lock,
                     file_stamp, holder_file, process_lock, stray_temp_files)

IO_PY = Path(__file__).resolve().parents[1] / "src" / "dspt" / "io.py"
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

# A holder process that loads io.py by its path (fast: no torch), takes the lock and waits to be killed.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("dspt_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.process_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def umask():
    """Set a umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@posix_only
@pytest.mark.parametrize("mask,mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})
    atomic_write(tmp_path / "c.bin", lambda tmp: Path(tmp).write_bytes(b"\0"))  # a writer that reopens the file

    def replace_with_private_file(tmp: str) -> None:  # like safetensors' save_file: a 0o600 file renamed onto tmp
        fd, own = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        os.replace(own, tmp)

    atomic_write(tmp_path / "d.bin", replace_with_private_file)
    for name in ("a.txt", "sub/b.json", "c.bin", "d.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", fail)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert stray_temp_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_file_stamp_changes_with_the_file(tmp_path):
    p = tmp_path / "f.bin"
    assert file_stamp(p) == "missing"
    p.write_bytes(b"abc")
    first = file_stamp(p)
    assert first == file_stamp(str(p)) and first.startswith("3:")
    p.write_bytes(b"abcd")  # new size
    assert file_stamp(p) != first
    second = file_stamp(p)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, new mtime
    assert file_stamp(p) != second


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DSPT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DSPT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dspt"


def test_io_does_not_use_fcntl():
    tree = ast.parse(IO_PY.read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "fcntl" not in imported


def test_dspt_imports_where_fcntl_does_not_exist():
    """Windows has no fcntl: `import dspt` (which imports dspt.io) must work there."""
    code = "import sys; sys.modules['fcntl'] = None\nimport dspt, dspt.io\nprint('imported')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]


def _hold(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(IO_PY), str(lock)], stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.strip() == "held", "the holder process did not take the lock"
    return proc


def test_process_lock_busy_in_another_process_then_freed_by_its_death(tmp_path):
    lock = tmp_path / "runs" / ".run.lock"
    proc = _hold(lock)
    try:
        with pytest.raises(LockBusy) as busy:
            with process_lock(lock):
                pass
        assert isinstance(busy.value, BlockingIOError)
        assert busy.value.holder == str(proc.pid) and busy.value.path == lock
        assert f"held by process {proc.pid}" in str(busy.value)
    finally:
        proc.kill()
        proc.wait()
    with process_lock(lock):  # the OS released the dead holder's lock
        assert holder_file(lock).read_text() == str(os.getpid())
    assert not holder_file(lock).exists()


def test_process_lock_wait_blocks_until_the_holder_dies(tmp_path):
    lock = tmp_path / ".run.lock"
    proc = _hold(lock)
    killed = threading.Event()

    def kill() -> None:
        killed.set()  # before the kill: the lock cannot be free before this is set
        proc.kill()

    killer = threading.Timer(1.0, kill)
    killer.start()
    try:
        with process_lock(lock, wait=True):
            # granted only once the holder was killed (not a wall-clock bound, which a loaded machine can break)
            assert killed.is_set(), "the lock was granted while its holder was alive"
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()


def test_process_lock_holder_unknown(tmp_path):
    lock = tmp_path / ".run.lock"
    with process_lock(lock):
        holder_file(lock).unlink()  # e.g. the holder has not written its pid yet
        with pytest.raises(LockBusy) as busy:
            with process_lock(lock):
                pass
        assert busy.value.holder == "?"


def test_file_lock_is_exclusive_and_waits(tmp_path):
    lock = tmp_path / "results.csv.lock"
    events = []

    def other() -> None:
        with file_lock(lock):
            events.append("other")

    with file_lock(lock):
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        events.append("first")
    t.join(timeout=10)
    assert events == ["first", "other"]
