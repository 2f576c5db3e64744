"""One run's configuration: a flat dataclass, resolved once and saved with the run (no config layers)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .backbone import PRECISIONS
from .losses import get_loss
from .noise import NOISE_TYPES
from .prompt import POSITIONS
from .errors import ConfigError

#: Fields that change where or how fast a run executes, not what it computes.
EXECUTION_FIELDS = ("output", "cache_dir", "workers", "results", "progress", "device", "download")




def protocol_epochs(shots: int) -> int:
    """CoOp's schedule: 200 epochs for 8-16 shots, 100 for 2-4, 50 for 1 shot or the full split."""
    if shots <= 0 or shots == 1:
        return 50
    return 100 if shots <= 4 else 200


@dataclass
class RunConfig:
    # data
    data: str | None = None
    dataset: str = "folder"
    root: str | None = None  # folder holding the benchmark datasets (default $DSPT_DATA); --data wins
    test_data: str | None = None
    test_fraction: float = 0.2
    classnames: str | None = None
    shots: int = 16  # per class; 0 = the full training split
    skip_bad_images: bool = False
    download: bool = False  # fetch a missing benchmark with torchvision (needs internet)
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
    n_ctx: int = 16
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = "end"
    template: str | None = None  # None: the dataset's template (CoOp's per dataset; "a photo of a {}." for folders)
    # optimisation (CoOp protocol defaults)
    loss: str = "dspt"
    loss_options: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None  # None: protocol_epochs(shots)
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
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
    workers: int = 0
    progress: bool = True

    def resolved(self) -> "RunConfig":
        """Defaults filled in and every option checked; raises ConfigError with the fix."""
        cfg = dataclasses.replace(self, loss_options=dict(self.loss_options))
        if cfg.epochs is None:
            cfg.epochs = protocol_epochs(cfg.shots)
        cfg._resolve_data()
        cfg.validate()
        if cfg.output is None:
            rate = f"{cfg.noise_rate:g}"
            weights = Path(cfg.checkpoint).stem if cfg.checkpoint else (cfg.pretrained or "random")
            cfg.output = str(Path("dspt_runs") / f"{Path(cfg.data or cfg.dataset).name}-{cfg.model}-{weights}-"
                             f"{cfg.noise}{rate}-{cfg.loss}-k{cfg.shots}-s{cfg.seed}")
        if cfg.results is None:
            cfg.results = str(Path(cfg.output).parent / "results.csv")
        return cfg

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
                self.fp = int(math.floor(self.noise_rate * self.shots + 0.5))
            elif self.noise_rate and abs(self.noise_rate - self.fp / self.shots) > 1e-9:
                raise ConfigError(f"--fp {self.fp} of --shots {self.shots} is rate {self.fp / self.shots:g}, not "
                                  f"--noise-rate {self.noise_rate:g}; give one of them")
            if not 0 <= self.fp < self.shots:
                raise ConfigError(f"--fp {self.fp} must be in [0, {self.shots - 1}] for {self.shots} shots")
            self.noise_rate = self.fp / self.shots
        elif self.fp is not None:
            raise ConfigError(f"--fp is for --noise symflip / pairflip, not '{self.noise}'")

    def validate(self) -> None:
        if self.data is None and self.dataset in ("folder", "csv"):
            raise ConfigError("no data given; pass --data FOLDER (one sub-folder of images per class)")
        if self.data is None and self.root is None and self.dataset not in ("folder", "csv"):
            raise ConfigError(f"no data root for {self.dataset}; pass --root DIR (the folder holding the benchmark "
                              "datasets, laid out as CoOp's DATASETS.md says) or set DSPT_DATA")
        if self.noise != "given" and (self.noise_file or self.label_set):
            raise ConfigError("--noise-file / --label-set hold real noisy labels; use them with --noise given")
        if self.noise == "given" and self.noise_rate:
            raise ConfigError("--noise given uses the labels shipped with the data; drop --noise-rate")
        rate = self.noise_rate
        if not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0.0 <= rate < 1.0:
            raise ConfigError(f"noise rate {rate} is outside [0, 1); pass a fraction such as 0.4")
        if self.noise not in NOISE_TYPES:
            raise ConfigError(f"unknown noise type '{self.noise}'; choose one of: {', '.join(sorted(NOISE_TYPES))}")
        try:
            get_loss(self.loss, **self.loss_options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
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
                  ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("views", self.views >= 0, ">= 0"), ("n_ctx", self.n_ctx >= 1, ">= 1"),
                  ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("test_fraction", 0 < self.test_fraction < 1, "inside (0, 1)"), ("seed", self.seed >= 0, ">= 0"),
                  ("crop_scale", 0 < self.crop_scale <= 1, "inside (0, 1]")]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid; it must be {rule}")
        if self.pretrained and self.checkpoint:
            raise ConfigError("give either --pretrained TAG or --checkpoint FILE, not both")

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
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(yaml.safe_load(fh) or {})

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
