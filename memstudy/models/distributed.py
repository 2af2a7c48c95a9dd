"""Data-parallel training under ``torchrun``: process group, device choice and gradient averaging.

Launched by ``torchrun --nproc_per_node K`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), training
joins a process group (NCCL on CUDA, gloo on CPU); otherwise it runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when this process group was started here and must be destroyed here

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """Return the torch device for ``"auto"`` (CUDA if present, else CPU), ``"cpu"`` or ``"cuda[:i]"``.

    Raises ValueError for a name torch does not know, or CUDA where there is none.
    """
    if str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch finds no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; return this process's DistInfo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), dev, owns)


def shutdown_distributed(dist: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if dist.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    """Wait for all processes (no-op in a single process)."""
    if dist.distributed:
        tdist.barrier()


def wrap_ddp(module: nn.Module, dist: DistInfo) -> nn.Module:
    """Wrap ``module`` in DistributedDataParallel when running under torchrun, else return it."""
    if not dist.distributed:
        return module
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def broadcast_buffers(module: nn.Module, dist: DistInfo) -> None:
    """Copy rank 0's buffers (running statistics) to every rank."""
    if dist.distributed:
        for tensor in module.buffers():
            tdist.broadcast(tensor.data, src=0)


def average_gradients(params: list[nn.Parameter], dist: DistInfo) -> None:
    """Average the gradients of ``params`` over all ranks, in one flat all-reduce.

    Used where ``DistributedDataParallel`` does not fit: StyleGAN takes several forward passes and
    double-backward regularizers per step (as NVlabs' code, which reduces gradients by hand too).
    """
    if not dist.distributed or not params:
        return
    # A parameter without a gradient on this rank still takes part, so every rank reduces the same vector.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    tdist.all_reduce(flat)
    flat /= dist.world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def all_reduce_mean(value: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Return the mean of ``value`` over all ranks (the value itself in a single process).

    Differentiable: the gradient of a loss that uses the mean reaches every rank's ``value``, so K
    processes compute the gradient that one process computes on the whole batch (StyleGAN's running
    path length enters the penalty this way).
    """
    if not dist.distributed:
        return value
    return _AllReduceSum.apply(value) / dist.world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks (every rank calls both)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        tdist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        tdist.all_reduce(total)
        return total
