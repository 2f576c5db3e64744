"""Frozen CLIP backbone through open_clip: model, tokenizer, transforms, precision.

The backbone is identified by (model name, pretrained tag or checkpoint hash); that identity is part of
every feature-cache key, so two different weights never share cached features.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import torch
from torchvision import transforms as T

import open_clip
from open_clip.transformer import QuickGELU

from .errors import BackboneError
from .io import file_sha256  # noqa: F401 - re-exported: callers import it from here

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

#: The package's own small configs: random weights build in a fraction of a second on the CPU.
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 with BF16, or AMX: oneDNN's bf16 kernels). Elsewhere torch
    emulates bf16, and a text-tower-sized bf16 matmul ran about 100x slower than fp32 (an AVX2 EPYC)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: torch.device) -> None:
    """One line, before any work, for a precision the device cannot compute in."""
    if precision not in PRECISIONS:
        raise BackboneError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision == "fp16":
        raise BackboneError("--precision fp16 needs a CUDA GPU (the CPU has no fast fp16 and no loss scaling); "
                            "on the CPU use --precision fp32, or bf16 where the CPU has it")
    if device.type == "cpu" and precision == "bf16" and not cpu_bf16_supported():
        raise BackboneError("--precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX); this one has "
                            f"{torch.backends.cpu.get_cpu_capability()}, where bf16 is emulated and far slower than "
                            "fp32; use --precision fp32")



@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: Callable
    model_name: str
    weights_id: str  # "openai", "sha256:<hex>" of a checkpoint file, or "random:<seed>"
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    precision: str = "fp32"
    crop_scale: float = 0.08  # smallest area fraction of the training crop (CoOp: 0.08)
    hflip: bool = True  # CoOp flips; digits, text and other handed images must not be flipped
    # the rest of open_clip's preprocess config of these weights (the test transform is exactly open_clip's)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    quick_gelu: bool = False  # the activation the model was built with (part of every feature-cache key)

    @property
    def text(self) -> torch.nn.Module:
        """The module that owns the text tower's parts (CLIP keeps them on itself, CustomTextCLIP in .text)."""
        return getattr(self.model, "text", None) or self.model

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().clamp(max=100.0)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on a GPU; bf16 autocast on a CPU that computes bf16 natively (`cpu_bf16_supported`);
        otherwise fp32. Only the towers run under it: logits, softmaxes and losses are computed outside, in
        fp32 (DSPT's logit scale of 100 must not round)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        if self.device.type == "cpu" and self.precision == "bf16" and cpu_bf16_supported():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def test_transform(self) -> Callable:
        """open_clip's own evaluation preprocessing for these weights (`create_model_and_transforms(...)[2]`):
        its resize mode and interpolation, centre crop, RGB conversion, normalisation."""
        cfg = open_clip.transform.PreprocessCfg(
            size=self.image_size, mean=tuple(self.mean), std=tuple(self.std), interpolation=self.interpolation,
            resize_mode=self.resize_mode, fill_color=self.fill_color)
        return open_clip.transform.image_transform_v2(cfg, is_train=False)

    def train_transform(self) -> Callable:
        """CoOp's training augmentation: random-resized-crop (area `crop_scale`-1) + horizontal flip."""
        return T.Compose([
            T.RandomResizedCrop(self.image_size, scale=(self.crop_scale, 1.0),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5 if self.hflip else 0.0),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image features."""
        with self.autocast():
            feats = self.model.encode_image(images.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text features of plain prompts (zero-shot classifier)."""
        tokens = self.tokenizer(texts).to(self.device)
        with self.autocast():
            feats = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device '{device}' requested but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def check_model_name(model_name: str) -> None:
    """An open_clip model name (or hf-hub:/local-dir:), else BackboneError with the near names: checked
    before any work, so a typo never waits behind data loading."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    if model_name not in open_clip.list_models():
        near = [m for m in open_clip.list_models() if model_name.lower().replace("/", "-") in m.lower()][:8]
        hint = f" (did you mean: {', '.join(near)})" if near else ""
        raise BackboneError(
            f"unknown model '{model_name}'{hint}; run `dspt models` for the list "
            f"(open_clip names use dashes, e.g. ViT-B-32, RN50; offline: {', '.join(TINY_MODELS)})"
        )


def _offline_mode() -> bool:
    """huggingface_hub's offline mode: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), also when set after import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.is_offline_mode()) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub reads only its local cache (no request at all) inside this block."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _hub_host(model_name: str, tag: str) -> str:
    """The host the weights come from (for messages only: nothing here connects to it)."""
    from huggingface_hub import constants

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if cfg.get("hf_hub") or model_name.startswith("hf-hub:"):
        url = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    else:
        url = cfg.get("url", "")
    return urlparse(url).hostname or "the model hub"


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (open_clip and huggingface_hub wrap the real one), as one short line."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None \
            and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cache_entry(path: str) -> str:
    """What to delete for a bad cached file: its huggingface_hub repo folder (models--org--name), else the file."""
    for parent in Path(path).parents:
        if parent.name.startswith("models--"):
            return str(parent)
    return str(path)


def _not_cached(model_name: str, tag: str) -> BackboneError:
    from huggingface_hub import constants

    return BackboneError(f"'{model_name}' weights '{tag}' are not in the local cache ({constants.HF_HUB_CACHE}) and "
                         "offline mode is on (HF_HUB_OFFLINE); download them once on a machine with internet "
                         "(open_clip caches them there), or pass --checkpoint FILE")


def _download_failed(model_name: str, tag: str, exc: BaseException) -> BackboneError:
    host = _hub_host(model_name, tag)
    return BackboneError(f"could not download '{model_name}' weights '{tag}' from {host} ({_root_cause(exc)}); "
                         "check the connection (behind a proxy set HTTPS_PROXY, for a mirror set HF_ENDPOINT), "
                         "or pass --checkpoint FILE")


def _create_pretrained(model_name: str, tag: str) -> torch.nn.Module:
    """open_clip model with the tag's weights: the local cache first (instant, and all an offline machine has),
    then a real download unless offline mode is on. huggingface_hub / open_clip make every request themselves
    (their proxy settings, endpoint and timeouts); nothing here opens a connection.

    Three failures, three messages: not cached while offline; the download failed (names the host); the cached
    file does not load (corrupt or truncated: names the folder to delete).
    """
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return _create_from_schema(model_name, tag)
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    path, cache_miss = None, None
    try:  # open_clip's own lookup (same file, same safetensors preference as create_model), cache only
        with _hub_offline():
            path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:  # open_clip reports every file it cannot find as FileNotFoundError
        cache_miss = exc
    if not path:
        if _offline_mode():
            raise _not_cached(model_name, tag) from cache_miss
        try:
            path = open_clip.pretrained.download_pretrained(cfg)
        except Exception as exc:
            raise _download_failed(model_name, tag, exc) from exc
    try:  # the file is in the cache now: build from it without any request
        with _hub_offline():
            # OpenAI's weights were trained with QuickGELU, which open_clip's plain config names (RN50,
            # ViT-B-16) do not use: build the activation the weights were trained with, not just warn about it.
            return open_clip.create_model(model_name, pretrained=tag, device="cpu",
                                          force_quick_gelu=bool((cfg or {}).get("quick_gelu")))
    except Exception as exc:
        raise BackboneError(
            f"the cached '{model_name}' weights '{tag}' ({path}) are corrupt or truncated ({_root_cause(exc)}); "
            f"delete {_cache_entry(path)} and run again to download them afresh, or pass --checkpoint FILE"
        ) from exc


def _create_from_schema(model_name: str, tag: str) -> torch.nn.Module:
    """'hf-hub:org/repo' / 'local-dir:PATH' names: open_clip fetches config and weights itself."""
    try:
        with _hub_offline():
            return open_clip.create_model(model_name, device="cpu", require_pretrained=True)
    except Exception as exc:
        cache_miss = exc
    if model_name.startswith("local-dir:"):
        raise BackboneError(f"could not load '{model_name}' ({_root_cause(cache_miss)}); the folder needs "
                            "open_clip_config.json and a weights file") from cache_miss
    if _offline_mode():
        raise _not_cached(model_name, tag) from cache_miss
    try:
        return open_clip.create_model(model_name, device="cpu", require_pretrained=True)
    except Exception as exc:
        raise _download_failed(model_name, tag, exc) from exc


def load_backbone(
    model_name: str,
    pretrained: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | None = "cpu",
    precision: str = "fp32",
    init_seed: int = 0,
) -> Backbone:
    """Build a frozen open_clip model.

    `pretrained` is an open_clip tag (downloaded by open_clip on a machine with internet); `checkpoint`
    a local state-dict file (.pt/.bin/.safetensors). With neither, weights are random from `init_seed`
    (tests and timing only).
    """
    if precision not in PRECISIONS:
        raise BackboneError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if pretrained and checkpoint:
        raise BackboneError("give either --pretrained TAG or --checkpoint FILE, not both")
    check_model_name(model_name)
    dev = resolve_device(device)
    check_precision(precision, dev)

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise BackboneError(f"checkpoint file '{path}' not found; pass the path of a CLIP state-dict file")
        weights_id = "sha256:" + file_sha256(path)
        try:
            model = open_clip.create_model(model_name, pretrained=str(path), device="cpu")
        except Exception as exc:  # open_clip raises many kinds for a wrong file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BackboneError(
                f"'{path}' is not a CLIP checkpoint for model '{model_name}' ({first}); "
                "check the file and that --model matches the architecture it was trained with"
            ) from exc
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if not model_name.startswith(("hf-hub:", "local-dir:")) and pretrained not in tags:
            raise BackboneError(
                f"unknown pretrained tag '{pretrained}' for model '{model_name}'; "
                + (f"choose one of: {', '.join(tags)}" if tags else
                   "it has no pretrained weights: pass --pretrained none (random weights) or --checkpoint FILE")
            )
        model = _create_pretrained(model_name, pretrained)
        weights_id = pretrained
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: intended here
            try:
                model = open_clip.create_model(model_name, pretrained=None, device="cpu")
            finally:
                logging.disable(logging.NOTSET)
        weights_id = f"random:{init_seed}"

    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        weights_id=weights_id,
        image_size=size,
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        device=dev,
        precision=precision,
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
        fill_color=int(cfg.get("fill_color", 0)),
        quick_gelu=any(isinstance(m, QuickGELU) for m in model.modules()),
    )


def iter_models() -> Iterator[tuple[str, list[str]]]:
    """(model name, pretrained tags) for every model open_clip knows, the tiny ones included."""
    for name in open_clip.list_models():
        yield name, open_clip.list_pretrained_tags_by_model(name)
