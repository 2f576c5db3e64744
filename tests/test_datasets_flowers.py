"""The image-folder path and the false-positive protocol on the real Flowers-102 photos of ../shared/data
(skipped, with the reason, when that folder is absent)."""
from __future__ import annotations

import numpy as np
import pytest

from dspt.data import DataError, cached_few_shot, load_data, load_image, select_training


def test_real_flowers_folder_with_names(flowers_valid, flowers_names, tmp_path):
    s = load_data("folder", root=flowers_valid, classnames=flowers_names, test_fraction=0.2, seed=0)
    full = len(s.train) + len(s.test)
    assert full == 818 and s.train.num_classes == 102
    assert s.classnames[:3] == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]  # folders 1, 2, 3
    assert s.train.meta["class_folders"][:11] == [str(i) for i in range(1, 12)]  # natural order, not 1, 10, 100
    img = load_image(s.train.paths[0])
    assert img.mode == "RGB" and min(img.size) > 100


def test_real_flowers_symflip_subset(flowers_valid, flowers_names, tmp_path):
    train = load_data("folder", root=flowers_valid, classnames=flowers_names,
                      test_root=flowers_valid).train  # all 818 valid photos as the pool
    sel = select_training(train, 2, 1, "symflip", fp=1, cache_dir=tmp_path)
    assert len(sel.train) == 204 and len(set(sel.train.paths)) == 204
    for c in range(102):
        mine = sel.given == c
        assert mine.sum() == 2 and (sel.train.labels[mine] != c).sum() == 1
    again = select_training(train, 2, 1, "symflip", fp=1, cache_dir=tmp_path / "other")
    assert np.array_equal(again.indices, sel.indices)
    # 16 shots with 8 false positives needs 8 photos of each class; valid has as few as 1
    with pytest.raises(DataError, match=r"class '.*' has \d training images, fewer than the 8 true shots of "
                                        r"symflip with --shots 16 --fp 8"):
        cached_few_shot(train, 16, 1, tmp_path, noise="symflip", fp=8)
