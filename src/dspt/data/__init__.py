"""Datasets: every loader returns an `ImageDataset` (paths, labels, class names)."""
from .base import DataError, ImageDataset, find_bad_images, load_image
from .folder import load_image_folder, read_classname_map
from .registry import DATASETS, DataSplits, load_data, register_dataset
from .sampling import few_shot_indices, stratified_split

__all__ = [
    "DATASETS", "DataError", "DataSplits", "ImageDataset", "few_shot_indices", "find_bad_images",
    "load_data", "load_image", "load_image_folder", "read_classname_map", "register_dataset",
    "stratified_split",
]
