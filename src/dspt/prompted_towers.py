"""CLIP's towers run block by block, with learned prompt tokens put in at chosen layers (VPT, MaPLe).

The image tower follows the convention of the released VPT-on-CLIP and MaPLe code: the prompt tokens are
appended after the patch tokens, after the positional embedding (so they carry none) and through `ln_pre`;
before each deeper layer i < depth the last P tokens are replaced by that layer's own prompts. The pooled
output is open_clip's own (`_pool`) on the sequence without the prompt tokens, so 'tok' and 'avg' pooling are
both exact. The text tower replaces the context positions 1..n_ctx before each deeper layer (MaPLe).

Every module of the towers stays frozen: only the prompts passed in carry gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone
from .errors import BackboneError


def image_tower(backbone: Backbone, learner: str) -> nn.Module:
    """The ViT image tower of `backbone`; a tower that cannot take prompt tokens is refused in one line."""
    from open_clip.transformer import VisionTransformer

    visual = backbone.model.visual
    name = getattr(backbone, "model_name", type(backbone.model).__name__)
    if not isinstance(visual, VisionTransformer):
        raise BackboneError(f"learner '{learner}' prompts the image tower's tokens, but model '{name}' has a "
                            f"{type(visual).__name__} image tower (not a ViT); use a ViT model (ViT-B-16, ...) or "
                            "a text-side learner (coop, kgcoop, cocoop)")
    if getattr(visual, "attn_pool", None) is not None:
        raise BackboneError(f"learner '{learner}' cannot prompt model '{name}': its image tower pools with "
                            "attention (CoCa-style); use a CLIP ViT with token or average pooling")
    return visual


def check_tower_config(model_name: str, learner: str, depth: int, both: bool) -> None:
    """Refuse, from open_clip's config alone (before any image is read), an image tower that cannot take prompt
    tokens or a depth beyond its layers; a config open_clip does not describe is checked when the model is built."""
    import open_clip

    cfg = open_clip.get_model_config(model_name) or {}
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    layers = vision.get("layers")
    if vision.get("timm_model_name") or isinstance(layers, (list, tuple)):
        kind = f"timm's {vision['timm_model_name']}" if vision.get("timm_model_name") else "a ResNet"
        raise BackboneError(f"learner '{learner}' prompts the image tower's tokens, but model '{model_name}' has "
                            f"{kind} image tower (not open_clip's ViT); use a ViT model (ViT-B-16, ...) or a "
                            "text-side learner (coop, kgcoop, cocoop)")
    if isinstance(layers, int):
        limit = min(layers, text.get("layers", layers)) if both else layers
        what = "shorter tower" if both else "image tower"
        if depth > limit:
            raise BackboneError(f"learner '{learner}': depth {depth} is beyond the {what}'s {limit} layers; pass "
                                f"--learner-opt depth=N with N <= {limit}")


def image_layers(backbone: Backbone) -> int:
    return len(backbone.model.visual.transformer.resblocks)


def text_layers(backbone: Backbone) -> int:
    from .prompt import text_parts

    return len(text_parts(backbone.model).transformer.resblocks)


def prompted_image_features(visual: nn.Module, pixels: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    """pixels [B, 3, H, W]; prompts[0] [P, W] at the input, prompts[i] [P, W] replacing them before block i
    -> unnormalised image features [B, E]."""
    x = visual._embeds(pixels)  # conv, class token, positional embedding, patch dropout, ln_pre
    b, n = x.shape[0], prompts[0].shape[0]
    x = torch.cat([x, visual.ln_pre(prompts[0].to(x.dtype)).unsqueeze(0).expand(b, -1, -1)], dim=1)
    first = visual.transformer.batch_first
    x = x if first else x.transpose(0, 1)
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(prompts):
            deep = prompts[i].to(x.dtype)
            if first:
                x = torch.cat([x[:, :-n], deep.unsqueeze(0).expand(b, -1, -1)], dim=1)
            else:
                x = torch.cat([x[:-n], deep.unsqueeze(1).expand(-1, b, -1)], dim=0)
        x = block(x)
    x = x if first else x.transpose(0, 1)
    pooled, _ = visual._pool(x[:, :-n])
    return pooled @ visual.proj if visual.proj is not None else pooled


def deep_text_features(text: nn.Module, prompts: torch.Tensor, eos: torch.Tensor, deep: list[torch.Tensor],
                       length: int) -> torch.Tensor:
    """prompts [C, L, D] token embeddings whose positions 1..n_ctx are the context; deep[i - 1] [n_ctx, D]
    replaces them before text block i -> unnormalised class features [C, E]. Only the first `length` positions
    run (the caller cuts a causal tower after the last EOS)."""
    x = prompts[:, :length] + text.positional_embedding[:length].to(prompts.dtype)
    mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
    c = x.shape[0]
    first = text.transformer.batch_first
    x = x if first else x.transpose(0, 1)
    for i, block in enumerate(text.transformer.resblocks):
        if 0 < i <= len(deep):
            ctx = deep[i - 1].to(x.dtype)
            n = ctx.shape[0]
            if first:
                x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(c, -1, -1), x[:, 1 + n:]], dim=1)
            else:
                x = torch.cat([x[:1], ctx.unsqueeze(1).expand(-1, c, -1), x[1 + n:]], dim=0)
        x = block(x, attn_mask=mask)
    x = x if first else x.transpose(0, 1)
    x = text.ln_final(x[torch.arange(c, device=x.device), eos])
    proj = text.text_projection
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj if proj is not None else x
