"""load_prompt finds the run's CLIP checkpoint by absolute path and proves it by its sha256."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dspt.backbone import load_backbone
from dspt.config import RunConfig
from dspt.errors import BackboneError
from dspt.train import load_prompt, train

from imagefolders import make_split_folders


def _weights(path, seed):
    model = load_backbone("dspt-tiny", init_seed=seed).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lp")
    data = make_split_folders(root / "imgs", classes=3, train=6, test=3)
    _weights(root / "clip.safetensors", 3)
    cwd = os.getcwd()
    os.chdir(root)  # the checkpoint is given as a relative path, as users do
    try:
        train(RunConfig(data=str(data), model="dspt-tiny", pretrained=None, checkpoint="clip.safetensors", shots=4,
                        views=1, n_ctx=4, epochs=2, batch_size=4, device="cpu", cache_dir=str(root / "cache"),
                        output=str(root / "run"), progress=False))
    finally:
        os.chdir(cwd)
    return root


def test_relative_checkpoint_path_is_recorded_absolute(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative path would no longer resolve
    clf = load_prompt(run / "run")
    assert clf.backbone.weights_id.startswith("sha256:")
    feats = torch.nn.functional.normalize(torch.randn(2, clf.text_features().shape[1]), dim=-1)
    assert clf.logits(feats).shape == (2, 3)


def test_moved_or_replaced_checkpoint_is_refused_with_the_fix(run, tmp_path):
    moved = tmp_path / "moved.safetensors"
    shutil.copy(run / "clip.safetensors", moved)
    original = run / "clip.safetensors"
    backup = tmp_path / "backup"
    shutil.move(original, backup)
    try:
        with pytest.raises(BackboneError, match="is not at .*clip.safetensors; pass its current path"):
            load_prompt(run / "run")
        assert load_prompt(run / "run", checkpoint=moved).learner.n_ctx == 4
        _weights(original, 4)  # other weights under the recorded name
        with pytest.raises(BackboneError, match="not the checkpoint run .* was trained with"):
            load_prompt(run / "run")
        with pytest.raises(BackboneError, match="trained on weights sha256:.* the given backbone has random:0"):
            load_prompt(run / "run", backbone=load_backbone("dspt-tiny", init_seed=0))
    finally:
        shutil.move(backup, original)
