"""`dspt sweep --backend ray` on a real, local Ray instance: every cell once, a SIGKILLed Ray worker fails its
cell(s) without hanging the sweep, and the same sweep submitted again resumes them from their checkpoints.

Ray runs on this machine only: its node address is 127.0.0.1 and every Ray server listens on the loopback
interface (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's "local only" mode; the fixture checks the address), no
usage statistics are sent, no dashboard is started and $RAY_ADDRESS is ignored (address="local" always starts
a new instance). Python sockets stay blocked as in conftest.py (Ray needs none of them). Tiny random-weight
model on generated images, CPU, two Ray CPUs.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from imagefolders import make_image_folder
from test_sweep import base as grid  # the same small grid as the local sweep tests

from dspt.errors import ConfigError
from dspt.io import holder_file, read_jsonl
from dspt.rundir import load_checkpoint, run_lock_path
from dspt.sweep import list_cells, run_sweep

ray = pytest.importorskip("ray")
try:
    from ray._private import ray_constants
except ImportError:  # another Ray layout: the fixture's node-address check still holds it to loopback
    ray_constants = None

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP 127.0.0.1: Ray's servers bind to loopback only
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report to the internet
    "RAY_AUTH_MODE": "disabled",  # no token written to ~/.ray (the instance is loopback-only and short-lived)
    "RAY_DEDUP_LOGS": "0",
}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs, no GPU, no dashboard) for this module, shut down after it, on 127.0.0.1
    only (checked). conftest's guard on Python sockets stays as it is: Ray's own connections are made by its
    C++ core (gRPC), which that guard does not see, so they are held to loopback by the node address instead."""
    temp = tempfile.mkdtemp(prefix="dspt-ray-")  # short: Ray's AF_UNIX socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        # read when ray was imported: this process's Ray too must take 127.0.0.1 as its node address
        if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
            mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp,
                 configure_logging=False, log_to_driver=False)
        try:
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ray-images") / "images")


def rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["run_id"])


def epochs_logged(run: Path) -> list[int]:
    path = run / "log.jsonl"
    return [r["epoch"] for r in read_jsonl(path) if r.get("event") == "epoch"] if path.is_file() else []


def wait_until(cond, timeout: float, what: str, thread: threading.Thread | None = None) -> None:
    t0 = time.monotonic()
    while not cond():
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"the sweep ended before {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_ray_sweep_runs_every_cell_once(ray_local, images, tmp_path):
    spec = grid(images, tmp_path, loss=["ce", "dspt"], seed=[1, 2], device="auto")
    lines: list[str] = []
    res = run_sweep(spec, backend="ray", echo=lines.append)
    print("\n".join(lines))
    assert res.ok, res.failed
    names = [c.name for c in res.cells]
    assert sorted(res.finished) == sorted(names) and not res.skipped
    assert "0 GPU per task" in lines[0] and "2 CPUs" in lines[0]
    # four compatible runs, two Ray CPUs: two tasks of two runs, each trained as one model
    assert sorted(len(b) for b in res.batches) == [2, 2] and sorted(itertools.chain(*res.batches)) == sorted(names)
    reported = [line for line in lines if line.startswith("[")]
    assert len(reported) == 4 and all(sum(f"] {n}: test accuracy" in line for line in reported) == 1
                                      for n in names)
    table = rows(tmp_path / "sweep" / "results.csv")
    assert sorted(table["run_id"]) == sorted(str(c.run_dir.resolve()) for c in res.cells)
    assert [c.status() for c in list_cells(spec)] == ["done"] * 4
    for cell in res.cells:  # a task without a GPU trains on the CPU, whatever GPUs its node has
        assert yaml.safe_load((cell.run_dir / "config.yaml").read_text())["device"] == "cpu"

    again = run_sweep(spec, backend="ray", echo=lambda s: None)
    assert sorted(again.skipped) == sorted(names) and not again.finished and not again.batches
    assert rows(tmp_path / "sweep" / "results.csv").equals(table)


def test_resources_the_cluster_lacks_fail_before_anything_runs(ray_local, images, tmp_path):
    with pytest.raises(ConfigError, match="has 0 GPU"):
        run_sweep(grid(images, tmp_path, seed=[1, 2]), backend="ray", gpus_per_run=0.5, echo=lambda s: None)
    with pytest.raises(ConfigError, match="has 2 CPU"):
        run_sweep(grid(images, tmp_path, seed=[1, 2]), backend="ray", cpus_per_run=3, echo=lambda s: None)
    with pytest.raises(ConfigError, match="--device cuda but the Ray tasks ask for no GPU"):
        run_sweep(grid(images, tmp_path, device="cuda"), backend="ray", echo=lambda s: None)
    assert not (tmp_path / "sweep").exists()


def _kill_ray_worker_of(run: Path, thread: threading.Thread) -> int:
    """SIGKILL the Ray worker training `run` once it has logged 2 epochs; returns its checkpoint's epoch."""
    pid_file = holder_file(run_lock_path(run))
    wait_until(lambda: pid_file.is_file() and len(epochs_logged(run)) >= 2, 300, f"2 epochs of {run.name}", thread)
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert cmdline.startswith("ray::"), f"pid {pid} is not a Ray worker: {cmdline!r}"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _dead(pid), 120, f"Ray worker {pid} to die")  # no checkpoint write after this point
    return load_checkpoint(run)["epoch"]


def _dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return any(line.startswith("State:") and line.split()[1] in ("Z", "X") for line in status.splitlines())


def _sweep_in_thread(spec: dict, **kw) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(run_sweep(spec, backend="ray", echo=print, **kw)),
                              daemon=True)
    thread.start()
    return thread, box


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finds the Ray worker through /proc")
@pytest.mark.parametrize("batch_runs,seeds", [(1, [1]), (None, [1, 2])], ids=["one-run-per-task", "batched"])
def test_killed_ray_worker_fails_its_cells_and_the_next_sweep_resumes_them(ray_local, images, tmp_path,
                                                                         batch_runs, seeds):
    """A task's Ray worker is SIGKILLed mid-run (max_retries=0): its cell (or every cell of its batch) fails,
    the others finish, the sweep returns; the same sweep again resumes them from their checkpoints."""
    epochs = 16  # ~0.1-0.3 s each: the kill lands after the second epoch, far from the end
    spec = grid(images, tmp_path, shots=4, batch_size=1, epochs=[epochs, 2, 3], seed=seeds)
    sweep = tmp_path / "sweep"
    cells = list_cells(spec)
    long_runs = [c.name for c in cells if c.config.epochs == epochs]
    others = sorted(c.name for c in cells if c.config.epochs != epochs)
    thread, box = _sweep_in_thread(spec, batch_runs=batch_runs)
    killed_at = _kill_ray_worker_of(sweep / long_runs[0], thread)
    thread.join(600)  # an upper bound, not a timing: two loaded cores can take minutes; a hang still fails
    assert not thread.is_alive(), "the sweep hangs on a killed Ray worker"
    res = box[0]
    assert [len(b) for b in res.batches] == [len(seeds)] * 3, "one task per epochs value: one run or a batch"
    assert sorted(res.failed) == long_runs and all("Ray task failed" in m for m in res.failed.values())
    assert sorted(res.finished) == others
    checkpointed = {name: load_checkpoint(sweep / name)["epoch"] for name in long_runs}
    assert checkpointed[long_runs[0]] == killed_at
    for name in long_runs:
        assert not (sweep / name / "metrics.json").exists() and 0 <= checkpointed[name] < epochs - 2
    assert sorted(rows(sweep / "results.csv")["run_id"]) == sorted(str((sweep / n).resolve()) for n in others)

    again = run_sweep(spec, backend="ray", batch_runs=batch_runs, echo=print)
    assert again.ok, again.failed
    assert sorted(again.finished) == long_runs and sorted(again.skipped) == others
    for name in long_runs:
        starts = [r["epoch"] for r in read_jsonl(sweep / name / "log.jsonl") if r["event"] == "start"]
        assert starts == [0, checkpointed[name] + 1], "resumed from its checkpoint, not started again"
        assert epochs_logged(sweep / name) == list(range(epochs)), "each epoch logged once"
    table = rows(sweep / "results.csv")
    assert len(table) == len(cells) and sorted(table["run_id"]) == sorted(str(c.run_dir.resolve()) for c in cells)
