"""The backbones users will use, on random weights (nothing downloaded), each built once per module:

- RN50: OpenAI's ResNet with attention pooling (CoOp's backbone);
- ViT-B-16-quickgelu: ViT-B/16 with QuickGELU, as OpenAI ships it;
- EVA02-B-16: a non-OpenAI family (timm EVA02 image tower, open_clip's causal text transformer inside
  CustomTextCLIP's `.text`, so the other place a text tower lives); it builds on the CPU in about a second.

For each: the prompt learner, with its context set to the embeddings of "a photo of a", gives exactly
`model.encode_text` of the same prompt (fast path and CoOp's plain path, every class-token position); and the
cached preprocessing is open_clip's own. Text towers prompt tuning cannot reproduce are refused in one line.
"""
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dspt.backbone import Backbone, BackboneError, load_backbone
from dspt.prompt import POSITIONS, PromptClassifier, PromptLearner, check_prompt_tunable

ARCHS = ["RN50", "ViT-B-16-quickgelu", "EVA02-B-16"]
CLASSES = ["dog", "golden retriever", "red-winged blackbird"]  # 1, 2 and 5 tokens
CTX = "a photo of a"
# the text the learner's prompt spells, per class-token position (n_ctx = 4 tokens: 'middle' splits 2 + 2)
TEMPLATES = {"end": "a photo of a {}.", "front": "{} a photo of a.", "middle": "a photo {} of a."}
PATHS = {
    "fast": dict(),  # truncated after the last EOS, shared prefix computed once
    "fast-chunked": dict(class_chunk=2),
    "plain": dict(truncate=False, share_prefix=False, mixed_precision=False),  # CoOp's own computation
}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    """(dspt backbone, open_clip's evaluation preprocess for the same model name)."""
    name = request.param
    bb = load_backbone(name, pretrained=None, init_seed=0)
    _, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return bb, preprocess


def test_the_archs_are_what_they_claim(arch):
    bb, _ = arch
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import QuickGELU, TextTransformer

    check_prompt_tunable(bb)  # accepted
    if bb.model_name == "RN50":
        assert isinstance(bb.model.visual, ModifiedResNet) and hasattr(bb.model.visual, "attnpool")
    elif bb.model_name == "ViT-B-16-quickgelu":
        assert bb.model.visual.patch_size == (16, 16)
        assert any(isinstance(m, QuickGELU) for m in bb.model.transformer.modules())
    else:
        assert isinstance(bb.model, open_clip.CustomTextCLIP) and isinstance(bb.model.text, TextTransformer)
        assert type(bb.model.visual).__name__ == "TimmModel"


@pytest.mark.parametrize("position", POSITIONS)
def test_prompt_features_equal_encode_text(arch, position):
    """Shared context (and, for 'end', per-class context CSC): fast path, chunked fast path, CoOp's plain path."""
    bb, _ = arch
    with torch.no_grad():
        tokens = bb.tokenizer([TEMPLATES[position].format(c) for c in CLASSES])
        want = F.normalize(bb.model.encode_text(tokens).float(), dim=-1)
        cos = want @ want.t()
        assert (cos - torch.eye(len(CLASSES))).max() < 1 - 1e-4  # the classes differ: the check has teeth
        for csc in (False, True) if position == "end" else (False,):
            learner = PromptLearner(bb, CLASSES, ctx_init=CTX, csc=csc, class_token_position=position)
            assert learner.n_ctx == 4 and torch.equal(learner.eos, tokens.argmax(-1))  # EOS where open_clip's is
            for path, kwargs in PATHS.items():
                clf = PromptClassifier(bb, learner, **kwargs)
                if path.startswith("fast"):  # the savings really are in use
                    assert clf.length < learner.context_length
                    assert clf.prefix == {"end": 0 if csc else 1 + learner.n_ctx, "middle": 1 + learner.n_ctx // 2,
                                          "front": 0}[position]
                got = clf.text_features()
                err = (got - want).abs().max().item()
                assert err < 1e-5, f"{bb.model_name} {position} csc={csc} {path}: max |diff| {err:.2e}"


def test_test_transform_equals_open_clips_preprocess(arch):
    bb, preprocess = arch
    rng = np.random.default_rng(0)
    ours = bb.test_transform()
    for (w, h), mode in [((300, 200), "RGB"), ((64, 64), "RGB"), ((500, 700), "RGB"), ((90, 130), "L"),
                         ((240, 180), "RGBA")]:
        pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        a, b = ours(img), preprocess(img)
        assert a.shape == b.shape == (3, bb.image_size, bb.image_size), (w, h, mode)
        assert torch.equal(a, b), f"{bb.model_name} {w}x{h} {mode}: max |diff| {(a - b).abs().max():.2e}"


# -- text towers prompt tuning cannot reproduce: one line, naming what is supported -------------------------

SUPPORTED = "open_clip text transformers with EOS/argmax pooling"
TINY_VISION = dict(image_size=32, layers=1, width=64, patch_size=16, head_width=32)


def standin_backbone(model: nn.Module, name: str) -> Backbone:
    return Backbone(model=model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), model_name=name,
                    weights_id="random:0", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                    device=torch.device("cpu"))


def real_text_tower(name: str) -> Backbone:
    """open_clip's own text tower of the named model, exactly as its config builds it, beside a tiny image
    tower (the real image towers only cost build time: the refusal reads the text side)."""
    cfg = open_clip.get_model_config(name)
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=TINY_VISION, text_cfg=cfg["text_cfg"])
    return standin_backbone(model, name)


def assert_refused(bb: Backbone, reason: str) -> str:
    with pytest.raises(BackboneError) as err:
        check_prompt_tunable(bb)
    msg = str(err.value)
    assert "\n" not in msg and f"model '{bb.model_name}' cannot be prompt-tuned" in msg
    assert reason in msg and SUPPORTED in msg and "OpenAI-style CLIP" in msg
    with pytest.raises(BackboneError, match="cannot be prompt-tuned"):  # PromptLearner refuses it too
        PromptLearner(bb, ["dog", "cat"], ctx_init=CTX)
    return msg


def test_siglip_text_tower_is_refused():
    """SigLIP: bidirectional attention and 'last'-token pooling (no EOS to put the class after)."""
    bb = real_text_tower("ViT-B-16-SigLIP")
    assert bb.model.text.attn_mask is None and bb.model.text.pool_type == "last"
    assert_refused(bb, "pools at 'last' with bidirectional attention, not at the EOS token")


def test_bidirectional_eos_pooled_text_tower_is_tuned_on_the_plain_path():
    """MobileCLIP-S1's text tower has no causal mask but pools at the EOS: prompts reproduce encode_text
    through the full-length plain path (no truncation, no shared prefix), so it is accepted."""
    bb = real_text_tower("MobileCLIP-S1")
    assert bb.model.text.attn_mask is None
    check_prompt_tunable(bb)
    learner = PromptLearner(bb, CLASSES, ctx_init=CTX)
    with torch.no_grad():
        want = F.normalize(bb.model.encode_text(bb.tokenizer([TEMPLATES["end"].format(c) for c in CLASSES])), dim=-1)
        fast = PromptClassifier(bb, learner)
        assert fast.length == learner.context_length and fast.prefix == 0
        for clf in (fast, PromptClassifier(bb, learner, **PATHS["plain"])):
            assert (clf.text_features() - want).abs().max() < 1e-5


def test_coca_text_tower_is_refused():
    """CoCa appends a learned class token to the text and pools it."""
    cfg = open_clip.get_model_config("coca_ViT-B-32")
    torch.manual_seed(0)
    model = open_clip.CoCa(embed_dim=cfg["embed_dim"], multimodal_cfg=dict(cfg["multimodal_cfg"], layers=1),
                           text_cfg=cfg["text_cfg"], vision_cfg=TINY_VISION)
    assert_refused(standin_backbone(model, "coca_ViT-B-32"), "appends a class token to the text (CoCa)")


def test_hugging_face_text_tower_is_refused():
    """open_clip's HFTextEncoder (xlm-roberta-base-ViT-B-32, ...). Without `transformers` installed it cannot be
    built, so the stand-in is an uninitialised HFTextEncoder: the refusal reads only the tower's type and parts."""
    from open_clip.hf_model import HFTextEncoder

    assert "hf_model_name" in open_clip.get_model_config("xlm-roberta-base-ViT-B-32")["text_cfg"]
    text = HFTextEncoder.__new__(HFTextEncoder)
    nn.Module.__init__(text)
    model = nn.Module()
    model.visual, model.text = nn.Identity(), text
    assert_refused(standin_backbone(model, "xlm-roberta-base-ViT-B-32"), "a Hugging Face text model (HFTextEncoder)")
