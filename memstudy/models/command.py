"""``memstudy train``, ``memstudy sample`` and ``memstudy bench train``.

The handlers import torch and the models only when they run, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from memstudy.data.command import add_data_options

MODEL_CHOICES = ("ddpm", "stylegan")


def add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``sample`` to the ``memstudy`` subcommands."""
    train = subparsers.add_parser(
        "train",
        help="train a DDPM or StyleGAN2 on an ImageSet (resumes an existing run)",
        description="Train a model on a saved ImageSet directory or a prepared dataset name, writing "
        "params.json, log.json and checkpoints/ into the run directory. Rerunning the same command "
        "resumes from the newest checkpoint that loads; a larger --steps continues training. "
        "--set mirror=true flips training images left-right at random.",
    )
    train.add_argument("data", help="a saved ImageSet directory, or a dataset name such as brain-phantom")
    train.add_argument(
        "--model", choices=MODEL_CHOICES, default="ddpm", help="model to train (default: ddpm)"
    )
    train.add_argument(
        "--config", default="tiny", help="config name: tiny (CPU demo) or paper (default: tiny)"
    )
    length = train.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=_positive_int, help="total optimizer steps")
    length.add_argument("--kimg", type=float, help="total thousands of training images shown")
    train.add_argument("--run-dir", required=True, type=Path, help="directory of this run")
    train.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of initialization, data order and noise"
    )
    train.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    train.add_argument(
        "--keep",
        type=_int_list,
        default=None,
        metavar="STEPS",
        help="comma-separated steps whose checkpoints are kept, e.g. 1000,2000,4000",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="overrides",
        help="override a config field (JSON value), e.g. --set base_channels=64; repeatable",
    )
    add_data_options(train)
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=run_train)

    sample = subparsers.add_parser(
        "sample",
        help="draw synthetic images from a trained run",
        description="Sample N images from a run's EMA network at one checkpoint: uint8, with the training "
        "images' shape and channels, saved as an ImageSet folder (names sample_000000..., provenance: run, "
        "checkpoint, seed, sampler) in RUN_DIR/samples/step_<STEP>-seed<SEED>/ or where --out says. An "
        "existing folder is replaced only with --force. The same --seed gives the same images.",
    )
    sample.add_argument("run_dir", type=Path, help="a run directory written by memstudy train")
    sample.add_argument("-n", "--num", type=_positive_int, required=True, help="number of images")
    sample.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed (default: 0)")
    sample.add_argument(
        "--checkpoint", type=_checkpoint, default="last", help="'last' or a kept step (default: last)"
    )
    sample.add_argument(
        "--sampler", default=None, help="DDPM sampler: ancestral or ddim (default: the run's config)"
    )
    sample.add_argument(
        "--steps", type=_positive_int, default=None, help="DDPM sampling steps (default: config)"
    )
    sample.add_argument("--eta", type=float, default=None, help="DDIM eta (default: config)")
    sample.add_argument("--truncation", type=float, default=None, help="StyleGAN truncation psi (default: 1)")
    sample.add_argument(
        "--batch-size", type=_positive_int, default=64, help="images generated at a time (default: 64)"
    )
    sample.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    sample.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the ImageSet folder to write (default: RUN_DIR/samples/step_<STEP>-seed<SEED>)",
    )
    sample.add_argument("--force", action="store_true", help="replace an existing output folder")
    sample.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sample.set_defaults(func=run_sample)


def add_bench_train_command(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``memstudy bench`` subcommands."""
    bench = bench_subparsers.add_parser(
        "train",
        help="seconds per step and images/s of each model config",
        description="Time training steps of the DDPM and the StyleGAN2 in the tiny configs (and the paper "
        "configs when a GPU is present), all in one run on this machine, on random images.",
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument(
        "--configs", default=None, help="comma-separated config names (default: tiny, +paper on GPU)"
    )
    bench.add_argument("--steps", type=_positive_int, default=16, help="steps per timed round (default: 16)")
    bench.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed rounds; the fastest counts (default: 3)"
    )
    bench.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    bench.set_defaults(func=run_bench_train)


def run_train(args: argparse.Namespace) -> int:
    """Handle ``memstudy train``."""
    from memstudy.data.command import open_data
    from memstudy.models.configs import resolve_config
    from memstudy.models.training import train

    overrides = _parse_overrides(args.overrides, "--set")
    if args.keep is not None:
        overrides["keep_checkpoints"] = args.keep
    resolve_config(args.model, args.config, **overrides)  # a bad --config or --set fails before data loads
    if args.run_dir.exists() and not args.run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {args.run_dir} is a file, not a folder")
    imageset = open_data(args.data, args, progress=not args.no_progress)
    result = train(
        args.model,
        imageset,
        args.config,
        args.run_dir,
        steps=args.steps,
        kimg=args.kimg,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        **overrides,
    )
    print(f"trained {args.model} for {result.step} steps; last checkpoint {result.checkpoint}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    """Handle ``memstudy sample``: write one ImageSet folder per checkpoint and seed, never over another."""
    from memstudy.atomic import make_temp_dir
    from memstudy.models.runs import find_checkpoint, read_params, sample_dir
    from memstudy.models.sampling import sample

    read_params(args.run_dir)  # "not a training run" before anything else
    # Resolve "last" once: a training still running may add a newer checkpoint while this samples.
    step = int(find_checkpoint(args.run_dir, args.checkpoint).stem.removeprefix("step_"))
    out = args.out or sample_dir(args.run_dir, step, args.seed)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it, or --out for another folder")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the ImageSet")
    # The old output moves aside, and comes back if sampling fails.
    aside = make_temp_dir(out.parent, f"{out.name}.old") / out.name if out.exists() else None
    if aside is not None:
        out.rename(aside)
    try:
        images = sample(
            args.run_dir,
            args.num,
            seed=args.seed,
            checkpoint=step,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            truncation_psi=args.truncation,
            batch_size=args.batch_size,
            device=args.device,
            out=out,
            progress=not args.no_progress,
        )
    except BaseException:
        if aside is not None:
            aside.rename(out)
            aside.parent.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside.parent)
    print(f"wrote {len(images)} samples {images.images.shape} of {args.run_dir} step {step} to {out}")
    return 0


def run_bench_train(args: argparse.Namespace) -> int:
    """Handle ``memstudy bench train``."""
    from memstudy.models.bench import bench_train

    configs = tuple(args.configs.split(",")) if args.configs else None
    results = bench_train(configs=configs, steps=args.steps, repeats=args.repeats, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    header = ("model", "config", "image", "batch", "params", "s/step", "img/s")
    print("{:<9} {:<6} {:<12} {:>5} {:>9} {:>8} {:>8}  device".format(*header))
    for r in results:
        shape = "×".join(map(str, r["image_shape"]))
        millions = r["parameters"] / 1e6
        print(
            f"{r['model']:<9} {r['config']:<6} {shape:<12} {r['batch_size']:>5} {millions:>8.2f}M "
            f"{r['seconds_per_step']:>8.3f} {r['images_per_s']:>8.1f}  {r['device']}"
        )
    return 0


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _checkpoint(text: str) -> str | int:
    if text == "last":
        return text
    try:
        return _non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'last' or a step number, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def _parse_overrides(items: list[str], option: str) -> dict[str, Any]:
    """``["base_channels=64", "amp=false"]`` → ``{"base_channels": 64, "amp": False}``.

    Values are parsed as JSON where they are JSON, else kept as strings.
    """
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides
