"""Multi-GPU (or multi-process CPU) support under ``torchrun``: PyTorch DDP, nothing home-made.

``run_stella.py`` works unchanged when launched by torchrun: :func:`init_from_env` reads the
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun sets, initialises the process group
(NCCL on CUDA, gloo on CPU) and picks ``cuda:LOCAL_RANK``. Each rank keeps its own replay buffer
(as the paper's 4 x 500 reservoirs), the training loader is sharded by the strategy's
``EpochSampler``, the retrieval stream is sharded for evaluation and the embeddings are gathered
with :func:`all_gather_cat` before recall is computed; only rank 0 logs and writes results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_from_env", "all_gather_cat", "is_main_process", "wrap_ddp", "get_rank"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: Optional[str] = None) -> DistContext:
    """Initialise torch.distributed if launched by torchrun; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    if world <= 1:
        dev = torch.device("cuda" if want_cuda else "cpu") if device in (None, "auto") else torch.device(device)
        return DistContext(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)  # by LOCAL rank: the global rank is wrong on several nodes
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False
             ) -> torch.nn.Module:
    """Wrap ``model`` (moved to ``ctx.device``) in PyTorch DDP.

    ``find_unused_parameters`` is off: every trainable parameter of the backbone takes part in each
    pre-training forward, whatever the strategy (full clips, kept ids or STELLA+ patches;
    ``tests/test_ddp_params.py`` checks this), so the extra autograd-graph traversal DDP would do
    after every forward to look for unused parameters is pure overhead. Turn it on only for a model
    whose forward skips parameters; DDP then raises at the second step if it is needed and off.

    :param model: the bare backbone (build the optimizer from it before wrapping: parameter names).
    :param ctx: this process's :class:`DistContext` (CUDA: one device per process).
    :param find_unused_parameters: passed to ``DistributedDataParallel``.
    """
    from torch.nn.parallel import DistributedDataParallel

    dev = ctx.device
    return DistributedDataParallel(model.to(dev), device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def get_rank() -> int:
    """This process's rank in the initialised process group; 0 without one (the one rank helper)."""
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_cat(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate each tensor over ranks along dim 0 (ranks may hold different lengths)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    out = {}
    for k, t in tensors.items():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev).contiguous()
        n = torch.tensor([t.shape[0]], device=dev)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        m = int(max(s.item() for s in sizes))
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=dev)
        buf = [torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=dev) for _ in range(world)]
        dist.all_gather(buf, torch.cat([t, pad]))
        out[k] = torch.cat([b[: int(s.item())] for b, s in zip(buf, sizes)]).cpu()
    return out
