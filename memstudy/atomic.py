"""Atomic, durable file writes: write a temporary file in the same folder, flush it, rename it over
the target, flush the folder.

A reader never sees a half-written file, and a crash (even of the machine) leaves the previous
version or the new one, never an empty file. New files and folders get the permissions the umask
allows, like any other file the user creates, so other users and Dask workers on a shared
filesystem can read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

#: Suffixes that writers append when a name lacks them (``np.save`` → ``.npy``, ``np.savez`` → ``.npz``).
_APPENDED_SUFFIXES = (".npy", ".npz")


def _temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` that keeps its suffixes (writers choose formats by them)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{''.join(path.suffixes)}")


def fsync_path(path: str | os.PathLike, *, recursive: bool = True) -> None:
    """Flush a file's data, or a folder's entries and (``recursive``) its files, to stable storage.

    ``recursive=False`` flushes only a folder's own entries (a rename into it), not the files other
    writers may be creating or removing there at the same time.
    """
    path = Path(path)
    if recursive and path.is_dir():
        for child in path.iterdir():
            if child.is_file() or child.is_dir():
                fsync_path(child)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` (file or folder) to ``target`` after flushing it; then flush the folder.

    After this returns, a crash leaves ``target`` complete. An existing target file is replaced; an
    existing target folder makes ``os.replace`` fail, as it should for a completed cache entry.
    """
    fsync_path(source)
    os.replace(source, target)
    fsync_path(Path(target).parent, recursive=False)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """Create a new empty hidden folder in ``parent`` with the umask's permissions (not 0700)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = parent / f".{prefix}.{secrets.token_hex(6)}.tmp"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty staging folder beside ``path``; on success it is flushed and renamed to ``path``.

    The folder counterpart of :func:`atomic_path`, for outputs made of several files (a saved
    ImageSet): readers see all of it or nothing. The staging folder is removed on error, and also
    when the rename fails (``path`` appeared meanwhile: ``OSError`` reaches the caller).
    """
    path = Path(path)
    staging = make_temp_dir(path.parent, path.name)
    try:
        yield staging
        replace_durably(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success its file is flushed and renamed to ``path``.

    Use this for writers that want a file name (``np.save``, ``torch.save``, ``nib.save``). The
    temporary name keeps the target's suffixes so that such writers pick the same format. A writer
    that appends a suffix the name lacks (``np.save`` adds ``.npy``, ``np.savez`` adds ``.npz``) gets
    the same suffix appended to ``path``, as it would without this wrapper. On error nothing is left
    behind and an existing ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    appended = [tmp.with_name(tmp.name + suffix) for suffix in _APPENDED_SUFFIXES]
    try:
        yield tmp
        if tmp.exists():
            replace_durably(tmp, path)
        else:
            written = [candidate for candidate in appended if candidate.exists()]
            if not written:
                raise FileNotFoundError(f"{path}: the writer created no file")
            replace_durably(written[0], path.with_name(path.name + written[0].name[len(tmp.name) :]))
    finally:
        for leftover in (tmp, *appended):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success it is flushed and replaces ``path``."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as ``.npy`` at exactly ``path``, atomically."""
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
