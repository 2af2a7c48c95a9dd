"""Data-parallel training under torchrun: two CPU processes with gloo, the code path of multi-GPU runs.

Two processes must train what one process trains on the same global batch; that is what makes a
wrong gradient scaling (summing instead of averaging over processes) fail the test.
"""

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
STEPS = 3
WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    from memstudy.data import ImageSet
    from memstudy.models import train
    from memstudy.models.ddpm import DDPMTrainer
    from memstudy.models.stylegan import StyleGANTrainer

    data, out = sys.argv[1:3]
    options = {
        # No gradient clipping: clipping to a norm would hide a gradient scaled by the process count.
        "ddpm": dict(base_channels=8, channel_mult=(1, 2), grad_clip=None, norm_num_groups=2),
        # Minibatch-stddev groups of one: the statistic is per process (as NVlabs'), so larger groups
        # would compute another function with 2 processes than with 1.
        "stylegan": dict(channel_base=64, channel_max=16, z_dim=16, w_dim=16, r1_interval=2, pl_interval=2,
                         pl_weight=2.0, mbstd_group=1),
    }

    # The training loop seeds each process's noise with (seed, rank, step), so 1 and 2 processes draw
    # different noise. Here every draw inside a training step is instead keyed by (step, draw number,
    # row of the global batch), which gives both layouts the same noise for the same image.
    real = {name: getattr(torch, name) for name in ("randn", "randn_like", "randint", "rand")}
    key = {"step": None, "draw": 0}
    rank = int(os.environ["RANK"])

    def rows(n, draw_row):
        key["draw"] += 1
        seeds = [(key["step"] * 1000 + key["draw"]) * 1000 + rank * n + i for i in range(n)]
        return torch.stack([draw_row(torch.Generator().manual_seed(seed)) for seed in seeds])

    def scalar(draw):
        key["draw"] += 1
        return draw(torch.Generator().manual_seed(key["step"] * 1000 + key["draw"]))

    def keyed(name, low_high=()):
        def draw(*size, device=None, dtype=None, **kw):
            size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            if key["step"] is None:
                return real[name](*low_high, size, device=device, dtype=dtype, **kw)
            if not size:
                value = scalar(lambda g: real[name](*low_high, [], generator=g))
            else:
                value = rows(size[0], lambda g: real[name](*low_high, size[1:], generator=g))
            return value.to(device) if dtype is None else value.to(device, dtype)
        return draw

    def randn_like(x, **kw):
        return keyed("randn")(*x.shape, device=x.device, dtype=x.dtype)

    def randint(low, high, size, **kw):
        return keyed("randint", (low, high))(size, **kw)

    randn, rand = keyed("randn"), keyed("rand")
    torch.randn, torch.randn_like, torch.rand, torch.randint = randn, randn_like, rand, randint
    for cls in (DDPMTrainer, StyleGANTrainer):
        def train_step(self, x, step, _step=cls.train_step):
            key.update(step=step, draw=0)
            try:
                return _step(self, x, step)
            finally:
                key["step"] = None
        cls.train_step = train_step

    # One process group for both runs: train() joins a group that exists and leaves it open.
    dist.init_process_group("gloo")
    for model in ("ddpm", "stylegan"):
        result = train(model, ImageSet.load(data), "tiny", os.path.join(out, model), steps=STEPS, seed=0,
                       batch_size=4, checkpoint_every=2, mirror=True, progress=False, **options[model])
        torch.save(result.trainer.state_dict(), os.path.join(out, f"{model}-rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
    """
).replace("STEPS", str(STEPS))


def _torchrun(processes: int, out: Path, data: Path) -> subprocess.Popen:
    (out / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), str(out / "worker.py"), str(data), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Both models trained for 3 steps with 1 and with 2 processes on the same global batch of 4."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    data = ImageSet(
        rng.integers(0, 256, (8, 1, 16, 16), dtype=np.uint8), [str(i) for i in range(8)], range(8), ["x"]
    )
    data.save(root / "data")
    out, launched = {}, {}
    for processes in (1, 2):  # at the same time: starting Python with torch is most of the cost
        out[processes] = root / f"{processes}-processes"
        out[processes].mkdir()
        launched[processes] = _torchrun(processes, out[processes], root / "data")
    for processes, process in launched.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{processes} process(es): {stderr[-3000:]}"
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
def test_two_processes_train_identical_weights_and_write_one_checkpoint(runs, model):
    rank0 = _flatten(torch.load(runs[2] / f"{model}-rank0.pt", weights_only=True))
    rank1 = _flatten(torch.load(runs[2] / f"{model}-rank1.pt", weights_only=True))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    # Each rank saw other images and other noise: only averaged gradients keep them equal.
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks diverged in {different[:5]}"

    # Rank 0 alone wrote the checkpoints (2 was pruned once 3 existed), the log and the params.
    run_dir = runs[2] / model
    assert list(list_checkpoints(run_dir)) == [3]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "log.json", "params.json"]
    checkpoint = torch.load(list_checkpoints(run_dir)[3], weights_only=True)
    assert checkpoint["world_size"] == 2
    saved = _flatten(checkpoint["state"])
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    assert read_params(run_dir)["world_size"] == 2
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_two_processes_train_what_one_process_trains_on_the_same_batch(runs, model):
    one = _flatten(torch.load(runs[1] / f"{model}-rank0.pt", weights_only=True))
    two = _flatten(torch.load(runs[2] / f"{model}-rank0.pt", weights_only=True))
    # w_avg (StyleGAN's running mean of w, used only for truncation when sampling) is each process's
    # own batch mean, rank 0's kept, as in NVlabs' code: it is not a function of the global batch.
    keys = [k for k in one if "w_avg" not in k]
    assert one.keys() == two.keys() and len(keys) > 10
    moments = [k for k in keys if k.rsplit("/", 1)[-1] in ("exp_avg", "exp_avg_sq")]
    assert len(moments) > 10  # the optimizer moments are where a wrong gradient scale shows
    # Error analysis. Both layouts compute the same per-image terms and differ only in the order of the
    # sums over images: one sum of 4 against two sums of 2 joined by the all-reduce. A float32 sum of
    # K terms is off by about √K·u·Σ|terms| (u = 6e-8; K ≲ 10⁴ terms per gradient entry here: images ×
    # pixels × kernel taps), i.e. ≲ 1e-5 of a tensor's largest gradient, a few times that where terms
    # cancel. Adam's first moment m carries that relative error, its second moment v twice it; the
    # update lr·m̂/(√v̂ + ε) is a ratio of the same gradients, so over 3 steps weights and EMA move apart
    # by ≲ 3·lr·(that error), again ≲ 1e-4 of their tensor's scale. The absolute floor, 1e-7, is two
    # float32 ulps of an O(1) weight and covers entries whose gradient is zero but for rounding
    # (≲ 1e-12, which Adam moves by lr·|g|/ε ≲ 1e-7 per step). A gradient scaled by the process count
    # (summed, not averaged) leaves Adam's update nearly unchanged but scales m by 2 and v by 4: an
    # error of 100–300 % of those tensors' scale.
    failures = []
    for k in keys:
        if not torch.is_floating_point(one[k]):
            assert torch.equal(one[k], two[k]), k  # step counters
            continue
        a, b = one[k].double(), two[k].double()
        rtol = 2e-4 if k.endswith("exp_avg_sq") else 1e-4
        scale, error = a.abs().max().item(), (a - b).abs().max().item()
        if error > rtol * scale + 1e-7 * (k not in moments) + 1e-12:
            failures.append(f"{k}: max difference {error:.3g} at scale {scale:.3g}")
    assert not failures, "\n".join(failures[:10])
