"""Datasets: every loader returns an `ImageDataset` (paths, labels, class names).

- `folder` (image folders) and `csv` (a CSV/TSV list) for your own data;
- the 11 CoOp benchmarks in CoOp's layout (`coop.py`), `dspt datasets` shows which are found under a root;
- real label noise (`realnoise.py`): CIFAR-10N / CIFAR-100N label files, Food-101N, generic noisy lists;
- K-shot subsets and the false-positive protocol of PTNL / JoAPR (`sampling.py`), kept in the cache;
- the training subset of a run (`training.py`: shots, given labels, unreadable images skipped).

Layers, each importing only those above it: base, imagefolder; registry, splits, sampling; download, table;
folder; coop,
realnoise; training. Importing this package registers every dataset ('folder' first, so it is listed first).
"""
from .base import DataError, ImageDataset, cache_root, find_bad_images, load_image
from .imagefolder import load_image_folder, read_classname_map
from . import folder  # noqa: F401, E402 - registers the 'folder' dataset first, so it is listed first
from .registry import (DATASETS, INFO, DataSplits, DatasetStatus, dataset_status, dataset_template,
                       default_data_root, format_status_table, load_data, register_dataset, resolve_dataset_name)
from .sampling import (FP_PROTOCOLS, cached_few_shot, false_positive_shots, few_shot_indices, fewshot_file,
                       stratified_split)
from .coop import BENCHMARKS, load_benchmark
from .realnoise import given_labels, load_cifar, load_food101n, read_cifarn, read_noise_list
from .splits import read_split_file, write_split_file
from .table import load_table
from .training import TrainingSubset, select_training

__all__ = [
    "BENCHMARKS", "DATASETS", "DataError", "DataSplits", "DatasetStatus", "FP_PROTOCOLS", "INFO", "ImageDataset",
    "cache_root", "cached_few_shot", "dataset_status", "dataset_template", "default_data_root",
    "false_positive_shots", "few_shot_indices", "fewshot_file", "find_bad_images", "format_status_table",
    "given_labels", "load_benchmark", "load_cifar", "load_data", "load_food101n", "load_image", "load_image_folder",
    "load_table", "read_cifarn", "read_classname_map", "read_noise_list", "read_split_file", "register_dataset",
    "resolve_dataset_name",
    "select_training", "stratified_split", "TrainingSubset", "write_split_file",
]
