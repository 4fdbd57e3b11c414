"""Device choice and the torchrun process group; one process takes the same code path with world size 1."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from fmcache.errors import FmcacheError


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given ("cpu", "cuda", "cuda:1", ...), else (None or "auto") CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FmcacheError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FmcacheError("device cuda was requested but CUDA is not available; use cpu or auto")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so a timer read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(precision: str, device: torch.device):
    """The context a forward runs under: ``auto`` is bf16 autocast on a GPU and fp32 on a CPU; ``fp32`` no autocast;
    ``fp16``/``bf16`` autocast to that type (fp16 needs a GPU: a CPU's fp16 kernels are slow and incomplete)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise FmcacheError("--precision fp16 needs a GPU (the seed's fp16 autocast); use fp32 or bf16 on a CPU")
    if precision not in ("fp16", "bf16"):
        raise FmcacheError(f"unknown precision '{precision}'; use auto, fp16, bf16 or fp32")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def rank() -> int:
    """This process's rank under torchrun (0 without it): the one place ``RANK`` is read."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in this torchrun job (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the process that prints and writes what the whole job shares."""
    return rank() == 0


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_gather_object(self, obj: object) -> list:
        """Every rank's ``obj`` (a collective, so also a barrier); ``[obj]`` with one process."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def init_dist(requested_device: str | None = None) -> Dist:
    """Join the torchrun group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = world_size()
    device = pick_device(requested_device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank(), world, device)


def close_dist(dist: Dist) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
