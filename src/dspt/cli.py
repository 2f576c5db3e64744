"""The `dspt` command. Each subcommand is a thin layer over a Python function of the same stage."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from .version import __version__
from .config import RunConfig
from .errors import ConfigError, DsptError, TrainingError

log = logging.getLogger("dspt")


def _loss_opts(items: list[str], option: str = "--loss-opt", words: bool = False) -> dict[str, float | str]:
    """NAME=VALUE pairs; values are numbers (a method's option may also be a word, e.g. cost=prob)."""
    out: dict[str, float | str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{option} '{item}' must look like NAME=VALUE, e.g. q=0.7")
        try:
            out[key] = float(value)
        except ValueError:
            if not words:
                raise ConfigError(f"{option} {key}: '{value}' is not a number") from None
            out[key] = value
    return out


def _shots(text: str) -> int:
    return 0 if text in ("all", "full") else int(text)


def _val_shots(text: str) -> int | str | None:
    if text in ("all", "none"):
        return None
    return "coop" if text == "coop" else int(text)


def add_run_options(p: argparse.ArgumentParser, defaults: RunConfig | None = None) -> None:
    """Options shared by train / zeroshot / demo: they map 1:1 onto RunConfig fields."""
    d = defaults or RunConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", help="image folder (class sub-folders, or train/ and test/ folders of them), a CSV/TSV "
                                  "file (path,label[,split]), or a benchmark's own folder")
    g.add_argument("--dataset", default=d.dataset,
                   help="folder (default), csv, a CoOp benchmark (oxford_flowers, dtd, ...), cifar10/100, food101n; "
                        "`dspt datasets` lists them")
    g.add_argument("--root", help="folder holding the benchmark datasets in CoOp's layout (default: $DSPT_DATA)")
    g.add_argument("--download", action="store_true",
                   help="download a missing benchmark with torchvision into --root (needs internet)")
    g.add_argument("--test-data", help="folder of test images (class sub-folders); default: test/ beside train/, "
                                       "else a seeded --test-fraction of --data")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="share of --data held out for testing when it has no test folder (default 0.2)")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="seed of that held-out test split: fixed across run seeds (default 1)")
    g.add_argument("--classnames", help="folders: JSON {folder: name} or TXT 'folder name'; CSV: TXT one name per "
                                        "line or a JSON list")
    g.add_argument("--shots", type=_shots, default=d.shots, help="images per class (int) or 'all' (default 16)")
    g.add_argument("--exclude", metavar="FILE",
                   help="text file of image paths (one per line) to leave out of training, e.g. a held-out fold")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images: drawn shots are checked and replaced, evaluation splits checked "
                        "whole (recorded in dataset.json)")
    g.add_argument("--val-labels", default=d.val_labels, choices=["noisy", "clean"],
                   help="validation labels: noisy like the training labels (default, what a user has) or clean")
    g.add_argument("--val-shots", type=_val_shots, default=d.val_shots,
                   help="validation images per class: an integer, 'coop' (CoOp's min(shots, 4)) or 'all' (default)")
    g = p.add_argument_group("noise")
    g.add_argument("--noise", default=d.noise,
                   help="noise protocol: sym, pair, symflip, pairflip (false positives), instance (depends on "
                        "each image's features), given (shipped labels); default sym")
    g.add_argument("--noise-rate", type=float, default=d.noise_rate, help="fraction of labels corrupted, in [0, 1)")
    g.add_argument("--fp", type=int, default=d.fp,
                   help="symflip/pairflip: false positives among the K shots of each class (rate FP/K)")
    g.add_argument("--noise-file", help="--noise given: CIFAR-N .pt label file, or a 'path label' list")
    g.add_argument("--label-set", help="CIFAR-N label set: worse, aggre, random1..3 (CIFAR-10N), noisy (CIFAR-100N)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="open_clip model name, e.g. RN50, ViT-B-16, dspt-tiny")
    g.add_argument("--pretrained", default=d.pretrained,
                   help="open_clip pretrained tag (default openai); 'none' for random weights")
    g.add_argument("--checkpoint", help="local CLIP state-dict file instead of a pretrained tag")
    g.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default); bf16 autocasts the towers on a GPU or on a CPU with native bf16 (logits and "
                   "losses stay fp32); fp16 on a GPU only")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1")
    g.add_argument("--max-memory", type=float, default=d.max_memory, metavar="GB",
                   help="memory budget of a training step above the model: the text tower runs its prompt rows in "
                   "chunks that fit (default: 80%% of the free GPU memory, or half the available RAM)")
    g = p.add_argument_group("prompt")
    g.add_argument("--learner", default=d.learner, help="which parameters are tuned: coop (default), kgcoop, cocoop, "
                   "vpt, vpt-deep, maple, promptsrc (`dspt learners` lists them and what a step costs)")
    g.add_argument("--learner-opt", action="append", metavar="NAME=VALUE",
                   help="learner hyperparameter (depth, length, weight, ...), repeatable")
    g.add_argument("--n-ctx", type=int, default=d.n_ctx,
                   help="context vectors (default 16; with --ctx-init, the phrase's token count)")
    g.add_argument("--ctx-init", help="initialise the context from a phrase, e.g. 'a photo of a'")
    g.add_argument("--csc", action="store_true", help="class-specific context")
    g.add_argument("--class-token-position", default=d.class_token_position, choices=["end", "middle", "front"])
    g.add_argument("--template", default=d.template,
                   help="zero-shot prompt template (default: the dataset's, CoOp's for the benchmarks)")
    g = p.add_argument_group("training")
    g.add_argument("--loss", default=d.loss, help="loss name (dspt, ce, mae, gce, ...; `dspt losses` lists them)")
    g.add_argument("--loss-opt", action="append", metavar="NAME=VALUE", help="loss hyperparameter, repeatable")
    g.add_argument("--method", default=d.method, help="training method beyond the loss: plain (default), "
                   "nlprompt, joapr, coteaching, ... (`dspt methods` lists them)")
    g.add_argument("--method-opt", action="append", metavar="NAME=VALUE", help="method hyperparameter, repeatable")
    g.add_argument("--epochs", type=int, default=d.epochs, help="default: 200 (8-16 shots), 100 (2-4), 50 (1/all); "
                   "another --learner: its paper's (`dspt learners`)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="default 32; another --learner: its paper's (`dspt learners`)")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate (default: CoOp's 0.002 for ce; for "
                   "other losses, CoOp's rate scaled to take CE's first step: `dspt losses` shows it)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    g.add_argument("--collapse-guard", action="store_true",
                   help="off by default (DSPT as published): when the run collapses onto one class, put the last "
                   "healthy prompt back and halve the learning rate for the rest of the run")
    g.add_argument("--views", type=int, default=d.views, help="cached augmented views per training image")
    g.add_argument("--crop-scale", type=float, default=d.crop_scale,
                   help="smallest area fraction of the training crop (CoOp: 0.08; raise it for tiny images)")
    g.add_argument("--no-hflip", dest="hflip", action="store_false",
                   help="no horizontal flips in the training views (for digits, text, other handed images)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--path", default=d.path, choices=["fast", "reference"],
                   help="fast: cached features; reference: CoOp's online computation (for comparison)")
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", help="run folder (default: dspt_runs/<name>)")
    g.add_argument("--results", help="results CSV (default: results.csv beside the run folder)")
    g.add_argument("--cache-dir", help="feature cache (default: $DSPT_CACHE or ~/.cache/dspt)")
    g.add_argument("--workers", type=int, default=d.workers, help="image-decoding worker processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    values["loss_options"] = _loss_opts(getattr(args, "loss_opt", None))
    values["method_options"] = _loss_opts(getattr(args, "method_opt", None), "--method-opt", words=True)
    values["learner_options"] = _loss_opts(getattr(args, "learner_opt", None), "--learner-opt")
    values["progress"] = not getattr(args, "no_progress", False)
    if values.get("checkpoint"):
        values["pretrained"] = None
    return RunConfig(**values)


def _print_plan(cfgs: list, names: list[str], batch_runs: int | None = None, workers: int = 1) -> int:
    from .plan import check_plan, format_plan, plan_runs

    plan = plan_runs(cfgs, names, batch_runs, workers, echo=lambda line: print(line, file=sys.stderr))
    print(format_plan(plan))
    check_plan(plan)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = config_from_args(args)
    if args.plan:
        resolved = cfg.resolved(need_data=False)
        return _print_plan([resolved], [resolved.output])
    metrics = train(cfg)
    out = cfg.resolved().output
    print(f"run folder: {out}")
    print(run_summary(metrics))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import SCORES as AUDIT_SCORES
    from .audit import audit

    if args.run:
        if args.data or args.dataset != "folder":
            raise ConfigError("give a run folder or --data/--dataset, not both")
        path = Path(args.run) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"'{args.run}' is not a dspt run folder (no config.yaml); pass a run folder or "
                              "--data DIR")
        cfg = RunConfig.load(path)
        cfg = dataclasses.replace(cfg, cache_dir=args.cache_dir or cfg.cache_dir, progress=not args.no_progress)
        out = Path(args.output) if args.output else Path(args.run) / "audit"
    else:
        cfg = config_from_args(args)
        cfg.output = None
        out = Path(args.output or "dspt_audit")
    res = audit(cfg, out, folds=args.folds, review=not args.no_review, apply=args.apply, score=args.score,
                estimator=args.estimator, flag_rate=args.flag_rate)
    t = res.table
    e, enc = res.noise_estimate, res.encoded
    print(f"image features: {enc['total']} image-view(s) encoded ({enc['audit']} by the audit's own pass, "
          f"{enc['fold_runs']} by its fold runs); the rest came from the cache")
    print(f"{e.text()}\nestimator: {res.estimator_chosen}\n{len(t)} images, {int(t['flagged'].sum())} flagged (the lowest {args.score}; cleanlab would "
          f"flag {int(t['cleanlab_flagged'].sum())}); most suspicious first:")
    cols = ["rank", "path", "given", "suggested", args.score, "flagged"]
    print(t[list(dict.fromkeys(cols))].head(args.show).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if res.metrics:
        m = res.metrics
        print(f"\nagainst the known wrong labels ({m['flips']} of {m['images']}, {m['realised_noise_rate']:.1%}): "
              f"flags precision {m['flagged']['precision']:.2f} recall {m['flagged']['recall']:.2f}; " + "; ".join(
                  f"{s} AUROC {m[s]['auroc']:.3f} AP {m[s]['average_precision']:.3f}" for s in AUDIT_SCORES if s in m))
    if "cleaned_labels.csv" in res.files:
        print(f"\n--apply {args.apply}: {res.files['cleaned_labels.csv']}; train on it with: dspt train --data "
              f"{res.files['cleaned_labels.csv']} (plus your model options)")
    print("\nwrote " + ", ".join(str(f) for f in res.files.values()))
    return 0


def run_summary(metrics: dict[str, Any]) -> str:
    """One line on a finished run; memorisation is only defined when some training labels are wrong."""
    memorised = metrics["train"]["memorised"]
    if memorised != memorised:  # NaN: no wrong label to memorise
        mem = "memorised wrong labels: none to memorise (no training label is wrong)"
    else:
        mem = f"memorised wrong labels {memorised:.1f}%"
    return (f"test accuracy {metrics['test_acc']:.2f} (zero-shot {metrics['zeroshot_acc']:.2f}, "
            f"gain {metrics['gain_over_zeroshot']:+.2f}); realised noise {metrics['noise']['realised_rate']:.3f}; "
            f"{mem}; loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}")


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from .train import zeroshot

    res = zeroshot(config_from_args(args))
    print(f"zero-shot accuracy {res['zeroshot_acc']:.2f} on {res['n_test']} test images ('{res['template']}')")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_files

    n = predict_files(args.run, args.images, args.out, top_k=args.top_k, device=args.device,
                      checkpoint=args.checkpoint)
    print(f"wrote {n} predictions to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run, sidecar_path

    fmt = args.format or ("onnx" if str(args.output).lower().endswith(".onnx") else "dspt")
    meta = export_run(args.run, args.output, format=fmt, checkpoint=args.checkpoint, device=args.device)
    extra = f" and {sidecar_path(args.output)}" if fmt == "onnx" else ""
    print(f"wrote {args.output}{extra}: {meta['num_classes']} classes, model {meta['model']['name']} "
          f"({meta['model']['weights_id']})")
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from .losses import LOSSES

    for name, cls in LOSSES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:12s} {doc}")
    return 0


#: Recipes of this research line that are a plain loss, shown by `dspt methods`.
RECIPES = {"gce": "PTNL's recipe (Wu et al., ICCV 2023): CoOp with GCE, --loss gce (q 0.7)",
           "ce": "CoOp (Zhou et al., IJCV 2022): --loss ce",
           "dspt": "DSPT (Li et al., ICML 2026): --loss dspt",
           "mae": "PromptMAE, NLPrompt's loss for its noisy part (Pan et al., CVPR 2025)"}


def cmd_methods(args: argparse.Namespace) -> int:
    from .losses import LOSSES, matched_lr
    from .methods import METHODS

    print("Methods (--method NAME, options with --method-opt NAME=VALUE; each trains with --loss as its base loss "
          "unless it says otherwise):")
    for name, cls in METHODS.items():
        opts = ", ".join(f"{k}={v}" for k, v in cls.defaults().items()) or "no options"
        summary = cls.summary or "every sample on its given label with --loss (plain prompt tuning)"
        print(f"  {name:12s} {summary}")
        if cls.paper:
            print(f"  {'':12s} paper: {cls.paper}")
        print(f"  {'':12s} options: {opts}" + (f"; {cls.learners} prompt learners" if cls.learners > 1 else ""))
    print("\nLosses (--loss NAME, options with --loss-opt NAME=VALUE; default lr for 10 / 100 / 1000 classes):")
    for name, cls in LOSSES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        defaults = cls().hparams() if hasattr(cls(), "hparams") else {}
        lrs = " / ".join(f"{matched_lr(name, c):.3g}" for c in (10, 100, 1000))
        print(f"  {name:12s} {doc}")
        print(f"  {'':12s} options: {', '.join(f'{k}={v:g}' for k, v in defaults.items()) or 'none'}; lr {lrs}")
        if name in RECIPES:
            print(f"  {'':12s} {RECIPES[name]}")
    return 0


def cmd_learners(args: argparse.Namespace) -> int:
    from .learners import LEARNERS

    print("Prompt learners (--learner NAME, options with --learner-opt NAME=VALUE; every loss trains each one):")
    for name, spec in LEARNERS.items():
        opts = ", ".join(f"{k}={v}" for k, v in spec.defaults().items()) or "no options"
        print(f"  {name:9s} {spec.summary}")
        print(f"  {'':9s} paper: {spec.paper}")
        towers = "both towers" if spec.towers == "both" else f"the {spec.towers} tower"
        print(f"  {'':9s} changes: {towers}; step: {spec.cost()}")
        methods = "every method" if spec.methods is None else ", ".join(spec.methods)
        context = f"; context '{spec.context}'" if spec.context else ""
        epochs = "CoOp's by shots" if spec.epochs_by_shots else spec.schedule["epochs"]
        print(f"  {'':9s} options: {opts}; CE lr {spec.lr:g}{context}; default epochs {epochs}, batch "
              f"{spec.schedule['batch_size']}; methods: {methods}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .backbone import iter_models

    for name, tags in iter_models():
        print(f"{name:40s} {', '.join(tags)}")
    return 0


def _preset_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec of --preset / `dspt presets NAME`, narrowed by --datasets, --root and --set."""
    from .presets import parse_overrides, preset_spec

    datasets = args.datasets.split(",") if args.datasets is not None else None
    return preset_spec(args.preset, datasets, args.root, parse_overrides(args.set))


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import list_cells, load_grid, run_sweep

    if (args.grid is None) == (args.preset is None):
        raise ConfigError("give a grid file or --preset NAME (`dspt presets` lists them), not both or neither")
    if args.preset is None and (args.datasets is not None or args.set):
        raise ConfigError("--datasets and --set narrow a --preset; for a grid file, edit the file")
    grid = args.grid if args.preset is None else _preset_spec(args)
    if args.preset is None and args.root:  # the data root of a grid file, e.g. one from `dspt presets NAME`
        grid = {k: v for k, v in load_grid(args.grid).items() if k != "root"} | {"root": args.root}
    if args.list:
        for cell in list_cells(grid, args.output, args.results):
            print(f"{cell.status():8s} {cell.run_dir}")
        return 0
    if args.plan:
        if args.backend != "local":
            raise ConfigError("--plan times the batches on this machine's device; plan without --backend ray")
        cells = list_cells(grid, args.output, args.results)
        return _print_plan([c.config for c in cells], [c.name for c in cells], args.batch_runs, args.jobs)
    if args.preset is not None:  # the report states the preset's learning-rate rule and source
        from .io import atomic_write_json
        from .presets import preset_note
        from .report import PRESET_NOTE

        cells = list_cells(grid, args.output, args.results)  # checks every cell before anything is written
        folder = Path(args.output or grid["output"])
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / PRESET_NOTE, preset_note(args.preset) | {"runs": len(cells)})
    # this process only validates and schedules (never computes), so its workers may be plain forks of it
    res = run_sweep(grid, output=args.output, jobs=args.jobs, backend=args.backend, results=args.results,
                    start_method="fork" if sys.platform.startswith("linux") else None, batch_runs=args.batch_runs,
                    cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, cache_dir=args.cache_dir)
    for name, msg in res.failed.items():
        print(f"dspt: error: run {name} failed: {msg}", file=sys.stderr)
    return 0 if res.ok else 1


def cmd_presets(args: argparse.Namespace) -> int:
    import textwrap

    import yaml

    from .presets import PRESETS, count_runs, describe, get_preset

    if args.preset is None:
        if args.datasets is not None or args.root or args.set:
            raise ConfigError("--datasets, --root and --set narrow one preset; pass its name, e.g. "
                              f"`dspt presets {next(iter(PRESETS))} --datasets dtd`")
        print("\n\n".join(describe(name) for name in PRESETS))
        print("\nrun one: dspt sweep --preset NAME --root DIR [--datasets a,b] [--set key=value ...]; "
              "`dspt presets NAME` prints it as a grid file to edit")
        return 0
    preset, spec = get_preset(args.preset), _preset_spec(args)
    head = [f"{preset.name}: {preset.description}", f"source: {preset.source}", preset.lr_rule,
            f"{count_runs(spec)} runs; run with: dspt sweep THIS.yaml --root DIR "
            f"(or: dspt sweep --preset {preset.name})"]
    print("\n".join(textwrap.fill(line, 116, initial_indent="# ", subsequent_indent="#   ") for line in head))
    print(yaml.safe_dump(spec, sort_keys=False, width=116, default_flow_style=None), end="")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import dataset_status, default_data_root
    from .data.download import download_dataset
    from .data.registry import format_status_table

    root = args.root or default_data_root()
    for name in args.download or []:
        download_dataset(name, root)
        print(f"downloaded {name} into {root}")
    statuses = dataset_status(root, args.cache_dir, args.names or None)
    if args.json:
        print(json.dumps([s.to_dict() for s in statuses], indent=1))
    else:
        print(format_status_table(statuses, root))
    return 0


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} '{text}' must be comma-separated numbers, e.g. 0,0.4,0.8") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    seeds = tuple(int(v) for v in _numbers(args.seeds, "--seeds"))
    res = run_demo(prior_seed=args.prior_seed, seeds=seeds, output=args.output,
                   noise_rates=_numbers(args.noise_rates, "--noise-rates"),
                   losses=tuple(args.losses.split(",")), epochs=args.epochs, shots=args.shots, views=args.views,
                   lrs=_numbers(args.lrs, "--lrs"), ctx_init=args.ctx_init or None,
                   model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                   data=args.data, test_data=args.test_data, cache_dir=args.cache_dir, device=args.device,
                   workers=args.workers, progress=not args.no_progress, jobs=args.jobs)
    print(res["setup"])
    print()
    print(res["table"])
    print()
    print("\n".join(res["verdicts"]))
    if res["sensitivity"]:
        print("\nTest accuracy at every lr tried, mean ± std over seeds (rate sensitivity, not used to choose):")
        print(res["sensitivity"])
    out = res["output"]
    print(f"\nplot: {out / 'accuracy_vs_noise.png'}  table: {out / 'table.md'}  "
          f"report: {out / 'report' / 'report.html'}"
          f"  results: {out / 'results.csv'}")
    print(f"wall time {res['seconds']:.0f} s (pretraining {res['pretrain_seconds']:.0f} s)")
    return 0


def add_demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prior-seed", type=int, default=0, help="seed of the miniature CLIP (its digits split and "
                   "pretraining); another prior seed stands for another machine (default 0)")
    p.add_argument("--seeds", default="1,2,3,4,5", help="tuning seeds (shots, noise, validation draw, init, views); "
                   "results are mean ± std over them and differences are paired by seed (default 1,2,3,4,5)")
    p.add_argument("--output", "-o", help="folder for runs, table, plot, report (default dspt_demo/prior<SEED>)")
    p.add_argument("--noise-rates", default="0,0.2,0.4,0.6,0.8", help="comma-separated sym noise rates")
    p.add_argument("--losses", default="ce,dspt", help="comma-separated losses to compare")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--lrs", default="0.0002,0.002,0.02,0.2",
                   help="learning rates tried per method; the one best on noisy validation labels is reported")
    p.add_argument("--ctx-init", default="a photo of a", help="context init phrase ('' for random N(0, 0.02))")
    p.add_argument("--model", help="real CLIP instead of the miniature, e.g. ViT-B-32 (needs --data)")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--checkpoint")
    p.add_argument("--data", help="image folder (class sub-folders) for a real-CLIP demo")
    p.add_argument("--test-data")
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--jobs", "-j", type=int, help="runs at a time, one process each (default: one per core, "
                   "at most 4, for the miniature; 1 for real CLIP)")
    p.add_argument("--no-progress", action="store_true")


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    methods = [m for m in (args.methods or "").split(",") if m.strip()]
    rep, files = report(args.stores, args.output, reference=args.reference, select=args.select,
                        select_on=args.select_on, methods=methods or None, plots=not args.no_plots,
                        multiplicity=args.multiplicity, bootstrap=args.bootstrap, formats=args.format)
    shown = next((files[n] for n in ("report.md", "tables.tex") if n in files), None)
    if shown is not None:
        print(shown.read_text(encoding="utf-8"))
    print(f"wrote {len(files)} files to {files['report.json'].parent}: " + ", ".join(sorted(files)))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor

    return doctor(args.cache_dir)


def add_preset_options(p: argparse.ArgumentParser) -> None:
    """--datasets, --root, --set: narrow a preset (`dspt sweep --preset`, `dspt presets NAME`)."""
    p.add_argument("--datasets", metavar="A,B", help="with a preset: only these of its datasets")
    p.add_argument("--root", help="folder holding the datasets in CoOp's layout (default: the grid's 'root:', else "
                   "$DSPT_DATA)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="with a preset: set an option for every run, repeatable (--set seed=1 --set epochs=2; "
                   "a comma list is crossed: --set loss=ce,dspt; noise, fp, noise_rate pick the preset's settings "
                   "that list the value)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "prompt-tune a CLIP model on (noisy) labelled images"),
    "zeroshot": (cmd_zeroshot, "zero-shot accuracy of a prompt template"),
    "predict": (cmd_predict, "classify images with a trained run or an exported classifier"),
    "export": (cmd_export, "write a finished run as one classifier file (safetensors, or ONNX for onnxruntime)"),
    "audit": (cmd_audit, "find the training labels that are probably wrong (cross-fitted scores, cleanlab) and "
                         "write a review page"),
    "losses": (cmd_losses, "list the losses"),
    "methods": (cmd_methods, "list the training methods and losses: what each does, its paper, options, default lr"),
    "learners": (cmd_learners, "list the prompt learners: which towers each changes, what a step costs, options"),
    "models": (cmd_models, "list open_clip models and pretrained tags"),
    "sweep": (cmd_sweep, "run a grid of configurations (skips finished runs, resumes partial ones)"),
    "presets": (cmd_presets, "list the named protocol grids (dspt sweep --preset NAME), or print one as a grid file"),
    "datasets": (cmd_datasets, "list the datasets: found under --root?, class/train/val/test counts, what is missing"),
    "doctor": (cmd_doctor, "check the install: versions, device, cache"),
    "demo": (cmd_demo, "DSPT vs CoOp under label noise, offline, in minutes"),
    "report": (cmd_report, "tables over seeds, paired comparisons with intervals, robustness and plots from results"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspt", description="Double-Softmax Prompt Tuning for CLIP on noisy labels")
    parser.add_argument("--version", action="version", version=f"dspt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
        if name in ("train", "zeroshot"):
            add_run_options(p)
            if name == "train":
                p.add_argument("--plan", action="store_true", help="time this run at its real shape on a random "
                               "init of its model and print its projected time, memory and cache; train nothing")
        elif name == "audit":
            from .audit_scores import DEFAULT_ESTIMATOR as AUDIT_DEFAULT_ESTIMATOR
            from .audit_scores import DEFAULT_SCORE as AUDIT_DEFAULT_SCORE
            from .audit_scores import ESTIMATORS as AUDIT_ESTIMATORS
            from .audit_scores import SCORES as AUDIT_SCORE_NAMES

            add_run_options(p)
            p.set_defaults(shots=0)
            p.add_argument("run", nargs="?", help="a run folder to audit (its images, labels and settings); or "
                           "give --data DIR and training options")
            p.add_argument("--folds", type=int, default=5, help="cross-fitting folds: each image is scored by "
                           "prompts tuned on the other folds (default 5)")
            p.add_argument("--no-review", action="store_true", help="no review page")
            p.add_argument("--apply", choices=["drop", "relabel"], help="also write cleaned_labels.csv: the flagged "
                           "images dropped, or relabelled to the suggested class (without review: the review page "
                           "downloads the same file after a person checked it)")
            p.add_argument("--show", type=int, default=15, help="suspects to print (default 15)")
            p.add_argument("--score", choices=AUDIT_SCORE_NAMES, default=AUDIT_DEFAULT_SCORE,
                           help=f"the score that ranks the images and picks the flags (default {AUDIT_DEFAULT_SCORE}; "
                                "docs/audit.md compares them)")
            p.add_argument("--estimator", choices=["auto", *AUDIT_ESTIMATORS], default=AUDIT_DEFAULT_ESTIMATOR,
                           help="how the share of wrong labels, and so the number of flags, is estimated: reference "
                                "(the zero-shot model calibrated on the clean test labels, then the noise transition "
                                "fitted by EM), mixture (a 2-Gaussian mixture on the score) or confident_joint "
                                f"(cleanlab); default {AUDIT_DEFAULT_ESTIMATOR}: reference where the test labels are "
                                "not the audited ones (injected noise, --test-data, a benchmark's test split), "
                                "else mixture; printed with a bootstrap interval")
            p.add_argument("--flag-rate", type=float, default=None,
                           help="flag this share of the images instead of the estimated one (a spot check's error "
                                "rate, or a review budget); the estimates are still reported")
            p.description = ("Scores every training image out of sample (K-fold cross-fitting): the probability of "
                             "the given label, cleanlab's label quality, the zero-shot model's probability and an "
                             "in-sample average; estimates the share of wrong labels (with an interval) and flags "
                             "that many of the most suspicious; writes "
                             "audit.csv, audit.json, review.html and, where the true labels are known, "
                             "precision_recall.png. -o is the audit folder (default RUN/audit or dspt_audit). "
                             "Without a run, every image of --data is audited (--shots 0).")
        elif name == "predict":
            p.add_argument("run", help="a finished run folder (from dspt train), or a classifier file from dspt "
                                       "export (.safetensors, or .onnx run with onnxruntime)")
            p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
            p.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv)")
            p.add_argument("--top-k", type=int, default=3)
            p.add_argument("--device", default="auto")
            p.add_argument("--checkpoint", help="the CLIP checkpoint file where it moved since training (its "
                                                "sha256 must match)")
        elif name == "export":
            p.add_argument("run", help="a finished run folder (from dspt train)")
            p.add_argument("--output", "-o", required=True, metavar="FILE",
                           help="file to write: FILE.safetensors (format dspt) or FILE.onnx (+ FILE.json)")
            p.add_argument("--format", choices=["dspt", "onnx"],
                           help="dspt: class text features + metadata in one safetensors file, for "
                           "dspt.load_classifier / dspt predict; onnx: image tower + text head as one ONNX model "
                           "(needs pip install 'dspt[export]'). Default: onnx for a .onnx file name, else dspt")
            p.add_argument("--checkpoint", help="the run's CLIP checkpoint file where it moved since training")
            p.add_argument("--device", default="cpu", help="device computing the text features (default cpu)")
        elif name == "doctor":
            p.add_argument("--cache-dir")
        elif name == "demo":
            p.description = ("`dspt demo`: DSPT vs CoOp (cross-entropy) under symmetric label noise, offline, in a "
                             "few minutes.")
            add_demo_options(p)
        elif name == "report":
            p.add_argument("stores", nargs="+", metavar="STORE",
                           help="results.csv, sweep or demo folder, or run folder(s); several are merged")
            p.add_argument("--output", "-o", help="folder to write into (default: STORE/report for one folder, "
                           "else report/)")
            p.add_argument("--reference", default="ce", help="method the others are compared with, paired by "
                           "seed (default ce: CoOp)")
            p.add_argument("--select", default="lr", choices=["lr", "none"], help="lr: each method's learning "
                           "rate chosen per setting on mean validation accuracy over seeds (default); none: every "
                           "rate reported as a method of its own")
            p.add_argument("--select-on", default="noisy", choices=["noisy", "clean"], help="validation labels the "
                           "choice uses: the noisy ones a user has (default) or clean ones")
            p.add_argument("--methods", help="comma-separated methods to report (default: all in the stores)")
            p.add_argument("--no-plots", action="store_true", help="tables and CSV files only")
            p.add_argument("--multiplicity", default="holm", choices=["holm", "bh", "none"], help="adjust the "
                           "verdicts of each table for its many comparisons: holm (family-wise error, default), bh "
                           "(Benjamini-Hochberg false-discovery rate) or none")
            p.add_argument("--bootstrap", action="store_true", help="add a percentile bootstrap interval (10,000 "
                           "resamples, fixed seed) beside each t-interval")
            p.add_argument("--format", default="md,html", help="what to write besides the CSV files, a comma list "
                           "of md, html, latex (latex: tables.tex, the paper tables in booktabs); default md,html")
        elif name == "datasets":
            p.add_argument("names", nargs="*", help="datasets to show (default: all)")
            p.add_argument("--root", help="folder holding the datasets (default: $DSPT_DATA)")
            p.add_argument("--download", action="append", metavar="NAME",
                           help="download NAME with torchvision into --root first (repeatable; needs internet)")
            p.add_argument("--cache-dir", help="where generated split files go (default: $DSPT_CACHE or ~/.cache/dspt)")
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        elif name == "presets":
            p.add_argument("preset", nargs="?", metavar="NAME", help="print this preset as a grid file (YAML)")
            add_preset_options(p)
        elif name == "sweep":
            p.add_argument("grid", nargs="?", help="YAML file of run options; list values are crossed (see "
                           "dspt.sweep); or --preset NAME")
            p.add_argument("--preset", metavar="NAME", help="a named protocol grid instead of a file (`dspt presets` "
                           "lists them); runs into sweeps/NAME unless -o")
            add_preset_options(p)
            p.add_argument("--output", "-o", help="sweep folder (default: the grid's 'output:', sweeps/NAME for a "
                           "preset)")
            p.add_argument("--results", help="results CSV (default: results.csv in the sweep folder)")
            p.add_argument("--jobs", "-j", type=int, default=1, help="worker processes on this machine, each "
                           "training a run or a batch of runs (default 1: in this process; ignored with --backend "
                           "ray, where the cluster's CPUs and GPUs decide)")
            p.add_argument("--backend", default="local", choices=["local", "ray"],
                           help="local worker processes, or a Ray cluster (optional dependency: pip install "
                           "'dspt[ray]'; the cluster is $RAY_ADDRESS, else one started here; see docs/ray.md)")
            p.add_argument("--batch-runs", type=int, metavar="N",
                           help="train up to N compatible runs (same model, data, shots, batch size, epochs; "
                           "losses, lrs, noise, seeds may differ) as one model in one process; 0 or 1: one run "
                           "per process (default: up to 64 on the CPU, 256 on a GPU, split so every worker has "
                           "work; a process trains as many of them at once as half the free memory holds)")
            p.add_argument("--cpus-per-run", type=float, metavar="X",
                           help="with --backend ray: CPUs each task (a run or a batch) asks for (default 1)")
            p.add_argument("--gpus-per-run", type=float, metavar="X",
                           help="with --backend ray: GPUs each task asks for; fractions share a GPU (0.25: four "
                           "tasks per GPU). Default: 1 if the cluster has GPUs, else 0. A task that asks for 0 "
                           "gets no GPU and silently trains on the CPU")
            p.add_argument("--cache-dir", help="feature cache of every run (overrides the grid's cache_dir:); on "
                           "a Ray cluster, a folder on storage that every node sees")
            p.add_argument("--list", action="store_true", help="list the runs and their state; run nothing")
            p.add_argument("--plan", action="store_true", help="time each distinct batch shape on a random init of "
                           "its model and print runs, batches, rows per chunk, projected peak memory, time and "
                           "cache size; refuse a grid that cannot fit; train nothing")
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.epilog = ("example grid (12 runs into sweeps/demo/<loss=..,noise_rate=..,seed=..>/):\n"
                        "  data: images/\n  model: RN50\n  shots: 16\n  output: sweeps/demo\n"
                        "  loss: [ce, dspt]\n  noise_rate: [0, 0.4]\n  seed: [1, 2, 3]\n"
                        "Run it again after a crash or a kill: finished runs are skipped, partial ones resume.\n"
                        "A paper's protocol by name: dspt sweep --preset ptnl --root DIR (`dspt presets` lists them).")
    return parser


def _setup_logging(verbose: bool) -> None:
    """Our messages at INFO on stderr; other libraries' (open_clip logs on the root logger) at WARNING."""
    for h in list(log.handlers):
        if getattr(h, "_dspt", False):
            log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._dspt = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run one command. dspt's own errors (a bad option, missing data, a diverged run) print one line that
    names the fix; anything else is a bug and keeps its traceback. `-v` shows the traceback of both."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dspt: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except DsptError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"dspt: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, TrainingError) else 2
    except OSError as exc:
        if exc.errno != 28:  # not ENOSPC: a real failure, with its traceback
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"dspt: error: disk full while writing {exc.filename or ''}; free space and run the same "
              "command again to resume (nothing half-written was kept)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
