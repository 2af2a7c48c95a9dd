"""Atomic writes: data lands where the caller named it, with the umask's permissions, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from memstudy.atomic import (
    atomic_dir,
    atomic_open,
    atomic_path,
    make_temp_dir,
    replace_durably,
    save_npy,
    write_json,
)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_np_savez_to_a_name_without_extension_lands_beside_it_with_the_data(tmp_path):
    with atomic_path(tmp_path / "matches") as tmp:
        np.savez(tmp, values=np.arange(3.0))
    assert not (tmp_path / "matches").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "matches.npz")["values"], np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matches.npz"]


def test_save_npy_writes_exactly_the_named_file(tmp_path):
    save_npy(tmp_path / "images", np.arange(6, dtype=np.uint8))
    np.testing.assert_array_equal(np.load(tmp_path / "images"), np.arange(6, dtype=np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_files_and_folders_follow_the_umask(tmp_path, umask_022):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.npy") as tmp:
        np.save(tmp, np.zeros(2))
    folder = make_temp_dir(tmp_path, "staging")
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "b.npy") == 0o644
    assert _mode(folder) == 0o755
    assert folder.name.startswith(".") and folder.is_dir() and not any(folder.iterdir())


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "log.json"
    write_json(target, {"step": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("{half")
        raise RuntimeError("crash")
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


def test_a_writer_that_writes_nothing_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="created no file"), atomic_path(tmp_path / "x.pt"):
        pass
    assert not any(tmp_path.iterdir())


def test_replace_durably_moves_a_whole_folder(tmp_path):
    staging = make_temp_dir(tmp_path, "entry")
    (staging / "images.npy").write_bytes(b"data")
    replace_durably(staging, tmp_path / "entry")
    assert (tmp_path / "entry" / "images.npy").read_bytes() == b"data"
    assert not staging.exists()


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    with atomic_dir(tmp_path / "set") as staging:
        (staging / "images.npy").write_bytes(b"data")
        assert not (tmp_path / "set").exists()
    assert (tmp_path / "set" / "images.npy").read_bytes() == b"data"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "other") as staging:
        (staging / "images.npy").write_bytes(b"half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_replace_durably_flushes_the_folder_entry_not_the_other_writers_files(tmp_path, monkeypatch):
    """Other workers create and remove temporary files beside the target; flushing them raced."""
    from memstudy import atomic

    (tmp_path / "other-writer.tmp").write_bytes(b"x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_bytes(b"y")
    source = tmp_path / "source.tmp"
    source.write_bytes(b"data")
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", recording_open)
    atomic.replace_durably(source, tmp_path / "target")
    assert set(opened) == {source, tmp_path}
    assert (tmp_path / "target").read_bytes() == b"data"
