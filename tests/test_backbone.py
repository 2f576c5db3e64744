"""Backbone loading: tiny config, local checkpoints, clear errors (never the network)."""
import time

import pytest
import torch
from safetensors.torch import save_file

from dspt.backbone import BackboneError, load_backbone


def test_tiny_config_builds_fast_and_is_seeded():
    t0 = time.perf_counter()
    a = load_backbone("dspt-tiny", init_seed=1)
    elapsed = time.perf_counter() - t0
    b = load_backbone("dspt-tiny", init_seed=1)
    c = load_backbone("dspt-tiny", init_seed=2)
    x = torch.randn(2, 3, a.image_size, a.image_size)
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    assert not torch.equal(a.encode_images(x), c.encode_images(x))
    assert a.weights_id == "random:1"
    assert all(not p.requires_grad for p in a.model.parameters())
    print(f"dspt-tiny built in {elapsed:.3f} s")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    src = load_backbone("dspt-tiny", init_seed=7)
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"mini{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = load_backbone("dspt-tiny", checkpoint=path)
    x = torch.randn(3, 3, src.image_size, src.image_size)
    assert torch.equal(loaded.encode_images(x), src.encode_images(x))
    assert loaded.weights_id.startswith("sha256:")


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(BackboneError, match="unknown model 'ViT-Q-99'"):
        load_backbone("ViT-Q-99")
    with pytest.raises(BackboneError, match="unknown pretrained tag 'nosuchtag'.*openai"):
        load_backbone("RN50", pretrained="nosuchtag")
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("dspt-tiny", checkpoint=tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BackboneError, match="not a CLIP checkpoint"):
        load_backbone("dspt-tiny", checkpoint=junk)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(BackboneError, match="not a CLIP checkpoint"):
        load_backbone("dspt-tiny", checkpoint=other)


def test_uncached_pretrained_weights_fail_fast_offline():
    """No network in tests (conftest): an uncached tag fails on the reachability probe, naming the fix,
    instead of going through the hub client's download retries."""
    with pytest.raises(BackboneError, match="not in the local cache and huggingface.co cannot be reached.*--checkpoint"):
        load_backbone("RN50", "openai")


def test_cached_pretrained_weights_load_without_the_network(monkeypatch):
    """Weights in the local cache load with the hub client in offline mode (no request at all)."""
    import open_clip
    from huggingface_hub import constants

    seen = []
    real_create = open_clip.create_model

    def fake_create(name, pretrained=None, device="cpu"):
        seen.append(constants.HF_HUB_OFFLINE)
        if not constants.HF_HUB_OFFLINE:
            raise AssertionError("went online although the weights were cached")
        return real_create("dspt-tiny", pretrained=None)

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    bb = load_backbone("RN50", "openai")
    assert seen == [True] and bb.weights_id == "openai"


def test_view_augmentation_options_reach_transform_and_cache_key(tmp_path):
    """crop_scale / hflip change the training views, so they must change the feature-cache key."""
    from dspt.data import ImageDataset
    from dspt.features import cache_key

    bb = load_backbone("dspt-tiny")
    ds = ImageDataset(paths=[str(tmp_path / "a.png")], labels=[0], classnames=["a", "b"])
    default = cache_key(bb, ds, "train", views=2, seed=0)
    crop, flip = bb.train_transform().transforms[:2]
    assert crop.scale == (0.08, 1.0) and flip.p == 0.5  # CoOp's protocol by default
    bb.crop_scale, bb.hflip = 0.8, False
    crop, flip = bb.train_transform().transforms[:2]
    assert crop.scale == (0.8, 1.0) and flip.p == 0.0
    assert cache_key(bb, ds, "train", views=2, seed=0) != default
    assert cache_key(bb, ds, "test", views=0, seed=0) == cache_key(load_backbone("dspt-tiny"), ds, "test", 0, 0)
