"""Datasets: the offline pack, torchvision CIFAR-10/100 and SVHN, batched augmentation."""

from __future__ import annotations

from frep_lightning.data.augment import random_crop_flip, to_float
from frep_lightning.data.datamodule import (
    DATASETS,
    NORMALIZATION,
    ImageClassificationData,
    balanced_indices,
    collate_uint8,
    resolve_root,
)
from frep_lightning.data.pack import KNOWN_SHA256, default_cache_dir, file_sha256, load_pack

__all__ = [
    "DATASETS",
    "KNOWN_SHA256",
    "NORMALIZATION",
    "ImageClassificationData",
    "balanced_indices",
    "collate_uint8",
    "default_cache_dir",
    "file_sha256",
    "load_pack",
    "random_crop_flip",
    "resolve_root",
    "to_float",
]
