"""Training speed of each model configuration on this machine, measured in one run."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from memstudy.models.configs import resolve_config
from memstudy.models.distributed import DistInfo, resolve_device
from memstudy.models.training import _TRAINERS, derive_seed, flush_denormals, to_model_range, trainer_class

# Image shapes benchmarked per config: the CPU demo size, and BraTS' 5 channels at the paper's 256 px.
BENCH_SHAPES = {"tiny": (1, 32, 32), "paper": (5, 256, 256)}


def bench_train(
    *,
    configs: tuple[str, ...] | None = None,
    steps: int = 16,
    repeats: int = 3,
    warmup: int = 2,
    device: str = "auto",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time training steps of every model in each config; return one record per (model, config).

    Parameters
    ----------
    configs : tuple of str or None
        Config names; None means ``("tiny",)`` on CPU and ``("tiny", "paper")`` on CUDA.
    steps : int
        Steps per timed round. StyleGAN's lazy R1 runs every 16 steps, so 16 includes its cost once.
    repeats : int
        Timed rounds; the fastest counts (as ``timeit``), since other work on the machine only slows
        a round down.
    warmup : int
        Untimed steps first (allocation, kernel selection).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    list of dict
        ``model``, ``config``, ``image_shape``, ``batch_size``, ``parameters`` (sampling network),
        ``seconds_per_step``, ``images_per_s``, ``device``.
    """
    dev = resolve_device(device)
    if configs is None:
        configs = ("tiny", "paper") if dev.type == "cuda" else ("tiny",)
    unknown = [name for name in configs if name not in BENCH_SHAPES]
    if unknown:
        raise ValueError(f"unknown config {unknown[0]!r} to benchmark; expected one of {tuple(BENCH_SHAPES)}")
    results = []
    for config_name in configs:
        shape = BENCH_SHAPES[config_name]
        for model_name in _TRAINERS:
            cfg = resolve_config(model_name, config_name)
            torch.manual_seed(derive_seed(seed, 0))
            trainer = trainer_class(model_name)(cfg, shape, dev, DistInfo(device=dev))
            rng = np.random.default_rng(seed)
            batch = to_model_range(rng.integers(0, 256, (cfg.batch_size, *shape), dtype=np.uint8)).to(dev)
            rounds = []
            with flush_denormals():
                for step in range(warmup):
                    trainer.train_step(batch, step + 1)
                for _ in range(repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    for step in range(steps):
                        trainer.train_step(batch, step)
                    _sync(dev)
                    rounds.append((time.perf_counter() - t0) / steps)
            seconds = min(rounds)
            results.append(
                {
                    "model": model_name,
                    "config": config_name,
                    "image_shape": list(shape),
                    "batch_size": cfg.batch_size,
                    "parameters": sum(p.numel() for p in trainer.sampling_network().parameters()),
                    "seconds_per_step": seconds,
                    "images_per_s": cfg.batch_size / seconds,
                    "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                }
            )
            del trainer
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
