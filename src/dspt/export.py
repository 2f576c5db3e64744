"""A finished run as one deployable classifier file: `dspt export RUN -o FILE [--format dspt|onnx]`.

A CoOp prompt only ever reaches the image side as its class text features, so an export stores those, fixed:

* format "dspt" (default): ONE safetensors file (no pickle) holding the normalised float32 class text features
  `text_features` [C, E] and, as JSON metadata, what rebuilds the rest: the class names, the image model (open_clip
  name + pretrained tag, or the checkpoint's file name and sha256, or the seed of random weights), the logit scale,
  the preprocessing (image size, resize mode, interpolation, mean, std, fill colour: the backbone's test transform),
  the dspt version and the run (its folder and the sha256 of its config.yaml). `load_classifier(FILE)` builds the
  image tower only and classifies: probabilities = softmax(logit_scale * normalised image features @ text_features.T),
  the run's own classifier's numbers.
* format "onnx": the image tower and the fixed text head (normalise, matmul with the stored text features, scale,
  softmax) as ONE ONNX model: input `images`, a float32 batch [N, 3, H, W] already preprocessed; outputs `logits`
  and `probabilities` [N, C]. The same metadata goes into a sidecar JSON beside it (FILE with suffix .json) and into
  the model's metadata_props. `OnnxClassifier` / `onnx_predict` run it with onnxruntime, numpy and PIL only: the
  preprocessing is re-implemented here in numpy/PIL to match the torch transform.

Precision. A run computes in its `--precision` where the backbone applies it (`Backbone.autocast`: bf16 / fp16
autocast on a GPU, bf16 also on a CPU with native bf16; otherwise fp32). The export records it (`precision` in
the metadata: the run's setting, device and what it computed in) and computes the text features as the run did
where the exporting device allows (export on a GPU for a GPU run: `--device cuda`). A dspt export's `load_classifier` encodes images
in the run's precision under the same rule, so on the run's kind of device it gives the run's own numbers (on a
CPU, a bf16/fp16 GPU run's export computes in fp32, and says so). An ONNX export is an fp32 graph: for a run that
computed in bf16/fp16 the export counts, on the run's test images, how many of its predictions differ from the
run's (the run's test features from its feature cache, else encoded here in the run's precision, against the
same text features) and says so in one line, e.g. ``export: the run used bf16; this ONNX export computes in fp32;
3 of 2000 test predictions differ``; the counts go into the metadata (`precision.test_predictions`).

The torch-free half of this module (preprocessing, image discovery, `OnnxClassifier`, `onnx_predict`) imports no
torch and no other dspt module at call time, so this file also works copied alone onto a machine that has only
onnxruntime, numpy and pillow (`python -c "import export; print(export.onnx_predict('m.onnx', ['img/']))"`).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

try:  # inside the dspt package
    from .data.base import IMAGE_EXTENSIONS, natural_key
    from .errors import BackboneError, ConfigError, DataError
except ImportError:  # this file loaded on its own (onnxruntime + numpy + PIL, no torch, no dspt): same behaviour
    IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

    def natural_key(text: str) -> list:
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]

    class DataError(ValueError):  # type: ignore[no-redef]
        pass

    class ConfigError(ValueError):  # type: ignore[no-redef]
        pass

    class BackboneError(ValueError):  # type: ignore[no-redef]
        pass

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedClassifier", "OnnxClassifier", "collect_images", "export_run",
           "load_classifier", "onnx_predict", "preprocess_image", "read_metadata", "sidecar_path"]

FORMAT = "dspt.classifier"  # the marker in every export's metadata
FORMAT_VERSION = 1  # bump when the stored layout changes
FORMATS = ("dspt", "onnx")
ONNX_INPUT, ONNX_OUTPUTS = "images", ("logits", "probabilities")

# ---------------------------------------------------------------------------------------------------------------
# torch-free: images in, preprocessing, the ONNX runtime side


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def collect_images(items: Iterable[str | os.PathLike]) -> list[str]:
    """Image files, folders expanded (recursively, in natural order), as `dspt predict` reads them."""
    items = list(items)
    paths: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            paths += sorted((str(f) for f in p.rglob("*") if f.is_file() and _is_image_file(f)), key=natural_key)
        elif p.is_file():
            paths.append(str(p))
        else:
            raise DataError(f"'{item}' is neither an image file nor a folder")
    if not paths:
        raise DataError(f"no images found in {[str(i) for i in items]}")
    return paths


def _inputs(images: Any) -> list[tuple[str, Any]]:
    """(name, source) per image: a path (folders expanded) or a PIL image (named '<image i>')."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out: list[tuple[str, Any]] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append((getattr(item, "filename", "") or f"<image {len(out)}>", item))
        elif isinstance(item, (str, os.PathLike)):
            out += [(p, p) for p in collect_images([item])]
        else:
            raise DataError(f"cannot classify a {type(item).__name__}: give PIL images, image files or folders")
    if not out:
        raise DataError("no images given")
    return out


def _open_rgb(source: Any) -> Image.Image:
    """An RGB PIL image from a path or a PIL image (dspt's own `load_image` rules for files)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file '{source}' not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image '{source}' ({type(exc).__name__}); remove or replace the file") from None


def _pil_interpolation(name: str) -> int:
    # open_clip: 'bilinear' is bilinear, anything else ('bicubic', 'random') bicubic at test time
    return Image.Resampling.BILINEAR if name == "bilinear" else Image.Resampling.BICUBIC


def _center_crop_or_pad(img: Image.Image, size: int, fill: int) -> Image.Image:
    """torchvision's center_crop (open_clip's CenterCropOrPad with a fill colour): pad to at least size x size
    (centred, extra pixel right/bottom), then crop the centre (offsets rounded half to even, as torchvision)."""
    w, h = img.size
    if size > w or size > h:
        pw, ph = max(size, w), max(size, h)
        canvas = Image.new(img.mode, (pw, ph), (fill,) * len(img.getbands()))
        canvas.paste(img, ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0))
        img, (w, h) = canvas, (pw, ph)
        if (w, h) == (size, size):
            return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_image(image: Any, preprocess: dict[str, Any]) -> np.ndarray:
    """[3, S, S] float32: open_clip's test transform (the backbone's `test_transform()`) in numpy/PIL.

    RGB; resize ('shortest': the short side to S, the long side truncated as torchvision does, then centre crop;
    'longest': the long side to S keeping the ratio, then centre pad with the fill colour; 'squash': S x S); /255;
    (x - mean) / std, all in float32.
    """
    img = _open_rgb(image)
    size, mode = int(preprocess["image_size"]), preprocess.get("resize_mode", "shortest")
    interp = _pil_interpolation(preprocess.get("interpolation", "bicubic"))
    w, h = img.size
    if mode == "squash":
        if (w, h) != (size, size):
            img = img.resize((size, size), interp)
    elif mode == "longest":
        ratio = max(h / size, w / size)
        new_h, new_w = round(h / ratio), round(w / ratio)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), interp)
        img = _center_crop_or_pad(img, size, int(preprocess.get("fill_color", 0)))
    elif mode == "shortest":
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), interp)
        img = _center_crop_or_pad(img, size, 0)
    else:
        raise ConfigError(f"unknown resize mode '{mode}' in the export's preprocessing; expected shortest, "
                          "longest or squash")
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(preprocess["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(preprocess["std"], dtype=np.float32)[:, None, None]
    return (x - mean) / std


def _batches(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ConfigError(f"batch size must be >= 1 (got {size})")
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _rows(names: list[str], probs: np.ndarray, classnames: list[str], top_k: int) -> list[dict[str, Any]]:
    """One row per image: path, prediction, probability, top_k [(class, probability), ...] best first."""
    k = max(1, min(int(top_k), probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for name, p, idx in zip(names, probs, order):
        top = [(classnames[i], float(p[i])) for i in idx]
        rows.append({"path": name, "prediction": top[0][0], "probability": top[0][1], "top_k": top})
    return rows


def sidecar_path(onnx_file: str | os.PathLike) -> Path:
    """The JSON beside an exported ONNX model: classifier.onnx -> classifier.json."""
    return Path(onnx_file).with_suffix(".json")


def _check_meta(meta: Any, source: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"'{source}' is not a classifier exported by `dspt export` (no '{FORMAT}' metadata); "
                          "export the run with `dspt export RUN -o FILE`")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"'{source}' was exported in format version {meta['format_version']}, newer than this "
                          f"dspt reads ({FORMAT_VERSION}); upgrade dspt")
    return meta


class OnnxClassifier:
    """An exported ONNX classifier run with onnxruntime, numpy and PIL only (no torch).

    The metadata (classes, preprocessing) comes from the sidecar JSON, else from the model's own metadata_props.
    """

    def __init__(self, onnx_file: str | os.PathLike, providers: Sequence[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("running an ONNX classifier needs onnxruntime: pip install 'dspt[export]' "
                              "(or pip install onnxruntime)") from None
        self.path = Path(onnx_file)
        if not self.path.is_file():
            raise DataError(f"ONNX file '{self.path}' not found; export one with `dspt export RUN -o FILE.onnx`")
        self.session = ort.InferenceSession(str(self.path), providers=list(providers or ["CPUExecutionProvider"]))
        side = sidecar_path(self.path)
        if side.is_file():
            meta = json.loads(side.read_text(encoding="utf-8"))
            source = str(side)
        else:
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map.get(FORMAT, "null"))
            source = str(self.path)
        self.meta = _check_meta(meta, source)
        self.classnames: list[str] = list(self.meta["classnames"])
        self.preprocess: dict[str, Any] = dict(self.meta["preprocess"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) [N, C] of a preprocessed float32 batch [N, 3, S, S]."""
        logits, probs = self.session.run(list(ONNX_OUTPUTS), {self.input_name: np.ascontiguousarray(batch,
                                                                                                   np.float32)})
        return logits, probs

    def _probabilities(self, inputs: list[tuple[str, Any]], batch_size: int) -> np.ndarray:
        out = [self.run(np.stack([preprocess_image(src, self.preprocess) for _, src in chunk]))[1]
               for chunk in _batches(inputs, batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def probabilities(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """[N, C] class probabilities of PIL images, image files or folders (searched recursively)."""
        return self._probabilities(_inputs(images), batch_size)

    def predict(self, images: Any, top_k: int = 3, batch_size: int = 64) -> list[dict[str, Any]]:
        """One dict per image: path, prediction, probability, top_k [(class, probability), ...]
        (`pandas.DataFrame(rows)` makes it the table `ExportedClassifier.predict` returns)."""
        inputs = _inputs(images)
        return _rows([n for n, _ in inputs], self._probabilities(inputs, batch_size), self.classnames, top_k)


def onnx_predict(onnx_file: str | os.PathLike, images: Any, top_k: int = 3, batch_size: int = 64
                 ) -> list[dict[str, Any]]:
    """Classify images with an exported ONNX model using onnxruntime, numpy and PIL only (see `OnnxClassifier`)."""
    return OnnxClassifier(onnx_file).predict(images, top_k=top_k, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------
# torch side: exporting a run, loading an exported file


def _model_id(meta: dict[str, Any], backbone: Any, checkpoint: Path | None) -> dict[str, Any]:
    """What rebuilds the image tower: open_clip name and pretrained tag, a checkpoint file by name + sha256, or
    the seed of random weights."""
    weights = backbone.weights_id
    out: dict[str, Any] = {"name": backbone.model_name, "pretrained": None, "checkpoint": None, "init_seed": None,
                           "weights_id": weights, "quick_gelu": bool(backbone.quick_gelu)}
    if weights.startswith("sha256:"):
        out["checkpoint"] = {"file": checkpoint.name if checkpoint else None,
                             "path": str(checkpoint.resolve()) if checkpoint else None,
                             "sha256": weights.split(":", 1)[1]}
    elif weights.startswith("random:"):
        out["init_seed"] = int(weights.split(":", 1)[1])
    else:
        out["pretrained"] = meta.get("pretrained") or weights
    return out


def _preprocess_of(backbone: Any) -> dict[str, Any]:
    """The backbone's test transform as data: open_clip's preprocess config of these weights (centre crop)."""
    return {"image_size": int(backbone.image_size), "resize_mode": backbone.resize_mode,
            "interpolation": backbone.interpolation, "crop": "center", "mean": [float(v) for v in backbone.mean],
            "std": [float(v) for v in backbone.std], "fill_color": int(backbone.fill_color)}


def _image_tower(model: Any) -> Any:
    """The module that turns images into (unnormalised) image features: `model.visual` where encode_image is
    exactly that (open_clip's CLIP and CustomTextCLIP), so the text tower can be dropped; else the whole model."""
    import torch
    from open_clip.model import CLIP, CustomTextCLIP

    class Whole(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.encode_image(x)

    if type(model).encode_image in (CLIP.encode_image, CustomTextCLIP.encode_image):
        return model.visual
    return Whole(model)


def _head_module(tower: Any, text_features: "torch.Tensor", logit_scale: float) -> Any:
    """images [N, 3, S, S] -> (logits, probabilities) [N, C]: the image tower and the fixed text head."""
    import torch
    import torch.nn.functional as F

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower
            # stored transposed [E, C]: the exporter's constant folding must not name a folded copy like the buffer
            self.register_buffer("class_weights", text_features.detach().float().t().contiguous().clone())
            self.register_buffer("logit_scale", torch.tensor(float(logit_scale), dtype=torch.float32))

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats = F.normalize(self.tower(images).float(), dim=-1)
            logits = self.logit_scale * (feats @ self.class_weights)
            return logits, logits.softmax(dim=-1)

    return Head().eval()


def _run_identity(run_dir: Path) -> dict[str, Any]:
    from .backbone import file_sha256

    cfg = run_dir / "config.yaml"
    return {"path": str(run_dir.resolve()), "config_sha256": file_sha256(cfg) if cfg.is_file() else None,
            "finished": (run_dir / "metrics.json").is_file()}


def export_run(run_dir: str | os.PathLike, out_file: str | os.PathLike, format: str = "dspt",
               checkpoint: str | os.PathLike | None = None, device: str | None = "cpu",
               compare: bool = True) -> dict[str, Any]:
    """Write the finished run `run_dir` as one classifier file (module docstring); returns its metadata.

    `checkpoint`: the run's CLIP checkpoint where it moved since training (its sha256 must match).
    `compare`: for an ONNX export of a run that computed in bf16/fp16, count on the run's test images how many
    predictions the fp32 export changes (encodes the test images once in fp32; off: recorded as not compared).
    Where the export does not compute as the run did, one line says so (logged as a warning, kept in
    `meta["precision"]["note"]`).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .io import atomic_write, atomic_write_text
    from .train import load_prompt
    from .version import __version__

    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out_file)
    if (out.suffix.lower() == ".onnx") != (format == "onnx"):
        raise ConfigError(f"format '{format}' is written to a .{'onnx' if format == 'onnx' else 'safetensors'} "
                          f"file, not '{out.name}'; name the output accordingly or pass --format "
                          f"{'dspt' if format == 'onnx' else 'onnx'}")
    if out.is_dir():
        raise ConfigError(f"output '{out}' is a folder; give a file name, e.g. {out / 'classifier.safetensors'}")
    clf = load_prompt(run_dir, device=device, checkpoint=checkpoint)
    if not hasattr(clf, "learner"):  # CoCoOp, VPT, MaPLe, PromptSRC: image-conditioned classes, or a prompted tower
        raise ConfigError(f"run '{run_dir}' trained learner '{clf.learner_name}': dspt export writes CoOp-style "
                          "classifiers (fixed class features on the frozen image tower) only; use `dspt predict` "
                          "on the run folder")
    with safe_open(str(run_dir / "prompt.safetensors"), framework="pt") as fh:
        prompt_meta = json.loads((fh.metadata() or {})["meta"])
    backbone = clf.backbone
    from .export_precision import compare_with_run, computes_in, run_config, run_precision

    cfg = run_config(run_dir)
    precision = run_precision(run_dir, cfg)
    if cfg is not None:  # the run's own classifier (train._classifier): its precision and prompt computation
        backbone.precision = cfg.precision  # applied where this device applies it (a GPU), as in the run
        clf.truncate = clf.share_prefix = clf.mixed_precision = cfg.path == "fast"
    run_computed = precision["run_computed"]
    precision["text_features"] = computes_in(backbone.precision, backbone.device)
    precision["images"] = "fp32" if format == "onnx" else run_computed
    used = None
    if prompt_meta.get("checkpoint"):
        used = Path(checkpoint).expanduser() if checkpoint else Path(prompt_meta["checkpoint"]).expanduser()
    with torch.no_grad():
        text = clf.text_features().float().cpu().contiguous()
    logit_scale = float(backbone.logit_scale.float().cpu())
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": format,
        "classnames": list(clf.learner.classnames), "num_classes": int(text.shape[0]), "embed_dim": int(text.shape[1]),
        "model": _model_id(prompt_meta, backbone, used), "logit_scale": logit_scale,
        "preprocess": _preprocess_of(backbone), "dspt_version": __version__, "run": _run_identity(run_dir),
        "prompt": {k: prompt_meta.get(k) for k in ("n_ctx", "ctx_init", "csc", "class_token_position", "template")},
        "formula": "probabilities = softmax(logit_scale * normalize(image_features) @ text_features.T)",
        "precision": precision,
    }
    note = None
    if run_computed != "fp32" and precision["text_features"] != run_computed:
        # this device cannot compute as the run did: the run's own predictions cannot be reproduced here
        precision["test_predictions"] = {"compared": 0, "differ": None,
                                         "why": f"the text features were computed in fp32 on {backbone.device}"}
        what = "this ONNX export computes in fp32" if format == "onnx" else \
            "this export's text features were computed in fp32"
        note = (f"export: the run used {run_computed}; {what} on {backbone.device}; its test predictions were not "
                f"compared with the run's (export on a GPU, --device cuda, to keep {run_computed})")
    elif run_computed != "fp32" and format == "onnx":
        if compare:
            precision["test_predictions"] = cmp = compare_with_run(cfg, run_dir, backbone, text)
        else:
            precision["test_predictions"] = cmp = {"compared": 0, "differ": None, "why": "compare=False"}
        note = f"export: the run used {run_computed}; this ONNX export computes in fp32; " + (
            f"{cmp['differ']} of {cmp['compared']} test predictions differ" if cmp["differ"] is not None
            else f"its test predictions were not compared with the run's ({cmp['why']})")
    if note:
        precision["note"] = note
        log.warning("%s", note)
    if format == "dspt":
        atomic_write(out, lambda tmp: save_file({"text_features": text}, tmp,
                                                metadata={"format": FORMAT, "meta": json.dumps(meta)}))
        return meta

    meta["onnx"] = {"input": ONNX_INPUT, "input_shape": ["N", 3, meta["preprocess"]["image_size"],
                                                           meta["preprocess"]["image_size"]],
                    "input_dtype": "float32 (preprocessed: see preprocess)", "outputs": list(ONNX_OUTPUTS)}
    head = _head_module(_image_tower(backbone.model), text, logit_scale).cpu()
    _write_onnx(head, meta, out)  # records the opset in meta["onnx"]
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=1) + "\n")
    return meta


def _write_onnx(head: Any, meta: dict[str, Any], out: Path) -> int:
    """torch.onnx.export (the torch.export-based exporter: needs onnx and onnxscript) with a dynamic batch, the
    metadata in metadata_props; written beside `out` and moved into place (with its .data file, for models over
    2 GB), so a reader never sees half a model. Returns the opset."""
    import contextlib
    import inspect
    import io
    import logging
    import shutil
    import tempfile

    import torch

    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise ConfigError(f"ONNX export needs {' and '.join(missing)}: pip install 'dspt[export]'")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise ConfigError(f"ONNX export needs torch's torch.export-based exporter (torch >= 2.6; this is "
                          f"{torch.__version__}): upgrade torch")
    size = meta["preprocess"]["image_size"]
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised away
    quiet = logging.getLogger("onnxscript")  # its optimizer logs each constant it leaves unfolded
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(head, (example,), None, dynamo=True, input_names=[ONNX_INPUT],
                                        output_names=list(ONNX_OUTPUTS), verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        quiet.setLevel(level)
    meta["onnx"]["opset"] = opset = int(program.model.opset_imports.get("", 0))
    program.model.metadata_props[FORMAT] = json.dumps(meta)
    program.model.doc_string = ("dspt classifier: input 'images' float32 [N, 3, S, S] preprocessed as in "
                                "metadata_props['dspt.classifier'].preprocess; outputs logits, probabilities [N, C]")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        program.save(tmp_dir / out.name, external_data=None)  # external data only over 2 GB
        for f in sorted(tmp_dir.iterdir(), key=lambda p: p.name != out.name + ".data"):  # data before the model
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return opset


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def read_metadata(file: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an exported classifier: a .safetensors export, or an .onnx one (sidecar or embedded)."""
    path = Path(file)
    if not path.is_file():
        raise DataError(f"exported classifier '{path}' not found; make one with `dspt export RUN -o FILE`")
    if path.suffix.lower() == ".onnx":
        side = sidecar_path(path)
        if side.is_file():
            return _check_meta(json.loads(side.read_text(encoding="utf-8")), str(side))
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return _check_meta(json.loads(props.get(FORMAT, "null")), str(path))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not a safetensors file ({type(exc).__name__}); give a file written by "
                          "`dspt export`") from None
    if raw.get("format") != FORMAT and "meta" in raw and path.name == "prompt.safetensors":
        raise ConfigError(f"'{path}' is a run's learned prompt, not an export; pass its run folder "
                          f"'{path.parent}', or export it: dspt export {path.parent} -o classifier.safetensors")
    try:
        meta = json.loads(raw.get("meta", "null"))
    except json.JSONDecodeError:
        meta = None
    return _check_meta(meta, str(path))


def _find_checkpoint(meta: dict[str, Any], file: Path, override: str | os.PathLike | None) -> Path:
    """The export's CLIP checkpoint: `override`, else the recorded absolute path, else a file of the recorded name
    beside the export or in the current folder; its sha256 must be the recorded one."""
    from .backbone import file_sha256

    ck = meta["model"]["checkpoint"]
    name = ck.get("file") or ""
    if override:
        candidates = [Path(override).expanduser()]
    else:
        candidates = [Path(p).expanduser() for p in (ck.get("path"),) if p] + \
                     ([file.parent / name, Path.cwd() / name] if name else [])
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        where = ", ".join(str(c) for c in candidates) or "(no path recorded)"
        raise BackboneError(f"the CLIP checkpoint of '{file}' ({name or 'sha256 ' + ck['sha256'][:12]}) is not at "
                            f"{where}; pass its current path (load_classifier(..., checkpoint=FILE) or "
                            "--checkpoint FILE)")
    found = file_sha256(path)
    if found != ck["sha256"]:
        raise BackboneError(f"'{path}' is not the checkpoint '{file}' was exported with (sha256 {found[:12]}, "
                            f"expected {ck['sha256'][:12]}); pass the original file with --checkpoint FILE")
    return path


class ExportedClassifier:
    """A classifier from `dspt export`: the image tower and the fixed class text features (the text tower is
    neither kept nor run). `probabilities(images)` / `predict(images)` take PIL images, image files or folders."""

    def __init__(self, tower: Any, text_features: "torch.Tensor", meta: dict[str, Any], device: Any,
                 file: Path | None = None):
        import open_clip

        self.tower, self.meta, self.device, self.file = tower, meta, device, file
        # the precision the run's image tower computed in; applied here by the run's own rule (a GPU autocasts)
        self.precision: str = (meta.get("precision") or {}).get("images") or "fp32"
        self.text_features = text_features.to(device)  # [C, E], normalised
        self.logit_scale = float(meta["logit_scale"])
        self.classnames: list[str] = list(meta["classnames"])
        self.preprocess: dict[str, Any] = dict(meta["preprocess"])
        p = self.preprocess
        cfg = open_clip.transform.PreprocessCfg(size=p["image_size"], mean=tuple(p["mean"]), std=tuple(p["std"]),
                                                interpolation=p["interpolation"], resize_mode=p["resize_mode"],
                                                fill_color=p["fill_color"])
        self.transform = open_clip.transform.image_transform_v2(cfg, is_train=False)  # the backbone's test transform

    def features(self, images: Any, batch_size: int = 64) -> "torch.Tensor":
        """[N, E] normalised float32 image features (on the CPU)."""
        return self._features(_inputs(images), batch_size)

    def _features(self, inputs: list[tuple[str, Any]], batch_size: int) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        from .export_precision import autocast_for

        out = []
        with torch.no_grad():
            for chunk in _batches(inputs, batch_size):
                batch = torch.stack([self.transform(_open_rgb(src)) for _, src in chunk]).to(self.device)
                with autocast_for(self.precision, self.device):
                    feats = self.tower(batch)
                out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    def logits_of(self, features: "torch.Tensor") -> "torch.Tensor":
        """logit_scale * features @ text_features.T for normalised image features [N, E]."""
        return self.logit_scale * features.to(self.device).float() @ self.text_features.t()

    def _probabilities(self, inputs: list[tuple[str, Any]], batch_size: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.logits_of(self._features(inputs, batch_size)).softmax(-1).cpu().numpy()

    def probabilities(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """[N, C] softmax(logit_scale * normalised image features @ text_features.T)."""
        return self._probabilities(_inputs(images), batch_size)

    def predict(self, images: Any, top_k: int = 3, batch_size: int = 64) -> "pd.DataFrame":
        """A table, one row per image: path, prediction, probability, top_k [(class, probability), ...]."""
        import pandas as pd

        inputs = _inputs(images)
        rows = _rows([n for n, _ in inputs], self._probabilities(inputs, batch_size), self.classnames, top_k)
        return pd.DataFrame(rows, columns=["path", "prediction", "probability", "top_k"])


def load_classifier(file: str | os.PathLike, device: str | None = "cpu",
                    checkpoint: str | os.PathLike | None = None) -> ExportedClassifier:
    """Rebuild an exported classifier (.safetensors from `dspt export`): the image tower only, from the recorded
    open_clip model and pretrained tag, checkpoint (found by its recorded path or beside the export, or given as
    `checkpoint`; its sha256 must match) or seeded random weights."""
    from safetensors.torch import load_file

    from .backbone import load_backbone

    path = Path(file)
    if path.suffix.lower() == ".onnx":
        raise ConfigError(f"'{path}' is an ONNX export; run it with dspt.export.OnnxClassifier / onnx_predict "
                          "(onnxruntime), or export the run in the dspt format for load_classifier")
    meta = read_metadata(path)
    model = meta["model"]
    ckpt = _find_checkpoint(meta, path, checkpoint) if model.get("checkpoint") else None
    if checkpoint and ckpt is None:
        raise BackboneError(f"'{path}' was exported from {model['pretrained'] or 'random'} weights, not a checkpoint "
                            "file; drop --checkpoint")
    backbone = load_backbone(model["name"], None if ckpt else model.get("pretrained"), ckpt, device,
                             init_seed=int(model.get("init_seed") or 0))
    if backbone.weights_id != model["weights_id"]:
        raise BackboneError(f"'{path}' was exported with weights {model['weights_id']}, but rebuilding "
                            f"'{model['name']}' gave {backbone.weights_id}; use the dspt and open_clip versions "
                            "it was exported with")
    if bool(model.get("quick_gelu", backbone.quick_gelu)) != backbone.quick_gelu:
        raise BackboneError(f"'{path}' was exported from '{model['name']}' built with"
                            f"{'' if model['quick_gelu'] else 'out'} QuickGELU, this open_clip builds it "
                            f"with{'' if backbone.quick_gelu else 'out'}; use the open_clip version it was "
                            "exported with")
    scale = float(backbone.logit_scale.float().cpu())
    if abs(scale - float(meta["logit_scale"])) > 1e-4 * max(1.0, abs(scale)):
        raise BackboneError(f"'{path}' records logit scale {meta['logit_scale']:.4f}, its weights give {scale:.4f}; "
                            "the file was altered or the weights differ: export the run again")
    text = load_file(str(path))["text_features"].float()
    if tuple(text.shape) != (len(meta["classnames"]), int(meta["embed_dim"])):
        raise ConfigError(f"'{path}' holds text features of shape {tuple(text.shape)} for "
                          f"{len(meta['classnames'])} classes; the file is damaged: export the run again")
    from .export_precision import computes_in

    tower = _image_tower(backbone.model)  # the text tower goes with the backbone
    clf = ExportedClassifier(tower, text, meta, backbone.device, path)
    here = computes_in(clf.precision, backbone.device)
    if here != clf.precision:
        log.warning("'%s': its run computed in %s on a GPU; on %s this classifier computes in %s, so a few "
                    "predictions may differ from the run's (load it with device='cuda' to compute as the run did)",
                    path, clf.precision, backbone.device, here)
    return clf
