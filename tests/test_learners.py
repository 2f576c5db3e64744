"""Prompt learners beyond CoOp (issue 23): each forward against an independent computation in float64 (outputs
and gradients), only the learner's own parameters train, the registry's one-line refusals, KgCoOp's penalty.

The independent computations run open_clip's own `Transformer.forward` (not dspt's block loop) and put the deep
prompts in with forward pre-hooks on its blocks, at full context length (no truncation, no shared prefix)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dspt.backbone import load_backbone
from dspt.errors import BackboneError, ConfigError
from dspt.learner_models import CoCoOpModel, MaPLeModel, PromptSRCModel, VPTModel, kg_penalty
from dspt.prompt import text_parts
from dspt.prompted_towers import prompted_image_features

CLASSES = ["dog", "golden retriever", "red-winged blackbird"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def bb64():
    """The tiny CLIP in float64, so the comparisons are exact to 1e-10."""
    bb = load_backbone("dspt-tiny", None, init_seed=0)
    bb.model = bb.model.double()
    return bb


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _replace_last(prompts, n):
    """Forward pre-hook for block i >= 1: the last n tokens become prompts[i] (open_clip's blocks are batch-first
    here; a hook sees the block's input)."""
    def hook_for(i):
        def hook(module, args, kwargs):
            x = args[0]
            x = torch.cat([x[:, :-n], prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
            return (x, *args[1:]), kwargs
        return hook
    return hook_for


def reference_image(visual, pixels, prompts):
    """Image features with prompt tokens, through open_clip's own Transformer.forward."""
    assert visual.transformer.batch_first
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0]
    x = torch.cat([x, prompts[0].unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    hook = _replace_last(prompts, n)
    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(visual.transformer.resblocks) if 0 < i < len(prompts)]
    try:
        x = visual.transformer(x)
    finally:
        for h in handles:
            h.remove()
    assert visual.pool_type == "tok" and visual.attn_pool is None and not visual.final_ln_after_pool
    return visual.ln_post(x[:, 0]) @ visual.proj


def reference_text(model, embeddings, eos, deep=()):
    """Class features of prompt embeddings [C, L, D] at full length; deep[i - 1] replaces positions 1..n at block
    i (MaPLe), through open_clip's own Transformer.forward with its causal mask."""
    text = text_parts(model)
    x = embeddings + text.positional_embedding

    def hook_for(i):
        def hook(module, args, kwargs):
            y = args[0]
            n = deep[i - 1].shape[0]
            y = torch.cat([y[:, :1], deep[i - 1].unsqueeze(0).expand(y.shape[0], -1, -1), y[:, 1 + n:]], dim=1)
            return (y, *args[1:]), kwargs
        return hook

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i, b in enumerate(text.transformer.resblocks) if 0 < i <= len(deep)]
    try:
        x = text.transformer(x, attn_mask=text.attn_mask)
    finally:
        for h in handles:
            h.remove()
    x = text.ln_final(x[torch.arange(x.shape[0]), eos])
    return x @ text.text_projection


def _grads(out, params):
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * weight).sum(), params)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_vpt_equals_open_clip_with_prompt_tokens(bb64, pixels, depth):
    model = VPTModel(bb64, CLASSES, {"length": 3, "depth": depth}, TEMPLATE, seed=1, learner="vpt-deep").double()
    params = list(model.prompts)
    ours = model.image_features(pixels)
    ref = F.normalize(reference_image(bb64.model.visual, pixels, params), dim=-1)
    assert ours.dtype == torch.float32  # features leave the learner in float32, as the frozen tower's do
    ours64 = F.normalize(prompted_image_features(bb64.model.visual, pixels, params), dim=-1)
    torch.testing.assert_close(ours64, ref, rtol=0, atol=1e-10)
    for a, b in zip(_grads(ours64, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
    # the prompts matter: without them the features are the frozen tower's own, which differ
    assert (ref - F.normalize(bb64.model.encode_image(pixels), dim=-1)).abs().max() > 1e-4


def test_maple_text_and_image_equal_independent_computation(bb64, pixels):
    model = MaPLeModel(bb64, CLASSES, {"depth": 3}, TEMPLATE, n_ctx=2, ctx_init=None, seed=2).double()
    prompt = model.prompt
    assert len(model.deep) == 2 and len(model.deep_proj) == 2
    # MaPLe deep-copies one linear map per layer: every map starts equal
    assert torch.equal(model.deep_proj[0].weight, model.deep_proj[1].weight)
    from dspt.prompted_towers import deep_text_features

    length = prompt.max_eos + 1
    ours = deep_text_features(text_parts(bb64.model), prompt(length), prompt.eos, list(model.deep), length)
    ref = reference_text(bb64.model, prompt(), prompt.eos, list(model.deep))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    params = [prompt.ctx, *model.deep]
    for a, b in zip(_grads(ours, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # image side: layer i's prompts are map_i(text context_i)
    vis = model.vision_prompts()
    torch.testing.assert_close(vis[1], model.deep[0] @ model.deep_proj[0].weight.t() + model.deep_proj[0].bias)
    img = prompted_image_features(bb64.model.visual, pixels, vis)
    img_ref = reference_image(bb64.model.visual, pixels, [model.proj(prompt.ctx)] +
                              [p(d) for p, d in zip(model.deep_proj, model.deep)])
    torch.testing.assert_close(img, img_ref, rtol=0, atol=1e-10)
    grads = _grads(img, [prompt.ctx, model.proj.weight, model.deep[1]])
    assert all(g.abs().sum() > 0 for g in grads)  # the text context reaches the image tower through its map
    for a, b in zip(grads, _grads(img_ref, [prompt.ctx, model.proj.weight, model.deep[1]])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_maple_depth_one_is_coop_text_plus_one_image_prompt(bb64):
    from dspt.prompt import PromptClassifier, PromptLearner

    model = MaPLeModel(bb64, CLASSES, {"depth": 1}, TEMPLATE, n_ctx=2, ctx_init=None, seed=2).double()
    coop = PromptLearner(bb64, CLASSES, n_ctx=2, seed=2).double()
    assert torch.equal(coop.ctx, model.prompt.ctx)
    torch.testing.assert_close(model.text_features(), PromptClassifier(bb64, coop).text_features(), rtol=0,
                               atol=1e-6)


def test_cocoop_equals_per_image_full_length_prompts(bb64):
    model = CoCoOpModel(bb64, CLASSES, {"reduction": 4}, TEMPLATE, n_ctx=3, ctx_init=None, seed=4).double()
    feats = F.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=-1)
    assert model.meta_net[0].in_features == 128 and model.meta_net[0].out_features == 32
    ours = model.text_features(feats)  # the shared-prefix path: each image's [SOS | context] once
    prompt = model.prompt
    refs = []
    for b in range(2):
        bias = model.meta_net(feats[b:b + 1])  # [1, D]: one token added to every context vector
        refs.append(F.normalize(reference_text(bb64.model, prompt(None, prompt.ctx + bias), prompt.eos), dim=-1))
    ref = torch.stack(refs)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
    params = [prompt.ctx, model.meta_net[0].weight, model.meta_net[2].bias]
    logits_ours = model.classify(feats.float())
    logits_ref = bb64.logit_scale * torch.einsum("be,bce->bc", feats, ref)
    torch.testing.assert_close(logits_ours.double(), logits_ref, rtol=0, atol=1e-3)
    for a, b in zip(_grads(logits_ours, params), _grads(logits_ref, params)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    # conditioned: two images get different class features
    assert (ours[0] - ours[1]).abs().max() > 1e-6


SRC = {"depth": 3, "length": 2, "text_weight": 25.0, "image_weight": 10.0, "gpa_mean": 15.0, "gpa_std": 1.0}


def test_promptsrc_forward_and_penalty_equal_independent_computations(bb64, pixels):
    model = PromptSRCModel(bb64, CLASSES, SRC, TEMPLATE, n_ctx=2, ctx_init=None, seed=5).double()
    prompt = model.prompt
    assert len(model.deep) == 2 and len(model.vision) == 3
    from dspt.prompted_towers import deep_text_features

    length = prompt.max_eos + 1
    text = deep_text_features(text_parts(bb64.model), prompt(length), prompt.eos, list(model.deep), length)
    text_ref = reference_text(bb64.model, prompt(), prompt.eos, list(model.deep))
    torch.testing.assert_close(text, text_ref, rtol=0, atol=1e-10)
    image = prompted_image_features(bb64.model.visual, pixels, list(model.vision))
    image_ref = reference_image(bb64.model.visual, pixels, list(model.vision))
    torch.testing.assert_close(image, image_ref, rtol=0, atol=1e-10)
    params = [prompt.ctx, model.deep[1], model.vision[2]]
    for a, b in zip(_grads(image @ text.t(), params), _grads(image_ref @ text_ref.t(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # the penalty, against its formula in float64: 25 mean|t - t0| + 10 mean|i - i0| + KL(p0 || p) summed / (B C)
    model.train()
    with torch.enable_grad():
        logits = model.logits(pixels)
        pen = model.penalty()
    t, i = F.normalize(text_ref, dim=-1), F.normalize(image_ref, dim=-1)
    t0 = F.normalize(bb64.model.encode_text(bb64.tokenizer([TEMPLATE.format(c) for c in CLASSES])), dim=-1)
    i0 = F.normalize(bb64.model.encode_image(pixels), dim=-1)
    scale = float(bb64.logit_scale)
    p, p0 = (scale * i @ t.t()).softmax(-1), (scale * i0 @ t0.t()).softmax(-1)
    kl = (p0 * (p0.log() - p.log())).sum() / p.numel()
    expected = 25 * (t - t0).abs().mean() + 10 * (i - i0).abs().mean() + kl
    torch.testing.assert_close(logits.double(), scale * i @ t.t(), rtol=0, atol=1e-4)
    assert float(pen.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert model.penalty is not None and model._step is None  # used once per step
    weights = model.aggregate_weights(20)  # PromptSRC's 20 epochs: N(15, 1)
    assert sum(weights) == pytest.approx(1.0) and max(range(20), key=weights.__getitem__) == 14
    assert weights[14] == pytest.approx(1 / sum(math.exp(-0.5 * (e - 15) ** 2) for e in range(1, 21)))


@pytest.mark.parametrize("name", ["cocoop", "vpt", "vpt-deep", "maple", "promptsrc"])
def test_only_the_learners_parameters_train_and_the_backbone_stays_bit_identical(name):
    from dspt.learner_models import build_model

    bb = load_backbone("dspt-tiny", None, init_seed=0)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    options = {"cocoop": {"reduction": 16}, "vpt": {"length": 2, "depth": 1}, "vpt-deep": {"length": 2, "depth": 0},
               "maple": {"depth": 2}, "promptsrc": dict(SRC, depth=2)}[name]
    model = build_model(name, bb, CLASSES, options, TEMPLATE, n_ctx=2, ctx_init=None, seed=0)
    own = model.trainable()
    expected = {"cocoop": {"prompt.ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight",
                           "meta_net.2.bias"},
                "vpt": {"prompts.0"}, "vpt-deep": {f"prompts.{i}" for i in range(4)},
                "maple": {"prompt.ctx", "proj.weight", "proj.bias", "deep.0", "deep_proj.0.weight",
                          "deep_proj.0.bias"},
                "promptsrc": {"prompt.ctx", "deep.0", "vision.0", "vision.1"}}[name]
    assert set(own) == expected
    x = torch.randn(4, 3, 32, 32) if model.image_input == "pixels" else F.normalize(torch.randn(4, 128), dim=-1)
    opt = torch.optim.SGD(list(own.values()), lr=0.5, momentum=0.9)
    start = {k: v.detach().clone() for k, v in own.items()}
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model.logits(x), torch.tensor([0, 1, 2, 0]))
        extra = model.penalty()
        (loss if extra is None else loss + extra).backward()
        opt.step()
    assert all(not torch.equal(start[k], v) for k, v in own.items()), "every parameter of the learner trains"
    assert all(p.grad is None for p in bb.model.parameters())
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the backbone is bit-identical"


def test_kg_penalty_is_one_minus_mean_cosine_in_float64():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1))
    assert float(kg_penalty(a, b)) == pytest.approx(float(1 - cos.mean()), abs=1e-6)
    an, bn = F.normalize(a64, dim=-1), F.normalize(b64, dim=-1)  # half the mean squared distance of unit vectors
    assert float(kg_penalty(an, bn)) == pytest.approx(float(((an - bn) ** 2).sum(-1).mean() / 2), abs=1e-6)
    assert float(kg_penalty(a, a)) == pytest.approx(0.0, abs=1e-6)


def test_image_side_learner_on_a_resnet_tower_is_refused_in_one_line():
    bb = load_backbone("RN50", None, init_seed=0)
    for name in ("vpt", "maple"):
        with pytest.raises(BackboneError) as err:
            from dspt.learner_models import build_model

            build_model(name, bb, CLASSES, {"length": 8, "depth": 1} if name == "vpt" else {"depth": 2}, TEMPLATE,
                        n_ctx=2, ctx_init=None)
        assert "ModifiedResNet" in str(err.value) and "not a ViT" in str(err.value) and "\n" not in str(err.value)


def test_depth_beyond_the_tower_is_refused(bb64):
    with pytest.raises(ConfigError, match="depth 5 is beyond the image tower's 4 layers"):
        VPTModel(bb64, CLASSES, {"length": 2, "depth": 5}, TEMPLATE)
    with pytest.raises(ConfigError, match="depth 4 is beyond the shorter tower's 3 layers"):
        MaPLeModel(bb64, CLASSES, {"depth": 4}, TEMPLATE, n_ctx=2, ctx_init=None)


def test_registry_options_and_pairings():
    from dspt.config import RunConfig
    from dspt.learners import LEARNERS, get_learner

    assert list(LEARNERS) == ["coop", "kgcoop", "cocoop", "vpt", "vpt-deep", "maple", "promptsrc"]
    with pytest.raises(ConfigError, match="unknown learner 'coopp'; choose one of: coop, kgcoop"):
        get_learner("coopp")
    base = dict(data="/x", model="dspt-tiny", pretrained=None)
    with pytest.raises(ConfigError, match="unknown option.* depth for learner 'kgcoop'; it takes: weight"):
        RunConfig(**base, learner="kgcoop", learner_options={"depth": 2}).resolved(need_data=False)
    with pytest.raises(ConfigError, match="length=0 is invalid"):
        RunConfig(**base, learner="vpt", learner_options={"length": 0}).resolved(need_data=False)
    with pytest.raises(ConfigError, match="depth=1.5.* must be an integer"):
        RunConfig(**base, learner="vpt", learner_options={"depth": 1.5}).resolved(need_data=False)
    with pytest.raises(ConfigError, match="method 'dualprompt' does not train learner 'vpt' .*pairs CoOp prompts"):
        RunConfig(**base, learner="vpt", method="dualprompt").resolved(need_data=False)
    with pytest.raises(ConfigError, match="method 'nlprompt' does not train learner 'cocoop'"):
        RunConfig(**base, learner="cocoop", method="nlprompt").resolved(need_data=False)
    with pytest.raises(ConfigError, match="method 'joapr' does not train learner 'maple'"):
        RunConfig(data="/x", model="ViT-B-16", pretrained=None, learner="maple", method="joapr",
                  loss="ce").resolved(need_data=False)
    with pytest.raises(ConfigError, match="learner 'cocoop' learns one context shared by all classes"):
        RunConfig(**base, learner="cocoop", csc=True).resolved(need_data=False)
    with pytest.raises(ConfigError, match="learner 'vpt' learns no text context"):
        RunConfig(**base, learner="vpt", ctx_init="a photo of a").resolved(need_data=False)
    with pytest.raises(ConfigError, match="model 'RN50' has a ResNet image tower"):  # before any image is read
        RunConfig(data="/x", model="RN50", pretrained=None, learner="maple").resolved(need_data=False)
    with pytest.raises(ConfigError, match="depth 9 is beyond the shorter tower's 3 layers"):
        RunConfig(**base, learner="maple").resolved(need_data=False)
    cfg = RunConfig(data="/x", model="ViT-B-16", pretrained=None, learner="maple").resolved(need_data=False)
    assert (cfg.epochs, cfg.batch_size) == (5, 4)  # MaPLe's own schedule when none is given
    assert cfg.default_name().endswith("-maple")  # its own epochs are no deviation to spell out
    given = RunConfig(data="/x", model="ViT-B-16", pretrained=None, learner="maple", epochs=7,
                      batch_size=8).resolved(need_data=False)
    assert (given.epochs, given.batch_size) == (7, 8) and "-e7" in given.default_name()
    coop = RunConfig(**base).resolved(need_data=False)
    assert (coop.epochs, coop.batch_size) == (200, 32)  # CoOp's protocol, as before learners existed
    assert (RunConfig(**base, shots=2).resolved(need_data=False).epochs,
            RunConfig(**base, learner="cocoop").resolved(need_data=False).batch_size) == (100, 1)
    assert cfg.ctx_init == "a photo" and cfg.n_ctx == 2 and cfg.learner_options == {"depth": 9}
    assert cfg.default_name().endswith("-maple")
    cfg = RunConfig(**base, learner="kgcoop", n_ctx=8).resolved(need_data=False)  # a given context wins
    assert cfg.ctx_init is None and cfg.n_ctx == 8
    again = RunConfig.from_dict(yaml_round_trip(cfg)).resolved(need_data=False)
    assert again.identity() == cfg.identity()


def yaml_round_trip(cfg):
    import yaml

    return yaml.safe_load(cfg.dump())
