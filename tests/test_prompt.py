"""Prompt learner and text encoder: CoOp semantics, EOS truncation, save/load."""
import pytest
import torch

from dspt.backbone import load_backbone
from dspt.prompt import PromptClassifier, PromptLearner, TextEncoder, mean_pairwise_cosine

CLASSES = ["cat", "golden retriever", "sea_lion", "airplane"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dspt-tiny", init_seed=3)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_truncation_matches_full_length(backbone, position, csc):
    learner = PromptLearner(backbone, CLASSES, n_ctx=6, csc=csc, class_token_position=position, seed=1)
    enc = TextEncoder(backbone)
    prompts = learner()
    full = enc(prompts, learner.eos, truncate=False)
    cut = enc(prompts, learner.eos, truncate=True)
    assert int(learner.eos.max()) + 1 < prompts.shape[1]  # the cut really removes positions
    assert torch.allclose(full, cut, atol=1e-5, rtol=0)
    assert (full - cut).abs().max() <= 1e-5


def test_end_position_reproduces_plain_clip_text_encoding(backbone):
    """With ctx set to the embeddings of a phrase, the learner's prompt is exactly that phrase's tokens."""
    learner = PromptLearner(backbone, CLASSES, ctx_init="a photo of a", seed=0)
    assert learner.n_ctx == 4
    ours = TextEncoder(backbone)(learner(), learner.eos, truncate=True)
    ref = backbone.model.encode_text(backbone.tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_positions_place_class_tokens(backbone):
    """front: [SOS] class ctx . ; middle: [SOS] ctx[:h] class ctx[h:] ."""
    n = 4
    end = PromptLearner(backbone, ["dog"], n_ctx=n, class_token_position="end", seed=0)
    front = PromptLearner(backbone, ["dog"], n_ctx=n, class_token_position="front", seed=0)
    mid = PromptLearner(backbone, ["dog"], n_ctx=n, class_token_position="middle", seed=0)
    e, f, m = end()[0], front()[0], mid()[0]
    ctx, cls = e[1:1 + n], e[1 + n]
    assert torch.equal(f[1], cls) and torch.equal(f[2:2 + n], ctx)
    assert torch.equal(m[1:3], ctx[:2]) and torch.equal(m[3], cls) and torch.equal(m[4:6], ctx[2:])
    assert torch.equal(f[2 + n:], e[2 + n:]) and torch.equal(m[2 + n:], e[2 + n:])


def test_only_ctx_is_trainable_and_init_is_seeded(backbone):
    a = PromptLearner(backbone, CLASSES, n_ctx=16, seed=5)
    b = PromptLearner(backbone, CLASSES, n_ctx=16, seed=5)
    c = PromptLearner(backbone, CLASSES, n_ctx=16, seed=6)
    assert [n for n, p in a.named_parameters()] == ["ctx"]
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert abs(a.ctx.std().item() - 0.02) < 0.004
    assert PromptLearner(backbone, CLASSES, n_ctx=3, csc=True).ctx.shape[:2] == (len(CLASSES), 3)


def test_gradient_reaches_ctx_only(backbone):
    clf = PromptClassifier(backbone, PromptLearner(backbone, CLASSES, n_ctx=4, seed=0))
    feats = torch.nn.functional.normalize(torch.randn(5, backbone.model.text_projection.shape[1]), dim=-1)
    clf.logits(feats).sum().backward()
    assert clf.learner.ctx.grad is not None and clf.learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_prompt_save_load_round_trip(tmp_path, backbone):
    from dspt.config import RunConfig
    from dspt.train import load_prompt, save_prompt

    learner = PromptLearner(backbone, CLASSES, n_ctx=5, csc=True, class_token_position="middle", seed=2)
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx))
    cfg = RunConfig(data="x", model="dspt-tiny", pretrained=None)
    save_prompt(tmp_path, learner, cfg, backbone)
    loaded = load_prompt(tmp_path, backbone=backbone)
    feats = torch.nn.functional.normalize(torch.randn(7, backbone.model.text_projection.shape[1]), dim=-1)
    before = PromptClassifier(backbone, learner).logits(feats)
    assert torch.equal(loaded.logits(feats), before)
    assert loaded.learner.classnames == [c.replace("_", " ") for c in CLASSES]


def test_mean_pairwise_cosine():
    f = torch.eye(3)
    assert mean_pairwise_cosine(f) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.ones(4, 2)) == pytest.approx(1.0)
