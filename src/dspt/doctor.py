"""`dspt doctor`: what is installed, which device will be used, where the cache is, whether a model builds."""
from __future__ import annotations

import time

import torch

from .version import __version__
from .backbone import TINY_MODELS, cpu_bf16_supported, load_backbone, resolve_device
from .memory import budget_bytes
from .features import cache_usage, default_cache_dir
from .io import stray_temp_files


def doctor(cache_dir: str | None = None) -> int:
    import numpy
    import open_clip

    ok = True
    print(f"dspt       {__version__}")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"open_clip  {open_clip.__version__}")
    print(f"numpy      {numpy.__version__}")
    dev = resolve_device("auto")
    print(f"device     {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    cpu_bf16 = ("native: --precision bf16 works here" if cpu_bf16_supported()
                else "not native: --precision bf16 is refused")
    print(f"cpu        {torch.backends.cpu.get_cpu_capability()}, bf16 {cpu_bf16}")
    free = budget_bytes(None, dev)
    print(f"memory     default step budget {free / 2**30:.1f} GB (--max-memory; `dspt train --plan` projects a run)"
          if free else "memory     free memory unknown: steps are not bounded unless --max-memory is given")
    root = cache_dir or default_cache_dir()
    files, size = cache_usage(root)
    print(f"cache      {root} ({files} files, {size / 2**20:.1f} MiB)")
    stray = stray_temp_files(root)
    if stray:
        print(f"           {len(stray)} temp file(s) left by interrupted writes (never read; safe to delete "
              f"while no dspt runs), e.g. {stray[0]}")
    try:
        t0 = time.perf_counter()
        bb = load_backbone(TINY_MODELS[0], device="cpu")
        feats = bb.encode_texts(["a photo of a dog."])
        assert torch.isfinite(feats).all()
        print(f"check      {TINY_MODELS[0]} builds and encodes on the CPU in {time.perf_counter() - t0:.2f} s: ok")
    except Exception as exc:  # report, do not crash: this command exists to diagnose
        ok = False
        print(f"check      building {TINY_MODELS[0]} failed: {type(exc).__name__}: {exc}")
    return 0 if ok else 1
