"""Datasets (CIFAR-10/100, MNIST, ImageFolder, built-in digits) and the on-device loader."""

from .loader import DEFAULT_FLIP, DEFAULT_PAD, DeviceLoader, LoaderConfig, batch_crop_flip
from .shards import SPLITS, shard_indices
from .sources import DATASETS, ArrayDataset, DataError, DatasetNotFound, check_data, load_arrays, resolve_data_dir

__all__ = ["DeviceLoader", "LoaderConfig", "batch_crop_flip", "DEFAULT_PAD", "DEFAULT_FLIP", "DATASETS",
           "ArrayDataset", "DataError", "DatasetNotFound", "check_data", "load_arrays", "resolve_data_dir",
           "SPLITS", "shard_indices"]
