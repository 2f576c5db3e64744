"""The fast text path computes exactly what CoOp computes; both training paths run end to end.

Speed itself is measured by benchmarks/speed.py, never asserted here.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dspt.backbone import Backbone, load_backbone
from dspt.config import RunConfig
from dspt.features import encode_paths
from dspt.prompt import PromptClassifier, PromptLearner, TextEncoder
from dspt.train import _ReferenceBatches, train

NAMES = ["cat", "dog", "sports car", "sea lion", "x", "mountain bike", "tabby cat", "apple", "maple tree", "a"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("dspt-tiny", None, device="cpu")


def custom_backbone(**text_cfg) -> Backbone:
    """A small open_clip CLIP with text-tower options the package configs do not use."""
    text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, **text_cfg)
    vision = dict(image_size=32, layers=1, width=64, patch_size=8, head_width=32)
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(model=model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), model_name="custom",
                    weights_id="random:0", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                    device=torch.device("cpu"))


def features_and_grad(clf: PromptClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Text features and d(a DSPT-like loss)/d ctx, so every class's feature carries gradient."""
    feats = clf.text_features()
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, feats.shape[1], generator=gen), dim=-1)
    labels = torch.arange(6) % feats.shape[0]
    loss = F.cross_entropy(F.softmax(20 * images @ feats.t(), -1), labels) + feats[:, 0].square().sum()
    (grad,) = torch.autograd.grad(loss, clf.learner.ctx)
    return feats.detach(), grad


def randomise(learner: PromptLearner, seed: int = 3) -> PromptLearner:
    with torch.no_grad():  # larger than the N(0, 0.02) init, so the context really shapes the features
        learner.ctx.copy_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(seed)))
    return learner


@pytest.mark.parametrize("n_ctx", [1, 4, 16])
@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("position", ["end", "middle"])
def test_shared_prefix_equals_plain_path(backbone, n_ctx, truncate, position):
    learner = randomise(PromptLearner(backbone, NAMES, n_ctx=n_ctx, class_token_position=position))
    plain = PromptClassifier(backbone, learner, truncate=truncate, share_prefix=False)
    shared = PromptClassifier(backbone, learner, truncate=truncate, share_prefix=True)
    expected_prefix = 1 + (n_ctx if position == "end" else n_ctx // 2)
    assert shared.prefix == (expected_prefix if expected_prefix > 1 else 0)
    assert plain.prefix == 0
    f0, g0 = features_and_grad(plain)
    f1, g1 = features_and_grad(shared)
    torch.testing.assert_close(f1, f0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)
    assert g0.abs().max() > 1e-3  # the gradient compared is not trivially zero


def test_fast_path_equals_coop_full_length_fp32(backbone):
    learner = randomise(PromptLearner(backbone, NAMES, n_ctx=16))
    coop = PromptClassifier(backbone, learner, truncate=False, share_prefix=False, mixed_precision=False)
    fast = PromptClassifier(backbone, learner)
    assert coop.length == 77 and fast.length < 77 and fast.prefix == 17
    f0, g0 = features_and_grad(coop)
    f1, g1 = features_and_grad(fast)
    torch.testing.assert_close(f1, f0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)


def test_prompt_features_equal_open_clip_encode_text(backbone):
    """Context initialised from a phrase: the learned prompt is exactly the tokenised sentence."""
    learner = PromptLearner(backbone, NAMES, ctx_init="a photo of a")
    tokens = backbone.tokenizer([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        expected = F.normalize(backbone.model.encode_text(tokens), dim=-1)
        for kw in ({}, dict(truncate=False, share_prefix=False)):
            torch.testing.assert_close(PromptClassifier(backbone, learner, **kw).text_features(), expected, **TOL)


def test_text_encoder_public_call_with_shared_prefix(backbone):
    learner = randomise(PromptLearner(backbone, NAMES, n_ctx=8))
    encoder = TextEncoder(backbone)
    with torch.no_grad():
        prompts = learner()
        for truncate in (True, False):
            plain = encoder(prompts, learner.eos, truncate=truncate)
            shared = encoder(prompts, learner.eos, truncate=truncate, shared_prefix=9)
            chunked = encoder(prompts, learner.eos, truncate=truncate, shared_prefix=9, chunk_size=3)
            torch.testing.assert_close(shared, plain, **TOL)
            torch.testing.assert_close(chunked, plain, **TOL)


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_equals_unchunked(backbone, share_prefix, chunk):
    learner = randomise(PromptLearner(backbone, NAMES, n_ctx=4))
    whole = PromptClassifier(backbone, learner, share_prefix=share_prefix)
    parts = PromptClassifier(backbone, learner, share_prefix=share_prefix, class_chunk=chunk)
    f0, g0 = features_and_grad(whole)
    f1, g1 = features_and_grad(parts)
    torch.testing.assert_close(f1, f0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)
    with torch.no_grad():  # evaluation: plain loop, no checkpointing
        torch.testing.assert_close(parts.text_features(), f0, **TOL)


def test_class_specific_context_and_front_position(backbone):
    for kw in (dict(csc=True), dict(class_token_position="front")):
        learner = randomise(PromptLearner(backbone, NAMES, n_ctx=4, **kw))
        fast = PromptClassifier(backbone, learner, class_chunk=4)
        coop = PromptClassifier(backbone, learner, truncate=False, share_prefix=False)
        assert fast.prefix == 0  # only SOS is shared: not worth a separate pass
        f0, g0 = features_and_grad(coop)
        f1, g1 = features_and_grad(fast)
        torch.testing.assert_close(f1, f0, **TOL)
        torch.testing.assert_close(g1, g0, **TOL)


def test_layer_scale_blocks_share_the_prefix():
    backbone = custom_backbone(ls_init_value=0.5)
    learner = randomise(PromptLearner(backbone, NAMES[:5], n_ctx=6))
    shared = PromptClassifier(backbone, learner)
    assert shared.prefix == 7
    f0, g0 = features_and_grad(PromptClassifier(backbone, learner, truncate=False, share_prefix=False))
    f1, g1 = features_and_grad(shared)
    torch.testing.assert_close(f1, f0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)


def test_unsupported_blocks_fall_back_to_plain_path():
    backbone = custom_backbone(qk_norm=True)  # open_clip's CustomResidualAttentionBlock
    learner = randomise(PromptLearner(backbone, NAMES[:5], n_ctx=6))
    fast = PromptClassifier(backbone, learner, class_chunk=2)
    assert not fast.encoder.can_share_prefix and fast.prefix == 0
    f0, g0 = features_and_grad(PromptClassifier(backbone, learner, truncate=False, share_prefix=False))
    f1, g1 = features_and_grad(fast)
    torch.testing.assert_close(f1, f0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)
    with pytest.raises(ValueError, match="prefix sharing"):
        fast.encoder.forward_shared(learner()[:1, :3], learner()[:, 3:], learner.eos)


def test_bidirectional_text_tower_is_never_truncated():
    backbone = custom_backbone(no_causal_mask=True)
    learner = randomise(PromptLearner(backbone, NAMES[:3], n_ctx=4))
    fast = PromptClassifier(backbone, learner)
    assert not fast.encoder.causal and fast.length == 77 and fast.prefix == 0
    with torch.no_grad():
        torch.testing.assert_close(fast.text_features(),
                                   PromptClassifier(backbone, learner, truncate=False).text_features(), **TOL)


def make_folder(root, classes=3, per_class=8, size=32):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_reference_batches_equal_seeded_encoding(backbone, tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=2, per_class=3)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    p = SimpleNamespace(backbone=backbone, train=SimpleNamespace(paths=paths))
    idx = torch.tensor([4, 0, 5, 2])
    got = _ReferenceBatches(p)(idx, torch.Generator().manual_seed(11))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(11)))
    want = encode_paths(backbone, [paths[i] for i in idx.tolist()], backbone.train_transform(), seed=seed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_both_training_paths_produce_a_run(tmp_path, path):
    data = make_folder(tmp_path / "data")
    cfg = RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=4, epochs=2, batch_size=4, views=2,
                    n_ctx=4, noise_rate=0.25, path=path, output=str(tmp_path / "run"),
                    cache_dir=str(tmp_path / "cache"), device="cpu", progress=False)
    metrics = train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "prompt.safetensors", "log.jsonl", "noisy_labels.csv"):
        assert (run / name).is_file(), name
    assert np.isfinite(metrics["final_loss"])
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r.get("event") == "epoch"] == [0, 1]
    assert metrics["test_acc"] == [r for r in epochs if r.get("event") == "epoch"][-1]["test_acc"]
