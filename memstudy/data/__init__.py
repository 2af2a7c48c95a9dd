"""Data: the ImageSet, loaders for real layouts, embedded phantom datasets and the cache."""

from memstudy.data.imageset import ImageSet

__all__ = ["ImageSet"]
