"""Run bookkeeping: the run directory, its parameters, its log and its checkpoints.

A run directory holds everything one training run writes::

    run_dir/
      params.json                    model, config, seed, image shape, channels, dataset fingerprint
      log.json                       losses per step (averaged over ``log_every``), images/s
      checkpoints/step_00001000.pt   weights, EMA, optimizer state (torch.save, written atomically)
      samples/step_00001000-seed0/   ImageSets written by ``memstudy sample``

A checkpoint is renamed into place only once flushed to disk, and older checkpoints are pruned only
after the new one reads back. Resuming takes the newest checkpoint that reads; one that does not
(truncated by a crash of the machine or a full disk) is renamed aside to ``*.pt.unreadable``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memstudy.atomic import atomic_path, replace_durably, write_json
from memstudy.data.imageset import ImageSet
from memstudy.models.configs import TrainingConfig, config_to_dict, resolve_config
from memstudy.models.distributed import DistInfo, barrier

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
LOG_FILE = "log.json"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
CHECKPOINT_FORMAT = 1
UNREADABLE_SUFFIX = ".unreadable"


def bookkeeping_fields(config: TrainingConfig | type[TrainingConfig]) -> frozenset[str]:
    """Names of the config fields marked ``metadata={"bookkeeping": True}``.

    They change what a run records (name, checkpoints, log, precision on GPU), not its weights, so a
    resumed run may change them.
    """
    return frozenset(f.name for f in dataclasses.fields(config) if f.metadata.get("bookkeeping", False))


def dataset_fingerprint(imageset: ImageSet) -> str:
    """A short hash of the ImageSet's layout, names, groups and up to 64 of its images."""
    h = hashlib.sha256()
    h.update(
        json.dumps([list(imageset.images.shape), list(imageset.channels), list(imageset.names)]).encode()
    )
    h.update(imageset.groups.tobytes())
    h.update(np.ascontiguousarray(imageset.images[:: max(1, len(imageset) // 64)]).tobytes())
    return h.hexdigest()[:16]


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Path of the checkpoint written after ``step`` steps."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def sample_dir(run_dir: str | os.PathLike, step: int, seed: int) -> Path:
    """Default folder of the samples drawn from the checkpoint at ``step`` with ``seed``."""
    return Path(run_dir) / SAMPLES_DIR / f"step_{step:08d}-seed{seed}"


def list_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """The run's checkpoints by step, in increasing order."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("step_*.pt"):
        with contextlib.suppress(ValueError):
            found[int(path.stem.removeprefix("step_"))] = path
    return dict(sorted(found.items()))


def find_checkpoint(run_dir: str | os.PathLike, checkpoint: str | int = "last") -> Path:
    """Return the checkpoint ``"last"`` or at step ``checkpoint``; FileNotFoundError names what exists."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints in {CHECKPOINT_DIR}/")
    if checkpoint == "last":
        return found[max(found)]
    if int(checkpoint) not in found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step {checkpoint}; kept steps: {list(found)}")
    return found[int(checkpoint)]


def read_params(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``params.json``."""
    path = Path(run_dir) / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no {PARAMS_FILE})")
    return json.loads(path.read_text())


def read_log(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The run's log: ``step`` (steps done), mean losses since the last record and ``images_per_s``."""
    path = Path(run_dir) / LOG_FILE
    return json.loads(path.read_text())["records"] if path.is_file() else []


def start_run(
    model_name: str,
    cfg: TrainingConfig,
    imageset: ImageSet,
    run_dir: Path,
    *,
    seed: int,
    steps: int,
    dist: DistInfo,
) -> dict[str, Any]:
    """Write ``params.json``, or check that an existing run is the same training; return the params.

    Raises ValueError naming every setting that differs from the existing run's, except bookkeeping
    fields of the config. A config field the existing run did not record yet counts as its default.
    """
    params = {
        "model": model_name,
        "config": config_to_dict(cfg),
        "seed": seed,
        "steps": steps,
        "image_shape": list(imageset.image_shape),
        "channels": list(imageset.channels),
        "n_images": len(imageset),
        "dataset": {"fingerprint": dataset_fingerprint(imageset), "provenance": imageset.provenance},
        "world_size": dist.world_size,
        "torch": torch.__version__,
    }
    if (run_dir / PARAMS_FILE).is_file():
        old = read_params(run_dir)
        same = ["model", "seed", "image_shape", "channels", "n_images"]
        diffs = [k for k in same if old.get(k) != params[k]]
        if old["dataset"]["fingerprint"] != params["dataset"]["fingerprint"]:
            diffs.append("dataset")
        old_config = _with_defaults(old.get("model", model_name), old["config"])
        skip = bookkeeping_fields(cfg)
        diffs += [
            f"config.{k}" for k, v in params["config"].items() if k not in skip and old_config.get(k) != v
        ]
        if diffs:
            raise ValueError(
                f"{run_dir} holds a different training run (differs in {', '.join(diffs)}); "
                f"use a new run_dir or the same settings to resume"
            )
        if old["world_size"] != dist.world_size:
            logger.warning(
                "resuming %s with %d processes (was %d): noise streams differ from an uninterrupted run",
                run_dir,
                dist.world_size,
                old["world_size"],
            )
    if dist.is_main:
        write_json(run_dir / PARAMS_FILE, params)
    return params


def _with_defaults(model_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with fields added since then at their defaults (what the run trained with)."""
    try:
        return config_to_dict(resolve_config(model_name, config))
    except (TypeError, ValueError):  # another model's or a malformed config: compare as recorded
        return config


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    records: list[dict],
    keep: set[int],
    dist: DistInfo,
) -> Path:
    """Rank 0 writes the log and the checkpoint, reads it back, then prunes; every rank waits for it.

    The log goes first: a run killed in between resumes from the previous checkpoint and drops the log's
    later records. Checkpoints older than ``step`` and not in ``keep`` are deleted only once the new one
    reads back, so a failed write never leaves the run without a checkpoint.

    Raises
    ------
    OSError
        When the checkpoint just written does not read back (older checkpoints are then kept).
    """
    path = checkpoint_path(run_dir, step)
    if dist.is_main:
        write_json(run_dir / LOG_FILE, {"model": state["model"], "records": records})
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
            # Loading costs about what saving did, once per checkpoint_every steps; it catches a file
            # that the filesystem or torch.save cut short before older checkpoints are deleted, and such
            # a file never takes the checkpoint's name.
            try:
                again = torch.load(tmp, map_location="cpu", weights_only=True)
                if again.get("step") != step:
                    raise ValueError(f"it holds step {again.get('step')}")
            except Exception as error:
                raise OSError(
                    f"{path}: the checkpoint just written does not read back ({type(error).__name__}: "
                    f"{error}); older checkpoints kept"
                ) from error
        for old_step, old_path in list_checkpoints(run_dir).items():
            if old_step < step and old_step not in keep:
                old_path.unlink(missing_ok=True)
        logger.debug("checkpoint %s", path)
    barrier(dist)
    return path


def load_newest_checkpoint(
    run_dir: str | os.PathLike, device: torch.device, dist: DistInfo
) -> tuple[Path, dict[str, Any]] | None:
    """Return (path, state) of the newest checkpoint that reads, or None when there is none.

    A checkpoint that does not load is skipped with a warning naming it, and rank 0 renames it aside
    (``step_N.pt`` → ``step_N.pt.unreadable``), so that it is neither sampled from nor overwritten.
    """
    for step, path in reversed(list_checkpoints(run_dir).items()):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # torch raises RuntimeError, EOFError or UnpicklingError by damage
            if not path.exists():  # rank 0 renamed it aside while this rank looked
                continue
            aside = _aside_name(path) if dist.is_main else None
            logger.warning(
                "checkpoint %s does not load (%s: %s); resuming from an older one%s",
                path,
                type(error).__name__,
                error,
                f", renamed it to {aside.name}" if aside else "",
            )
            if aside:
                replace_durably(path, aside)
            continue
        if int(state.get("step", -1)) != step:
            raise ValueError(f"{path} holds step {state.get('step')}, not {step} as its name says")
        return path, state
    return None


def _aside_name(path: Path) -> Path:
    """``step_N.pt.unreadable``, numbered when an earlier one is already there."""
    candidate, n = path.with_name(path.name + UNREADABLE_SUFFIX), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}{n}")
    return candidate
