"""Fault injection: kills, crashes, a full disk, broken caches and bad input (issue 5).

Everything runs on a generated 3-class folder of 16x16 images with the random-weight `dspt-tiny` model on the
CPU, one thread (identical numbers across processes, and no OpenMP contention on a shared machine).
Kills are real SIGKILLs of `dspt` subprocesses; crashes at an exact line are simulated in-process by raising
a BaseException from a patched function (dspt never swallows one: cleanup code re-raises it); a full
disk is simulated in-process by patching the writer used at that point (`torch.save`, safetensors'
`save_file`, the results writer) to write part of the file and raise OSError(ENOSPC). No test touches the
network: sockets other than local (AF_UNIX) ones raise, here and in every subprocess.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dspt import cli

from clirun import run_cli
from dspt.config import RunConfig
from dspt.io import process_lock, read_jsonl, stray_temp_files
from dspt.rundir import CHECKPOINT, load_checkpoint

NO_NETWORK = """
import socket, sys
_connect = socket.socket.connect
def _guarded_connect(self, address, *a, **k):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address, *a, **k)
    raise OSError("a dspt test tried to reach the network: %r" % (address,))
def _no_lookup(*a, **k):
    raise OSError("a dspt test tried to resolve a host name: %r" % (a[:1],))
socket.socket.connect = _guarded_connect
socket.getaddrinfo = _no_lookup
socket.create_connection = lambda *a, **k: _no_lookup(*a)
"""
RUN_CLI = "\nfrom dspt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
VOLATILE = ("seconds", "cache_hit", "features_encoded", "memory")  # timings, a warm cache, a budget from the free RAM: not results


class Crash(BaseException):
    """Stands in for a kill at a chosen line (the run's files are left as they are at that point)."""


# ------------------------------------------------------------------------------------------- fixtures

def options(images: Path, out: Path, cache: Path, **over) -> dict:
    opts = dict(data=images, model="dspt-tiny", pretrained="none", shots=4, views=2, n_ctx=4, batch_size=2,
                epochs=6, noise_rate=0.4, loss="dspt", seed=1, device="cpu", cache_dir=cache, output=out)
    opts.update(over)
    return opts


def argv(opts: dict) -> list[str]:
    args = ["train", "--no-progress"]
    for key, value in opts.items():
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            args += [f"--{key.replace('_', '-')}", str(v)]
    return args


def env(tmp: Path) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
             DSPT_CACHE=str(tmp / "default-cache"))
    return e


def spawn(args: list[str], tmp: Path, log_name: str, extra: str = "", **extra_env: str) -> subprocess.Popen:
    """A `dspt` subprocess (network blocked; `extra` code runs before the CLI)."""
    with open(tmp / log_name, "w") as out:
        return subprocess.Popen([sys.executable, "-c", NO_NETWORK + extra + RUN_CLI, *args], cwd=tmp,
                                env=env(tmp) | extra_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(cond, proc: subprocess.Popen | None = None, timeout: float = 120.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def epochs_logged(run: Path) -> int:
    path = run / "log.jsonl"
    return sum(r.get("event") == "epoch" for r in read_jsonl(path)) if path.is_file() else 0


def stable(run: Path) -> str:
    """The numbers of a finished run: metrics without timings, and the per-epoch log without timings."""
    metrics = json.loads((run / "metrics.json").read_text())
    for key in VOLATILE:
        metrics.pop(key)
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(run / "log.jsonl")
               if r.get("event") == "epoch"]
    in_sample = (run / "in_sample.csv").read_text()  # the audit's in-sample score: a resume must not change it
    return json.dumps({"metrics": metrics, "history": history, "in_sample": in_sample}, sort_keys=True)


def train_in_process(opts: dict) -> Path:
    code, _, err = run_cli(argv(opts))
    assert code == 0, err
    return Path(opts["output"])


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """An uninterrupted 6-epoch run: what every interrupted run with the same options must end with."""
    tmp = tmp_path_factory.mktemp("reference")
    return train_in_process(options(images, tmp / "run", tmp / "cache"))


def results_rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["run_id"])


# ------------------------------------------------------------------------------------- kill and resume

def test_sigkill_mid_run_then_resume_gives_identical_metrics(images, tmp_path):
    opts = options(images, tmp_path / "run", tmp_path / "cache", epochs=20)
    proc = spawn(argv(opts), tmp_path, "killed.log")
    try:
        wait_until(lambda: epochs_logged(tmp_path / "run") >= 2, proc, what="2 epochs in log.jsonl")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    killed_at = load_checkpoint(run)["epoch"]
    assert 0 <= killed_at < 19, "the kill must land mid-run"
    assert not results_rows(tmp_path / "results.csv")["run_id"].size

    code, _, err = run_cli(argv(opts))  # `dspt train` on the run folder resumes it
    assert code == 0, err
    starts = [r for r in read_jsonl(run / "log.jsonl") if r["event"] == "start"]
    assert [s["epoch"] for s in starts] == [0, killed_at + 1]
    assert [r["epoch"] for r in read_jsonl(run / "log.jsonl") if r["event"] == "epoch"] == list(range(20))

    uninterrupted = train_in_process(options(images, tmp_path / "whole", tmp_path / "cache", epochs=20))
    assert stable(run) == stable(uninterrupted)
    rows = results_rows(tmp_path / "results.csv")
    assert sorted(rows["run_id"]) == sorted([str(run.resolve()), str(uninterrupted.resolve())])


def test_crash_between_epoch_log_and_checkpoint(images, tmp_path, reference, monkeypatch):
    """The window a kill can hit: epoch 3 logged, its checkpoint not yet written. The resumed run redoes
    epoch 3 and logs it once."""
    T, L = sys.modules["dspt.train"], sys.modules["dspt.loop"]  # the training loop saves the checkpoints

    save = L.save_checkpoint

    def crash_at_epoch_3(run_dir, epoch, *state):
        if epoch == 3:
            raise Crash()
        save(run_dir, epoch, *state)

    opts = options(images, tmp_path / "run", tmp_path / "cache")
    monkeypatch.setattr(L, "save_checkpoint", crash_at_epoch_3)
    with pytest.raises(Crash):
        T.train(RunConfig(**_config_fields(opts)))
    monkeypatch.setattr(L, "save_checkpoint", save)
    assert epochs_logged(tmp_path / "run") == 4 and not (tmp_path / "run" / "metrics.json").exists()
    train_in_process(opts)
    assert stable(tmp_path / "run") == stable(reference)


def test_crash_between_metrics_and_results_row(images, tmp_path, reference, monkeypatch):
    """metrics.json written, results row not: the next `dspt train` (or sweep) adds the row, once."""
    T, L = sys.modules["dspt.train"], sys.modules["dspt.loop"]  # the training loop appends the results row

    monkeypatch.setattr(L, "append_result", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    opts = options(images, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(Crash):
        T.train(RunConfig(**_config_fields(opts)))
    monkeypatch.undo()
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "results.csv").exists()
    for _ in range(2):
        train_in_process(opts)
    rows = results_rows(tmp_path / "results.csv")
    assert list(rows["run_id"]) == [str((tmp_path / "run").resolve())]
    assert stable(tmp_path / "run") == stable(reference)


def test_unreadable_checkpoint_restarts_from_scratch(images, tmp_path, reference, monkeypatch):
    T, L = sys.modules["dspt.train"], sys.modules["dspt.loop"]  # the training loop saves the checkpoints

    save = L.save_checkpoint
    monkeypatch.setattr(L, "save_checkpoint",
                        lambda d, e, *state: (_ for _ in ()).throw(Crash()) if e == 2 else save(d, e, *state))
    opts = options(images, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(Crash):
        T.train(RunConfig(**_config_fields(opts)))
    monkeypatch.undo()
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"\x00garbage, as after a disk error")
    train_in_process(opts)
    assert stable(tmp_path / "run") == stable(reference)


def _config_fields(opts: dict) -> dict:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}
    out["pretrained"] = None if out.get("pretrained") == "none" else out.get("pretrained")
    out["progress"] = False
    return out


# ------------------------------------------------------------------------------------- feature caches

def test_sigkill_while_writing_feature_cache_then_rebuilt(images, tmp_path, reference):
    """The child is killed half-way through writing the training-feature cache (the write is patched to
    stop there and wait for the kill). The next run never reads the half file and rebuilds the cache."""
    hold = """
import os, pathlib, time
import dspt.features as F
_save = F.save_file
def _half_then_wait(tensors, filename, metadata=None):
    _save(tensors, filename, metadata=metadata)
    data = pathlib.Path(filename).read_bytes()
    pathlib.Path(filename).write_bytes(data[: len(data) // 2])
    pathlib.Path(os.environ["DSPT_TEST_MARK"]).write_text(filename)
    time.sleep(600)
F.save_file = _half_then_wait
"""
    cache = tmp_path / "cache"
    mark = tmp_path / "writing"
    opts = options(images, tmp_path / "run", cache)
    proc = spawn(argv(opts), tmp_path, "killed.log", extra=hold, DSPT_TEST_MARK=str(mark))
    try:
        wait_until(mark.is_file, proc, what="the cache write to start")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stray = stray_temp_files(cache)
    assert len(stray) == 1 and Path(mark.read_text()) == stray[0]
    assert not list((cache / "features").rglob("*.safetensors")), "only the temp file may exist"

    code, _, err = run_cli(argv(opts))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cache_hit"] == {"train": False, "test": False}
    assert stable(tmp_path / "run") == stable(reference)
    assert stray_temp_files(cache) == stray, "the half-written temp file is never read or renamed"
    code, report = _doctor(cache)
    assert code == 0 and "1 temp file(s) left by interrupted writes" in report


def _doctor(cache: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["doctor", "--cache-dir", str(cache)])
    return code, out.getvalue()


def test_truncated_or_garbage_cache_is_rebuilt_never_read(images, tmp_path, reference):
    cache = tmp_path / "cache"
    shutil.copytree(reference.parent / "cache", cache)
    (store,) = [d for d in (cache / "features").iterdir() if d.is_dir() and d.name != "identities"]
    shards = sorted(store.glob("*.safetensors"))
    assert len(shards) >= 2
    for k, shard in enumerate(shards):  # every shard: cut mid-write, or garbage
        if k % 2:
            shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
        else:
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (store / f".{shards[0].name}.x1y2z3.tmp").write_bytes(b"left by a kill")

    code, _, err = run_cli(argv(options(images, tmp_path / "run", cache)))
    assert code == 0, err
    assert "unreadable" in err and "ignoring it" in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cache_hit"] == {"train": False, "test": False}
    assert stable(tmp_path / "run") == stable(reference)
    code, _, err = run_cli(argv(options(images, tmp_path / "again", cache)))  # the rebuilt files are good
    assert code == 0 and json.loads((tmp_path / "again" / "metrics.json").read_text())["cache_hit"] == {
        "train": True, "test": True}


# --------------------------------------------------------------------------------- non-finite training

def test_non_finite_loss_stops_keeps_last_good_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(argv(options(images, run, tmp_path / "cache", lr=1e30)))
    assert code == 3
    line = _error_line(err)
    assert "non-finite" in line and "lower --lr" in line and "checkpoint (epoch 1) is kept" in line
    assert load_checkpoint(run)["epoch"] == 0  # the warm-up epoch
    assert torch.isfinite(load_checkpoint(run)["ctx"]).all()
    assert not (run / "metrics.json").exists() and not (run / "prompt.safetensors").exists()
    assert not (tmp_path / "results.csv").exists()

    code, _, err = run_cli(argv(options(images, tmp_path / "nowarm", tmp_path / "cache", lr=1e30, warmup_epochs=0)))
    assert code == 3 and "nothing was kept" in _error_line(err)
    assert not (tmp_path / "nowarm").exists()


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dspt: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ determinism

def test_same_seed_same_labels_indices_features_and_metrics(images, tmp_path, reference):
    again = train_in_process(options(images, tmp_path / "run", tmp_path / "cache"))  # a cold cache too
    for name in ("noisy_labels.csv", "train_files.csv"):
        assert (again / name).read_bytes() == (reference / name).read_bytes(), name
    labels = pd.read_csv(again / "train_files.csv")
    assert len(labels) == 12 and (labels["true"] != labels["given"]).sum() == 5  # round(0.4 * 12)
    assert stable(again) == stable(reference)
    from safetensors.torch import load_file

    for f in (tmp_path / "cache" / "features").glob("*.safetensors"):
        assert torch.equal(load_file(f)["features"],
                           load_file(reference.parent / "cache" / "features" / f.name)["features"])
    env_info = json.loads((again / "environment.json").read_text())
    import open_clip

    import dspt

    assert env_info["torch"] == torch.__version__ and env_info["open_clip_torch"] == open_clip.__version__
    assert env_info["dspt"] == dspt.__version__ and env_info["device"] == "cpu"

    other = train_in_process(options(images, tmp_path / "seed2", tmp_path / "cache", seed=2))
    assert (other / "train_files.csv").read_bytes() != (reference / "train_files.csv").read_bytes()


# ------------------------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    # (id, option changes, expected exit code, key words of the one-line message)
    ("unknown-model", dict(model="NoSuchNet"), 2, ["unknown model", "NoSuchNet", "dspt models"]),
    ("unknown-tag", dict(pretrained="laion9000"), 2, ["unknown pretrained tag", "laion9000"]),
    ("unknown-tag-RN50", dict(model="RN50", pretrained="laion9000"), 2, ["unknown pretrained tag", "openai"]),
    ("checkpoint-missing", dict(checkpoint="missing.pt"), 2, ["checkpoint file", "not found"]),
    ("checkpoint-text", dict(checkpoint="notes.pt"), 2, ["not a CLIP checkpoint", "--model"]),
    ("checkpoint-wrong-keys", dict(checkpoint="other.pt"), 2, ["not a CLIP checkpoint"]),
    ("data-missing", dict(data="no/such/folder"), 2, ["data folder", "not found"]),
    ("too-few-for-k-shots", dict(shots=7), 2, ["fewer than 7 shots", "lower --shots"]),
    ("noise-rate-1", dict(noise_rate=1.0), 2, ["noise rate 1.0", "outside [0, 1)"]),
    ("noise-rate-negative", dict(noise_rate=-0.1), 2, ["outside [0, 1)"]),
    ("noise-rate-nan", dict(noise_rate="nan"), 2, ["--noise-rate nan is not a finite number"]),
    ("unknown-loss", dict(loss="focal9"), 2, ["unknown loss", "focal9", "dspt"]),
    ("loss-hyperparameter-range", dict(loss="gce", loss_opt=["q=5"]), 2, ["q=5", "outside"]),
    ("loss-hyperparameter-unknown", dict(loss="ce", loss_opt=["zz=1"]), 2, ["unknown hyperparameter", "zz"]),
    ("loss-hyperparameter-malformed", dict(loss_opt=["q"]), 2, ["NAME=VALUE"]),
    ("unknown-noise", dict(noise="weird"), 2, ["unknown noise type", "weird"]),
    ("bad-lr", dict(lr=-1), 2, ["--lr", "> 0"]),
]


@pytest.mark.parametrize("name,change,code,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_error_and_nothing_written(images, tmp_path, monkeypatch, name, change, code, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.pt").write_text("these are my notes, not weights\n")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    opts = options(images, tmp_path / "runs" / "run", tmp_path / "cache", **change)
    if "checkpoint" in change:
        opts.pop("pretrained")
    got, _, err = run_cli(argv(opts))
    assert got == code, err
    line = _error_line(err)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not (tmp_path / "runs" / "run").exists(), "a failed fresh run leaves no run folder"
    assert not (tmp_path / "runs" / "results.csv").exists()
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.safetensors"))


def test_output_folder_of_a_different_run(images, tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_cli(argv(options(images, run, tmp_path / "cache", seed=2)))
    assert code == 3
    line = _error_line(err)
    assert "holds a different run" in line and "seed" in line and "--output" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before, "the other run is left untouched"
    assert not (tmp_path / "results.csv").exists()

    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "config.yaml").write_text("- just\n- a list\n")
    code, _, err = run_cli(argv(options(images, tmp_path / "notrun", tmp_path / "cache")))
    assert code == 3 and "is not a dspt run config" in _error_line(err)
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(argv(options(images, tmp_path / "afile", tmp_path / "cache")))
    assert code == 3 and "is a file" in _error_line(err)


def test_run_folder_in_use_by_another_process(images, tmp_path):
    from dspt.rundir import run_lock_path

    run = tmp_path / "run"
    with process_lock(run_lock_path(run)):
        code, _, err = run_cli(argv(options(images, run, tmp_path / "cache")))
    assert code == 3 and "in use by another dspt process" in _error_line(err)
    assert not run.exists()


# -------------------------------------------------------------------------------------------- disk full

def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_writing_checkpoint_keeps_last_good_then_resumes(images, tmp_path, reference, monkeypatch):
    """Simulation: the writer writes half of the 3rd checkpoint (epoch index 2), then raises ENOSPC."""
    import dspt.rundir

    real_save = dspt.rundir.save_file
    calls = []

    def save(tensors, f, *a, **k):
        calls.append(f)
        if len(calls) == 3:
            real_save(tensors, f, *a, **k)
            Path(f).write_bytes(Path(f).read_bytes()[:100])
            raise _enospc(f)
        return real_save(tensors, f, *a, **k)

    monkeypatch.setattr(dspt.rundir, "save_file", save)
    run = tmp_path / "run"
    code, _, err = run_cli(argv(options(images, run, tmp_path / "cache")))
    monkeypatch.undo()
    assert code == 2
    line = _error_line(err)
    assert "disk full" in line and "run the same command again" in line
    assert load_checkpoint(run)["epoch"] == 1
    assert not stray_temp_files(run), "the half-written temp file is removed"
    assert not (run / "metrics.json").exists() and not (tmp_path / "results.csv").exists()
    train_in_process(options(images, run, tmp_path / "cache"))
    assert stable(run) == stable(reference)


def test_disk_full_writing_feature_cache(images, tmp_path, monkeypatch):
    """Simulation: safetensors' save_file (the cache writer) writes 1 KiB, then raises ENOSPC."""
    F = sys.modules["dspt.features"]

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1024)
        raise _enospc(filename)

    monkeypatch.setattr(F, "save_file", save_file)
    code, _, err = run_cli(argv(options(images, tmp_path / "run", tmp_path / "cache")))
    assert code == 2 and "disk full" in _error_line(err)
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not stray_temp_files(tmp_path / "cache")
    assert not (tmp_path / "run").exists()


def test_disk_full_writing_results_row(images, tmp_path, reference, monkeypatch):
    """Simulation: the results writer raises ENOSPC after metrics.json is written; the next run of the same
    command adds the row (once) without training again."""
    R = sys.modules["dspt.results"]

    real = R.atomic_write_text
    monkeypatch.setattr(R, "atomic_write_text", lambda path, text: (_ for _ in ()).throw(_enospc(path)))
    opts = options(images, tmp_path / "run", tmp_path / "cache")
    code, _, err = run_cli(argv(opts))
    assert code == 2 and "disk full" in _error_line(err)
    monkeypatch.setattr(R, "atomic_write_text", real)
    assert not (tmp_path / "results.csv").exists()
    log_lines = len(read_jsonl(tmp_path / "run" / "log.jsonl"))
    train_in_process(opts)
    assert len(read_jsonl(tmp_path / "run" / "log.jsonl")) == log_lines, "not trained again"
    assert list(results_rows(tmp_path / "results.csv")["run_id"]) == [str((tmp_path / "run").resolve())]
    assert stable(tmp_path / "run") == stable(reference)


# ------------------------------------------------------------------------------------------------ sweep

def test_sweep_killed_twice_every_row_exactly_once(images, tmp_path):
    """`dspt sweep --jobs 2` is SIGKILLed (the sweep process alone) once a run has finished, then
    `dspt sweep --jobs 1` likewise; a third sweep completes the grid. Each kill must also take the sweep's
    workers with it: a run that was far from done when its sweep was killed must not finish afterwards."""
    from dspt.sweep import run_sweep

    epochs = 8
    grid = {"data": str(images), "model": "dspt-tiny", "pretrained": "none", "shots": 4, "views": 1, "n_ctx": 4,
            "batch_size": 2, "epochs": epochs, "device": "cpu", "cache_dir": str(tmp_path / "cache"),
            "output": str(tmp_path / "sweep"), "loss": ["ce", "dspt"], "seed": [1, 2, 3]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    sweep = tmp_path / "sweep"
    results = sweep / "results.csv"
    counts = []
    for attempt, jobs in enumerate(["2", "1"]):
        before = len(results_rows(results))
        proc = spawn(["sweep", "grid.yaml", "--jobs", jobs], tmp_path, f"sweep{attempt}.log")
        try:
            wait_until(lambda: len(results_rows(results)) > before, proc, what="a new results row")
            running = [lock.name[1:-len(".lock")] for lock in sweep.glob(".*.lock") if not _free(lock)]
            os.kill(proc.pid, signal.SIGKILL)  # the sweep process only: its workers must die with it
        finally:
            proc.kill()
            proc.wait()
        far_from_done = [name for name in running if epochs_logged(sweep / name) < epochs - 2]
        counts.append(len(results_rows(results)))
        for lock in sweep.glob(".*.lock"):  # every worker is gone: all run locks are free
            wait_until(lambda: _free(lock), timeout=30, what=f"{lock.name} to be released")
        for name in far_from_done:
            assert not (sweep / name / "metrics.json").exists(), f"a worker outlived its sweep: {name} finished"
    assert counts[0] < counts[1] < 6, "each kill lands while runs are left"

    res = run_sweep(tmp_path / "grid.yaml", jobs=1, echo=lambda s: None)
    assert res.ok, res.failed
    rows = results_rows(results)
    cells = sorted(str(d.resolve()) for d in sweep.iterdir() if d.is_dir())
    assert len(cells) == 6 and sorted(rows["run_id"]) == cells, "every run exactly once"
    for _, row in rows.iterrows():
        metrics = json.loads((Path(row["run_id"]) / "metrics.json").read_text())
        assert row["test_acc"] == metrics["test_acc"]
        assert [r["epoch"] for r in read_jsonl(Path(row["run_id"]) / "log.jsonl")
                if r["event"] == "epoch"] == list(range(epochs)), "each epoch logged once, resumed or not"
    assert len(res.skipped) >= counts[-1] and len(res.skipped) + len(res.finished) == 6


def _free(lock: Path) -> bool:
    try:
        with process_lock(lock):
            return True
    except BlockingIOError:
        return False
