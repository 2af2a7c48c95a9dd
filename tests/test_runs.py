"""Run bookkeeping: durable checkpoints, resuming past a damaged one, which settings a resume may change."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch

from memstudy.models import list_checkpoints, read_log
from memstudy.models.configs import DDPMConfig, StyleGANConfig
from memstudy.models.runs import bookkeeping_fields

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("damage", ["empty", "half"])
def test_resume_skips_a_truncated_newest_checkpoint(
    tmp_path, training_images, train_tiny, trainer_tensors, caplog, damage
):
    options = {"checkpoint_every": 2, "keep_checkpoints": [2]}
    straight = train_tiny("stylegan", training_images, tmp_path / "straight", 6, **options)
    run = tmp_path / "run"
    train_tiny("stylegan", training_images, run, 4, **options)
    assert list(list_checkpoints(run)) == [2, 4]
    newest = list_checkpoints(run)[4]
    os.truncate(newest, 0 if damage == "empty" else newest.stat().st_size // 2)
    damaged = newest.read_bytes()

    with caplog.at_level(logging.WARNING, logger="memstudy.models.runs"):
        resumed = train_tiny("stylegan", training_images, run, 6, **options)
    assert "step_00000004.pt does not load" in caplog.text
    # Kept aside for inspection, out of the checkpoints' way, not silently deleted.
    assert (run / "checkpoints" / "step_00000004.pt.unreadable").read_bytes() == damaged
    a, b = trainer_tensors(straight), trainer_tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert [r["step"] for r in read_log(run)] == list(range(1, 7))
    assert list(list_checkpoints(run)) == [2, 6]


def test_a_checkpoint_that_does_not_read_back_prunes_nothing(
    tmp_path, training_images, train_tiny, monkeypatch
):
    save = torch.save

    def truncating_save(obj, path):
        save(obj, path)
        if obj["step"] == 4:  # as a full disk or a dying filesystem would leave it
            os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(torch, "save", truncating_save)
    with pytest.raises(OSError, match=r"step_00000004.pt: the checkpoint just written does not read back"):
        train_tiny("ddpm", training_images, tmp_path, 4, checkpoint_every=2)
    assert list(list_checkpoints(tmp_path)) == [2]
    assert not list(tmp_path.rglob(".*"))  # the damaged temporary file is gone too


def test_bookkeeping_fields_come_from_field_metadata():
    expected = {"name", "checkpoint_every", "keep_checkpoints", "log_every", "amp"}
    for cls in (DDPMConfig, StyleGANConfig):
        marked = {f.name for f in dataclasses.fields(cls) if f.metadata.get("bookkeeping")}
        assert marked >= expected
        assert bookkeeping_fields(cls) == marked == bookkeeping_fields(cls())
        assert not {"mirror", "lr", "batch_size", "seed"} & marked  # these change the weights


def test_a_run_recorded_before_a_config_field_existed_resumes(tmp_path, training_images, train_tiny):
    train_tiny("ddpm", training_images, tmp_path, 1)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["config"]["mirror"]  # as written before the field existed (its default: off)
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert train_tiny("ddpm", training_images, tmp_path, 2).step == 2
    with pytest.raises(ValueError, match=r"differs in config.mirror"):
        train_tiny("ddpm", training_images, tmp_path, 3, mirror=True)
