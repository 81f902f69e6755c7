"""Datasets: the offline pack, torchvision CIFAR-10/100 and SVHN, batched augmentation."""

from frep_lightning.data.augment import random_crop_flip, to_float
from frep_lightning.data.datamodule import DATASETS, ImageClassificationData, balanced_indices, resolve_root
from frep_lightning.data.pack import KNOWN_SHA256, load_pack

__all__ = [
    "DATASETS",
    "KNOWN_SHA256",
    "ImageClassificationData",
    "balanced_indices",
    "load_pack",
    "random_crop_flip",
    "resolve_root",
    "to_float",
]
