"""The prompt-learner registry: name -> Learner spec (`--learner NAME`, `dspt learners` lists them).

A prompt learner decides *which* parameters prompt tuning trains; the loss (`--loss`) and the method
(`--method`) decide *how*. Each spec says which towers it changes and what that costs:

- text-only learners (CoOp, KgCoOp) train on the frozen image tower's cached features and batch with other
  runs (one text-tower pass for many runs' prompts);
- CoCoOp conditions its prompt on each image's *frozen* features, so the cache still applies, but the text
  tower runs once per (image, class) pair: it trains alone;
- image-side learners (VPT, MaPLe, PromptSRC) prompt the image tower: it runs, with gradients, on every step's images
  (loaded and augmented per step as CoOp does), so no feature cache applies and they train alone.

Defaults come from each paper's released configuration; the source is written beside each.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, TypeVar

from .errors import ConfigError
from .registries import registrar


class Learner:
    """What a prompt learner is, before any model exists: its towers, its cost model and its options."""

    name: ClassVar[str] = "coop"
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    towers: ClassVar[str] = "text"  # "text", "image" or "both": the towers whose computation it changes
    cached_features: ClassVar[bool] = True  # trains on the frozen image tower's cached features
    batches: ClassVar[bool] = True  # several runs train as one model (text-only learners)
    methods: ClassVar[tuple[str, ...] | None] = None  # the methods it trains with (None: every method)
    why_not: ClassVar[str] = ""  # why the other methods do not train it
    options: ClassVar[dict[str, Any]] = {}  # option -> default (each from the paper's config, see the class)
    minimums: ClassVar[dict[str, tuple[float, str]]] = {}  # option -> (its least value, a note on the range)
    layout: ClassVar[str] = "any"  # its text context: "any" of CoOp's, "shared-end" (one, before the name), "none"
    module: ClassVar[str | None] = None  # its model class in dspt.learner_models (None: CoOp's PromptLearner)
    context: ClassVar[str | None] = None  # the paper's context phrase (when no --n-ctx or --ctx-init is given)
    lr: ClassVar[float] = 0.002  # the paper's SGD rate for CE (scaled like CoOp's for other losses)
    # the paper's epochs and batch size at 16 shots (the `learners` preset trains each learner on its own)
    schedule: ClassVar[dict[str, int]] = {"epochs": 200, "batch_size": 32}  # CoOp: configs/trainers/CoOp/*_ep200
    # default epochs: CoOp's protocol by shots (200 at 8-16, 100 at 2-4, 50 at 1), or the schedule's (16 shots)
    epochs_by_shots: ClassVar[bool] = False
    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dict(cls.options)

    @classmethod
    def check(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; an unknown one or a value out of range is a ConfigError."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            takes = f"it takes: {', '.join(cls.options)}" if cls.options else "it takes no options"
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for learner '{cls.name}'; {takes}")
        out = cls.defaults()
        for key, value in options.items():
            kind = type(cls.options[key])
            try:
                number = float(value)
                if kind is int and not number.is_integer():
                    raise ValueError(value)
            except (TypeError, ValueError):
                raise ConfigError(f"learner '{cls.name}': option {key}={value!r} must be "
                                  f"{'an integer' if kind is int else 'a number'}") from None
            out[key] = kind(number)
        cls.check_values(out)
        return out

    @classmethod
    def check_values(cls, options: dict[str, Any]) -> None:
        """A learner's own range checks (ConfigError naming the option and its range)."""
        for key, (low, note) in cls.minimums.items():
            if key in options and not options[key] >= low:
                raise ConfigError(f"learner option {key}={options[key]} is invalid; it must be >= {low:g}{note}")

    @classmethod
    def check_method(cls, method: str) -> None:
        if cls.methods is not None and method not in cls.methods:
            raise ConfigError(f"method '{method}' does not train learner '{cls.name}' ({cls.why_not}); use --method "
                              f"{' / '.join(cls.methods)} with it, or learner coop or kgcoop with '{method}'")

    @classmethod
    def cost(cls) -> str:
        """One line for the plan and `dspt learners`: what a training step runs."""
        if cls.batches:
            return "text tower per step on cached image features; batches with other runs"
        if cls.cached_features:
            return "text tower per (image, class) pair on cached image features; trains alone"
        return "image tower (with gradients) on every step's images, no feature cache; trains alone"


LEARNERS: dict[str, type[Learner]] = {}

_T = TypeVar("_T", bound=type)


def register_learner(name: str) -> Callable[[_T], _T]:
    """Decorator adding a Learner spec to :data:`LEARNERS` under `name`."""
    return registrar(LEARNERS, name, "learner")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"learner option {name}={value} is invalid; it must be > 0")


@register_learner("coop")
class CoOp(Learner):
    summary = "learned text context shared by all classes (or per class with --csc); the default"
    paper = "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022"
    epochs_by_shots = True


@register_learner("kgcoop")
class KgCoOp(Learner):
    summary = "CoOp + weight x (1 - mean cosine) between the learned and the hand-crafted prompt's class features"
    paper = "Yao et al., Visual-Language Prompt Tuning with Knowledge-guided Context Optimization, CVPR 2023"
    # weight 8.0: KgCoOp's trainers/kgcoop.py (loss = CE + 8.0 * score, score = 1 - mean cosine)
    options = {"weight": 8.0}
    minimums = {"weight": (0, "")}
    context = "a photo of a"  # its code initialises the context from this phrase (4 tokens)
    schedule = {"epochs": 100, "batch_size": 128}  # configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml


@register_learner("cocoop")
class CoCoOp(Learner):
    summary = "CoOp + a meta-net that turns each image's frozen features into a token added to every context vector"
    paper = "Zhou et al., Conditional Prompt Learning for Vision-Language Models, CVPR 2022"
    towers = "text"
    batches = False
    methods = ("plain", "joapr", "coteaching")
    why_not = ("NLPrompt's transport needs one set of class features, and CoCoOp's differ per image; dualprompt "
               "pairs CoOp prompts")
    # CoCoOp's configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: 4 context tokens from "a photo of a",
    # lr 0.002, 10 epochs, batch 1; meta-net Linear(E, E // 16) - ReLU - Linear(E // 16, D) (trainers/cocoop.py)
    options = {"reduction": 16}
    minimums = {"reduction": (1, "")}
    lr = 0.002
    module = "CoCoOpModel"
    layout = "shared-end"
    schedule = {"epochs": 10, "batch_size": 1}
    context = "a photo of a"


class _ImageSide(Learner):
    methods = ("plain", "nlprompt", "coteaching")
    why_not = "JoAPR mixes cached image features, and these learners see images; dualprompt pairs CoOp prompts"
    schedule = {"epochs": 5, "batch_size": 4}  # the VPT and MaPLe configs: *_ep5_batch4_*.yaml
    module = "VPTModel"
    layout = "none"
    towers = "image"
    cached_features = False
    batches = False
    minimums = {"length": (1, ""), "depth": (1, " (layers)")}


@register_learner("vpt")
class VPTShallow(_ImageSide):
    summary = "learned tokens appended to the image tower's input (shallow VPT); text: the hand-crafted prompt"
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    # length 8: N_CTX_VISION of the VPT baseline in MaPLe's repository (configs/trainers/VPT/
    # vit_b16_c2_ep5_batch4_4.yaml: lr 0.0025, 5 epochs, batch 4, prompts ~ N(0, 0.02)); depth 1 is VPT-shallow
    options = {"length": 8, "depth": 1}
    lr = 0.0025


@register_learner("vpt-deep")
class VPTDeep(_ImageSide):
    summary = "VPT-deep: new learned image tokens at the input of each of the first `depth` layers (0: all)"
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    # the same config: 8 tokens, PROMPT_DEPTH_VISION 12 (every layer of ViT-B/16); depth 0 = every layer
    options = {"length": 8, "depth": 0}
    minimums = {"length": (1, ""), "depth": (0, " (0: all)")}
    lr = 0.0025


@register_learner("maple")
class MaPLe(_ImageSide):
    summary = "text context in the first `depth` text layers, each mapped into image prompts at the same layer"
    paper = "Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023"
    towers = "both"
    # MaPLe's configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: N_CTX 2, PROMPT_DEPTH 9, CTX_INIT
    # "a photo of a", lr 0.0035, 5 epochs, batch 4; the context length here is --n-ctx / --ctx-init
    options = {"depth": 9}
    lr = 0.0035
    module = "MaPLeModel"
    layout = "shared-end"
    context = "a photo"  # MaPLe learns the first N_CTX = 2 words of "a photo of a" (the rest stay fixed text there)


@register_learner("promptsrc")
class PromptSRC(_ImageSide):
    summary = ("deep text and image prompts (independent) kept near the frozen CLIP: L1 on both features, KL to its "
               "logits, and a Gaussian-weighted average of the epochs' prompts")
    paper = "Khattak et al., Self-regulating Prompts: Foundational Model Adaptation without Forgetting, ICCV 2023"
    towers = "both"
    # PromptSRC's configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml: 4 text + 4 image tokens, depth 9
    # in both towers, "a photo of a", lr 0.0025, 20 epochs, batch 4, TEXT_LOSS_WEIGHT 25, IMAGE_LOSS_WEIGHT 10,
    # GPA_MEAN 15, GPA_STD 1 (epochs, 1-based); trainers/promptsrc.py for the losses
    options = {"depth": 9, "length": 4, "text_weight": 25.0, "image_weight": 10.0, "gpa_mean": 15.0, "gpa_std": 1.0}
    minimums = {"length": (1, ""), "depth": (1, " (layers)"), "text_weight": (0, ""), "image_weight": (0, "")}
    lr = 0.0025
    schedule = {"epochs": 20, "batch_size": 4}
    module = "PromptSRCModel"
    layout = "shared-end"
    context = "a photo of a"

    @classmethod
    def check_values(cls, options: dict[str, Any]) -> None:
        super().check_values(options)
        if not options["gpa_std"] > 0:
            raise ConfigError(f"learner option gpa_std={options['gpa_std']} is invalid; it must be > 0 (epochs)")


def learner_names() -> list[str]:
    return list(LEARNERS)


def get_learner(name: str) -> type[Learner]:
    if name not in LEARNERS:
        raise ConfigError(f"unknown learner '{name}'; choose one of: {', '.join(LEARNERS)} (`dspt learners` lists "
                          "them)")
    return LEARNERS[name]
