"""Sample from a trained run: load a checkpoint's EMA network and draw uint8 images shaped like the
training data.

Image i of a draw with seed s is made from a CPU generator seeded with (s, i) alone, so it is the same
image whatever the batch size, however many images are drawn, and (up to the device's arithmetic)
whichever device runs the network.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from memstudy.atomic import atomic_dir
from memstudy.data.imageset import IMAGES_FILE, ImageSet, write_meta
from memstudy.models.configs import DDPMConfig, TrainingConfig, resolve_config
from memstudy.models.distributed import resolve_device
from memstudy.models.runs import find_checkpoint, read_params
from memstudy.models.training import _STREAM_SAMPLE, derive_seed, flush_denormals, model_module, to_uint8


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
            net, key = model_module("ddpm").build_unet(cfg, shape), "ema"
        else:
            net, key = model_module("stylegan").Generator(cfg, shape), "G_ema"
    net.load_state_dict(state["state"][key])
    return net.to(device).eval().requires_grad_(False), cfg, params, int(state["step"])


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator that every random number of synthetic image ``index`` comes from."""
    return torch.Generator().manual_seed(derive_seed(seed, _STREAM_SAMPLE, index))


def sampler_settings(
    model_name: str,
    config: TrainingConfig,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    truncation_psi: float | None = None,
) -> dict[str, Any]:
    """Resolve the sampler options against a run's config; raise ValueError for ones that do not apply.

    Returns
    -------
    dict
        ``sampler`` (its name for the record, e.g. ``"ancestral-1000"``, ``"ddim-50-eta0"``,
        ``"stylegan-psi1"``), ``kind`` (``"ancestral"``, ``"ddim"`` or ``"stylegan"``), ``steps``,
        ``eta`` and ``truncation_psi`` (None where they do not apply).
    """
    if model_name != "ddpm":
        given = [k for k, v in (("sampler", sampler), ("steps", steps), ("eta", eta)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to DDPM runs only; this is a {model_name} run")
        psi = config.truncation_psi if truncation_psi is None else float(truncation_psi)
        return {
            "sampler": f"stylegan-psi{psi:g}",
            "kind": "stylegan",
            "steps": None,
            "eta": None,
            "truncation_psi": psi,
        }
    assert isinstance(config, DDPMConfig)
    if truncation_psi is not None:
        raise ValueError("truncation_psi applies to StyleGAN runs only; this is a ddpm run")
    ddpm = model_module("ddpm")
    kind = config.sampler if sampler is None else sampler
    if kind not in ddpm.SAMPLERS:
        raise ValueError(f"unknown DDPM sampler {kind!r}; expected one of {ddpm.SAMPLERS}")
    if kind == "ancestral" and eta is not None:
        raise ValueError("eta applies to the DDIM sampler only (sampler='ddim')")
    total = config.num_train_timesteps
    n_steps = len(ddpm.sampling_timesteps(total, config.sample_steps if steps is None else steps))
    eta = (config.ddim_eta if eta is None else float(eta)) if kind == "ddim" else None
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    return {
        "sampler": ddpm.sampler_name(kind, n_steps, eta or 0.0),
        "kind": kind,
        "steps": n_steps,
        "eta": eta,
        "truncation_psi": None,
    }


def sample(
    run_dir: str | os.PathLike,
    n: int,
    *,
    seed: int,
    checkpoint: str | int = "last",
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
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
        A run written by :func:`~memstudy.models.train`.
    n : int
        Number of images.
    seed : int
        Image i is drawn from a generator seeded with (seed, i): the same seed gives the same images
        whatever ``batch_size`` and ``n`` (the first m of n images are an m-image draw).
    checkpoint : "last" or int
        Which checkpoint (by step) to sample from; see :func:`~memstudy.models.list_checkpoints`.
    sampler : {"ancestral", "ddim"} or None
        DDPM only; None takes the config's ``sampler`` (default ``"ancestral"``, the paper's).
    steps : int or None
        DDPM only: network evaluations, 1..``num_train_timesteps``; None takes the config's
        ``sample_steps`` (default: all). Fewer than all respace the chain evenly.
    eta : float or None
        DDIM's η in [0, 1]; None takes the config's ``ddim_eta`` (default 0, deterministic).
    truncation_psi : float or None
        StyleGAN only: truncation ψ; None takes the config's (1 = none).
    batch_size : int
        Images generated at a time; does not change the images.
    device : str
        ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda"``.
    out : path, optional
        A new folder to write the images into as a saved ImageSet (``images.npy``, ``meta.json``),
        batch by batch: it is assembled in a hidden staging folder beside it and renamed into place
        when complete. An existing ``out`` is refused (FileExistsError).
    progress : bool
        Show a progress bar over denoising steps (DDPM) or images (StyleGAN).

    Returns
    -------
    ImageSet
        uint8 images with the training images' shape and channel names (memory-mapped from ``out``
        when given); names ``sample_000000``…, one group per image; provenance records the run,
        checkpoint step, seed, sampler (e.g. ``"ancestral-1000"``), steps, η, truncation ψ and the
        training dataset's fingerprint.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    derive_seed(seed)  # rejects a negative seed before anything is loaded
    if out is not None and os.path.lexists(out):
        raise FileExistsError(f"{out} already exists; sampling writes a new folder and never overwrites")
    dev = resolve_device(device)
    net, cfg, params, step = load_sampling_network(run_dir, checkpoint, device=dev)
    model_name, shape = params["model"], tuple(params["image_shape"])
    settings = sampler_settings(
        model_name, cfg, sampler=sampler, steps=steps, eta=eta, truncation_psi=truncation_psi
    )
    provenance = {
        "model": model_name,
        "config": cfg.name,
        "run_dir": str(run_dir),
        "checkpoint_step": step,
        "seed": seed,
        **{k: settings[k] for k in ("sampler", "steps", "eta", "truncation_psi")},
        "training_dataset": params["dataset"]["fingerprint"],
    }
    names = [f"sample_{i:06d}" for i in range(n)]
    if out is None:
        images = np.empty((n, *shape), dtype=np.uint8)
        _draw_into(images, net, cfg, settings, seed, batch_size, dev, progress)
        return ImageSet(images, names, np.arange(n), tuple(params["channels"]), provenance)
    with atomic_dir(out) as staging:
        path = staging / IMAGES_FILE
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
        _draw_into(images, net, cfg, settings, seed, batch_size, dev, progress)
        images.flush()
        del images
        write_meta(staging, names, np.arange(n), params["channels"], (n, *shape), provenance)
    return ImageSet.load(out)


def _draw_into(
    images: np.ndarray,
    net: nn.Module,
    cfg: TrainingConfig,
    settings: dict[str, Any],
    seed: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> None:
    """Fill ``images`` batch by batch; image i uses only :func:`image_generator` (seed, i)."""
    n, shape = images.shape[0], images.shape[1:]
    amp = cfg.amp and device.type == "cuda"
    batches = range(0, n, batch_size)
    per_batch = settings["steps"] if settings["kind"] != "stylegan" else None
    total = len(batches) * per_batch if per_batch else n
    unit = "step" if per_batch else "image"
    with flush_denormals(), tqdm(total=total, disable=not progress, unit=unit, desc="sampling") as bar:
        for b, start in enumerate(batches):
            m = min(batch_size, n - start)
            generators = [image_generator(seed, i) for i in range(start, start + m)]
            bar.set_description(f"sampling batch {b + 1}/{len(batches)}")
            if settings["kind"] == "stylegan":
                x = model_module("stylegan").generate(
                    net, generators, truncation_psi=settings["truncation_psi"], device=device, amp=amp
                )
                bar.update(m)
            else:
                x = model_module("ddpm").generate(
                    net,
                    cfg,
                    tuple(shape),
                    generators,
                    sampler=settings["kind"],
                    steps=settings["steps"],
                    eta=settings["eta"] or 0.0,
                    device=device,
                    amp=amp,
                    bar=bar,
                )
            images[start : start + m] = to_uint8(x)
