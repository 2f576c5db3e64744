"""CoOp prompt learner and the text encoder that runs learned prompt embeddings through CLIP's text tower.

As in CoOp, the token prefix (SOS) and suffix (class name, '.', EOS, padding) are frozen buffers; only
`ctx` is a parameter. The class token position is a fixed gather over [prefix | ctx | suffix], so
'end', 'middle' and 'front' all build the prompts in one vectorised op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone

POSITIONS = ("end", "middle", "front")


def text_parts(model: nn.Module) -> nn.Module:
    """CLIP keeps the text tower's parts on itself; CustomTextCLIP keeps them in `.text`."""
    return getattr(model, "text", None) or model


def eos_positions(tokens: torch.Tensor, model: nn.Module) -> torch.Tensor:
    text = text_parts(model)
    pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    if pool == "argmax":  # OpenAI BPE: EOT has the largest id
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id")
        return (tokens == eos_id).int().argmax(dim=-1)
    raise ValueError(f"text pooling '{pool}' is not supported by prompt tuning; use a CLIP model with EOS pooling")


class TextEncoder(nn.Module):
    """Frozen text tower over prompt embeddings; pools at EOS.

    The tower is causal, so every position up to the last EOS is unaffected by what follows: cutting the
    sequence there (`truncate=True`) gives the same features with far less work.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        text = text_parts(backbone.model)
        self.transformer = text.transformer
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)

    def forward(self, prompts: torch.Tensor, eos: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """prompts [C, L, D] token embeddings, eos [C] EOS positions -> unnormalised features [C, E]."""
        length = int(eos.max()) + 1 if truncate else prompts.shape[1]
        x = prompts[:, :length] + self.positional_embedding[:length].to(prompts.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eos]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection if self.text_projection is not None else x


class PromptLearner(nn.Module):
    """Learnable context `[V]_1..[V]_M` shared by all classes or per class (CSC)."""

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
        seed: int = 0,
    ):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class token position '{class_token_position}' unknown; choose one of {POSITIONS}")
        if not classnames:
            raise ValueError("no class names: the dataset has no classes")
        model, tokenize = backbone.model, backbone.tokenizer
        embed = text_parts(model).token_embedding
        device = embed.weight.device
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.csc, self.position = csc, class_token_position
        self.ctx_init = ctx_init

        def n_tokens(texts: list[str]) -> torch.Tensor:
            return eos_positions(tokenize(texts), model) - 1

        if ctx_init:
            ctx_init = ctx_init.replace("_", " ").strip()
            n_ctx = int(n_tokens([ctx_init])[0])
            with torch.no_grad():
                init_emb = embed(tokenize([ctx_init]).to(device))[0, 1 : 1 + n_ctx].float()
            ctx = init_emb.unsqueeze(0).repeat(len(classnames), 1, 1) if csc else init_emb
            prefix_text = ctx_init
        else:
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1 (got {n_ctx})")
            shape = (len(classnames), n_ctx, embed.weight.shape[1]) if csc else (n_ctx, embed.weight.shape[1])
            gen = torch.Generator().manual_seed(seed)
            ctx = torch.randn(shape, generator=gen) * 0.02
            prefix_text = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.to(device))

        prompts = [f"{prefix_text} {name}." for name in self.classnames]
        tokens = tokenize(prompts).to(device)
        eos = eos_positions(tokens, model)
        context_length = tokens.shape[1]
        name_lens = n_tokens(self.classnames)
        if int(eos.max()) >= context_length - 1 and int(tokens[:, -1].max()) > 0:
            too_long = [n for n, e in zip(self.classnames, eos.tolist()) if e >= context_length - 1]
            raise ValueError(f"prompt too long for the text tower's {context_length} tokens: {too_long[:3]}; "
                             "use fewer context tokens or shorter class names")
        with torch.no_grad():
            emb = embed(tokens).float()
        self.register_buffer("token_prefix", emb[:, :1].clone())
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :].clone())
        self.register_buffer("tokens", tokens)
        self.register_buffer("eos", eos)
        self.register_buffer("order", self._order(name_lens, context_length).to(device))

    def _order(self, name_lens: torch.Tensor, length: int) -> torch.Tensor:
        """Per class, which slot of [prefix | ctx | suffix] fills each output position."""
        n, rows = self.n_ctx, []
        for name_len in name_lens.tolist():
            ctx = list(range(1, 1 + n))
            name = list(range(1 + n, 1 + n + name_len))
            rest = list(range(1 + n + name_len, length))
            if self.position == "end":
                order = [0] + ctx + name + rest
            elif self.position == "front":
                order = [0] + name + ctx + rest
            else:
                half = n // 2
                order = [0] + ctx[:half] + name + ctx[half:] + rest
            rows.append(order)
        return torch.tensor(rows, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def forward(self) -> torch.Tensor:
        """Prompt token embeddings [C, L, D]."""
        c = self.num_classes
        ctx = self.ctx if self.csc else self.ctx.unsqueeze(0).expand(c, -1, -1)
        src = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)
        if self.position == "end":
            return src
        idx = self.order.unsqueeze(-1).expand(-1, -1, src.shape[-1])
        return torch.gather(src, 1, idx)

    def meta(self) -> dict:
        """Everything needed to rebuild this learner around a saved `ctx`."""
        return {
            "classnames": self.classnames,
            "n_ctx": self.n_ctx,
            "ctx_init": self.ctx_init,
            "csc": self.csc,
            "class_token_position": self.position,
        }


class PromptClassifier(nn.Module):
    """Learned prompts -> normalised class text features; logits against cached image features."""

    def __init__(self, backbone: Backbone, learner: PromptLearner, truncate: bool = True):
        super().__init__()
        self.backbone = backbone
        self.learner = learner
        self.encoder = TextEncoder(backbone)
        self.truncate = truncate

    def text_features(self) -> torch.Tensor:
        with self.backbone.autocast():
            feats = self.encoder(self.learner(), self.learner.eos, truncate=self.truncate)
        return F.normalize(feats.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        text_features = self.text_features() if text_features is None else text_features
        return self.backbone.logit_scale * image_features @ text_features.t()


def context_drift(ctx: torch.Tensor, ctx0: torch.Tensor) -> float:
    """Relative distance the context vectors moved: ||ctx - ctx0|| / ||ctx0||."""
    return float((ctx - ctx0).norm() / max(ctx0.norm().item(), 1e-12))


def mean_pairwise_cosine(text_features: torch.Tensor) -> float:
    """Mean off-diagonal cosine of class text features; near 1 means the classes collapsed together."""
    f = F.normalize(text_features.float(), dim=-1)
    c = f.shape[0]
    if c < 2:
        return math.nan
    sim = f @ f.t()
    return float((sim.sum() - sim.diagonal().sum()) / (c * (c - 1)))
