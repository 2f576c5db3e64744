"""One run's configuration: a flat dataclass, resolved once and saved with the run (no config layers).

Every value is coerced to its field's type and checked before any work starts, whichever way it came in:
the command line, a YAML grid (PyYAML reads `2e-3` as a string) or Python. `resolved()` fills in the
defaults that depend on other fields, so `config.yaml` records what ran.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .backbone import PRECISIONS, BackboneError, check_model_name
from .errors import ConfigError
from .losses import get_loss
from .noise import NOISE_TYPES
from .numbers import round_half_up
from .prompt import POSITIONS

#: Fields that change where or how fast a run executes, not what it computes.
EXECUTION_FIELDS = ("output", "cache_dir", "workers", "results", "progress", "device", "download", "max_memory")
#: Spellings of "no value" accepted for optional fields (the command line and YAML cannot write None).
NONE_WORDS = ("none", "null", "None", "~", "")
DEFAULT_N_CTX = 16
VAL_LABELS = ("noisy", "clean")
#: Fields spelled out in the default run-folder name; every other non-default field goes into its hash.
NAMED_FIELDS = ("data", "dataset", "model", "pretrained", "checkpoint", "noise", "noise_rate", "loss", "shots",
                "seed", "lr", "epochs")


def default_epochs(learner: str, shots: int) -> int:
    """CoOp's protocol epochs for its shots, or the epochs of the learner's paper (its 16-shot config)."""
    from .learners import get_learner

    spec = get_learner(learner)
    return protocol_epochs(shots) if spec.epochs_by_shots else spec.schedule["epochs"]


def protocol_epochs(shots: int) -> int:
    """CoOp's schedule: 200 epochs for 8-16 shots, 100 for 2-4, 50 for 1 shot or the full split."""
    if shots <= 0 or shots == 1:
        return 50
    return 100 if shots <= 4 else 200


def _type_error(name: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"--{name.replace('_', '-')} {value!r} is not {what}; fix the value in the command or grid")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int, float, bool, str, X | None, dict[str, float]); ConfigError otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip() in NONE_WORDS):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if value is None:
        raise _type_error(name, value, f"a {getattr(hint, '__name__', hint)} (this option cannot be empty)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise _type_error(name, value, "true or false")
    if hint is int:
        if isinstance(value, bool):
            raise _type_error(name, value, "an integer")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).strip()) if not isinstance(value, float) else value
        except ValueError:
            raise _type_error(name, value, "an integer") from None
        if not math.isfinite(number) or number != int(number):
            raise _type_error(name, value, "an integer")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise _type_error(name, value, "a number")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise _type_error(name, value, "a number") from None
        if not math.isfinite(number):
            raise _type_error(name, value, "a finite number")
        return number
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise _type_error(name, value, "text")
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise _type_error(name, value, "a mapping NAME: VALUE")
        _, vtype = typing.get_args(hint)
        if set(typing.get_args(vtype)) == {float, str}:  # a number where it reads as one, else a word
            return {str(k): _number_or_word(f"{name} {k}", v) for k, v in value.items()}
        return {str(k): _coerce(f"{name} {k}", v, vtype) for k, v in value.items()}
    raise TypeError(f"RunConfig field {name} has an unsupported type {hint}")  # a bug in this module


def _number_or_word(name: str, value: Any) -> float | str:
    try:
        return _coerce(name, value, float)
    except ConfigError:
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise


def coerce_field(name: str, value: Any) -> Any:
    """`value` as the declared type of RunConfig field `name`, with the spellings the command line accepts:
    'none' for an empty optional, 'all' shots, 'coop' validation shots, '2e-3' for a number."""
    hints = _field_types()
    if name not in hints:
        raise ConfigError(f"unknown option '{name}'; valid: {', '.join(sorted(hints))}")
    if name == "shots" and isinstance(value, str) and value.strip() in ("all", "full"):
        return 0
    if name == "val_shots" and isinstance(value, str) and value.strip() == "coop":
        return "coop"
    return _coerce(name, value, hints[name])


@functools.lru_cache(maxsize=None)
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


@functools.lru_cache(maxsize=64)
def phrase_tokens(model: str, phrase: str) -> int:
    """Number of tokens of `phrase` under `model`'s tokenizer (what --ctx-init makes the context length)."""
    import open_clip

    try:
        tokens = open_clip.get_tokenizer(model)([phrase])[0]
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a bad --model / --ctx-init
        raise ConfigError(f"cannot tokenize --ctx-init '{phrase}' for model '{model}' ({type(exc).__name__}); "
                          "check --model") from None
    return int((tokens != 0).sum()) - 2  # minus SOS and EOS


@dataclass
class RunConfig:
    # data
    data: str | None = None
    dataset: str = "folder"
    root: str | None = None  # folder holding the benchmark datasets (default $DSPT_DATA); --data wins
    test_data: str | None = None
    test_fraction: float = 0.2
    split_seed: int = 1  # the held-out test split of data without a test folder: fixed, not the run seed
    classnames: str | None = None
    shots: int = 16  # per class; 0 = the full training split
    skip_bad_images: bool = False
    exclude: str | None = None  # a file of image paths (one per line) left out of training (audit folds use it)
    download: bool = False  # fetch a missing benchmark with torchvision (needs internet)
    # validation (choosing hyperparameters; never the test split)
    val_labels: str = "noisy"  # "noisy": corrupted like the training labels (what a user has); "clean"
    val_shots: int | None = None  # per class; None: every validation image; "coop": CoOp's min(shots, 4)
    # noise
    noise: str = "sym"
    noise_rate: float = 0.0
    fp: int | None = None  # symflip/pairflip: false positives among the K shots of each class (rate = fp/shots)
    noise_file: str | None = None  # --noise given: CIFAR-N .pt file or a 'path label' list
    label_set: str | None = None  # --noise given with a CIFAR-N file: worse, aggre, random1..3, noisy
    # backbone
    model: str = "RN50"
    pretrained: str | None = "openai"
    checkpoint: str | None = None
    precision: str = "fp32"
    # prompt
    learner: str = "coop"  # which parameters prompt tuning trains: coop, or a learner of `dspt learners`
    learner_options: dict[str, float] = field(default_factory=dict)
    n_ctx: int | None = None  # None: 16, or the number of tokens of --ctx-init
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = "end"
    template: str | None = None  # None: the dataset's template (CoOp's per dataset; "a photo of a {}." for folders)
    # optimisation (CoOp protocol defaults)
    loss: str = "dspt"
    loss_options: dict[str, float] = field(default_factory=dict)
    method: str = "plain"  # what a step does beyond the loss: plain, or a method of `dspt methods`
    method_options: dict[str, float | str] = field(default_factory=dict)
    epochs: int | None = None  # None: protocol_epochs(shots) for CoOp; another learner's paper's epochs
    batch_size: int | None = None  # None: the learner's paper's (CoOp: 32)
    lr: float | None = None  # None: CoOp's 0.002 for CE, matched to CE's first step for other losses
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    collapse_guard: bool = False  # on a collapse, restore the last healthy prompt and halve the rate (dspt.collapse)
    views: int = 10
    crop_scale: float = 0.08  # smallest area of the random-resized crop of the cached training views
    hflip: bool = True  # random horizontal flip of the training views (CoOp: on)
    seed: int = 1
    path: str = "fast"  # "fast": cached features + truncated prompts; "reference": CoOp's online computation
    # execution
    output: str | None = None
    results: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    max_memory: float | None = None  # GB for a training step above the model (None: a share of the free memory)
    workers: int = 0
    progress: bool = True

    def coerced(self) -> "RunConfig":
        """A copy with every field converted to its declared type (ConfigError naming the field otherwise)."""
        return dataclasses.replace(self, **{f.name: coerce_field(f.name, getattr(self, f.name)) for f in fields(self)})

    def resolved(self, need_data: bool = True) -> "RunConfig":
        """Types coerced, defaults filled in and every option checked; raises ConfigError with the fix.
        `need_data=False` (a plan): a benchmark may lack its data root; the registry knows its sizes."""
        cfg = self.coerced()
        cfg.loss_options = dict(cfg.loss_options)
        cfg.method_options = dict(cfg.method_options)
        cfg._resolve_learner()
        if cfg.epochs is None:
            cfg.epochs = default_epochs(cfg.learner, cfg.shots)
        if cfg.val_shots == "coop":
            cfg.val_shots = min(cfg.shots, 4) if cfg.shots > 0 else 4
        cfg._resolve_data()
        cfg._resolve_context()
        cfg.validate(need_data)
        if cfg.output is None:
            cfg.output = str(Path("dspt_runs") / cfg.default_name())
        if cfg.results is None:
            cfg.results = str(Path(cfg.output).parent / "results.csv")
        return cfg

    def _resolve_learner(self) -> None:
        """The learner's options with its defaults, and its paper's context phrase when no context is given."""
        from .learners import get_learner

        spec = get_learner(self.learner)
        self.learner_options = spec.check(dict(self.learner_options))
        if self.batch_size is None:
            self.batch_size = spec.schedule["batch_size"]
        if spec.context and self.n_ctx is None and not (self.ctx_init and self.ctx_init.strip()):
            self.ctx_init = spec.context

    def _resolve_context(self) -> None:
        """--ctx-init fixes the context length to the phrase's tokens; record that, refuse a contradiction."""
        if not self.ctx_init or not self.ctx_init.strip():
            self.ctx_init = None
            self.n_ctx = DEFAULT_N_CTX if self.n_ctx is None else self.n_ctx
            return
        check_model_name(self.model)
        n = phrase_tokens(self.model, self.ctx_init.replace("_", " ").strip())
        if self.n_ctx is not None and self.n_ctx != n:
            raise ConfigError(f"--ctx-init '{self.ctx_init}' is {n} tokens, so the context has {n} vectors, not "
                              f"--n-ctx {self.n_ctx}; drop --n-ctx or change the phrase")
        self.n_ctx = n

    def default_name(self) -> str:
        """Run-folder name: the main settings spelled out, plus a hash of every other non-default option, so
        two runs that differ in anything never share a folder."""
        rate = f"{self.noise_rate:g}"
        weights = Path(self.checkpoint).stem if self.checkpoint else (self.pretrained or "random")
        name = (f"{Path(self.data or self.dataset).name}-{self.model}-{weights}-{self.noise}{rate}-{self.loss}-"
                f"k{self.shots}-s{self.seed}")
        if self.method != RunConfig.method:
            name += f"-{self.method}"
        if self.learner != RunConfig.learner:
            name += f"-{self.learner}"
        if self.lr is not None:
            name += f"-lr{self.lr:g}"
        if self.epochs != default_epochs(self.learner, self.shots):
            name += f"-e{self.epochs}"
        defaults = RunConfig(data=self.data, dataset=self.dataset, root=self.root, model=self.model,
                             noise=self.noise, noise_rate=self.noise_rate, fp=self.fp, shots=self.shots,
                             pretrained=self.pretrained, checkpoint=self.checkpoint, learner=self.learner)
        defaults._resolve_learner()
        defaults._resolve_data()
        defaults._resolve_context()
        base = defaults.identity()
        other = {k: v for k, v in self.identity().items() if k not in NAMED_FIELDS and base.get(k) != v}
        if other:
            name += "-" + hashlib.sha256(json.dumps(other, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return name

    def _resolve_data(self) -> None:
        """Dataset name and template, data root, and the FP count / rate of symflip / pairflip."""
        from .data import DataError, dataset_template, default_data_root, resolve_dataset_name

        try:
            self.dataset = resolve_dataset_name(self.dataset)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        if self.template is None:
            self.template = dataset_template(self.dataset)
        if self.data is None and self.root is None and self.dataset not in ("folder", "csv"):
            self.root = default_data_root()
        if self.noise in ("symflip", "pairflip"):
            if self.shots < 1:
                raise ConfigError(f"{self.noise} picks false positives into K shots per class; pass --shots K (>= 1)")
            if self.fp is None:
                if not self.noise_rate:
                    raise ConfigError(f"{self.noise} needs --fp N (false positives per class, e.g. {self.shots // 2} "
                                      f"of {self.shots}) or --noise-rate FP/K")
                self.fp = round_half_up(self.noise_rate * self.shots)
            elif self.noise_rate and abs(self.noise_rate - self.fp / self.shots) > 1e-9:
                raise ConfigError(f"--fp {self.fp} of --shots {self.shots} is rate {self.fp / self.shots:g}, not "
                                  f"--noise-rate {self.noise_rate:g}; give one of them")
            if not 0 <= self.fp < self.shots:
                raise ConfigError(f"--fp {self.fp} must be in [0, {self.shots - 1}] for {self.shots} shots")
            self.noise_rate = self.fp / self.shots
        elif self.fp is not None:
            raise ConfigError(f"--fp is for --noise symflip / pairflip, not '{self.noise}'")

    def validate(self, need_data: bool = True) -> None:
        check_model_name(self.model)
        if self.data is None and self.dataset in ("folder", "csv"):
            raise ConfigError("no data given; pass --data FOLDER (one sub-folder of images per class)")
        if need_data and self.data is None and self.root is None and self.dataset not in ("folder", "csv"):
            raise ConfigError(f"no data root for {self.dataset}; pass --root DIR (the folder holding the benchmark "
                              "datasets, laid out as CoOp's DATASETS.md says) or set DSPT_DATA")
        if self.noise != "given" and (self.noise_file or self.label_set):
            raise ConfigError("--noise-file / --label-set hold real noisy labels; use them with --noise given")
        if self.exclude is not None and self.noise_file:
            raise ConfigError("--exclude cannot be combined with --noise-file (its labels are matched by position "
                              "in the full training split); leave one of them out")
        if self.noise == "given" and self.noise_rate:
            raise ConfigError("--noise given uses the labels shipped with the data; drop --noise-rate")
        rate = self.noise_rate
        if not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0.0 <= rate < 1.0:
            raise ConfigError(f"noise rate {rate} is outside [0, 1); pass a fraction such as 0.4")
        if self.noise not in NOISE_TYPES:
            raise ConfigError(f"unknown noise type '{self.noise}'; choose one of: {', '.join(sorted(NOISE_TYPES))}")
        try:
            loss_name = getattr(get_loss(self.loss, **self.loss_options), "name", self.loss)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
        from .methods import METHODS, check_method

        check_method(self.method, self.method_options)
        METHODS[self.method].check_loss(loss_name)  # a method that takes only some losses refuses the others
        self._validate_learner()
        if self.class_token_position not in POSITIONS:
            raise ConfigError(f"class token position '{self.class_token_position}' unknown; "
                              f"choose one of: {', '.join(POSITIONS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' unknown; choose one of: {', '.join(PRECISIONS)}")
        if self.path not in ("fast", "reference"):
            raise ConfigError(f"path '{self.path}' unknown; choose 'fast' or 'reference'")
        if self.template is not None and "{}" not in self.template:
            raise ConfigError(f"template '{self.template}' has no '{{}}' for the class name")
        checks = [("shots", self.shots >= 0, ">= 0"), ("epochs", self.epochs >= 1, ">= 1"),
                  ("batch_size", self.batch_size is None or self.batch_size >= 1, ">= 1"),
                  ("lr", self.lr is None or self.lr > 0, "> 0"),
                  ("views", self.views >= 0, ">= 0"), ("n_ctx", self.n_ctx >= 1, ">= 1"),
                  ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                  ("warmup_lr", self.warmup_lr > 0, "> 0"), ("split_seed", self.split_seed >= 0, ">= 0"),
                  ("val_shots", self.val_shots is None or self.val_shots >= 1, ">= 1, 'coop' or none"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("test_fraction", 0 < self.test_fraction < 1, "inside (0, 1)"), ("seed", self.seed >= 0, ">= 0"),
                  ("crop_scale", 0 < self.crop_scale <= 1, "inside (0, 1]")]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid; it must be {rule}")
        if self.val_labels not in VAL_LABELS:
            raise ConfigError(f"--val-labels '{self.val_labels}' unknown; choose 'noisy' (corrupted like the "
                              "training labels, what a user has) or 'clean'")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum {self.momentum} is invalid; it must be in [0, 1)")
        if self.pretrained and self.checkpoint:
            raise ConfigError("give either --pretrained TAG or --checkpoint FILE, not both")
        if self.max_memory is not None and not (math.isfinite(self.max_memory) and self.max_memory > 0):
            raise ConfigError(f"--max-memory {self.max_memory} is invalid; give the step's budget in GB, e.g. 1.5")

    def _validate_learner(self) -> None:
        """Pairings a learner cannot train (its model, depth and tower are checked when the model is built)."""
        from .learners import get_learner

        spec = get_learner(self.learner)
        spec.check_method(self.method)
        if spec.module and self.path != "fast":
            raise ConfigError(f"--path reference is CoOp's online computation; learner '{self.learner}' has its own "
                              "step (it never trains on a fast path to compare against); drop --path")
        if spec.layout == "shared-end" and (self.csc or self.class_token_position != "end"):
            raise ConfigError(f"learner '{self.learner}' learns one context shared by all classes, before the class "
                              "name; drop --csc and --class-token-position")
        if spec.module and spec.towers != "text":  # VPT, MaPLe, PromptSRC: a ViT deep enough
            from .prompted_towers import check_tower_config

            try:
                depth = int(spec.check(dict(self.learner_options))["depth"])  # (defaults filled in)
                check_tower_config(self.model, self.learner, depth, both=spec.towers == "both")
            except BackboneError as exc:
                raise ConfigError(str(exc)) from None
        if spec.layout == "none" and (self.csc or self.ctx_init or self.class_token_position != "end"):
            raise ConfigError(f"learner '{self.learner}' learns no text context (its classifier is the template's "
                              "class features); drop --csc, --ctx-init and --class-token-position")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the run's numbers (a resumed run must match these)."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**data).coerced()

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(yaml.safe_load(fh) or {})

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
