"""Train a model on an ImageSet with resumable checkpoints: the training loop.

The run directory, its parameters and checkpoints are :mod:`memstudy.models.runs`' business.
Randomness is counter-based: the data order of epoch e, the mirror flips of step s and the noise of
step s come from seeds derived from (seed, e), (seed, s) and (seed, rank, s). A checkpoint therefore
needs no RNG state, and a resumed run on CPU repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memstudy.data.imageset import ImageSet
from memstudy.models.configs import TrainingConfig, config_to_dict, resolve_config
from memstudy.models.distributed import DistInfo, init_distributed, shutdown_distributed
from memstudy.models.runs import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    find_checkpoint,
    load_newest_checkpoint,
    read_log,
    save_checkpoint,
    start_run,
)

logger = logging.getLogger(__name__)

# Trainer class of each model, in that model's module.
_TRAINERS = {"ddpm": "DDPMTrainer", "stylegan": "StyleGANTrainer"}
# Independent random streams derived from the run's seed (new streams go at the end: the numbers of the
# existing ones are part of every run's reproducibility).
_STREAM_INIT, _STREAM_DATA, _STREAM_STEP, _STREAM_SAMPLE, _STREAM_MIRROR = range(5)


def model_module(model_name: str) -> ModuleType:
    """The module of one model (``memstudy.models.ddpm`` or ``.stylegan``), imported on first use.

    Importing MONAI takes seconds, and a StyleGAN2 run never needs it. The workflow's code stamps add
    the model's module explicitly (``memstudy.workflow.stamps``), since no static import names it.
    """
    return importlib.import_module(f"memstudy.models.{model_name}")


def trainer_class(model_name: str) -> type:
    """The trainer of ``model_name`` (``"ddpm"`` or ``"stylegan"``)."""
    if model_name not in _TRAINERS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {tuple(_TRAINERS)}")
    return getattr(model_module(model_name), _TRAINERS[model_name])


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    run_dir : Path
    step : int
        Steps trained in total.
    checkpoint : Path
        The checkpoint written at ``step``.
    trainer : DDPMTrainer or StyleGANTrainer
        The networks as trained in this process (``trainer.state_dict()``).
    """

    run_dir: Path
    step: int
    checkpoint: Path
    trainer: Any


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 0–255 → float32 in [-1, 1], as the paper's loaders: ``x / 127.5 - 1``."""
    return torch.as_tensor(np.asarray(images)).to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float in [-1, 1] → uint8 0–255: ``(x + 1) · 127.5``, rounded and clipped.

    Rounding makes this the exact inverse of :func:`to_model_range`. NVlabs' ``x · 127.5 + 128``
    truncated rounds too (ties aside); guided-diffusion truncates ``(x + 1) · 127.5``, which is half a
    level darker on average and not an exact inverse.
    """
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero on the CPU while inside (and not afterwards).

    Adam's second moments of tiny gradients become denormal, and x86 CPUs compute with those many
    times slower: a tiny DDPM trained ~3× slower without this. Values below ~1e-38 become 0.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def derive_seed(seed: int, *keys: int) -> int:
    """Return a 63-bit seed for the stream ``keys`` of ``seed`` (independent streams, no collisions)."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def batch_indices(n_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the global batch for ``step``.

    Each epoch is a permutation seeded by (seed, epoch); the last partial batch of an epoch is dropped.
    """
    per_epoch = n_images // batch_size
    epoch, k = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, _STREAM_DATA, epoch))
    perm = torch.randperm(n_images, generator=generator).numpy()
    return perm[k * batch_size : (k + 1) * batch_size]


def mirror_flags(batch_size: int, seed: int, step: int) -> np.ndarray:
    """Which images of the global batch of ``step`` are flipped when ``mirror`` is on (bool, each 1/2).

    Drawn for the whole global batch from (seed, step), so every process slices the same flags and a
    resumed run draws what an uninterrupted one did.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, _STREAM_MIRROR, step))
    return (torch.rand(batch_size, generator=generator) < 0.5).numpy()


def training_batch(
    imageset: ImageSet, cfg: TrainingConfig, seed: int, step: int, dist: DistInfo
) -> np.ndarray:
    """This process's share of the global batch of ``step``: uint8 images, mirrored where drawn."""
    local = cfg.batch_size // dist.world_size
    part = slice(dist.rank * local, (dist.rank + 1) * local)
    batch = np.asarray(imageset.images[batch_indices(len(imageset), cfg.batch_size, seed, step)[part]])
    if cfg.mirror:
        flip = mirror_flags(cfg.batch_size, seed, step)[part]
        batch[flip] = batch[flip][..., ::-1]
    return batch


def check_training_setup(
    model_name: str, config: TrainingConfig, imageset: ImageSet, world_size: int = 1
) -> None:
    """Raise ValueError if ``config`` cannot train on ``imageset``; called before anything is built.

    Checks the image size against the config and the architecture (power of two for StyleGAN, a
    multiple of the U-Net's downsampling for DDPM), the channel count, and that the images fill a batch.
    """
    shape = imageset.image_shape
    channels, spatial = shape[0], shape[1:]
    if config.image_channels is not None and config.image_channels != channels:
        raise ValueError(
            f"the ImageSet has {channels} channels {imageset.channels} but the {config.name!r} config "
            f"expects image_channels={config.image_channels}"
        )
    if config.image_size is not None and any(s != config.image_size for s in spatial):
        raise ValueError(
            f"the ImageSet's images are {'×'.join(map(str, spatial))} but the {config.name!r} config expects "
            f"image_size={config.image_size}; prepare the data at that size or override image_size"
        )
    if model_name == "ddpm":
        model_module("ddpm").check_ddpm_shape(config, shape)
    else:
        model_module("stylegan").check_stylegan_shape(config, shape)
    if len(imageset) < config.batch_size:
        raise ValueError(
            f"the ImageSet has {len(imageset)} images, fewer than batch_size={config.batch_size}; "
            f"use more images or override batch_size"
        )
    if config.batch_size % world_size:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {world_size} processes")


def train(
    model_name: str,
    imageset: ImageSet | str | os.PathLike,
    config: str | TrainingConfig | dict,
    run_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    kimg: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train ``model_name`` on ``imageset``, resuming from the newest checkpoint in ``run_dir``.

    Parameters
    ----------
    model_name : {"ddpm", "stylegan"}
    imageset : ImageSet or path to a saved ImageSet
        uint8 training images; the model trains at their size and channel count.
    config : str, config dataclass or dict
        ``"tiny"`` (CPU demo), ``"paper"`` (the authors' settings) or a :mod:`~memstudy.models.configs`
        dataclass; ``overrides`` replace fields (``base_channels=64``, ``keep_checkpoints=[1000, 2000]``).
    run_dir : path
        Where ``params.json``, ``log.json`` and ``checkpoints/`` go; an existing run is resumed.
    steps, kimg : int or float
        Total length of training (not the increment), in optimizer steps or thousands of images;
        give exactly one.
    seed : int
        Seeds initialization, data order and noise; the same seed gives the same weights on CPU.
    device : str
        ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``. Under ``torchrun`` each process uses
        its local GPU and gradients are averaged across processes.
    progress : bool
        Show a progress bar with loss and images/s (rank 0 only).

    Returns
    -------
    TrainResult

    Notes
    -----
    A checkpoint is written every ``checkpoint_every`` steps, at each step in ``keep_checkpoints``
    and at the end; older checkpoints not in ``keep_checkpoints`` are deleted once a newer one has been
    read back. A run resumes from its newest checkpoint that loads (see
    :func:`~memstudy.models.runs.load_newest_checkpoint`).
    """
    if model_name not in _TRAINERS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {tuple(_TRAINERS)}")
    cfg = resolve_config(model_name, config, **overrides)
    if not isinstance(imageset, ImageSet):
        imageset = ImageSet.load(imageset)
    if (steps is None) == (kimg is None):
        raise ValueError("give the length of training as exactly one of steps= or kimg=")
    total = int(steps) if steps is not None else math.ceil(kimg * 1000 / cfg.batch_size)
    if total < 1:
        raise ValueError(f"training needs at least one step, got steps={total}")
    derive_seed(seed)  # rejects a negative seed before anything starts
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_training_setup(model_name, cfg, imageset, world_size)

    run_dir = Path(run_dir)
    dist = init_distributed(device)
    try:
        start_run(model_name, cfg, imageset, run_dir, seed=seed, steps=total, dist=dist)
        devices = [dist.device.index] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), flush_denormals():
            return _train_loop(model_name, cfg, imageset, run_dir, total, seed, dist, progress)
    finally:
        shutdown_distributed(dist)


def _train_loop(
    model_name: str,
    cfg: TrainingConfig,
    imageset: ImageSet,
    run_dir: Path,
    total: int,
    seed: int,
    dist: DistInfo,
    progress: bool,
) -> TrainResult:
    torch.manual_seed(derive_seed(seed, _STREAM_INIT))  # identical initial weights on every rank
    trainer = trainer_class(model_name)(cfg, imageset.image_shape, dist.device, dist)
    start, records = 0, []
    resumed = load_newest_checkpoint(run_dir, dist.device, dist)
    if resumed is not None:
        path, state = resumed
        trainer.load_state_dict(state["state"])
        start = int(state["step"])
        records = [r for r in read_log(run_dir) if r["step"] <= start]
        logger.info("resuming %s from step %d (%s)", run_dir, start, path.name)
    n_params = sum(p.numel() for p in trainer.sampling_network().parameters())
    logger.info(
        "training %s/%s on %d images %s, %.2f M parameters (sampling network), steps %d→%d, "
        "%d process(es) on %s",
        model_name,
        cfg.name,
        len(imageset),
        tuple(imageset.image_shape),
        n_params / 1e6,
        start,
        total,
        dist.world_size,
        dist.device,
    )
    if start >= total:
        return TrainResult(run_dir, start, find_checkpoint(run_dir), trainer)

    keep = set(cfg.keep_checkpoints)
    pending: dict[str, list[float]] = {}
    n_pending = 0
    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        disable=not (progress and dist.is_main),
        desc=f"{model_name}/{cfg.name}",
    )
    t_record = time.perf_counter()
    for step in range(start, total):
        x = to_model_range(training_batch(imageset, cfg, seed, step, dist)).to(dist.device, non_blocking=True)
        torch.manual_seed(derive_seed(seed, _STREAM_STEP, dist.rank, step))
        t0 = time.perf_counter()
        losses = trainer.train_step(x, step)
        rate = cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
        for key, value in losses.items():
            pending.setdefault(key, []).append(value)
        n_pending += 1
        done = step + 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()} | {"img/s": f"{rate:.3g}"}, refresh=False)
        checkpointing = done % cfg.checkpoint_every == 0 or done in keep or done == total
        # A record also closes at each checkpoint, so a resumed run logs what an uninterrupted one does.
        if done % cfg.log_every == 0 or checkpointing:
            now = time.perf_counter()
            records.append(
                {
                    "step": done,
                    **{k: float(np.mean(v)) for k, v in pending.items()},
                    "images_per_s": cfg.batch_size * n_pending / max(now - t_record, 1e-9),
                }
            )
            pending, n_pending, t_record = {}, 0, now
        if checkpointing:
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": model_name,
                "step": done,
                "world_size": dist.world_size,
                "config": config_to_dict(cfg),
                "state": trainer.state_dict(),
            }
            save_checkpoint(run_dir, done, state, records, keep, dist)
    bar.close()
    return TrainResult(run_dir, total, checkpoint_path(run_dir, total), trainer)
