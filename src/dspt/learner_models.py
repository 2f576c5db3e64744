"""The prompt learners beyond CoOp's context, as modules around the frozen backbone (`dspt.learners` holds
their registry entries and defaults).

Each model holds only its own parameters (the backbone is kept outside its state) and maps a step's inputs to
logits: cached image features for CoCoOp, pixels for the image-side learners (VPT, MaPLe, PromptSRC). KgCoOp is CoOp's
prompt plus a penalty and trains in CoOp's batched loop (`kg_penalty`).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .errors import BackboneError, ConfigError
from .memory import RowBudget
from .prompt import PromptLearner, TextEncoder, text_parts
from .prompted_towers import deep_text_features, image_layers, image_tower, prompted_image_features, text_layers


def kg_penalty(text: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KgCoOp's knowledge-guided term: 1 - mean over classes of the cosine between the learned prompt's class
    features `text` [C, E] and the hand-crafted prompt's `reference` [C, E] (as its released code computes
    it; for unit vectors this is half the mean squared distance the paper writes)."""
    return 1.0 - F.cosine_similarity(text.float(), reference.float(), dim=-1, eps=1e-7).mean()


def _seeded_normal(shape: tuple[int, ...], seed: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


class TunedModel(nn.Module):
    """A learner's trainable part around a frozen backbone: `logits(x)` for a step's inputs `x`."""

    learner_name: str = ""
    image_input: str = "features"  # "features": cached [B, E] image features; "pixels": [B, 3, H, W] images

    def __init__(self, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str):
        super().__init__()
        self.__dict__["backbone"] = backbone  # not a submodule: the state holds the learner's parameters only
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.options, self.template = dict(options), template

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.backbone.autocast()

    def trainable(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def meta(self) -> dict[str, Any]:
        """Everything that rebuilds this learner around its saved parameters."""
        return {"learner": self.learner_name, "learner_options": self.options, "classnames": self.classnames,
                "template": self.template}

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image features of a step's inputs (cached features pass through)."""
        return x.float()

    def class_features(self, anchor: torch.Tensor) -> torch.Tensor:
        """[C, E] normalised class features (an image-conditioned learner: those of the image `anchor` [1, E])."""
        return self.text_features()

    def penalty(self) -> torch.Tensor | None:
        """A learner's own regularisation of the last training step (PromptSRC), added to the run's loss."""
        return None

    def aggregate_weights(self, epochs: int) -> list[float] | None:
        """Per-epoch weights whose weighted average of the epochs' parameters is the final prompt (PromptSRC's
        Gaussian aggregation); None: the last epoch's parameters."""
        return None

    def classify(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of normalised image features [B, E] (what `image_features` gives)."""
        return self.backbone.logit_scale * image_features.float() @ self.text_features().t()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of a step's inputs (cached features or pixels, as `image_input` says)."""
        return self.classify(self.image_features(x))



class CoCoOpModel(TunedModel):
    """CoOp's context plus a meta-net token per image: context_m + pi(x) for every m, pi = Linear(E, E/r) - ReLU -
    Linear(E/r, D) on the image's normalised features (CoCoOp's `meta_net`). Every image has its own prompts, so
    the text tower runs B x C prompts per step; with a causal tower each image's [SOS | context] runs once and
    the class tails against it (`TextEncoder.forward_runs`), exactly as the full-length computation."""

    learner_name = "cocoop"
    image_input = "features"

    def __init__(self, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str,
                 n_ctx: int, ctx_init: str | None, seed: int = 0, chunk: int | RowBudget | None = None):
        super().__init__(backbone, classnames, options, template)
        self.prompt = PromptLearner(backbone, classnames, n_ctx, ctx_init, False, "end", seed=seed)
        width = self.prompt.ctx.shape[-1]
        embed = self._embed_dim()
        hidden = max(embed // int(options["reduction"]), 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.meta_net = nn.Sequential(nn.Linear(embed, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.meta_net.to(self.prompt.ctx.device)
        self.__dict__["encoder"] = TextEncoder(backbone)
        self.chunk = chunk

    def _embed_dim(self) -> int:
        with torch.no_grad():
            return int(self.backbone.encode_texts(["x"]).shape[-1])

    def meta(self) -> dict[str, Any]:
        return super().meta() | {"n_ctx": self.prompt.n_ctx, "ctx_init": self.prompt.ctx_init}

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features [B, E] -> each image's normalised class features [B, C, E]."""
        prompt, encoder = self.prompt, self.encoder
        b, c = image_features.shape[0], prompt.num_classes
        bias = self.meta_net(image_features.to(prompt.ctx.dtype))  # [B, D]
        ctx = prompt.ctx.unsqueeze(0) + bias.unsqueeze(1)  # [B, n_ctx, D]
        length = prompt.max_eos + 1 if encoder.causal else prompt.context_length
        with self.autocast():
            if encoder.usable_prefix(1 + prompt.n_ctx, prompt.min_eos):
                heads = torch.cat([prompt.token_prefix[:1].expand(b, -1, -1), ctx.to(prompt.token_prefix.dtype)], 1)
                feats = encoder.forward_runs(heads, prompt.token_suffix[:, :length - 1 - prompt.n_ctx], prompt.eos,
                                             self.chunk)
            else:
                prompts = torch.cat([prompt(length, ctx[i]) for i in range(b)])
                feats = encoder.forward_plain(prompts, prompt.eos.repeat(b), self.chunk)
        return F.normalize(feats.float(), dim=-1).view(b, c, -1)

    def class_features(self, anchor: torch.Tensor) -> torch.Tensor:
        return self.text_features(anchor)[0]

    def classify(self, image_features: torch.Tensor) -> torch.Tensor:
        x = image_features.float()
        return self.backbone.logit_scale * torch.einsum("be,bce->bc", x, self.text_features(x))


def _layer_count(depth: int, layers: int, what: str, learner: str) -> int:
    depth = layers if depth == 0 else depth
    if depth > layers:
        raise ConfigError(f"learner '{learner}': depth {depth} is beyond the {what}'s {layers} layers; pass "
                          f"--learner-opt depth=N with N <= {layers}")
    return depth


class VPTModel(TunedModel):
    """Visual prompt tuning: `length` learned tokens at the image tower's input (shallow, depth 1), or new ones
    before each of the first `depth` layers (deep). The classifier is the hand-crafted prompt's class features
    (frozen), as in the VPT baseline of the CLIP prompt-learning code."""

    learner_name = "vpt"
    image_input = "pixels"

    def __init__(self, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str,
                 seed: int = 0, learner: str = "vpt"):
        super().__init__(backbone, classnames, options, template)
        self.learner_name = learner
        visual = image_tower(backbone, learner)
        depth = _layer_count(int(options["depth"]), image_layers(backbone), "image tower", learner)
        width = visual.conv1.out_channels
        dev = backbone.device
        self.prompts = nn.ParameterList([nn.Parameter(_seeded_normal((int(options["length"]), width), seed + i)
                                                      .to(dev)) for i in range(depth)])
        from .prepare import zeroshot_text_features

        self.register_buffer("text", zeroshot_text_features(backbone, self.classnames, template), persistent=False)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            feats = prompted_image_features(self.backbone.model.visual, x.to(self.backbone.device), list(self.prompts))
        return F.normalize(feats.float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return self.text


class _DeepPrompts(TunedModel):
    """What MaPLe and PromptSRC share: CoOp's context at the text tower's input and new text context before each of
    the first `depth` text layers (N(0, 0.02)), and image prompts at the same layers (`vision_prompts`)."""

    image_input = "pixels"

    def __init__(self, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str,
                 n_ctx: int, ctx_init: str | None, seed: int = 0):
        super().__init__(backbone, classnames, options, template)
        self.visual_width = image_tower(backbone, self.learner_name).conv1.out_channels
        self.depth = _layer_count(int(options["depth"]), min(image_layers(backbone), text_layers(backbone)),
                                  "shorter tower", self.learner_name)
        self.prompt = PromptLearner(backbone, classnames, n_ctx, ctx_init, False, "end", seed=seed)
        self.deep = nn.ParameterList([nn.Parameter(_seeded_normal((self.prompt.n_ctx, self.prompt.ctx.shape[-1]),
                                                                  seed + 1 + i).to(backbone.device))
                                      for i in range(self.depth - 1)])
        self.causal = TextEncoder(backbone).causal

    def meta(self) -> dict[str, Any]:
        return super().meta() | {"n_ctx": self.prompt.n_ctx, "ctx_init": self.prompt.ctx_init}

    def text_features(self) -> torch.Tensor:
        prompt = self.prompt
        length = prompt.max_eos + 1 if self.causal else prompt.context_length
        with self.autocast():
            feats = deep_text_features(text_parts(self.backbone.model), prompt(length), prompt.eos, list(self.deep),
                                       length)
        return F.normalize(feats.float(), dim=-1)

    def vision_prompts(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            feats = prompted_image_features(self.backbone.model.visual, x.to(self.backbone.device),
                                            self.vision_prompts())
        return F.normalize(feats.float(), dim=-1)


class MaPLeModel(_DeepPrompts):
    """Multi-modal prompt learning: the deep text context of `_DeepPrompts`; each layer's image prompts are a
    learned linear map of that layer's text context (one map per layer), put into the image tower at the same
    layers. Class token at the end."""

    learner_name = "maple"

    def __init__(self, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str,
                 n_ctx: int, ctx_init: str | None, seed: int = 0):
        super().__init__(backbone, classnames, options, template, n_ctx, ctx_init, seed)
        width_t, width_v = self.prompt.ctx.shape[-1], self.visual_width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.proj = nn.Linear(width_t, width_v)
            one = nn.Linear(width_t, width_v)  # MaPLe deep-copies one layer: every map starts the same
        self.deep_proj = nn.ModuleList([copy.deepcopy(one) for _ in range(self.depth - 1)])
        self.to(backbone.device)

    def vision_prompts(self) -> list[torch.Tensor]:
        return [self.proj(self.prompt.ctx)] + [p(d) for p, d in zip(self.deep_proj, self.deep)]


class PromptSRCModel(_DeepPrompts):
    """PromptSRC: independent deep prompts in both towers (the deep text context of `_DeepPrompts`; `length` image
    tokens at the first `depth` image layers), regulated by the frozen CLIP: `penalty()` adds text_weight x
    L1(text features, the template's) + image_weight x L1(image features, the frozen tower's) + KL(frozen CLIP's
    class distribution || the prompted one) (sum / elements, as its code), and the prompts of every epoch are
    averaged with Gaussian weights N(gpa_mean, gpa_std) over epochs 1..E (`aggregate_weights`), the average being
    the final prompt."""

    learner_name = "promptsrc"

    def __init__(self, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str,
                 n_ctx: int, ctx_init: str | None, seed: int = 0):
        super().__init__(backbone, classnames, options, template, n_ctx, ctx_init, seed)
        self.vision = nn.ParameterList([nn.Parameter(_seeded_normal((int(options["length"]), self.visual_width),
                                                                    seed + 101 + i).to(backbone.device))
                                        for i in range(self.depth)])
        from .prepare import zeroshot_text_features

        self.register_buffer("frozen_text", zeroshot_text_features(backbone, self.classnames, template),
                             persistent=False)
        self._step: tuple[torch.Tensor, ...] | None = None

    def vision_prompts(self) -> list[torch.Tensor]:
        return list(self.vision)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        image, text = self.image_features(x), self.text_features()
        if self.training and torch.is_grad_enabled():  # what penalty() regulates: this step's features
            self._step = (x, image, text)
        return self.backbone.logit_scale * image @ text.t()

    def penalty(self) -> torch.Tensor:
        """The self-regulating terms of the last training step's `logits` (PromptSRC's trainers/promptsrc.py)."""
        if self._step is None:
            raise RuntimeError("promptsrc: penalty() before a training step's logits()")
        x, image, text = self._step
        self._step = None
        frozen_image = self.backbone.encode_images(x).float()  # the frozen tower's features of the same images
        frozen_text, scale = self.frozen_text.float(), self.backbone.logit_scale.float()
        logits = scale * image @ text.t()
        frozen_logits = scale * frozen_image @ frozen_text.t()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(frozen_logits, -1), reduction="sum",
                      log_target=True) / logits.numel()
        return (self.options["text_weight"] * F.l1_loss(text, frozen_text)
                + self.options["image_weight"] * F.l1_loss(image, frozen_image) + kl)

    def aggregate_weights(self, epochs: int) -> list[float]:
        """Gaussian prompt aggregation: epoch e's (1-based) weight, N(e; gpa_mean, gpa_std) normalised over 1..E."""
        import math

        mean, std = self.options["gpa_mean"], self.options["gpa_std"]
        dens = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
        total = sum(dens)
        if total == 0.0:  # every epoch far from the mean: the last one carries the average
            return [0.0] * (epochs - 1) + [1.0]
        return [d / total for d in dens]


def build_model(name: str, backbone: Backbone, classnames: list[str], options: dict[str, Any], template: str,
                n_ctx: int, ctx_init: str | None, seed: int = 0, chunk: int | RowBudget | None = None) -> TunedModel:
    """The module of a registered learner that is not CoOp's plain context (its spec's `module`; coop and kgcoop
    train as `PromptLearner`s in the batched loop)."""
    from .learners import get_learner

    kind = globals().get(get_learner(name).module or "")
    if kind is None:
        raise BackboneError(f"learner '{name}' has no module; please report this as a dspt bug")
    if kind is CoCoOpModel:
        return kind(backbone, classnames, options, template, n_ctx, ctx_init, seed, chunk)
    if kind in (MaPLeModel, PromptSRCModel):
        return kind(backbone, classnames, options, template, n_ctx, ctx_init, seed)
    return kind(backbone, classnames, options, template, seed, learner=name)
