"""The contrastive objective of pre-training (docs/method.md §1.5): the weighted symmetric InfoNCE over
the pooled audio and video embeddings, with negatives gathered over the ranks under torch.distributed."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce"]


def _distributed_world() -> int:
    """World size of the initialised default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gather_columns(cols: Tensor) -> tuple[Tensor, int]:
    """All-gather ``cols`` (B, C) over ranks; this rank's slice is ``cols`` itself (keeps its grad).

    The other ranks' slices arrive without gradient (§1.5: "the local slice keeping its gradient"),
    so backward never communicates. All ranks must hold the same B: the sizes are exchanged first
    and every rank raises the same error, so a mismatch cannot deadlock the next collective.

    :returns: (gathered (W*B, C) in rank order, column offset of this rank's first row = rank*B).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    b = cols.shape[0]
    size = torch.tensor([b], device=cols.device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    if any(c != b for c in counts):
        raise ValueError(f"info_nce: gathering negatives needs the same batch size on every rank, got "
                         f"per-rank sizes {counts}; shard the data evenly (drop_last / padded sampler) "
                         f"or set CAVConfig.gather_negatives=False")
    buf = [torch.empty_like(cols) for _ in range(world)]
    dist.all_gather(buf, cols.detach().contiguous())
    buf[rank] = cols  # the autograd-tracked local slice replaces its detached copy
    return torch.cat(buf, dim=0), rank * b


def info_nce(z_a: Tensor, z_v: Tensor, *, temperature: float, weight: float = 1.0, gather: bool = True
             ) -> tuple[Tensor, Tensor]:
    """Weighted symmetric InfoNCE between audio and video embeddings (§1.5), in fp32.

    ``a = normalize(z_a)``, ``v = normalize(z_v)``; per local sample n
    ``per[n] = weight * ½ [CE(v_n · A / τ, n') + CE(a_n · V / τ, n')]`` where the columns A, V are this
    rank's batch alone, or, when ``gather`` is set and torch.distributed runs with world size W > 1,
    the batches of all ranks in rank order (the positive column is ``n' = rank * B + n``). The rows
    stay local and only the local column slice carries gradient, so under DDP (which averages the
    parameter gradients) the update is the gradient of the mean over ranks of the per-rank losses
    with the other ranks' columns held constant. A single process computes exactly the plain
    B x B loss whatever ``gather`` says.

    :param z_a: (B, D) un-normalised audio embeddings (any float dtype).
    :param z_v: (B, D) un-normalised video embeddings, row n paired with ``z_a[n]``.
    :param temperature: τ > 0.
    :param weight: w_c, multiplies every term.
    :param gather: gather the columns over ranks when distributed (collective call: every rank
        must call with the same B).
    :returns: (mean over local rows (scalar), per-sample loss (B,)), both fp32.
    """
    if z_a.shape != z_v.shape or z_a.dim() != 2:
        raise ValueError(f"info_nce: z_a and z_v must both be (B, D), got {tuple(z_a.shape)} and "
                         f"{tuple(z_v.shape)}")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a = F.normalize(z_a.float(), dim=-1)
        v = F.normalize(z_v.float(), dim=-1)
        if not gather or _distributed_world() == 1:
            logits = v @ a.t() / temperature  # rows: video queries over audio keys
            target = torch.arange(logits.shape[0], device=logits.device)
            per = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                         + F.cross_entropy(logits.t(), target, reduction="none"))
        else:
            # one collective for both modalities: columns [a | v] side by side
            cols, offset = _gather_columns(torch.cat([a, v], dim=1))
            a_all, v_all = cols.split(a.shape[1], dim=1)
            target = offset + torch.arange(a.shape[0], device=a.device)
            per = 0.5 * (F.cross_entropy(v @ a_all.t() / temperature, target, reduction="none")
                         + F.cross_entropy(a @ v_all.t() / temperature, target, reduction="none"))
        per = weight * per
    return per.mean(), per
