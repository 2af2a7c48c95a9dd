"""Image sources: a uniform way to read rows of flattened images from arrays, memmaps, .npy files and
ImageSets, in chunks, without loading a whole file.

A file-backed source reads chunks with ``os.preadv`` into its own buffers instead of through a
memory map: pages read through a map count towards the process's resident memory until the kernel
reclaims them, so a streamed search over a large memmap would look (and be accounted) as if it held
the whole file. With explicit reads the working memory stays at the chunk buffers.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from memstudy.data.imageset import META_FILE, ImageSet

Channel = int | str | None


def _check_dtype(dtype: np.dtype, role: str) -> None:
    if dtype.kind not in "biuf":
        raise TypeError(f"{role} images must be a real numeric array (uint8, float...), got dtype {dtype}")


@dataclass(frozen=True)
class ArraySource:
    """Images held in an ndarray (or any array, memmap views included), one image per row of axis 0."""

    array: np.ndarray
    role: str
    names: tuple[str, ...] | None = None
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.array.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def in_memory(self) -> bool:
        return not isinstance(self.array, np.memmap)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Return images ``start:stop`` as a C-contiguous ``(stop - start, D)`` array.

        Without ``out`` this is a view where the layout allows; with ``out`` (a flat buffer) the
        images are copied into it, which is what makes a read-ahead thread useful for memmaps.
        """
        block = self.array[start:stop]
        if out is None:
            return np.ascontiguousarray(block).reshape(stop - start, -1)
        rows = out.reshape(-1)[: block.size].reshape(block.shape)
        np.copyto(rows, block)
        return rows.reshape(stop - start, -1)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Images at sorted ``indices`` as a new ``(len(indices), D)`` array."""
        return np.asarray(self.array[indices]).reshape(len(indices), -1)

    def subset(self, start: int, stop: int) -> ArraySource:
        """The images ``start:stop`` as a new source (a view)."""
        return replace(
            self,
            array=self.array[start:stop],
            names=None if self.names is None else self.names[start:stop],
            groups=None if self.groups is None else self.groups[start:stop],
        )


@dataclass(frozen=True)
class FileSource:
    """Images stored C-contiguously in a raw file region (the data of a ``.npy`` file)."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    role: str
    channel: int | None = None
    names: tuple[str, ...] | None = None
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        per_image = self.shape[1:]
        return per_image if self.channel is None else per_image[1:]

    @property
    def in_memory(self) -> bool:
        return False

    @property
    def _row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read images ``start:stop`` from disk as a ``(stop - start, D)`` array (into ``out`` if given)."""
        count = stop - start
        d = int(np.prod(self.image_shape, dtype=np.int64))
        if out is None or out.size < count * d:
            out = np.empty(count * d, dtype=self.dtype)
        rows = out.reshape(-1)[: count * d].reshape(count, d)
        row_bytes = self._row_bytes
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.channel is None:
                _pread_exact(fd, rows, self.offset + start * row_bytes, self.path)
            else:
                # One channel of each image is one contiguous segment: read only those bytes.
                channel_offset = self.channel * d * self.dtype.itemsize
                for i in range(count):
                    _pread_exact(
                        fd, rows[i], self.offset + (start + i) * row_bytes + channel_offset, self.path
                    )
        finally:
            os.close(fd)
        return rows

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Images at sorted ``indices`` read from disk as a ``(len(indices), D)`` array.

        Runs of consecutive indices are read with one call each.
        """
        d = int(np.prod(self.image_shape, dtype=np.int64))
        out = np.empty((len(indices), d), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(indices)], strict=True):
            self.read(int(indices[first]), int(indices[last - 1]) + 1, out[first:last])
        return out

    def subset(self, start: int, stop: int) -> FileSource:
        """The images ``start:stop`` as a new source reading the same file."""
        return replace(
            self,
            offset=self.offset + start * self._row_bytes,
            shape=(stop - start, *self.shape[1:]),
            names=None if self.names is None else self.names[start:stop],
            groups=None if self.groups is None else self.groups[start:stop],
        )


Source = ArraySource | FileSource


def _pread_exact(fd: int, target: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(target).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"{path}: file ended at byte {offset + done}; expected {len(view) - done} more")
        done += got


def _from_memmap(array: np.memmap, role: str, names: Any, groups: Any, channel: int | None) -> Source:
    """A FileSource for a whole, C-ordered, shared memmap; otherwise an ArraySource over it.

    A copy-on-write map (mode "c") may differ from its file, so it is read through the map.
    """
    whole = isinstance(array.base, mmap.mmap) and array.flags.c_contiguous and array.filename is not None
    if whole and array.mode != "c":
        return FileSource(
            str(array.filename),
            int(array.offset),
            array.dtype,
            tuple(array.shape),
            role,
            channel,
            names,
            groups,
        )
    return ArraySource(array if channel is None else array[:, channel], role, names, groups)


def _channel_index(
    channel: Channel, channels: Sequence[str] | None, n_channels: int, role: str
) -> int | None:
    if channel is None:
        return None
    if isinstance(channel, str):
        if channels is None or channel not in channels:
            known = (
                f"channels {tuple(channels)}"
                if channels is not None
                else "no channel names (not an ImageSet)"
            )
            raise KeyError(f"{role} images: no channel {channel!r}; they have {known}")
        return list(channels).index(channel)
    index = int(channel)
    if not -n_channels <= index < n_channels:
        raise ValueError(
            f"{role} images: channel {index} out of range; they have {n_channels} channels (axis 1)"
        )
    return index % n_channels


def _open(images: Any, role: str) -> tuple[np.ndarray, Any, Any, tuple[str, ...] | None]:
    """Images as an array (memmapped for files) with their names, groups and channel names if known."""
    if isinstance(images, str | os.PathLike):
        path = Path(images)
        if path.is_dir() and (path / META_FILE).is_file():
            images = ImageSet.load(path)
        elif path.suffix == ".npy" and path.is_file():
            images = np.load(path, mmap_mode="r")
        elif not path.exists():
            raise FileNotFoundError(f"{role} images: {path} does not exist")
        else:
            raise ValueError(f"{role} images: {path} is neither a .npy file nor a saved ImageSet folder")
    if isinstance(images, ImageSet):
        return images.images, images.names, images.groups, images.channels
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    return images, None, None, None


def as_source(
    images: Any, *, channel: Channel = None, role: str = "images", channels: Sequence[str] | None = None
) -> Source:
    """Wrap ``images`` as a source of flattened rows.

    Parameters
    ----------
    images : ndarray, memmap, ImageSet, or path to a ``.npy`` file or a saved ImageSet folder
        One image per entry of axis 0; any per-image shape.
    channel : int, str or None
        None: all channels together. Otherwise pick one entry of axis 1 (``(N, C, ...)`` layout);
        a name is looked up in ``ImageSet.channels``.
    role : str
        "synthetic" or "training", used in error messages.
    channels : sequence of str, optional
        Channel names to use when ``images`` has none (a plain array in an ImageSet's layout).
    """
    return _source(_open(images, role), channel, role, channels)


def _source(
    opened: tuple[np.ndarray, Any, Any, tuple[str, ...] | None],
    channel: Channel,
    role: str,
    channels: Sequence[str] | None,
) -> Source:
    images, names, groups, own_channels = opened
    _check_dtype(images.dtype, role)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"{role} images must have shape (N, ...) with N >= 1 images, got {images.shape}")
    if images.dtype.byteorder == ">":
        images = images.astype(images.dtype.newbyteorder("="))
    index = None
    if channel is not None:
        if images.ndim < 3:
            raise ValueError(
                f"{role} images: channel={channel!r} needs (N, C, ...) images, got {images.shape}"
            )
        index = _channel_index(channel, own_channels or channels, images.shape[1], role)
    if isinstance(images, np.memmap):
        return _from_memmap(images, role, names, groups, index)
    return ArraySource(images if index is None else images[:, index], role, names, groups)


def open_pair(synthetic: Any, training: Any, channel: Channel = None) -> tuple[Source, Source]:
    """Sources for both sides; a channel name known to one side (an ImageSet) applies to the other."""
    if not isinstance(channel, str):
        return (
            as_source(synthetic, channel=channel, role="synthetic"),
            as_source(training, channel=channel, role="training"),
        )
    synthetic, training = _open(synthetic, "synthetic"), _open(training, "training")
    names = synthetic[3] or training[3]
    return _source(synthetic, channel, "synthetic", names), _source(training, channel, "training", names)


def image_size(source: Source) -> int:
    """Number of values per flattened image."""
    return int(np.prod(source.image_shape, dtype=np.int64))


def check_compatible(synthetic: Source, training: Source) -> None:
    """Raise if the per-image shapes differ (singleton axes are ignored)."""
    a = tuple(s for s in synthetic.image_shape if s != 1)
    b = tuple(s for s in training.image_shape if s != 1)
    if a != b:
        raise ValueError(
            f"synthetic images have shape {synthetic.image_shape} per image but training images have "
            f"{training.image_shape}; they must match"
        )


def iter_chunks(source: Source, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, rows)`` for each range, reading the next range while the caller works.

    Disk reads release the GIL, so one read-ahead thread overlaps I/O with the matrix products. Two
    buffers alternate; a yielded array is valid until the next one is requested.
    """
    if not ranges:
        return
    if source.in_memory:
        for start, stop in ranges:
            yield start, stop, source.read(start, stop)
        return
    largest = max(stop - start for start, stop in ranges) * image_size(source)
    buffers = [np.empty(largest, dtype=source.dtype) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstudy-read") as reader:
        pending = reader.submit(source.read, *ranges[0], buffers[0])
        for i, (start, stop) in enumerate(ranges):
            rows = pending.result()
            if i + 1 < len(ranges):
                pending = reader.submit(source.read, *ranges[i + 1], buffers[(i + 1) % 2])
            yield start, stop, rows
