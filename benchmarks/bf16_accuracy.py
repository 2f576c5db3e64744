"""Does bf16 change what a run learns? Demo-grid test accuracy in bf16 minus fp32, paired by seed.

The demo's miniature CLIP on its digits (`dspt.miniature`), sym noise at `--noise-rates`, CE and DSPT at each
loss's default learning rate, tuning seeds 1-5 (shots, noise draw, init, views, epoch order), 30 epochs: every
run trained once in fp32 and once in bf16 (image features encoded and the text tower run under bf16 autocast;
logits, softmaxes and losses fp32), as one batch per precision. Prints per (loss, noise rate) the mean test
accuracy in each precision and the mean paired difference bf16 - fp32 with its 95 % t-interval, and the wall time
of each batch.

On a CPU without native bf16 (`dspt.backbone.cpu_bf16_supported()` False, e.g. AVX2 only) dspt refuses bf16; this
benchmark then lets torch emulate it (`--emulate`, on by default there): the numbers are bf16's, the bf16 time is
not (emulated bf16 is far slower than native) and is reported as such.

    python benchmarks/bf16_accuracy.py                       # noise 40 %, about 10 minutes on 2 emulating cores
    python benchmarks/bf16_accuracy.py --noise-rates 0.0 0.4 0.8 --json bf16.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--noise-rates", type=float, nargs="+", default=[0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch

    import dspt.backbone
    from dspt.compare import t_interval
    from dspt.config import RunConfig
    from dspt.miniature import DEMO_MODEL, VIEWS, pretrained_miniature
    from dspt.train import train_batch

    native = dspt.backbone.cpu_bf16_supported()
    if not native:
        dspt.backbone.cpu_bf16_supported = lambda: True  # torch emulates bf16: its numbers, not its speed
    torch.set_num_threads(1)  # the demo's miniature runs on one thread (same prior on every core count)
    world = pretrained_miniature(0, None, progress=False)
    records, acc = [], {}
    with tempfile.TemporaryDirectory(prefix="dspt-bf16-") as tmp:
        for precision in ("fp32", "bf16"):
            cfgs, keys = [], []
            for rate in args.noise_rates:
                for loss in ("ce", "dspt"):
                    for seed in args.seeds:
                        cfgs.append(RunConfig(
                            model=DEMO_MODEL, pretrained=None, checkpoint=str(world["checkpoint"]),
                            data=str(world["tune"]), test_data=str(world["test"]), template="a photo of a {}.",
                            shots=16, epochs=args.epochs, views=10, ctx_init="a photo of a", noise="sym",
                            noise_rate=rate, loss=loss, seed=seed, precision=precision, device="cpu",
                            progress=False, cache_dir=str(Path(tmp) / "cache"),
                            output=str(Path(tmp) / precision / f"{loss}-{rate:g}-s{seed}")))
                        keys.append((loss, rate, seed))
            t0 = time.perf_counter()
            out = train_batch(cfgs)
            wall = time.perf_counter() - t0
            for key, (status, payload) in zip(keys, out):
                if status != "ok":
                    raise SystemExit(f"{precision} {key}: {payload}")
                acc[(precision, *key)] = payload["test_acc"]
            records.append({"precision": precision, "runs": len(cfgs), "wall_s": wall,
                            "emulated": precision == "bf16" and not native})
            print(f"{precision}: {len(cfgs)} runs in {wall:.1f} s"
                  + (" (bf16 emulated by torch: not a speed)" if precision == "bf16" and not native else ""))
    rows = []
    for rate in args.noise_rates:
        for loss in ("ce", "dspt"):
            fp = np.array([acc[("fp32", loss, rate, s)] for s in args.seeds])
            bf = np.array([acc[("bf16", loss, rate, s)] for s in args.seeds])
            lo, hi = t_interval(bf - fp)
            rows.append({"loss": loss, "noise_rate": rate, "fp32": fp.mean(), "bf16": bf.mean(),
                         "diff": float((bf - fp).mean()), "ci": [lo, hi], "per_seed_diff": (bf - fp).tolist()})
            print(f"{loss:5s} sym {rate:.0%}: fp32 {fp.mean():.1f}, bf16 {bf.mean():.1f}, bf16 - fp32 "
                  f"{(bf - fp).mean():+.2f} [{lo:+.2f}, {hi:+.2f}] over seeds {args.seeds}")
    if args.json:
        args.json.write_text(json.dumps({"native_bf16": native, "batches": records, "accuracy": rows}, indent=2))


if __name__ == "__main__":
    main()
