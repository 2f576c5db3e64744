"""Memory budgets for the text side of a training step: how many prompt rows run through the text tower at once.

A step's memory above the loaded model is dominated by the activations the text tower keeps for backward: every
(run, class) prompt row holds its tokens' activations at every layer. At ImageNet's 1,000 classes and a real
text tower that is gigabytes per run, so an unbounded step crashes a 24 GB machine at a few runs. Instead the
rows run in chunks, each under activation checkpointing (only the chunk's output is kept; its forward is
recomputed in backward), so the step holds one chunk's activations at a time.

The chunk size is derived, not fixed: the budget (`--max-memory GB`, else a share of what the device has free)
divided by the per-row cost of the model at hand, measured once per prompt shape by running a few rows with
autograd and counting the bytes it saves for backward. Where every row fits, nothing is chunked (no recompute).
Chunked and unchunked steps compute the same numbers (tests/test_memory.py: outputs and gradients to 1e-5).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import ConfigError

GIB = 1024 ** 3
#: default budget: this share of the free GPU memory, or of the RAM the OS reports available
GPU_SHARE, CPU_SHARE = 0.8, 0.5
#: a chunked step's peak above the model, measured against the bytes its chunk saves for backward (the text towers
#: of ViT-B-16 and RN50 on the CPU, fp32, peak resident memory: 54 MB + 1.48 x saved over chunks of 30-100 rows at
#: C = 100, and 1.58-2.05 x at 155-395 rows of C = 1000, over runs and thread counts: the full-size prompt tails
#: and their gradients add to it); the excess is the backward's transient gradients, the chunk outputs and the
#: allocator's slack. At 2.0, four runs of ViT-B-16 at C = 1000 under 3 GB peaked at 3.07 GB on one thread; 2.25
#: leaves a margin, so a step stays inside its budget.
PEAK_PER_SAVED = 2.25
OVERHEAD = 64 * 2 ** 20
#: rows per probe of the per-row cost (it runs 1x and 2x this many)
PROBE_ROWS = 2


class MemoryBudgetError(ConfigError):
    """The budget cannot hold even one chunk of the step."""


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (None where it cannot be told): the GPU's free memory, or the RAM available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:  # MemAvailable counts reclaimable page cache
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def budget_bytes(max_memory_gb: float | None, device: torch.device) -> int | None:
    """The step budget in bytes: `max_memory_gb` if given, else a share of the device's free memory (None: the
    device cannot tell, so nothing is bounded)."""
    if max_memory_gb is not None:
        if not max_memory_gb > 0:
            raise ConfigError(f"--max-memory must be a positive number of GB (got {max_memory_gb})")
        return int(max_memory_gb * GIB)
    free = free_memory(device)
    if free is None:
        return None
    return int(free * (GPU_SHARE if device.type == "cuda" else CPU_SHARE))


def saved_bytes(fn: Callable[..., torch.Tensor], *args: Any) -> int:
    """Bytes autograd keeps for backward while `fn(*args)` runs with gradients (each storage counted once),
    plus the output. Tensor arguments that are floating point are made leaves that require grad, so the count
    is that of a training step whatever the caller's grad mode."""
    seen: dict[tuple, int] = {}

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    leaves = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
        count(out)  # the output is kept too (once, if backward also saved it)
    return sum(seen.values())


def _shape_key(fn: Callable, tensors: tuple) -> tuple:
    """What decides a row's cost: the function, the shapes and dtypes of its per-row and shared inputs and of
    any tensor it closes over, and the autocast state."""
    closed = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            closed.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    described = tuple((tuple(t.shape), t.dtype) for t in (*tensors, *closed) if isinstance(t, torch.Tensor))
    return (getattr(fn, "__qualname__", repr(fn)), described, torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else False)


@dataclass
class RowBudget:
    """A byte budget for one pass of prompt rows through the text tower. `rows` gives the chunk size for a
    pass; `last` records the latest decision (per-row bytes, rows per chunk), for logs and plans."""

    nbytes: int
    source: str = "--max-memory"  # how the budget was set, for the error line
    costs: dict[tuple, int] = field(default_factory=dict)
    last: dict[str, int | None] = field(default_factory=dict)

    def row_cost(self, fn: Callable[..., torch.Tensor], per_row: tuple, shared: tuple = ()) -> int:
        """Measured bytes one row keeps for backward (cached per shape): the difference of two probes, so what
        every row shares (weights, the shared prefix) cancels."""
        key = _shape_key(fn, (*per_row, *shared))
        if key not in self.costs:
            k = max(1, min(PROBE_ROWS, per_row[0].shape[0] // 2))
            small = saved_bytes(fn, *(t[:k] for t in per_row), *shared)
            large = saved_bytes(fn, *(t[:2 * k] for t in per_row), *shared)
            self.costs[key] = max(1, (large - small) // k)
        return self.costs[key]

    def rows(self, fn: Callable[..., torch.Tensor], per_row: tuple, shared: tuple = ()) -> int | None:
        """Rows per chunk for `fn` over `per_row` (None: all rows fit; no chunking)."""
        n = per_row[0].shape[0]
        if n < 2:  # one row cannot be split (nor probed by difference)
            self.last = {"rows": n, "per_row_bytes": None, "chunk_rows": None}
            return None
        cost = self.row_cost(fn, per_row, shared)
        fit = int(max(self.nbytes - OVERHEAD, 0) / (cost * PEAK_PER_SAVED))
        self.last = {"rows": n, "per_row_bytes": cost, "chunk_rows": None if fit >= n else fit}
        if fit < 1:
            need = (OVERHEAD + cost * PEAK_PER_SAVED) / GIB
            raise MemoryBudgetError(
                f"the memory budget ({self.source}: {self.nbytes / GIB:.3g} GB) cannot hold one prompt row of the "
                f"text tower ({cost / 2**20:.1f} MB of activations per row); raise --max-memory to at least "
                f"{need:.2g} GB, or use --precision bf16 where the device has it")
        return None if fit >= n else fit


def chunk_for(budget: RowBudget | int | None, fn: Callable[..., torch.Tensor], per_row: tuple,
              shared: tuple = ()) -> int | None:
    """Rows per chunk: a fixed int as given, a budget's derived size, or None (no chunking)."""
    if isinstance(budget, RowBudget):
        return budget.rows(fn, per_row, shared)
    return budget
