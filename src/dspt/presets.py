"""Named sweep grids: the protocols of this research line, so one command reproduces a paper's table.

`dspt presets` lists them; `dspt presets NAME` prints one as a grid file to copy and edit; `dspt sweep --preset
NAME --root DIR` runs it into `sweeps/NAME` (finished runs skipped, partial ones resumed, as any sweep).

A preset is a function that builds a `dspt.sweep` spec when asked, so a loss registered after import is in
"every loss" presets. The noise settings of a paper do not form one cross product (symflip/pairflip take
`fp`, sym/pair `noise_rate`, Food-101N none), so presets are unions of grids (`grids:`), each entry crossing
`dataset` and `noise` so that every cell name says what it is: `dataset=dtd,noise=symflip,fp=2,loss=ce,seed=1`.

`preset_spec(name, datasets, root, overrides)` narrows a preset: `datasets` keeps some of its datasets, and
each override sets an option for every cell (`seed=1`, `epochs=2`; a list is crossed). An option a preset
crosses per noise setting (noise, fp, noise_rate) selects instead: entries that list the value keep only it,
entries that list none of the values are left out (`noise=symflip` drops the sym/pair entry); a value that
no entry lists replaces the lists (`fp=3`). Crossed options stay crossed, so a slice runs into the same
folders as the full preset, which then skips them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .config import coerce_field
from .errors import ConfigError
from .sweep import _value_text

SpecBuilder = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str  # one line
    source: str  # the papers, and where each value comes from
    build: SpecBuilder  # a fresh sweep spec (without output:) each call
    lr_rule: str = ""  # how each loss's learning rate is set, and the source of every fixed rate

    def spec(self) -> dict[str, Any]:
        return self.build()


PRESETS: dict[str, Preset] = {}

#: Free-text options: a comma in their value is text, not a list.
_TEXT_FIELDS = ("template", "ctx_init")
#: Options set by their own flags, not --set.
_OWN_FLAGS = {"output": "-o DIR", "results": "--results FILE", "dataset": "--datasets a,b"}


def register_preset(preset: Preset) -> Preset:
    """Add `preset` to PRESETS under its name (unique)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset '{preset.name}' is already registered")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)} (`dspt presets` lists them)")
    return PRESETS[name]


def default_output(name: str) -> str:
    return f"sweeps/{name}"


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (--set) as {field: value}; 'a,b' becomes a list (crossed), values stay text here
    and are coerced to the field's type by `preset_spec`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set '{item}' must look like KEY=VALUE, e.g. --set epochs=2 or --set loss=ce,dspt")
        if key in out:
            raise ConfigError(f"--set {key} is given twice; give a comma list instead, e.g. --set {key}=a,b")
        out[key] = value.split(",") if "," in value and key not in _TEXT_FIELDS else value
    return out


def _coerced(key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    try:
        out = [coerce_field(key, v) for v in values]
    except ConfigError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    if not out or len({_value_text(v) for v in out}) != len(out):
        raise ConfigError(f"--set {key}={','.join(map(str, values))} must list distinct values")
    return out


def _override(spec: dict[str, Any], key: str, values: list[Any]) -> None:
    """Set `key` for every cell of `spec` (see the module docstring: select where an entry crosses it)."""
    if key in _OWN_FLAGS:
        raise ConfigError(f"--set {key} is not allowed; use {_OWN_FLAGS[key]}")
    if key == "noise":  # checked here: a bad type would otherwise surface as a confusing --fp error
        from .noise import NOISE_TYPES

        bad = [v for v in values if v not in NOISE_TYPES]
        if bad:
            raise ConfigError(f"--set noise={bad[0]}: unknown noise type; choose one of: "
                              f"{', '.join(sorted(NOISE_TYPES))}")
    entries = [e for e in spec.get("grids", []) if key in e]
    texts = {_value_text(v) for v in values}
    if entries:
        listed = [e for e in entries if texts & {_value_text(v) for v in _as_list(e[key])}]
        for entry in entries:
            if listed and not any(entry is e for e in listed):
                spec["grids"] = [e for e in spec["grids"] if e is not entry]
            else:
                keep = [v for v in _as_list(entry[key]) if _value_text(v) in texts] if listed else values
                entry[key] = keep
    grid = spec.get("grid") or {}
    if key in grid:
        grid[key] = values
    elif key in spec:
        crossed = isinstance(spec[key], list)
        spec[key] = values if crossed or len(values) > 1 else values[0]
    elif not entries:
        spec[key] = values if len(values) > 1 else values[0]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def preset_datasets(spec: dict[str, Any]) -> list[str]:
    """The datasets of a preset spec, in order."""
    names = list(_as_list(spec.get("dataset", [])))
    for entry in spec.get("grids", []):
        names += [d for d in _as_list(entry.get("dataset", [])) if d not in names]
    return list(dict.fromkeys(names))


def _restrict(spec: dict[str, Any], name: str, datasets: Iterable[str]) -> None:
    from .data import DataError, resolve_dataset_name

    valid = preset_datasets(spec)
    wanted = []
    for d in [d for d in datasets if d.strip()]:
        try:
            resolved = resolve_dataset_name(d.strip())
        except DataError:
            resolved = None
        if resolved not in valid:
            raise ConfigError(f"--datasets: '{d.strip()}' is not a dataset of preset '{name}'; choose from: "
                              f"{', '.join(valid)}")
        wanted.append(resolved)
    if not wanted:
        raise ConfigError(f"--datasets is empty; choose from: {', '.join(valid)}")
    if isinstance(spec.get("dataset"), list):
        spec["dataset"] = [d for d in spec["dataset"] if d in wanted]
    if "grids" in spec:
        kept = []
        for entry in spec["grids"]:
            names = [d for d in _as_list(entry.get("dataset", [])) if d in wanted]
            if "dataset" not in entry or names:
                kept.append(entry | ({"dataset": names} if names else {}))
        spec["grids"] = kept


def preset_spec(name: str, datasets: Iterable[str] | None = None, root: str | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep spec of preset `name` (for `dspt.sweep.run_sweep`), into `sweeps/<name>` unless the spec is
    given another output; `datasets` keeps only those, `root` is the data root, `overrides` set options for
    every cell (see the module docstring)."""
    preset = get_preset(name)
    spec = copy.deepcopy(preset.spec())
    spec.setdefault("output", default_output(name))
    if datasets is not None:
        _restrict(spec, name, datasets)
    if root is not None:
        spec["root"] = str(root)
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        _override(spec, key, _coerced(key, value))
    if "grids" in spec and not spec["grids"]:
        raise ConfigError(f"preset '{name}' has no runs left after --datasets / --set; check the values against "
                          f"`dspt presets {name}`")
    return spec


def count_runs(spec: dict[str, Any]) -> int:
    """Number of cells of a spec, without resolving them (no data root needed)."""
    def size(options: dict[str, Any]) -> int:
        n = 1
        for value in options.values():
            n *= len(value) if isinstance(value, list) else 1
        return n

    top = {k: v for k, v in spec.items() if k not in ("grid", "grids")}
    shared = size(top) * size(spec.get("grid") or {})
    return shared * sum(size(entry) for entry in spec.get("grids", [{}]))


def describe(name: str) -> str:
    """What `dspt presets` prints for one preset."""
    preset = get_preset(name)
    spec = preset.spec()
    losses = list(dict.fromkeys(_as_list(spec.get("loss", [])) + [
        x for e in spec.get("grids", []) if "method" not in e or _as_list(e["method"]) == ["plain"]
        for x in _as_list(e.get("loss", []))]))
    methods = list(dict.fromkeys(m for e in spec.get("grids", []) for m in _as_list(e.get("method", []))
                                 if m != "plain"))
    noise = []
    for entry in spec.get("grids", []):
        level = next((k for k in ("fp", "noise_rate") if k in entry), None)
        text = "/".join(_as_list(entry.get("noise", spec.get("noise", "sym"))))
        if level:
            text += f" {'FP' if level == 'fp' else 'rate'} " + ",".join(_value_text(v) for v in _as_list(entry[level]))
        ds = _as_list(entry.get("dataset", []))
        text += f" on {', '.join(ds)}" if len(ds) <= 2 else f" on {len(ds)} datasets"
        if text not in noise:
            noise.append(text)
    pretrained = spec.get("pretrained", "openai")
    learners = list(dict.fromkeys(x for e in spec.get("grids", []) for x in _as_list(e.get("learner", []))))
    training = (f"{spec.get('shots', 16)} shots, {spec.get('epochs')} epochs, batch {spec.get('batch_size', 32)}, "
                f"n_ctx {spec.get('n_ctx', 16)}, class token {spec.get('class_token_position', 'end')}, context init "
                f"{spec.get('ctx_init') or 'random'}")
    if learners:  # each learner on its own paper's schedule and context
        training = (f"{spec.get('shots', 16)} shots; learners {', '.join(learners)}, each on its paper's epochs, "
                    "batch size, context and options (`dspt learners`)")
    rows = [
        ("models", ", ".join(f"{m} ({pretrained})" for m in _as_list(spec.get("model", "RN50")))),
        ("datasets", ", ".join(preset_datasets(spec))),
        ("noise", "; ".join(noise)),
        ("training", training),
        ("lr", preset.lr_rule.removeprefix("learning rate: ")),
        ("losses", ", ".join(losses)),
        ("methods", (", ".join(methods) + " (each on CE)") if methods else "none"),
        ("seeds", ", ".join(str(s) for s in _as_list(spec.get("seed", 1)))),
        ("source", preset.source),
    ]
    head = f"{preset.name}: {count_runs(spec)} runs into {default_output(name)}/\n  {preset.description}"
    return head + "".join(f"\n  {k + ':':9s} {v}" for k, v in rows)


def preset_note(name: str) -> dict[str, str]:
    """What a sweep of preset `name` records beside its runs (`preset.json`) for `dspt report` to state."""
    preset = get_preset(name)
    return {"name": preset.name, "lr_rule": preset.lr_rule, "source": preset.source}


# ----------------------------------------------------------------------------------------------- presets

#: CoOp's 11 benchmarks minus ImageNet, in CoOp's order.
COOP_10 = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
           "dtd", "eurosat", "ucf101"]
#: The datasets of PTNL's training scripts (scripts/upl_train_exp*.sh).
PTNL_DATASETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "dtd", "ucf101"]
FP_16 = [2, 4, 6, 8, 10, 12]  # 12.5 % ... 75 % of 16 shots

#: CoOp's prompt and optimiser, shared by every preset (CoOp's configs/trainers/CoOp/rn50.yaml, which PTNL,
#: JoAPR and NLPrompt copy): 16 random-init context vectors, class token at the end, batch 32. The learning
#: rate is per loss: `PAPER_RATES`.
COOP_BASE = {"pretrained": "openai", "shots": 16, "n_ctx": 16, "ctx_init": None, "class_token_position": "end",
             "csc": False, "batch_size": 32}

#: The learning rates the source papers ran, per loss: CoOp's 0.002 for cross-entropy (CoOp, and the CE base of
#: NLPrompt, JoAPR and co-teaching as those papers ran them), and PTNL's GCE at the same 0.002. A preset keeps
#: them; every other loss (DSPT, MAE, SCE, ...) was not run by these papers and gets its matched default rate
#: (`dspt.losses.matched_lr`: CoOp's rate scaled so its first step equals CE's; DSPT: 0.002 x classes), because
#: CE's rate would leave a loss whose gradient is C times smaller nearly still.
PAPER_RATES = {"ce": 0.002, "gce": 0.002}
LR_RULE = ("learning rate: ce and gce at 0.002, the rate their source papers ran (CoOp's rn50 config, which PTNL, "
           "JoAPR and NLPrompt copy; PTNL ran GCE at it); every other loss at its matched default (CoOp's rate "
           "scaled so its first step equals CE's: DSPT 0.002 x classes; `dspt losses`), as no source paper ran it; "
           "methods (NLPrompt, JoAPR, co-teaching) on CE at 0.002. To choose rates on validation data instead: "
           "--set lr=0.002,0.02,0.2 and `dspt report`")

JOAPR_SOURCE = (
    "JoAPR (Guo & Gu, CVPR 2024: scripts/main.sh, configs/trainers/JoAPR/rn50.yaml) and NLPrompt (Pan et al., "
    "CVPR 2025), both built on CoOp (Zhou et al., IJCV 2022). RN50, 16 shots, 200 epochs, n_ctx 16, random init, "
    "class token end, lr 0.002, batch 32: CoOp's rn50 config as JoAPR ships it. symflip/pairflip FP 2..12 of "
    "16 (12.5-75 %): JoAPR's table of settings; sym/pair at the same rates: NLPrompt's Sym/Asym noise. "
    "Seeds 1-3: JoAPR's main.sh. Datasets: the CoOp benchmarks without ImageNet, plus Food-101N with its own "
    "web labels (one setting: noise given). JoAPR's README also tunes ImageNet (and has no Food-101 row): to "
    "add it, edit the grid from `dspt presets NAME`. Losses: every registered loss (`dspt losses`); methods: "
    "every registered method (`dspt methods`) on CE, the base loss of NLPrompt, JoAPR and co-teaching.")
PTNL_SOURCE = (
    "PTNL (Wu et al., ICCV 2023, 'Why is prompt tuning for vision-language models robust to noisy labels?'; "
    "CEWu/PTNL). RN50, 50 epochs: configs/trainers/UPLTrainer/rn50_ep50.yaml (lr 0.002, batch 32, 1 warm-up "
    "epoch at 1e-5). 16 shots, n_ctx 16, class token end, random init, FP 0, 2, 4, 8 of 16 (0-50 %): "
    "README and scripts/upl_train_exp*.sh. Losses: cross-entropy, and GCE (q 0.7) of --use-robustloss. "
    "Noise: symflip (its scripts set only a count of false positives per class, --num-fp; dspt draws them "
    "uniformly from the other classes). "
    "Datasets: those of its scripts. Seeds 1-3 (its scripts run seeds 1-16 for an ensemble).")


def _every_loss() -> list[str]:
    from .losses import loss_names

    return loss_names()


def _every_method() -> list[str]:
    from .methods import method_names

    return [m for m in method_names() if m != "plain"]


def joapr_spec(model: str = "RN50") -> dict[str, Any]:
    """JoAPR / NLPrompt: symflip/pairflip and sym/pair at 12.5-75 % on 10 CoOp datasets, plus Food-101N; every
    loss with plain prompt tuning, and every method on its base loss CE."""
    settings = [
        {"dataset": list(COOP_10), "noise": ["symflip", "pairflip"], "fp": list(FP_16)},
        {"dataset": list(COOP_10), "noise": ["sym", "pair"], "noise_rate": [fp / 16 for fp in FP_16]},
        {"dataset": ["food101n"], "noise": ["given"]},
    ]
    runs = [{"method": ["plain"], "loss": _every_loss()}, {"method": _every_method(), "loss": ["ce"]}]
    return {"model": model, **COOP_BASE, "lr_by_loss": dict(PAPER_RATES), "epochs": 200, "seed": [1, 2, 3],
            "grids": [s | r for s in settings for r in runs]}


def ptnl_spec(model: str = "RN50") -> dict[str, Any]:
    """PTNL: symflip FP 0, 2, 4, 8 of 16, CE vs GCE, 50 epochs."""
    return {"model": model, **COOP_BASE, "lr_by_loss": dict(PAPER_RATES), "epochs": 50, "loss": ["ce", "gce"],
            "seed": [1, 2, 3],
            "grids": [{"dataset": list(PTNL_DATASETS), "noise": ["symflip"], "fp": [0, 2, 4, 8]}]}


_VIT = "ViT-B-16 (openai) instead of RN50, all else as"
register_preset(Preset("joapr", "JoAPR / NLPrompt protocol: CoOp RN50, 16 shots, 200 epochs; symflip/pairflip "
                       "and sym/pair noise at 12.5-75 % on 10 CoOp datasets, Food-101N; every loss and method; "
                       "seeds 1-3",
                       JOAPR_SOURCE, joapr_spec, LR_RULE))
register_preset(Preset("joapr-vitb16", f"{_VIT} joapr", JOAPR_SOURCE + " ViT-B/16: same schedule, other backbone "
                       "(CoOp's vit_b16 config has the same optimiser settings).", lambda: joapr_spec("ViT-B-16"), LR_RULE))
register_preset(Preset("ptnl", "PTNL protocol: CoOp RN50, 16 shots, 50 epochs; symflip FP 0/2/4/8 of 16 on 6 CoOp "
                       "datasets; CE vs GCE; seeds 1-3", PTNL_SOURCE, ptnl_spec, LR_RULE))
register_preset(Preset("ptnl-vitb16", f"{_VIT} ptnl", PTNL_SOURCE + " ViT-B/16: same schedule, other backbone.",
                       lambda: ptnl_spec("ViT-B-16"), LR_RULE))

LEARNERS_SOURCE = (
    "The plug-in table of NLPrompt (Pan et al., CVPR 2025), which reports its loss inside other prompt learners, "
    "asked of every learner of `dspt learners` with CE, DSPT and MAE (PromptMAE, NLPrompt's loss for its noisy "
    "part). ViT-B/16 (openai): the image-side learners need a ViT. 16 shots, sym noise at NLPrompt's rates 12.5-75 % "
    "(2..12 of 16), seeds 1-3, the 10 CoOp datasets without ImageNet. Each learner trains on its own paper's "
    "schedule (epochs and batch size: CoOp 200 / 32, KgCoOp 100 / 128, CoCoOp 10 / 1, VPT and MaPLe 5 / 4, "
    "PromptSRC 20 / 4; `dspt learners` names the config files) with its paper's context and options; the losses are compared "
    "within a learner, never across schedules.")
LEARNERS_LR_RULE = ("learning rate: each learner's paper rate for CE (CoOp, KgCoOp, CoCoOp 0.002, VPT and PromptSRC "
                    "0.0025, MaPLe 0.0035); DSPT and MAE at that rate scaled so their first step equals CE's (`dspt losses`), as "
                    "no paper ran them in these learners. To choose rates on validation data instead: --set "
                    "lr=... and `dspt report`")


def learners_spec(model: str = "ViT-B-16") -> dict[str, Any]:
    """Every prompt learner x CE, DSPT, MAE under sym noise at NLPrompt's rates (each learner on its paper's
    epochs and batch size)."""
    from .learners import LEARNERS

    grids = [{"learner": [name], "epochs": [spec.schedule["epochs"]], "batch_size": [spec.schedule["batch_size"]],
              "dataset": list(COOP_10), "noise": ["sym"], "noise_rate": [fp / 16 for fp in FP_16]}
             for name, spec in LEARNERS.items()]
    return {"model": model, "pretrained": "openai", "shots": 16, "loss": ["ce", "dspt", "mae"], "seed": [1, 2, 3],
            "grids": grids}


register_preset(Preset("learners", "every prompt learner (CoOp, KgCoOp, CoCoOp, VPT, MaPLe, PromptSRC) x CE, DSPT, "
                       "MAE: "
                       "ViT-B/16, 16 shots, sym noise 12.5-75 % on 10 CoOp datasets, each learner on its paper's "
                       "schedule; seeds 1-3", LEARNERS_SOURCE, learners_spec, LEARNERS_LR_RULE))
