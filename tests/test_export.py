"""`dspt export`, `dspt.load_classifier`, the ONNX export and `dspt predict` on an exported file: every path gives
the run's own classifier's probabilities (softmax(logit_scale * normalised image features @ text features.T))."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import dspt
from dspt.backbone import file_sha256, load_backbone
from dspt.config import RunConfig
from dspt.errors import BackboneError, ConfigError
from dspt.export import (FORMAT, ExportedClassifier, OnnxClassifier, collect_images, export_run, load_classifier,
                         onnx_predict, preprocess_image, sidecar_path)
from dspt.train import load_prompt, train

from clirun import run_cli
from imagefolders import make_split_folders

EXPORT_PY = Path(dspt.export.__file__)
TOL = 1e-4


def _weights(path: Path, seed: int) -> Path:
    model = load_backbone("dspt-tiny", init_seed=seed).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _train(root: Path, data: Path, name: str, **weights) -> Path:
    train(RunConfig(data=str(data), model="dspt-tiny", shots=4, views=1, n_ctx=4, epochs=2, batch_size=4,
                    device="cpu", cache_dir=str(root / "cache"), output=str(root / name), progress=False, **weights))
    return root / name


def _new_images(root: Path) -> Path:
    """Images unlike the training ones: odd sizes and aspect ratios (resize + crop do work), grey and RGBA, in
    nested folders (searched recursively)."""
    rng = np.random.default_rng(5)
    specs = [((50, 37), "RGB"), ((20, 64), "RGB"), ((32, 32), "RGB"), ((100, 90), "L"), ((41, 41), "RGBA"),
             ((17, 23), "RGB")]
    for i, ((w, h), mode) in enumerate(specs):
        bands = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    data = make_split_folders(root / "imgs", classes=3, train=6, test=3)
    ckpt = _weights(root / "clip.safetensors", 3)
    run = _train(root, data, "run", pretrained=None, checkpoint=str(ckpt))
    new = _new_images(root / "new")
    images = [str(new), str(data / "test")]
    export_run(run, root / "clf.safetensors")
    return {"root": root, "run": run, "ckpt": ckpt, "images": images, "file": root / "clf.safetensors"}


def _reference(run: Path, images: list[str]) -> np.ndarray:
    """The run's own classifier, by the formula: load_prompt -> text features; its backbone's test transform."""
    clf = load_prompt(run)
    bb = clf.backbone
    paths = collect_images(images)
    with torch.no_grad():
        text = clf.text_features()
        batch = torch.stack([bb.test_transform()(Image.open(p).convert("RGB")) for p in paths])
        feats = torch.nn.functional.normalize(bb.model.encode_image(batch).float(), dim=-1)
        return (bb.logit_scale * feats @ text.t()).softmax(-1).numpy()


def test_the_export_is_one_safetensors_file_with_metadata_and_no_pickle(world):
    raw = world["file"].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: header length, JSON header, raw tensor bytes, nothing else
    header = json.loads(raw[8:8 + n])
    assert set(header) == {"__metadata__", "text_features"}
    info = header["text_features"]
    assert info["dtype"] == "F32" and info["shape"] == [3, 128]
    assert len(raw) == 8 + n + 3 * 128 * 4 == 8 + n + info["data_offsets"][1]
    with safe_open(str(world["file"]), framework="pt") as fh:
        assert fh.metadata()["format"] == FORMAT
        meta = json.loads(fh.metadata()["meta"])
        text = fh.get_tensor("text_features")
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert meta["classnames"] == ["class 0", "class 1", "class 2"]
    model = meta["model"]
    assert model["name"] == "dspt-tiny" and model["pretrained"] is None
    assert model["checkpoint"] == {"file": "clip.safetensors", "path": str(world["ckpt"].resolve()),
                                   "sha256": file_sha256(world["ckpt"])}
    bb = load_prompt(world["run"]).backbone
    assert meta["logit_scale"] == pytest.approx(float(bb.logit_scale))
    assert meta["preprocess"] == {"image_size": 32, "resize_mode": bb.resize_mode, "interpolation": bb.interpolation,
                                  "crop": "center", "mean": list(bb.mean), "std": list(bb.std),
                                  "fill_color": bb.fill_color}
    assert meta["dspt_version"] == dspt.__version__
    assert meta["run"] == {"path": str(world["run"].resolve()), "finished": True,
                           "config_sha256": file_sha256(world["run"] / "config.yaml")}
    assert torch.allclose(text, load_prompt(world["run"]).text_features(), atol=0)


def test_load_classifier_gives_the_runs_own_probabilities(world):
    clf = dspt.load_classifier(world["file"])
    assert isinstance(clf, ExportedClassifier) and clf.classnames == ["class 0", "class 1", "class 2"]
    probs = clf.probabilities(world["images"], batch_size=4)  # batches of 4: 15 images over 4 batches
    ref = _reference(world["run"], world["images"])
    assert probs.shape == ref.shape == (15, 3) and probs.dtype == np.float32
    diff = float(np.abs(probs - ref).max())
    print(f"load_classifier max |prob diff| {diff:.3g}")
    assert diff < TOL
    assert (probs.argmax(1) == ref.argmax(1)).all()
    table = clf.predict(world["images"], top_k=2)
    assert list(table.columns) == ["path", "prediction", "probability", "top_k"]
    assert table["path"].tolist() == collect_images(world["images"])
    assert table["prediction"].tolist() == [clf.classnames[i] for i in ref.argmax(1)]
    assert np.allclose(table["probability"], ref.max(1), atol=TOL)
    assert all(len(t) == 2 and t[0][0] == p for t, p in zip(table["top_k"], table["prediction"]))
    # PIL images and single files classify the same as the folder they came from
    paths = collect_images(world["images"])[:3]
    pil = [Image.open(p) for p in paths]
    assert np.allclose(clf.probabilities(pil), probs[:3], atol=1e-6)
    assert np.allclose(clf.probabilities(paths[0]), probs[:1], atol=1e-6)


def test_the_text_tower_is_neither_kept_nor_run(world, monkeypatch):
    import open_clip

    def boom(*a, **k):
        raise AssertionError("the text tower ran")

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", boom)
    monkeypatch.setattr(dspt.prompt.PromptClassifier, "text_features", boom)
    monkeypatch.setattr(dspt.prompt.TextEncoder, "forward_plain", boom)
    clf = load_classifier(world["file"])
    assert clf.probabilities(world["images"]).shape == (15, 3)
    keys = set(clf.tower.state_dict())
    assert keys and not any("token_embedding" in k or "ln_final" in k for k in keys)


def test_random_weights_are_rebuilt_from_their_seed(world, tmp_path):
    run = _train(tmp_path, Path(world["images"][1]).parent, "random", pretrained=None)
    export_run(run, tmp_path / "random.safetensors")
    meta = dspt.export.read_metadata(tmp_path / "random.safetensors")
    assert meta["model"]["weights_id"] == "random:0" and meta["model"]["init_seed"] == 0
    assert meta["model"]["checkpoint"] is None
    probs = load_classifier(tmp_path / "random.safetensors").probabilities(world["images"])
    assert np.abs(probs - _reference(run, world["images"])).max() < TOL
    with pytest.raises(BackboneError, match="not a checkpoint file; drop --checkpoint"):
        load_classifier(tmp_path / "random.safetensors", checkpoint=world["ckpt"])


def test_a_moved_or_changed_checkpoint_is_refused_in_one_line(world, tmp_path):
    original, backup = world["ckpt"], tmp_path / "backup.safetensors"
    shutil.move(original, backup)
    try:
        with pytest.raises(BackboneError, match=r"is not at .*clip.safetensors.*; pass its current path") as err:
            load_classifier(world["file"])
        assert "\n" not in str(err.value)
        code, out, stderr = run_cli(["predict", str(world["file"]), world["images"][0], "--out",
                                     str(tmp_path / "p.csv")])
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and "pass its current path" in stderr
        ref = load_classifier(world["file"], checkpoint=backup).probabilities(world["images"])  # given explicitly
        meta = export_run(world["run"], tmp_path / "again.safetensors", checkpoint=backup)  # export: the same
        assert meta["model"]["checkpoint"]["path"] == str(backup.resolve())
        assert np.array_equal(load_classifier(tmp_path / "again.safetensors").probabilities(world["images"]), ref)
        # shipped together: the export and a checkpoint of the recorded name in one folder
        dist = tmp_path / "dist"
        dist.mkdir()
        shutil.copy(world["file"], dist / "clf.safetensors")
        shutil.copy(backup, dist / "clip.safetensors")
        assert np.array_equal(load_classifier(dist / "clf.safetensors").probabilities(world["images"]), ref)
        _weights(original, 4)  # other weights under the recorded path
        with pytest.raises(BackboneError, match="is not the checkpoint .* was exported with") as err:
            load_classifier(world["file"])
        assert "\n" not in str(err.value)
        code, out, stderr = run_cli(["predict", str(world["file"]), world["images"][0], "--out",
                                     str(tmp_path / "p.csv")])
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and "sha256" in stderr
    finally:
        shutil.move(backup, original)


def test_files_that_are_not_exports_are_refused_with_the_fix(world, tmp_path):
    with pytest.raises(ConfigError, match="is a run's learned prompt, not an export; pass its run folder"):
        load_classifier(world["run"] / "prompt.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not a classifier exported by `dspt export`"):
        load_classifier(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_classifier(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="is written to a .onnx file"):
        export_run(world["run"], tmp_path / "clf.bin", format="onnx")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_run(world["run"], tmp_path / "clf.bin", format="pickle")
    code, _, stderr = run_cli(["predict", str(tmp_path / "missing.safetensors"), world["images"][0]])
    assert code == 2 and "neither a run folder nor an exported classifier" in stderr


# -- numpy/PIL preprocessing (the torch-free side) ------------------------------------------------------------


@pytest.mark.parametrize("mode,interpolation,fill", [("shortest", "bicubic", 0), ("shortest", "bilinear", 0),
                                                     ("longest", "bicubic", 0), ("longest", "bilinear", 128),
                                                     ("squash", "bicubic", 0)])
def test_numpy_preprocessing_matches_the_torch_transform(mode, interpolation, fill):
    import open_clip

    pp = {"image_size": 32, "resize_mode": mode, "interpolation": interpolation, "crop": "center",
          "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
          "fill_color": fill}
    cfg = open_clip.transform.PreprocessCfg(size=32, mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                                            interpolation=interpolation, resize_mode=mode, fill_color=fill)
    transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
    rng = np.random.default_rng(0)
    for w, h in [(32, 32), (50, 37), (37, 50), (20, 64), (100, 90), (17, 23), (33, 32), (7, 5)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = preprocess_image(img, pp)
        theirs = transform(img).numpy()
        assert ours.shape == theirs.shape == (3, 32, 32) and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() < TOL, (w, h)


# -- ONNX ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_file(world) -> Path:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dspt[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter) is not installed "
                                             "(pip install 'dspt[export]')")
    out = world["root"] / "clf.onnx"
    code, stdout, stderr = run_cli(["export", str(world["run"]), "-o", str(out)])  # format from the suffix
    assert code == 0, stderr
    assert stdout.strip() == f"wrote {out} and {out.with_suffix('.json')}: 3 classes, model dspt-tiny " \
                             f"(sha256:{file_sha256(world['ckpt'])})"
    return out


def test_the_onnx_model_gives_the_runs_own_probabilities(world, onnx_file):
    import onnx
    import onnxruntime as ort

    meta = json.loads(sidecar_path(onnx_file).read_text())
    assert meta["format"] == FORMAT and meta["classnames"] == ["class 0", "class 1", "class 2"]
    assert meta["onnx"]["input"] == "images" and meta["onnx"]["outputs"] == ["logits", "probabilities"]
    assert meta["preprocess"] == dspt.export.read_metadata(world["file"])["preprocess"]
    model = onnx.load(str(onnx_file))
    assert json.loads({p.key: p.value for p in model.metadata_props}[FORMAT])["classnames"] == meta["classnames"]
    assert not list(onnx_file.parent.glob("clf.onnx.data"))  # small models: one file

    ref = _reference(world["run"], world["images"])
    probs = OnnxClassifier(onnx_file).probabilities(world["images"], batch_size=4)
    diff = float(np.abs(probs - ref).max())
    print(f"ONNX max |prob diff| {diff:.3g}")
    assert diff < TOL and (probs.argmax(1) == ref.argmax(1)).all()

    # the bare model on the torch transform's batch: logits and probabilities, any batch size
    clf = load_prompt(world["run"])
    paths = collect_images(world["images"])
    batch = torch.stack([clf.backbone.test_transform()(Image.open(p).convert("RGB")) for p in paths]).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for rows in (slice(0, 1), slice(0, 15)):
        logits, p = session.run(["logits", "probabilities"], {"images": batch[rows]})
        assert np.abs(p - ref[rows]).max() < TOL
        assert np.allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), p, atol=1e-6)

    rows = onnx_predict(onnx_file, world["images"], top_k=3)
    assert [r["path"] for r in rows] == paths
    assert [r["prediction"] for r in rows] == [meta["classnames"][i] for i in ref.argmax(1)]
    assert all(len(r["top_k"]) == 3 and abs(r["probability"] - p) < TOL for r, p in zip(rows, ref.max(1)))
    # without the sidecar: the metadata embedded in the model
    side = sidecar_path(onnx_file)
    moved = side.with_name("moved.json")
    side.rename(moved)
    try:
        assert np.array_equal(OnnxClassifier(onnx_file).probabilities(world["images"]), probs)
    finally:
        moved.rename(side)


def test_the_onnx_classifier_runs_without_torch(world, onnx_file):
    """export.py alone (no dspt package, torch made unimportable): onnxruntime, numpy and PIL only."""
    script = (
        "import importlib.util, json, sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['dspt'] = None\n"
        f"spec = importlib.util.spec_from_file_location('export', {str(EXPORT_PY)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"p = mod.OnnxClassifier({str(onnx_file)!r}).probabilities({world['images']!r})\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "print(json.dumps(p.tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    probs = np.array(json.loads(res.stdout))
    assert np.abs(probs - _reference(world["run"], world["images"])).max() < TOL


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("kind", ["dspt", "onnx"])
def test_predict_writes_the_same_predictions_from_a_run_and_its_export(world, kind, request, tmp_path):
    source = world["file"] if kind == "dspt" else request.getfixturevalue("onnx_file")
    tables = {}
    for name, src in (("run", world["run"]), (kind, source)):
        out = tmp_path / f"{name}.csv"
        code, stdout, stderr = run_cli(["predict", str(src), *world["images"], "--out", str(out), "--top-k", "2"])
        assert code == 0, stderr
        assert stdout.strip() == f"wrote 15 predictions to {out}"
        tables[name] = _csv(out)
    run, rows = tables["run"], tables[kind]
    assert list(run[0]) == list(rows[0]) == ["path", "prediction", "confidence", "top1", "top2"]
    assert [(r["path"], r["prediction"]) for r in rows] == [(r["path"], r["prediction"]) for r in run]
    assert all(abs(float(a["confidence"]) - float(b["confidence"])) <= 1e-4 for a, b in zip(rows, run))
    assert [[t.split(":")[0] for t in (r["top1"], r["top2"])] for r in rows] == \
           [[t.split(":")[0] for t in (r["top1"], r["top2"])] for r in run]


# -- precision: a run that computed in bf16 ------------------------------------------------------------------
# Backbone.autocast autocasts bf16 on a GPU, and on a CPU with native bf16 (`cpu_bf16_supported`); elsewhere a run
# computes in fp32. These tests make this CPU one with native bf16 (torch emulates it: slow, but the numbers are
# bf16's), for the run and for the export alike; the backbone's own rule decides the rest.


@pytest.fixture
def gpu_like(monkeypatch):
    monkeypatch.setattr(dspt.backbone, "cpu_bf16_supported", lambda: True)


@pytest.fixture(scope="module")
def bf16_world(world, tmp_path_factory) -> dict[str, Any]:
    """A bf16 run with 360 test images in 12 classes (two per colour: near ties, so bf16 and fp32 disagree on a
    few), and the run's own test predictions computed here the way the run computed them."""
    root = tmp_path_factory.mktemp("export_bf16")
    data = make_split_folders(root / "imgs", classes=12, train=6, test=30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dspt.backbone, "cpu_bf16_supported", lambda: True)
        run = _train(root, data, "run", pretrained=None, checkpoint=str(world["ckpt"]), precision="bf16")
        clf = load_prompt(run)
        clf.backbone.precision = "bf16"
        paths = collect_images([data / "test"])
        batch = torch.stack([clf.backbone.test_transform()(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            text = clf.text_features()
            probs = (clf.backbone.logit_scale * clf.backbone.encode_images(batch) @ text.t()).softmax(-1).numpy()
    labels = np.array([clf.learner.classnames.index(Path(p).parent.name.replace("_", " ")) for p in paths])
    metrics = json.loads((run / "metrics.json").read_text())
    assert 100 * float((probs.argmax(1) == labels).mean()) == pytest.approx(metrics["test_acc"], abs=1e-9), \
        "the reference is the run's own classifier: it has the run's recorded test accuracy"
    return {"root": root, "run": run, "test": str(data / "test"), "paths": paths, "batch": batch.numpy(),
            "probs": probs, "labels": labels}


def test_a_bf16_runs_export_computes_as_the_run_did(world, bf16_world, gpu_like, tmp_path):
    meta = export_run(bf16_world["run"], tmp_path / "bf16.safetensors")
    assert meta["precision"] == {"run": "bf16", "run_device": "cpu", "run_computed": "bf16",
                                 "text_features": "bf16", "images": "bf16"}  # kept: nothing to say
    clf = load_classifier(tmp_path / "bf16.safetensors")
    assert clf.precision == "bf16"
    probs = clf.probabilities(bf16_world["test"], batch_size=64)
    ref = bf16_world["probs"]
    diff = float(np.abs(probs - ref).max())
    print(f"bf16 export: max |prob diff| {diff:.3g}")
    assert diff < TOL and (probs.argmax(1) == ref.argmax(1)).all()
    # an fp32 run's export records fp32 and changes nothing
    fp32 = dspt.export.read_metadata(world["file"])["precision"]
    assert fp32 == {"run": "fp32", "run_device": "cpu", "run_computed": "fp32", "text_features": "fp32",
                    "images": "fp32"}


def test_the_fp32_onnx_export_of_a_bf16_run_counts_the_predictions_it_changes(bf16_world, gpu_like, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dspt[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'dspt[export]')")
    import onnxruntime as ort

    out = tmp_path / "bf16.onnx"
    code, stdout, stderr = run_cli(["export", str(bf16_world["run"]), "-o", str(out)])
    assert code == 0, stderr
    # independently: the ONNX model (onnxruntime) on the run's test images against the run's own predictions
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_probs,) = session.run(["probabilities"], {"images": bf16_world["batch"]})
    run_pred = bf16_world["probs"].argmax(1)
    differ = int((onnx_probs.argmax(1) != run_pred).sum())
    n = len(bf16_world["paths"])
    print(f"bf16 run, fp32 ONNX: {differ} of {n} test predictions differ")
    # how many differ depends on the CPU's bf16 arithmetic (0 on some): the count is checked against onnxruntime
    # here, and a count that is known not to be 0 by the next test
    line = f"export: the run used bf16; this ONNX export computes in fp32; {differ} of {n} test predictions differ"
    assert [ln for ln in stderr.splitlines() if ln.startswith("export:")] == [line]
    assert stdout.startswith(f"wrote {out} and ")
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["precision"]["images"] == "fp32" and meta["precision"]["note"] == line
    cmp = meta["precision"]["test_predictions"]
    assert (cmp["compared"], cmp["differ"], cmp["run_features"]) == (n, differ, "feature cache")
    assert cmp["differing_images"] == [p for p, a, b in zip(bf16_world["paths"], onnx_probs.argmax(1), run_pred)
                                       if a != b]


def test_the_comparison_with_the_run_counts_and_names_exactly_the_changed_predictions(bf16_world, gpu_like,
                                                                                     monkeypatch):
    """The run's side made to disagree on known images (their cached features swapped for those of an image
    predicted as another class): the comparison counts and names exactly those, on any CPU."""
    import types

    import dspt.features
    from dspt.export_precision import compare_with_run
    from dspt.metrics import predict

    run = bf16_world["run"]
    clf = load_prompt(run)
    clf.backbone.precision = "bf16"
    with torch.no_grad():
        text = clf.text_features()
        fp32 = dataclasses.replace(clf.backbone, precision="fp32")
        ours = dspt.features.encode_paths(fp32, bf16_world["paths"], fp32.test_transform())
    pred = predict(ours, text)
    other = {int(c): int(np.flatnonzero(pred != c)[0]) for c in np.unique(pred)}  # an image predicted otherwise
    changed = [3, 50, 121, 299]
    run_side = ours.clone()
    for i in changed:
        run_side[i] = ours[other[int(pred[i])]]
    real = dspt.features.cached_features
    monkeypatch.setattr(dspt.features, "cached_features",
                        lambda *a, **k: types.SimpleNamespace(features=[run_side], hit=real(*a, **k).hit))
    cmp = compare_with_run(RunConfig.load(run / "config.yaml"), run, clf.backbone, text)
    assert (cmp["compared"], cmp["differ"], cmp["run_features"]) == (len(bf16_world["paths"]), 4, "feature cache")
    assert cmp["differing_images"] == [bf16_world["paths"][i] for i in changed]


def test_a_gpu_runs_export_made_on_the_cpu_says_what_changed(bf16_world, tmp_path, caplog, monkeypatch):
    """A copy of the run that records a GPU, exported on a CPU without native bf16: it computes in fp32."""
    monkeypatch.setattr(dspt.backbone, "cpu_bf16_supported", lambda: False)
    run = tmp_path / "gpu_run"
    shutil.copytree(bf16_world["run"], run)
    env = json.loads((run / "environment.json").read_text())
    (run / "environment.json").write_text(json.dumps(env | {"device": "cuda:0"}))
    code, _, stderr = run_cli(["export", str(run), "-o", str(tmp_path / "gpu.safetensors")])
    assert code == 0, stderr
    line = ("export: the run used bf16; this export's text features were computed in fp32 on cpu; its test "
            "predictions were not compared with the run's (export on a GPU, --device cuda, to keep bf16)")
    assert [ln for ln in stderr.splitlines() if ln.startswith("export:")] == [line]
    meta = dspt.export.read_metadata(tmp_path / "gpu.safetensors")
    assert meta["precision"]["run_computed"] == meta["precision"]["images"] == "bf16"
    assert meta["precision"]["text_features"] == "fp32"
    assert meta["precision"]["test_predictions"]["differ"] is None
    with caplog.at_level("WARNING", logger="dspt"):
        clf = load_classifier(tmp_path / "gpu.safetensors")
    warned = [r.getMessage() for r in caplog.records if "computes in fp32" in r.getMessage()]
    assert len(warned) == 1 and "its run computed in bf16 on a GPU; on cpu this classifier computes in fp32" \
        in warned[0] and "\n" not in warned[0]
    assert clf.probabilities(bf16_world["paths"][:2]).shape == (2, 12)
