"""Data: the ImageSet, loaders for real layouts, embedded phantom datasets and the cache."""

from memstudy.data.brats import load_brats
from memstudy.data.cache import cache_dir
from memstudy.data.chestxray import load_chestxray
from memstudy.data.datasets import DATASETS, load_dataset, open_imageset
from memstudy.data.imageset import ImageSet

__all__ = [
    "DATASETS",
    "ImageSet",
    "cache_dir",
    "load_brats",
    "load_chestxray",
    "load_dataset",
    "open_imageset",
]
