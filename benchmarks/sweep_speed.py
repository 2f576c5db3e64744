"""A grid of runs trained one after the other, then as batches (`dspt.train.train_batch`), in one process.

Prints the wall time of each, the ratio, runs per minute, and the largest difference between the two in any
run's final test accuracy and loss history (a batched run must equal the run trained alone).

    python benchmarks/sweep_speed.py                       # one seed of the demo grid: 5 rates x 2 losses x 4 lrs
    python benchmarks/sweep_speed.py --grid my_grid.yaml   # any grid file (its lists are crossed)
    python benchmarks/sweep_speed.py --suite gpu           # 100 CoOp runs of ViT-B/16 shape, C = 100, on a GPU

The demo's grid runs on the demo's miniature CLIP (built once and kept in the dspt cache). The gpu suite uses
random ViT-B-16 weights and random cached features of C = 100 classes (speed only: accuracies mean nothing);
it times 2 single runs and projects the sequential time of all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _history(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if r.get("event") == "epoch"]


def demo_grid(args) -> list[dict]:
    from dspt.miniature import VIEWS, pretrained_miniature

    world = pretrained_miniature(seed=0, progress=False)
    base = dict(model=world["model"], pretrained=None, checkpoint=str(world["checkpoint"]), data=str(world["tune"]),
                test_data=str(world["test"]), shots=16, epochs=args.epochs, views=10, ctx_init="a photo of a",
                template="a photo of a {}.", noise="sym", seed=0, device="cpu", progress=False, **VIEWS)
    return [dict(base, noise_rate=rate, loss=loss, lr=lr) for rate in (0.0, 0.2, 0.4, 0.6, 0.8)
            for loss in ("ce", "dspt") for lr in (0.0002, 0.002, 0.02, 0.2)]


def file_grid(path: str) -> list[dict]:
    from dspt.sweep import expand, load_grid

    return [{k: v for k, v in cell.config.to_dict().items() if k not in ("output", "results")}
            for cell in expand(load_grid(path))]


def gpu_grid(args, work: Path) -> list[dict]:
    """C = 100 classes of random 'images' (tiny PNGs; the fast path trains on cached features, so their
    content only sets accuracy, not speed)."""
    import numpy as np
    from PIL import Image

    root = work / "c100"
    if not (root / "done").is_file():
        rng = np.random.default_rng(0)
        for split, per in (("train", 16), ("test", 2)):
            for c in range(100):
                d = root / split / f"class{c:03d}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(per):
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (root / "done").touch()
    base = dict(model="ViT-B-16", pretrained=None, data=str(root), shots=16, epochs=args.epochs, views=1,
                device="cuda", precision="bf16", progress=False, seed=1)
    return [dict(base, loss=("ce", "dspt")[i % 2], lr=0.002 * (1 + i % 5), noise_rate=0.1 * (i % 5), seed=i)
            for i in range(args.runs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--grid", help="a grid YAML file instead of the demo's grid")
    ap.add_argument("--epochs", type=int, default=None, help="default: 30 (cpu, the demo's), 200 (gpu)")
    ap.add_argument("--runs", type=int, default=100, help="gpu suite: number of runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (cpu; default 1, as the demo)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dspt-sweep-speed")
    args = ap.parse_args()
    args.epochs = args.epochs or (200 if args.suite == "gpu" else 30)
    import torch

    from dspt.config import RunConfig
    from dspt.train import train, train_batch

    if args.suite == "cpu":
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.work / "runs", ignore_errors=True)
    cache = args.work / "cache"
    specs = file_grid(args.grid) if args.grid else gpu_grid(args, args.work) if args.suite == "gpu" else demo_grid(args)

    def cfgs(mode: str) -> list[RunConfig]:
        return [RunConfig(**dict(s, cache_dir=str(cache), output=str(args.work / "runs" / mode / f"run{i:03d}"),
                                 results=str(args.work / "runs" / mode / "results.csv"))) for i, s in enumerate(specs)]

    # feature caches built first, outside both timings (both modes read the same files)
    from dspt.train import prepare

    for c in {json.dumps({k: v for k, v in s.items() if k not in ("loss", "lr")}, sort_keys=True): s
              for s in specs}.values():
        prepare(RunConfig(**dict(c, cache_dir=str(cache))).resolved())
    sequential = cfgs("sequential")
    if args.suite == "gpu":
        sequential = sequential[:2]  # project the rest: every run of the grid has the same shape
    t0 = time.perf_counter()
    alone = [train(c) for c in sequential]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = train_batch(cfgs("batched"))
    t_batch = time.perf_counter() - t0
    failed = [(i, p) for i, (st, p) in enumerate(batched) if st != "ok"]
    if failed:
        sys.exit(f"batched run {failed[0][0]} failed: {failed[0][1]}")
    projected = t_seq * len(specs) / len(sequential)
    acc = max(abs(a["test_acc"] - b["test_acc"]) for a, (_, b) in zip(alone, batched))
    loss = max(max(abs(x - y) for x, y in zip(_history(Path(s.resolved().output)), _history(Path(b.resolved().output))))
               for s, b in zip(sequential, cfgs("batched")))
    dev = torch.cuda.get_device_name() if args.suite == "gpu" else f"{platform.processor() or platform.machine()}, " \
        f"{os.cpu_count()} cores, {args.threads} torch thread(s)"
    grid = args.grid or ('gpu: ViT-B-16 shape, C = 100' if args.suite == 'gpu' else 'one seed of the demo (40 runs)')
    print(f"grid: {grid}; "
          f"{len(specs)} runs, {args.epochs} epochs; {dev}")
    print("| mode | wall (s) | runs / min |")
    print("|---|---|---|")
    seq_label = f"sequential ({len(sequential)} timed, projected to {len(specs)})" if len(sequential) < len(specs) \
        else "sequential"
    print(f"| {seq_label} | {projected:.1f} | {60 * len(specs) / projected:.1f} |")
    print(f"| batched (one batch of {len(specs)}) | {t_batch:.1f} | {60 * len(specs) / t_batch:.1f} |")
    print(f"speed-up: {projected / t_batch:.1f}x; largest difference batched vs alone: test accuracy {acc:.2f} points, "
          f"epoch loss {loss:.2e}")


if __name__ == "__main__":
    main()
