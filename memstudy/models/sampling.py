"""Sample from a trained run: load a checkpoint's EMA network and draw uint8 images shaped like the
training data."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from memstudy.atomic import atomic_path
from memstudy.data.imageset import ImageSet
from memstudy.models import ddpm, stylegan
from memstudy.models.configs import TrainingConfig, resolve_config
from memstudy.models.distributed import resolve_device
from memstudy.models.training import (
    _STREAM_SAMPLE,
    derive_seed,
    find_checkpoint,
    flush_denormals,
    read_params,
    to_uint8,
)


def load_sampling_network(
    run_dir: str | os.PathLike, checkpoint: str | int = "last", *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, TrainingConfig, dict, int]:
    """Return (EMA network in eval mode, config, params, step) of one checkpoint."""
    params = read_params(run_dir)
    model_name = params["model"]
    cfg = resolve_config(model_name, params["config"])
    shape = tuple(params["image_shape"])
    path = find_checkpoint(run_dir, checkpoint)
    state = torch.load(path, map_location=device, weights_only=True)
    # The initial weights are overwritten; building them must not move the caller's random state.
    with torch.random.fork_rng(devices=[]):
        if model_name == "ddpm":
            net, key = ddpm.build_unet(cfg, shape), "ema"
        else:
            net, key = stylegan.Generator(cfg, shape), "G_ema"
    net.load_state_dict(state["state"][key])
    return net.to(device).eval().requires_grad_(False), cfg, params, int(state["step"])


def sample(
    run_dir: str | os.PathLike,
    n: int,
    *,
    seed: int,
    steps: int | None = None,
    checkpoint: str | int = "last",
    truncation_psi: float | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> ImageSet:
    """Draw ``n`` synthetic images from a run's EMA network at one checkpoint.

    Parameters
    ----------
    run_dir : path
        A run written by :func:`train`.
    n : int
        Number of images.
    seed : int
        The same seed (and ``batch_size``) gives the same images.
    steps : int or None
        DDPM only: sampling steps; None takes the config's ``sample_steps``. ``num_train_timesteps``
        (or a config value of None) runs the full ancestral chain, fewer steps run DDIM (η = 0).
    checkpoint : "last" or int
        Which checkpoint (by step) to sample from; see :func:`list_checkpoints`.
    truncation_psi : float or None
        StyleGAN only: truncation ψ; None takes the config's (1 = none).
    batch_size : int
        Images generated at a time.
    device : str
        ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda"``.
    out : path to a ``.npy`` file, optional
        Write the images there batch by batch (atomically, memory-mapped) instead of holding them in
        memory: 100,000 BraTS-sized images are 33 GB.
    progress : bool
        Show a progress bar over batches.

    Returns
    -------
    ImageSet
        uint8 images with the training images' shape and channel names (a read-only memmap of ``out``
        when given); names ``sample_000000``..., one group per image; provenance records run,
        checkpoint step, seed and sampler.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if out is not None and Path(out).suffix != ".npy":
        raise ValueError(f"out must be a .npy file, got {out}")
    dev = resolve_device(device)
    net, cfg, params, step = load_sampling_network(run_dir, checkpoint, device=dev)
    model_name, shape = params["model"], tuple(params["image_shape"])
    if model_name == "ddpm":
        if truncation_psi is not None:
            raise ValueError("truncation_psi applies to StyleGAN runs only")
        steps = cfg.sample_steps if steps is None else steps
        sampler = "ddpm-ancestral" if steps in (None, cfg.num_train_timesteps) else f"ddim-{steps}"
    else:
        if steps is not None:
            raise ValueError("steps applies to DDPM runs only")
        truncation_psi = cfg.truncation_psi if truncation_psi is None else truncation_psi
        sampler = f"stylegan-psi{truncation_psi:g}"
    amp = cfg.amp and dev.type == "cuda"
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        if out is None:
            images = np.empty((n, *shape), dtype=np.uint8)
        else:
            tmp = stack.enter_context(atomic_path(out))
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(flush_denormals())
        torch.manual_seed(derive_seed(seed, _STREAM_SAMPLE))
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling", unit="batch"):
            m = min(batch_size, n - start)
            if model_name == "ddpm":
                x = ddpm.generate(net, cfg, m, shape, steps=steps, device=dev, amp=amp)
            else:
                x = stylegan.generate(net, m, truncation_psi=truncation_psi, device=dev, amp=amp)
            images[start : start + m] = to_uint8(x)
        if out is not None:
            images.flush()
            del images
    if out is not None:
        images = np.load(out, mmap_mode="r")
    provenance = {
        "model": model_name,
        "config": cfg.name,
        "run_dir": str(run_dir),
        "checkpoint_step": step,
        "seed": seed,
        "sampler": sampler,
        "batch_size": batch_size,
        "training_dataset": params["dataset"]["fingerprint"],
    }
    return ImageSet(
        images,
        tuple(f"sample_{i:06d}" for i in range(n)),
        np.arange(n),
        tuple(params["channels"]),
        provenance,
    )
