"""Backbone loading: tiny config, local checkpoints, clear errors (never the network).

Every test here runs on an empty model cache of its own (`hermetic_hub`), so results do not depend on what
the user's huggingface_hub / open_clip cache holds.
"""
import socket

import pytest
import torch
from safetensors.torch import save_file

from dspt.backbone import BackboneError, load_backbone

pytestmark = pytest.mark.usefixtures("hermetic_hub")


def test_tiny_config_is_seeded_and_frozen():
    a = load_backbone("dspt-tiny", init_seed=1)
    b = load_backbone("dspt-tiny", init_seed=1)
    c = load_backbone("dspt-tiny", init_seed=2)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x = torch.randn(2, 3, a.image_size, a.image_size)
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    assert not torch.equal(a.encode_images(x), c.encode_images(x))
    assert a.weights_id == "random:1" and c.weights_id == "random:2"
    assert all(not p.requires_grad for p in a.model.parameters()) and not a.model.training
    # the seed is local: building a backbone leaves the caller's random stream alone
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("dspt-tiny", init_seed=5)
    assert torch.equal(torch.rand(3), want)


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


# -- pretrained weights: the hub client decides, dspt opens no socket -------------------------------------

REPO = "dspt-test/tiny"  # a pretrained tag registered for dspt-tiny below, served by huggingface_hub's cache
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def sockets(monkeypatch):
    """Every network connection attempt in the test, recorded (and refused)."""
    calls = []
    connect = socket.socket.connect

    def guarded_connect(self, address, *a, **k):
        if self.family == getattr(socket, "AF_UNIX", None):
            return connect(self, address, *a, **k)
        calls.append(address)
        raise OSError(f"test: no network ({address!r})")

    def refuse(*a, **k):
        calls.append(a[:1])
        raise OSError(f"test: no network ({a[:1]!r})")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


@pytest.fixture
def hub_tag(monkeypatch):
    """dspt-tiny gets an open_clip pretrained tag 'hubtest' whose weights live on the hub at REPO."""
    import open_clip.pretrained as ocp

    monkeypatch.setitem(ocp._PRETRAINED, "dspt-tiny", {"hubtest": ocp._pcfg(hf_hub=f"{REPO}/")})
    assert open_clip_tags("dspt-tiny") == ["hubtest"]
    return "hubtest"


def open_clip_tags(name):
    import open_clip

    return open_clip.list_pretrained_tags_by_model(name)


def tiny_weights(seed: int = 3) -> tuple[dict, bytes]:
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in load_backbone("dspt-tiny", init_seed=seed).model.state_dict().items()}
    return state, save(state)


def put_in_hub_cache(hub, data: bytes, filename: str = "open_clip_model.safetensors"):
    """A file in huggingface_hub's cache layout, as a finished download leaves it."""
    folder = hub / f"models--{REPO.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).write_bytes(data)
    return folder


def go_online(monkeypatch, **env):
    """Offline mode off (as on a machine with internet), plus the given environment (proxy, endpoint)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def fake_hub(monkeypatch, online):
    """huggingface_hub's download as open_clip calls it: the real client answers from the cache in offline
    mode; online, `online(repo_id, filename)` stands for the network."""
    import open_clip.pretrained as ocp
    from huggingface_hub import constants

    real = ocp.hf_hub_download
    requests = []

    def download(repo_id, filename, **kw):
        if constants.HF_HUB_OFFLINE:
            return real(repo_id=repo_id, filename=filename, **kw)
        requests.append(filename)
        return online(repo_id, filename)

    monkeypatch.setattr(ocp, "hf_hub_download", download)
    return requests


def network_down(repo_id, filename):
    """What huggingface_hub raises when the request fails (no route, proxy refused, DNS, timeout)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # huggingface_hub's HTTP client (httpx2 in huggingface_hub 1.x/2.x)
        from httpx2 import ConnectError
    except ImportError:
        from httpx import ConnectError
    try:
        raise ConnectError("[Errno 111] Connection refused")
    except ConnectError as exc:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                      "cannot find the requested files in the local cache.") from exc


def test_uncached_weights_offline_name_the_fix(sockets):
    """Offline mode on, empty cache: one line that says so and names the fix; no request, no socket."""
    with pytest.raises(BackboneError) as err:
        load_backbone("RN50", "openai")
    msg = str(err.value)
    assert "'RN50' weights 'openai' are not in the local cache" in msg and "offline mode is on" in msg
    assert "--checkpoint FILE" in msg and "\n" not in msg and "reach" not in msg
    assert sockets == []


def test_cached_weights_load_without_any_request(hermetic_hub, hub_tag, sockets, monkeypatch):
    """Weights in the cache load through open_clip with the hub client offline, also when the machine is online
    (no request at all: cache first)."""
    state, data = tiny_weights()
    put_in_hub_cache(hermetic_hub, data)
    for online in (False, True):
        if online:
            go_online(monkeypatch, HTTPS_PROXY="http://proxy.invalid:3128")
        requests = fake_hub(monkeypatch, online=lambda *a: pytest.fail("went online although the file is cached"))
        bb = load_backbone("dspt-tiny", hub_tag)
        got = bb.model.state_dict()
        assert bb.weights_id == hub_tag and all(torch.equal(got[k], state[k]) for k in state)
        assert requests == [] and sockets == []


def test_download_behind_a_proxy_goes_through_the_hub_client(hermetic_hub, hub_tag, sockets, monkeypatch):
    """Online and not cached: the hub client downloads (it honours HTTPS_PROXY itself); dspt opens no socket of
    its own to probe the hub first (a direct probe fails behind a proxy although the download works)."""
    go_online(monkeypatch, HTTPS_PROXY="http://proxy.invalid:3128", https_proxy="http://proxy.invalid:3128")
    state, data = tiny_weights()

    def download(repo_id, filename):
        assert repo_id == REPO
        folder = put_in_hub_cache(hermetic_hub, data, filename)
        return str(folder / "snapshots" / COMMIT / filename)

    requests = fake_hub(monkeypatch, download)
    bb = load_backbone("dspt-tiny", hub_tag)
    assert requests == ["open_clip_model.safetensors"] and sockets == []
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("endpoint, host", [(None, "huggingface.co"),
                                            ("https://hf-mirror.example", "hf-mirror.example")])
def test_network_failure_names_host_proxy_and_checkpoint(hub_tag, sockets, monkeypatch, endpoint, host):
    go_online(monkeypatch, HTTPS_PROXY="http://proxy.invalid:3128",
              **({"HF_ENDPOINT": endpoint} if endpoint else {}))
    requests = fake_hub(monkeypatch, network_down)
    with pytest.raises(BackboneError) as err:
        load_backbone("dspt-tiny", hub_tag)
    msg = str(err.value)
    assert f"could not download 'dspt-tiny' weights 'hubtest' from {host}" in msg
    assert "ConnectError" in msg and "HTTPS_PROXY" in msg and "HF_ENDPOINT" in msg and "--checkpoint FILE" in msg
    assert "\n" not in msg and requests and sockets == []


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_corrupt_cached_file_is_named_not_reported_unreachable(hermetic_hub, hub_tag, sockets, monkeypatch,
                                                               filename):
    """A truncated download in the cache: the message says corrupt and names the folder to delete."""
    import io

    state, data = tiny_weights()
    if filename.endswith(".bin"):
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    folder = put_in_hub_cache(hermetic_hub, data[: len(data) // 2], filename)
    for online in (False, True):
        if online:
            go_online(monkeypatch)
            fake_hub(monkeypatch, network_down)
        with pytest.raises(BackboneError) as err:
            load_backbone("dspt-tiny", hub_tag)
        msg = str(err.value)
        assert "are corrupt or truncated" in msg and f"delete {folder} and run again" in msg and filename in msg
        assert "reach" not in msg and "not in the local cache" not in msg and "\n" not in msg
    assert sockets == []


def test_test_transform_follows_the_weights_preprocess_config(hermetic_hub, monkeypatch):
    """Weights whose open_clip preprocess config differs from CLIP's (DFN5B ViT-H-14: squash; MobileCLIP-B,
    PE-Core: bilinear, other mean): the test transform is open_clip's for those weights, not a fixed one."""
    import numpy as np
    import open_clip
    import open_clip.pretrained as ocp
    from PIL import Image

    monkeypatch.setitem(ocp._PRETRAINED, "dspt-tiny", {"squash": ocp._pcfg(
        hf_hub=f"{REPO}/", resize_mode="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)})
    put_in_hub_cache(hermetic_hub, tiny_weights()[1])
    bb = load_backbone("dspt-tiny", "squash")
    _, _, preprocess = open_clip.create_model_and_transforms("dspt-tiny", pretrained="squash")
    assert (bb.resize_mode, bb.interpolation, bb.mean) == ("squash", "bilinear", (0.5,) * 3)
    rng = np.random.default_rng(0)
    for w, h in [(300, 200), (40, 90)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(bb.test_transform()(img), preprocess(img))


def test_test_transform_repr_is_stable():
    """The feature-cache key holds repr(test_transform()): no object addresses, same in every process."""
    bb = load_backbone("dspt-tiny")
    text = repr(bb.test_transform())
    assert " at 0x" not in text and text == repr(load_backbone("dspt-tiny").test_transform())
    assert "MaybeConvertMode" in text and "bicubic" in text


def test_view_augmentation_options_reach_transform_and_cache_key(tmp_path):
    """crop_scale / hflip change the training views, so they must change the feature-cache key."""
    from dspt.features import store_key, view_tags

    bb = load_backbone("dspt-tiny")
    default = view_tags(bb, views=2, seed=0)
    crop, flip = bb.train_transform().transforms[:2]
    assert crop.scale == (0.08, 1.0) and flip.p == 0.5  # CoOp's protocol by default
    bb.crop_scale, bb.hflip = 0.8, False
    crop, flip = bb.train_transform().transforms[:2]
    assert crop.scale == (0.8, 1.0) and flip.p == 0.0
    changed = view_tags(bb, views=2, seed=0)
    assert changed[0] == default[0] == "view0" and set(changed[1:]).isdisjoint(default[1:])  # augmented views differ
    assert store_key(bb) == store_key(load_backbone("dspt-tiny"))  # the un-augmented view does not


@pytest.mark.parametrize("trained_with_quick_gelu", [True, False])
def test_weights_get_the_activation_they_were_trained_with(hermetic_hub, sockets, monkeypatch,
                                                           trained_with_quick_gelu):
    """OpenAI's weights were trained with QuickGELU while open_clip's plain configs (RN50, ViT-B-16) use GELU:
    the model is built with the tag's activation, and the feature cache key tells the two apart."""
    import open_clip.pretrained as ocp

    from dspt.features import store_key

    monkeypatch.setitem(ocp._PRETRAINED, "dspt-tiny",
                        {"hubtest": ocp._pcfg(hf_hub=f"{REPO}/", quick_gelu=trained_with_quick_gelu)})
    state, data = tiny_weights()
    put_in_hub_cache(hermetic_hub, data)
    fake_hub(monkeypatch, online=lambda *a: pytest.fail("went online although the file is cached"))
    bb = load_backbone("dspt-tiny", "hubtest")
    acts = {type(m).__name__ for m in bb.model.modules()} & {"QuickGELU", "GELU"}
    assert bb.quick_gelu is trained_with_quick_gelu
    assert acts == ({"QuickGELU"} if trained_with_quick_gelu else {"GELU"})
    key = store_key(bb)
    assert key["quick_gelu"] is trained_with_quick_gelu
