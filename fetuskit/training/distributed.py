"""Process-group set-up for torchrun: rank, world size, device and collective helpers.

Under ``torchrun`` the environment contains RANK, WORLD_SIZE and LOCAL_RANK; without them the run
is a single process. CUDA runs use NCCL with one GPU per local rank, CPU runs use gloo.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fetuskit.training.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """The place of this process in the job.

    Attributes:
        rank: global rank, 0 on a single process.
        world_size: number of processes.
        local_rank: rank on this machine; selects the CUDA device.
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that logs, validates and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:K" into a device; "auto" prefers CUDA.

    Raises:
        ConfigError: ``name`` is not a torch device, or names CUDA on a machine without it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"invalid run.device={name!r}: expected auto, cpu, cuda or cuda:K ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} was requested but CUDA is not available; use run.device=cpu or auto")
    return device


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group if the environment names one, else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(context: DistContext) -> None:
    """Wait for every process; a no-op on a single process."""
    if context.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(context: DistContext) -> None:
    """Leave the process group if this module or the caller joined one."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
