"""CoOp prompt learner and the text encoder that runs learned prompt embeddings through CLIP's text tower.

As in CoOp, the token prefix (SOS) and suffix (class name, '.', EOS, padding) are frozen buffers; only
`ctx` is a parameter. The class token position is a fixed gather over [prefix | ctx | suffix], so
'end', 'middle' and 'front' all build the prompts in one vectorised op.

The text side of the fast training path (cached image features, short prompts) lives here: prompts cut
after the last EOS, the prefix shared by all classes run once, class chunks, autocast. Each gives the same
features as CoOp's full-length computation (tests/test_prompt_speed.py pins this to 1e-5, outputs and
gradients).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import Backbone
from .errors import BackboneError, ConfigError
from .memory import RowBudget, chunk_for

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


SUPPORTED_TEXT_TOWERS = ("open_clip text transformers with EOS/argmax pooling: the OpenAI-style CLIP families "
                         "(RN50, ViT-B-16, ConvNeXt, EVA02, ...; causal towers get the fast truncated path)")


def check_prompt_tunable(backbone: Backbone) -> None:
    """Refuse, in one line, a text tower whose features CoOp prompts cannot reproduce.

    Prompt tuning replaces token embeddings and pools the EOS position of open_clip's own text transformer
    (token embedding, positional embedding, resblocks, final LayerNorm, projection). The causal towers of the
    OpenAI-style CLIP families fit, and also run the fast path (truncation, shared prefix); a bidirectional
    tower that pools at the EOS (MobileCLIP-S*) fits through the plain full-length path. Hugging Face text
    towers (open_clip's HFTextEncoder), 'last'/'first'/'mean' pooling (SigLIP) and CoCa's appended class token
    do not.
    """
    model = backbone.model
    text = text_parts(model)
    name = getattr(backbone, "model_name", type(model).__name__)
    parts = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    reasons = []
    if not all(hasattr(text, a) for a in parts) or not isinstance(getattr(text, "token_embedding", None),
                                                                    nn.Embedding):
        kind = type(text).__name__
        what = f"a Hugging Face text model ({kind})" if "HF" in kind or hasattr(text, "config") else kind
        reasons.append(f"its text tower is {what}, not an open_clip text transformer")
    else:
        pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        if pool not in ("argmax", "eos"):
            both_ways = "" if _is_causal(getattr(text, "attn_mask", None)) else " with bidirectional attention"
            reasons.append(f"its text tower pools at '{pool}'{both_ways}, not at the EOS token")
        if getattr(text, "cls_emb", None) is not None:
            reasons.append("its text tower appends a class token to the text (CoCa)")
    if reasons:
        raise BackboneError(f"model '{name}' cannot be prompt-tuned: {'; '.join(reasons)}; prompt tuning supports "
                            f"{SUPPORTED_TEXT_TOWERS}")


def _is_causal(mask: torch.Tensor | None) -> bool:
    """True for the standard causal mask (additive -inf above the diagonal, or boolean True = blocked)."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(mask[upper].all() and not mask[~upper].any())
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def _splittable(block: nn.Module) -> bool:
    """Blocks whose attention this module can run itself: open_clip's plain pre-LN ResidualAttentionBlock."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim
            and attn.in_proj_weight is not None and attn.bias_k is None and attn.bias_v is None
            and not attn.add_zero_attn and attn.dropout == 0.0)


def _qkv(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.MultiheadAttention's input projection: [B, T, D] -> q, k, v each [B, heads, T, D / heads]."""
    attn = block.attn
    b, t, d = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(b, t, 3, attn.num_heads, d // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _out(block: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Heads [B, heads, T, d] -> nn.MultiheadAttention's output projection [B, T, D]."""
    b, h, t, d = a.shape
    proj = block.attn.out_proj
    return F.linear(a.transpose(1, 2).reshape(b, t, h * d), proj.weight, proj.bias)


def _over_chunks(fn, chunk: int | RowBudget | None, per_class: tuple, shared: tuple = ()) -> torch.Tensor:
    """fn(*per_class, *shared) over slices of at most `chunk` rows (a `RowBudget`: as many as its bytes hold).

    With gradients on, each slice runs under activation checkpointing: only its output is kept and its
    forward is recomputed in backward, so peak memory is one slice's activations (one extra forward).
    """
    n = per_class[0].shape[0]
    chunk = chunk_for(chunk, fn, per_class, shared)
    if not chunk or chunk >= n:
        return fn(*per_class, *shared)
    tensors = [t for t in (*per_class, *shared) if isinstance(t, torch.Tensor)]
    keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for s in range(0, n, chunk):
        args = tuple(t[s:s + chunk] for t in per_class)
        outs.append(checkpoint(fn, *args, *shared, use_reentrant=False) if keep_graph else fn(*args, *shared))
    return torch.cat(outs)


class TextEncoder(nn.Module):
    """Frozen text tower over prompt embeddings; pools at EOS.

    Three exact savings over running all C prompts at the full context length:
    - truncation: the tower is causal, so every position up to the last EOS is unaffected by what
      follows; cutting the sequence there (`truncate=True`) gives the same features with far less work;
    - shared prefix: when the first P positions are the same for every prompt (SOS + a shared context
      with the class token at the end), they are computed once (batch 1) and each class runs only its
      tail, whose queries attend to the prefix's keys/values at every layer; this needs open_clip's
      plain ResidualAttentionBlock (other block types fall back to the plain path);
    - class chunks (`chunk_size`): bounded memory for ImageNet-sized C (activation checkpointing).
    Truncation and prefix sharing are used only when the tower's mask is the causal one.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        text = text_parts(backbone.model)
        self.transformer = text.transformer
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.causal = _is_causal(text.attn_mask)
        blocks = getattr(self.transformer, "resblocks", None)
        self.can_share_prefix = self.causal and bool(blocks) and all(_splittable(b) for b in blocks)

    def usable_prefix(self, shared_prefix: int, min_eos: int) -> int:
        """The shared-prefix length actually used (0: plain path). The EOS must lie in the tail."""
        return shared_prefix if self.can_share_prefix and 1 < shared_prefix <= min_eos else 0

    def forward(self, prompts: torch.Tensor, eos: torch.Tensor, truncate: bool = True, shared_prefix: int = 0,
                chunk_size: int | RowBudget | None = None) -> torch.Tensor:
        """prompts [C, L, D] token embeddings, eos [C] EOS positions -> unnormalised features [C, E].

        `shared_prefix`: the caller's promise that prompts[:, :shared_prefix] is the same for every row.
        """
        length = int(eos.max()) + 1 if truncate and self.causal else prompts.shape[1]
        share = self.usable_prefix(shared_prefix, int(eos.min()))
        if share:
            return self.forward_shared(prompts[:1, :share], prompts[:, share:length], eos, chunk_size)
        return self.forward_plain(prompts[:, :length], eos, chunk_size)

    def forward_plain(self, prompts: torch.Tensor, eos: torch.Tensor,
                      chunk_size: int | RowBudget | None = None) -> torch.Tensor:
        """Every prompt through open_clip's own transformer at the given length."""
        return _over_chunks(self._plain, chunk_size, (prompts, eos))

    def forward_shared(self, shared: torch.Tensor, tail: torch.Tensor, eos: torch.Tensor,
                       chunk_size: int | RowBudget | None = None) -> torch.Tensor:
        """shared [1, P, D] (positions 0..P-1 of every prompt), tail [C, T, D] (positions P..P+T-1), eos [C]
        (absolute, >= P) -> the features of the C prompts [shared | tail], exactly as the plain path."""
        if not self.can_share_prefix:
            raise ValueError("this text tower's blocks do not support prefix sharing; use forward_plain")
        p, t = shared.shape[1], tail.shape[1]
        pos = self.positional_embedding
        kv = self._prefix_kv(shared + pos[:p].to(shared.dtype))
        # query i of the tail (absolute position p + i) sees every prefix key and tail keys 0..i
        allowed = torch.ones(t, p + t, dtype=torch.bool, device=tail.device).tril(p)
        return _over_chunks(self._tail, chunk_size, (tail + pos[p:p + t].to(tail.dtype), eos - p), (allowed, *kv))

    def forward_runs(self, heads: torch.Tensor, tails: torch.Tensor, eos: torch.Tensor,
                     chunk_size: int | RowBudget | None = None) -> torch.Tensor:
        """R runs' prompts at once: heads [R, P, D] (each run's shared positions 0..P-1), tails [C, T, D] (the
        same for every run) or [R * C, T, D], eos [C] -> features [R * C, E], row r * C + c = run r, class c.

        Each run's prefix runs once; every (run, class) row runs only its tail against its run's prefix keys
        and values. `chunk_size` bounds the rows held at once (activation-checkpointed in training), so
        R x C may be 10,000 or more.
        """
        if not self.can_share_prefix:
            raise ValueError("this text tower's blocks do not support prefix sharing; use forward_plain")
        r, p = heads.shape[:2]
        c, t = eos.shape[0], tails.shape[1]
        pos = self.positional_embedding
        kv = self._prefix_kv(heads + pos[:p].to(heads.dtype))
        allowed = torch.ones(t, p + t, dtype=torch.bool, device=tails.device).tril(p)
        tails = tails + pos[p:p + t].to(tails.dtype)
        per_row = tails.shape[0] == r * c and r > 1

        def rows_fn(rows: torch.Tensor, *kv_all: torch.Tensor) -> torch.Tensor:
            run, cls = rows // c, rows % c
            x = tails[rows] if per_row else tails[cls]
            return self._tail(x, eos[cls] - p, allowed, *(k[run] for k in kv_all))

        rows = torch.arange(r * c, device=tails.device)
        return _over_chunks(rows_fn, chunk_size, (rows,), tuple(kv))

    def _plain(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        return self._pool(self.transformer(x, attn_mask=mask), eos)

    def _prefix_kv(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Keys and values of the shared prefix at every layer (the last layer's block output is unused)."""
        blocks = self.transformer.resblocks
        kv = []
        for i, block in enumerate(blocks):
            q, k, v = _qkv(block, block.ln_1(x))
            kv += [k, v]
            if i == len(blocks) - 1:
                break
            x = x + block.ls_1(_out(block, F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return kv

    def _tail(self, x: torch.Tensor, eos: torch.Tensor, allowed: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        """The tail positions through every block against the prefix's keys/values. In the last block only
        the EOS position feeds the output, so only its query, attention output and MLP are computed there."""
        n = x.shape[0]
        blocks = self.transformer.resblocks
        rows = torch.arange(n, device=x.device)
        for i, block in enumerate(blocks):
            q, k, v = _qkv(block, block.ln_1(x))
            k = torch.cat([kv[2 * i].expand(n, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([kv[2 * i + 1].expand(n, -1, -1, -1).to(v.dtype), v], dim=2)
            if i == len(blocks) - 1:
                q, mask = q[rows, :, eos].unsqueeze(2), allowed[eos][:, None, None]  # [n, h, 1, d], [n, 1, 1, P+T]
                x = x[rows, eos].unsqueeze(1)
                x = x + block.ls_1(_out(block, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
                return self._pool(x, torch.zeros_like(eos))
            x = x + block.ls_1(_out(block, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        raise AssertionError("unreachable: a text tower has at least one block")

    def _pool(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """EOS token -> final LayerNorm (per token, so after the gather) -> projection."""
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eos])
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
            raise ConfigError(f"class token position '{class_token_position}' unknown; choose one of {POSITIONS}")
        if not classnames:
            raise ConfigError("no class names: the dataset has no classes")
        check_prompt_tunable(backbone)
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
                raise ConfigError(f"n_ctx must be >= 1 (got {n_ctx})")
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
            raise ConfigError(f"prompt too long for the text tower's {context_length} tokens: {too_long[:3]}; "
                             "use fewer context tokens or shorter class names")
        with torch.no_grad():
            emb = embed(tokens).float()
        self.register_buffer("token_prefix", emb[:, :1].clone())
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :].clone())
        self.register_buffer("tokens", tokens)
        self.register_buffer("eos", eos)
        self.register_buffer("order", self._order(name_lens, context_length).to(device))
        self.min_eos, self.max_eos = int(eos.min()), int(eos.max())  # fixed: kept as ints (no device sync)

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

    @property
    def context_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def shared_prefix(self) -> int:
        """How many leading prompt positions are the same for every class: SOS, plus the shared context
        tokens that come before the class name."""
        if self.csc:
            return 1
        return {"end": 1 + self.n_ctx, "middle": 1 + self.n_ctx // 2, "front": 1}[self.position]

    def forward(self, length: int | None = None, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt token embeddings [C, L, D] (only the first `length` positions when given); `ctx` in place of
        the learner's own context (one run of a `PromptBatch`)."""
        c = self.num_classes
        length = self.context_length if length is None else length
        ctx = self.ctx if ctx is None else ctx
        ctx = ctx if self.csc else ctx.unsqueeze(0).expand(c, -1, -1)
        if self.position == "end":
            suffix = self.token_suffix[:, : max(length - 1 - self.n_ctx, 0)]
            return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), suffix], dim=1)[:, :length]
        src = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)
        idx = self.order[:, :length].unsqueeze(-1).expand(-1, -1, src.shape[-1])
        return torch.gather(src, 1, idx)

    def tail_is_shared(self, shared: int) -> bool:
        """True when positions `shared`.. hold no context vector: the tails are the same for any context."""
        return not self.csc and self.position == "end" and shared == 1 + self.n_ctx

    def split(self, shared: int, length: int | None = None,
              ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions 0..shared-1 once [1, shared, D], positions shared..length-1 per class [C, T, D]);
        `shared` must not exceed `shared_prefix`."""
        if shared > self.shared_prefix:
            raise ValueError(f"only the first {self.shared_prefix} prompt positions are shared (asked {shared})")
        length = self.context_length if length is None else length
        ctx = self.ctx if ctx is None else ctx
        if self.tail_is_shared(shared):  # no C-fold copy of ctx
            head = torch.cat([self.token_prefix[:1], ctx.unsqueeze(0).to(self.token_prefix.dtype)], dim=1)
            return head, self.token_suffix[:, : length - shared]
        prompts = self(length, ctx)
        return prompts[:1, :shared], prompts[:, shared:]

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
    """Learned prompts -> normalised class text features; logits against cached image features.

    The defaults are the fast path: prompts cut after the last EOS, the shared prefix computed once, and
    the backbone's mixed precision on GPU. `truncate=False, share_prefix=False, mixed_precision=False` is
    CoOp's own computation (all context-length tokens of every prompt, fp32). `class_chunk` bounds memory
    for large C (classes per slice, activation-checkpointed in training). All settings give the same
    features up to float rounding.
    """

    def __init__(self, backbone: Backbone, learner: PromptLearner, truncate: bool = True, share_prefix: bool = True,
                 class_chunk: int | RowBudget | None = None, mixed_precision: bool = True):
        super().__init__()
        if isinstance(class_chunk, int) and class_chunk < 1:
            raise ValueError(f"class_chunk must be >= 1 or None (got {class_chunk})")
        self.backbone = backbone
        self.learner = learner
        self.encoder = TextEncoder(backbone)
        self.truncate = truncate
        self.share_prefix = share_prefix
        self.class_chunk = class_chunk
        self.mixed_precision = mixed_precision

    @property
    def length(self) -> int:
        """Token positions the text tower runs per prompt."""
        if self.truncate and self.encoder.causal:
            return self.learner.max_eos + 1
        return self.learner.context_length

    @property
    def prefix(self) -> int:
        """Leading positions computed once for all classes (0: none)."""
        if not self.share_prefix:
            return 0
        return self.encoder.usable_prefix(self.learner.shared_prefix, self.learner.min_eos)

    def text_features(self) -> torch.Tensor:
        learner, encoder, length, prefix = self.learner, self.encoder, self.length, self.prefix
        precision = self.backbone.autocast() if self.mixed_precision else contextlib.nullcontext()
        with precision:
            if prefix:
                head, tail = learner.split(prefix, length)
                feats = encoder.forward_shared(head, tail, learner.eos, self.class_chunk)
            else:
                feats = encoder.forward_plain(learner(length), learner.eos, self.class_chunk)
        return F.normalize(feats.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        text_features = self.text_features() if text_features is None else text_features
        return self.backbone.logit_scale * image_features @ text_features.t()


class PromptBatch(nn.Module):
    """R runs' prompts trained as one model: their contexts are one parameter `ctx` [R, n_ctx, D] (CSC:
    [R, C, n_ctx, D]) and one text-tower pass computes the R x C class features.

    The runs share the backbone, the classes and the prompt layout (n_ctx, CSC, class token position); each
    keeps its own context, so a run's features, logits, loss and gradient depend on its context alone: the
    batch changes how the work is laid out, not what any run computes. A single run is a batch of one.
    """

    def __init__(self, backbone: Backbone, learners: list[PromptLearner], truncate: bool = True,
                 share_prefix: bool = True, row_chunk: int | RowBudget | None = None, mixed_precision: bool = True):
        super().__init__()
        first = learners[0]
        for other in learners[1:]:
            if (other.classnames, other.n_ctx, other.csc, other.position) != \
                    (first.classnames, first.n_ctx, first.csc, first.position):
                raise ValueError("runs in one prompt batch must share classes, n_ctx, CSC and class token position")
        self.backbone, self.template, self.runs = backbone, first, len(learners)
        self.ctx = nn.Parameter(torch.stack([learner.ctx.detach() for learner in learners]))
        self.encoder = TextEncoder(backbone)
        self.truncate, self.share_prefix, self.mixed_precision = truncate, share_prefix, mixed_precision
        self.row_chunk = row_chunk

    def text_features(self) -> torch.Tensor:
        """[R, C, E] normalised class text features of every run."""
        learner, encoder = self.template, self.encoder
        length = learner.max_eos + 1 if self.truncate and encoder.causal else learner.context_length
        prefix = encoder.usable_prefix(learner.shared_prefix, learner.min_eos) if self.share_prefix else 0
        precision = self.backbone.autocast() if self.mixed_precision else contextlib.nullcontext()
        r, c = self.runs, learner.num_classes
        with precision:
            if prefix:
                parts = [learner.split(prefix, length, self.ctx[i]) for i in range(r)]
                heads = torch.cat([head for head, _ in parts])
                tails = parts[0][1] if learner.tail_is_shared(prefix) else torch.cat([tail for _, tail in parts])
                feats = encoder.forward_runs(heads, tails, learner.eos, self.row_chunk)
            else:
                prompts = torch.cat([learner(length, self.ctx[i]) for i in range(r)])
                feats = encoder.forward_plain(prompts, learner.eos.repeat(r), self.row_chunk)
        return F.normalize(feats.float(), dim=-1).view(r, c, -1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """image_features [R, B, E] (each run's own minibatch) -> logits [R, B, C]."""
        text_features = self.text_features() if text_features is None else text_features
        return self.backbone.logit_scale * torch.bmm(image_features, text_features.transpose(1, 2))


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
