"""Grids of runs: one run folder per cell, finished runs skipped, partial ones resumed, one results file.

A grid is a YAML mapping of `RunConfig` fields. Fields whose value is a list are crossed (in the order they
appear); everything else is the base of every run. `output` is the sweep folder: each cell runs in
`<output>/<cell name>` and adds its row to `<output>/results.csv` (or `results:` when given)::

    data: images/            # base fields: any `dspt train` option, with underscores
    model: dspt-tiny
    pretrained: none
    epochs: 20
    output: sweeps/demo
    loss: [ce, dspt]         # crossed: 2 x 2 x 3 = 12 runs
    noise_rate: [0, 0.4]
    seed: [1, 2, 3]

Cell names are built from the crossed values only (``loss=ce,noise_rate=0.4,seed=1``), so they are the same
every time the grid is run. A `grid:` mapping of lists may be used instead of top-level lists, and
`loss_options` may be a list of mappings (each one a cell). Relative paths are relative to the current
folder, as on the command line.

Restarting a sweep is always safe: a cell whose metrics.json exists is not run again (its results row is
re-added if a kill came between the two writes), a cell with a checkpoint resumes from it, and results rows
are keyed by run folder, so nothing is lost and nothing is counted twice. Each run has its own worker
process (`jobs` at a time); on Linux the workers die with the sweep process, so a killed sweep leaves no
orphan writing into its folders. `backend="ray"` sends the runs to a Ray cluster instead (optional
dependency; the run folders must be on storage that every node sees).
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import RunConfig, coerce_field
from .errors import ConfigError, DsptError
from .rundir import check_run_dir, finished_metrics, has_checkpoint, is_finished, run_lock_path

log = logging.getLogger(__name__)

#: Keys of a grid file that are not RunConfig fields.
SWEEP_KEYS = ("grid", "output", "results")
_FIELDS = {f.name for f in fields(RunConfig)}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]+")


@dataclass
class Cell:
    """One run of a grid."""

    name: str
    values: dict[str, Any]  # the crossed values that make this cell
    config: RunConfig  # resolved: output, results filled in

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output)

    def done(self) -> bool:
        return is_finished(self.run_dir)

    def status(self) -> str:
        if self.done():
            return "done"
        return "partial" if has_checkpoint(self.run_dir) else "new"


@dataclass
class SweepResult:
    cells: list[Cell]
    skipped: list[str] = field(default_factory=list)  # already finished before this call
    finished: list[str] = field(default_factory=list)  # ran (or resumed) to the end in this call
    failed: dict[str, str] = field(default_factory=dict)  # cell name -> one-line error
    results: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file '{path}' not found; pass a YAML file of run options (lists are crossed)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file '{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"grid file '{path}' must hold a mapping of run options, e.g. 'loss: [ce, dspt]'")
    return spec


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "+".join(f"{k}{_value_text(v)}" for k, v in sorted(value.items())) or "none"
    return str(value)


def cell_name(values: dict[str, Any]) -> str:
    """Deterministic, file-system safe folder name of a cell: `key=value` of each crossed field."""
    if not values:
        return "run"
    name = ",".join(f"{k}={_value_text(v)}" for k, v in values.items())
    return _UNSAFE.sub("_", name).strip("._") or "run"


def _grid_value(key: str, value: Any) -> Any:
    """A grid value as its field's type (YAML reads `2e-3` as text), so cell names and checks see numbers."""
    try:
        return coerce_field(key, value)
    except ConfigError as exc:
        raise ConfigError(f"grid option '{key}': {exc}") from None


def expand(spec: dict[str, Any], output: str | os.PathLike | None = None,
           results: str | os.PathLike | None = None) -> list[Cell]:
    """All cells of a grid, each with a resolved (validated) config. Raises ConfigError naming the cell."""
    spec = dict(spec)
    grid = spec.pop("grid", None) or {}
    if not isinstance(grid, dict):
        raise ConfigError("'grid:' must be a mapping of option -> list of values")
    root = output or spec.pop("output", None)
    spec.pop("output", None)
    results = results or spec.pop("results", None)
    spec.pop("results", None)
    if root is None:
        raise ConfigError("the grid has no 'output:' folder; add 'output: sweeps/NAME' or pass --output DIR")
    axes: dict[str, list[Any]] = {}
    base: dict[str, Any] = {}
    for key, value in list(spec.items()) + [(k, v) for k, v in grid.items()]:
        if key not in _FIELDS:
            raise ConfigError(f"unknown option '{key}' in the grid; valid: {', '.join(sorted(_FIELDS))}, "
                              f"and {', '.join(SWEEP_KEYS)}")
        if key in grid and key in spec:
            raise ConfigError(f"option '{key}' is given both at the top level and under 'grid:'")
        if isinstance(value, list) or key in grid:
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ConfigError(f"grid option '{key}' has an empty list of values")
            values = [_grid_value(key, v) for v in values]
            texts = [_value_text(v) for v in values]
            if len(set(texts)) != len(texts):
                raise ConfigError(f"grid option '{key}' lists a value twice: {values}")
            axes[key] = values
        else:
            base[key] = _grid_value(key, value)
    if "output" in axes or "results" in axes:
        raise ConfigError("'output' and 'results' name the sweep folder and file; they cannot be crossed")
    root = Path(root)
    results_path = Path(results) if results else root / "results.csv"
    cells: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        name = cell_name(values)
        if name in seen:
            raise ConfigError(f"cells {seen[name]} and {values} would share the folder '{name}'; "
                              "use values that differ after replacing unusual characters")
        seen[name] = values
        data = base | values | {"output": str(root / name), "results": str(results_path), "progress": False}
        try:
            cfg = RunConfig.from_dict(data).resolved()
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"grid cell '{name}': {exc}") from None
        cells.append(Cell(name, values, cfg))
    return cells


# ---------------------------------------------------------------------------------------------- workers

def _die_with_parent(sweep_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies, however it dies.

    The parent is the sweep process itself (fork) or multiprocessing's fork server, which exits as soon as
    the sweep process is gone.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass
    try:
        os.kill(sweep_pid, 0)
    except ProcessLookupError:  # the sweep died before the prctl above
        os._exit(1)
    except PermissionError:  # pragma: no cover
        pass


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, DsptError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run_cell(cfg: RunConfig) -> float:
    """Run one cell to the end (resuming it if partial); returns its test accuracy."""
    from .io import process_lock
    from .train import train

    # An earlier sweep's worker may still be finishing this run (where workers do not die with the sweep).
    with process_lock(run_lock_path(Path(cfg.output)), wait=True):
        pass
    return float(train(cfg)["test_acc"])


def _worker(cfg: RunConfig, conn: Any, sweep_pid: int, threads: int | None) -> None:
    _die_with_parent(sweep_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep process decides; it stops us on Ctrl-C
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        outcome = ("ok", _run_cell(cfg))
    except BaseException as exc:  # noqa: BLE001 - reported to the sweep, which goes on with other cells
        outcome = ("error", _error_line(exc))
    try:
        conn.send(outcome)
        conn.close()
    except OSError:  # the sweep is gone; the run folder holds the outcome for the next sweep
        pass
    if outcome[0] != "ok":
        sys.exit(1)


def _context(start_method: str | None = None) -> Any:
    """How workers start. Default: a fork server that has imported dspt once, so each run starts in a
    fraction of a second in a clean process (a plain fork of a process that has already computed with torch
    can hang in OpenMP, and CUDA cannot be forked at all; `spawn` would re-import torch for every run).
    `dspt sweep` passes "fork": its own process never computes, so forking it is safe and saves the
    fork server's start-up."""
    methods = mp.get_all_start_methods()
    if start_method is None:
        start_method = "forkserver" if "forkserver" in methods else "spawn"
    if start_method not in methods:
        raise ConfigError(f"start method '{start_method}' unavailable here; choose one of: {', '.join(methods)}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["dspt.train", "dspt.sweep"])
    return ctx


def _run_inline(cells: list[Cell], jobs: int, report: Callable[[Cell, str, Any], None]) -> None:
    """One run after the other in this process (--jobs 1): a kill of the sweep is a kill of its run."""
    for cell in cells:
        try:
            status, payload = "ok", _run_cell(cell.config)
        except Exception as exc:  # noqa: BLE001 - reported; the sweep goes on with the other cells
            status, payload = "error", _error_line(exc)
        report(cell, status, payload)


def _run_local(cells: list[Cell], jobs: int, report: Callable[[Cell, str, Any], None],
               start_method: str | None = None, threads: int | None = None) -> None:
    """`jobs` worker processes at a time, one per run, each with `threads` torch threads (default: the
    cores shared out)."""
    if jobs == 1:
        return _run_inline(cells, jobs, report)
    ctx = _context(start_method)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    queue = list(cells)
    running: dict[Any, tuple[Any, Any, Cell]] = {}  # sentinel -> (process, connection, cell)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(cell.config, send, os.getpid(), threads),
                                   name=f"dspt-sweep {cell.name}", daemon=False)
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, recv, cell)
            for sentinel in mp.connection.wait(list(running)):
                proc, recv, cell = running.pop(sentinel)
                proc.join()
                try:
                    status, payload = recv.recv() if recv.poll() else ("error", None)
                except (EOFError, OSError):
                    status, payload = "error", None
                recv.close()
                if status == "error" and payload is None:
                    payload = f"worker died (exit code {proc.exitcode})"
                report(cell, status, payload)
    except BaseException:
        for proc, recv, _ in running.values():
            if proc.is_alive():
                proc.kill()  # its run resumes from its last checkpoint next time
        for proc, recv, _ in running.values():
            proc.join()
        raise


def _ray_task(cfg: RunConfig) -> tuple[str, Any]:
    try:
        return "ok", _run_cell(cfg)
    except Exception as exc:  # noqa: BLE001
        return "error", _error_line(exc)


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs the optional package 'ray' (pip install 'ray[default]'); "
                          "or run on this machine with --backend local --jobs N") from None
    return ray


def _run_ray(cells: list[Cell], jobs: int, report: Callable[[Cell, str, Any], None]) -> None:
    ray = _require_ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    task = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
    pending = {task.remote(cell.config): cell for cell in cells}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            cell = pending.pop(ref)
            try:
                status, payload = ray.get(ref)
            except Exception as exc:  # the worker process died, the node went away, ...
                status, payload = "error", _error_line(exc)
            report(cell, status, payload)


BACKENDS = {"local": _run_local, "ray": _run_ray}


def run_sweep(
    grid: str | os.PathLike | dict[str, Any],
    output: str | os.PathLike | None = None,
    jobs: int = 1,
    backend: str = "local",
    results: str | os.PathLike | None = None,
    echo: Callable[[str], None] = print,
    start_method: str | None = None,
    threads: int | None = None,
) -> SweepResult:
    """Run every cell of `grid` (a YAML path or a mapping) that has not finished yet.

    `jobs` runs at a time: 1 runs them one after the other in this process; more start one worker process
    per run (`start_method`, see `_context`) with `threads` torch threads each. Returns which cells were
    skipped, finished and failed; a failed cell does not stop the others."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} is invalid; it must be >= 1")
    if backend not in BACKENDS:
        raise ConfigError(f"backend '{backend}' unknown; choose one of: {', '.join(BACKENDS)}")
    spec = load_grid(grid) if not isinstance(grid, dict) else grid
    cells = expand(spec, output, results)  # every cell is checked before anything runs
    if backend == "ray":
        _require_ray()
    out = SweepResult(cells, results=Path(cells[0].config.results))
    todo: list[Cell] = []
    for cell in cells:
        check_run_dir(cell.config, cell.run_dir)  # a folder of a different run stops the sweep before it starts
        if cell.done():
            finished_metrics(cell.config, cell.run_dir)  # re-adds a results row lost to a kill after metrics.json
            out.skipped.append(cell.name)
        else:
            todo.append(cell)
    echo(f"sweep: {len(cells)} runs, {len(out.skipped)} already done, {len(todo)} to run "
         f"({sum(c.status() == 'partial' for c in todo)} to resume) with {jobs} worker(s) on {backend}")
    t0 = time.perf_counter()

    def report(cell: Cell, status: str, payload: Any) -> None:
        n = len(out.finished) + len(out.failed) + 1
        if status == "ok":
            out.finished.append(cell.name)
            echo(f"[{n}/{len(todo)}] {cell.name}: test accuracy {payload:.2f}")
        else:
            out.failed[cell.name] = str(payload)
            echo(f"[{n}/{len(todo)}] {cell.name}: FAILED: {payload}")

    if todo:
        if backend == "local":
            _run_local(todo, jobs, report, start_method, threads)
        else:
            _run_ray(todo, jobs, report)
    echo(f"sweep: {len(out.finished)} finished, {len(out.skipped)} skipped, {len(out.failed)} failed "
         f"in {time.perf_counter() - t0:.1f} s; results in {out.results}")
    return out


def list_cells(grid: str | os.PathLike | dict[str, Any], output: str | os.PathLike | None = None,
               results: str | os.PathLike | None = None) -> list[Cell]:
    spec = load_grid(grid) if not isinstance(grid, dict) else grid
    return expand(spec, output, results)
