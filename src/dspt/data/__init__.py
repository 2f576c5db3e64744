"""Datasets: every loader returns an `ImageDataset` (paths, labels, class names).

- `folder` (image folders) and `csv` (a CSV/TSV list) for your own data;
- the 11 CoOp benchmarks in CoOp's layout (`coop.py`), `dspt datasets` shows which are found under a root;
- real label noise (`realnoise.py`): CIFAR-10N / CIFAR-100N label files, Food-101N, generic noisy lists;
- K-shot subsets and the false-positive protocol of PTNL / JoAPR (`sampling.py`), kept in the cache.
"""
from .base import DataError, ImageDataset, cache_root, find_bad_images, load_image
from .folder import load_image_folder, read_classname_map
from .registry import (DATASETS, INFO, DataSplits, DatasetStatus, dataset_status, dataset_template,
                       default_data_root, load_data, register_dataset, resolve_dataset_name)
from .sampling import (FP_PROTOCOLS, TrainingSubset, cached_few_shot, false_positive_shots, few_shot_indices,
                       fewshot_file, select_training, stratified_split)
from . import coop, realnoise, table  # noqa: E402,F401  (register the datasets)
from .coop import BENCHMARKS, load_benchmark
from .realnoise import given_labels, load_cifar, load_food101n, read_cifarn, read_noise_list
from .splits import read_split_file, write_split_file
from .table import load_table

__all__ = [
    "BENCHMARKS", "DATASETS", "DataError", "DataSplits", "DatasetStatus", "FP_PROTOCOLS", "INFO", "ImageDataset",
    "cache_root", "cached_few_shot", "dataset_status", "dataset_template", "default_data_root",
    "false_positive_shots", "few_shot_indices", "fewshot_file", "find_bad_images", "given_labels", "load_benchmark",
    "load_cifar", "load_data", "load_food101n", "load_image", "load_image_folder", "load_table", "read_cifarn",
    "read_classname_map", "read_noise_list", "read_split_file", "register_dataset", "resolve_dataset_name",
    "select_training", "stratified_split", "TrainingSubset", "write_split_file",
]
