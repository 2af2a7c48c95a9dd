"""The prepared-data cache: permissions that follow the umask, durable renames, versioned keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from memstudy.data import brats, load_brats


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_entries_follow_the_umask(brats20_root, umask):
    previous = os.umask(umask)
    try:
        imageset = load_brats(brats20_root, pad_to=32, progress=False)
    finally:
        os.umask(previous)
    entry = Path(imageset.provenance["cache_dir"])
    assert stat.S_IMODE(entry.stat().st_mode) == 0o777 & ~umask
    for name in ("images.npy", "meta.json"):
        assert stat.S_IMODE((entry / name).stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name flushed files")
def test_cache_entry_is_flushed_before_it_is_renamed_into_place(brats20_root, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source), str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    imageset = load_brats(brats20_root, pad_to=32, progress=False)
    entry = imageset.provenance["cache_dir"]
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == entry)
    staging = events[rename][1]
    flushed = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{staging}/images.npy", f"{staging}/meta.json", staging} <= flushed
    assert ("fsync", str(Path(entry).parent)) in events[rename:]  # the new folder entry itself


def test_pipeline_version_is_part_of_the_cache_key(brats20_root, monkeypatch):
    first = load_brats(brats20_root, pad_to=32, progress=False)
    monkeypatch.setattr(brats, "PIPELINE_VERSION", brats.PIPELINE_VERSION + 1)
    bumped = load_brats(brats20_root, pad_to=32, progress=False)
    assert bumped.provenance["cache_dir"] != first.provenance["cache_dir"]
    assert bumped.provenance["pipeline_version"] == first.provenance["pipeline_version"] + 1
