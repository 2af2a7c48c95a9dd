"""Data-parallel training under torchrun: two CPU processes with gloo, the code path of multi-GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from memstudy.data import ImageSet
from memstudy.models import list_checkpoints, read_log, read_params

MODELS = ("ddpm", "stylegan")
WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    from memstudy.data import ImageSet
    from memstudy.models import train

    data, out = sys.argv[1:3]
    options = {
        "ddpm": dict(base_channels=8, channel_mult=(1, 2)),
        "stylegan": dict(channel_base=64, channel_max=16, z_dim=16, w_dim=16, r1_interval=2, pl_interval=2),
    }
    # One process group for both runs: train() joins a group that exists and leaves it open.
    dist.init_process_group("gloo")
    for model in ("ddpm", "stylegan"):
        result = train(model, ImageSet.load(data), "tiny", os.path.join(out, model), steps=3, seed=0,
                       batch_size=4, checkpoint_every=2, progress=False, **options[model])
        torch.save(result.trainer.state_dict(), os.path.join(out, f"{model}-rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Train both models for 3 steps with ``torchrun --nproc_per_node 2``; return the output folder."""
    out = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    data = ImageSet(
        rng.integers(0, 256, (8, 1, 16, 16), dtype=np.uint8), [str(i) for i in range(8)], range(8), ["x"]
    )
    data.save(out / "data")
    (out / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(out / "worker.py"), str(out / "data"), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _flatten(state, prefix=""):
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    if isinstance(state, list):
        return {k: v for i, value in enumerate(state) for k, v in _flatten(value, f"{prefix}/{i}").items()}
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_two_processes_train_identical_weights_and_write_one_checkpoint(two_process_runs, model):
    rank0 = _flatten(torch.load(two_process_runs / f"{model}-rank0.pt", weights_only=True))
    rank1 = _flatten(torch.load(two_process_runs / f"{model}-rank1.pt", weights_only=True))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    # Each rank saw other images and other noise: only averaged gradients keep them equal.
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks diverged in {different[:5]}"

    # Rank 0 alone wrote the checkpoints (2 was pruned once 3 existed), the log and the params.
    run_dir = two_process_runs / model
    assert list(list_checkpoints(run_dir)) == [3]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "log.json", "params.json"]
    checkpoint = torch.load(list_checkpoints(run_dir)[3], weights_only=True)
    assert checkpoint["world_size"] == 2
    saved = _flatten(checkpoint["state"])
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    assert read_params(run_dir)["world_size"] == 2
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]
