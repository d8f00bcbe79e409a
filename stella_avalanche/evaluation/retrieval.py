"""Zero-shot audio<->video retrieval: strict ranks, recall@K and median rank.

Protocol (``benchmarks-and-metrics.md`` §4):

* similarity ``S = Â V̂ᵀ`` of the L2-normalised fp32 embeddings, query ``i``'s positive is item ``i``;
* A→V rank of row ``i``: ``1 + #{j : S_ij > S_ii}`` (strict, so exact ties are optimistic);
  V→A rank of column ``j``: ``1 + #{i : S_ij > S_jj}``;
* pessimistic diagnostic rank: ``1 + #{j ≠ i : S_ij ≥ S_ii}``; a large gap to the strict rank flags
  collapsed (tied) embeddings;
* gallery: the whole pool (paper-faithful default) or, optionally, only the query's own task.

Algorithm: one pass over blocks of ``c`` rows. Each block computes ``S_B = Â_B V̂ᵀ`` (c×N) once and
derives both directions from it: row counts give A→V, column counts accumulated over the blocks give
V→A. Time O(N²·D), memory O(c·N); the N×N matrix is never materialised and nothing is sorted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RetrievalRanks", "retrieval_ranks", "recall_report", "median_rank", "auto_chunk_size",
           "DIRECTIONS", "DEFAULT_KS"]

DIRECTIONS: tuple[str, str] = ("a2v", "v2a")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: Bytes per similarity element held at once in a block: fp32 value + bool masks + int temporaries.
_BYTES_PER_ELEMENT = 16
_DEFAULT_MEMORY_BUDGET = 512 * 2**20


@dataclass(frozen=True)
class RetrievalRanks:
    """1-based ranks of the true match for every query, both directions.

    All fields are int64 tensors of shape (N,) on the CPU; entry ``i`` belongs to clip ``i``
    (A→V: audio query ``i``; V→A: video query ``i``).

    :param a2v: strict A→V ranks ``1 + #{j : S_ij > S_ii}``.
    :param v2a: strict V→A ranks ``1 + #{i : S_ij > S_jj}`` (query = column ``j``).
    :param a2v_pess: pessimistic A→V ranks ``1 + #{j ≠ i : S_ij ≥ S_ii}``.
    :param v2a_pess: pessimistic V→A ranks.
    """

    a2v: torch.Tensor
    v2a: torch.Tensor
    a2v_pess: torch.Tensor
    v2a_pess: torch.Tensor

    def strict(self, direction: str) -> torch.Tensor:
        """Strict ranks of ``direction`` ("a2v" or "v2a")."""
        _check_direction(direction)
        return getattr(self, direction)

    def pessimistic(self, direction: str) -> torch.Tensor:
        """Pessimistic ranks of ``direction`` ("a2v" or "v2a")."""
        _check_direction(direction)
        return getattr(self, f"{direction}_pess")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def auto_chunk_size(n: int, *, memory_budget_bytes: int = _DEFAULT_MEMORY_BUDGET) -> int:
    """Rows per block so that one block's working set (~16 bytes per similarity) fits the budget.

    :param n: gallery size N.
    :param memory_budget_bytes: bytes allowed for one block's temporaries.
    :return: block size in [1, max(n, 1)].
    """
    c = memory_budget_bytes // max(1, n * _BYTES_PER_ELEMENT)
    return int(max(1, min(max(n, 1), c)))


def _as_embeddings(x: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    # fp32 on purpose: fp16 embeddings create spurious exact ties (design §4).
    return F.normalize(x.detach().to(device=device, dtype=torch.float32), dim=1)


def retrieval_ranks(
    z_audio: torch.Tensor,
    z_video: torch.Tensor,
    *,
    task_ids: torch.Tensor | Sequence[int] | None = None,
    per_task_gallery: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    memory_budget_bytes: int = _DEFAULT_MEMORY_BUDGET,
) -> RetrievalRanks:
    """Strict and pessimistic ranks of the true match in both directions.

    :param z_audio: (N, D) audio embeddings, row ``i`` pairs with ``z_video[i]``; normalised here.
    :param z_video: (N, D) video embeddings.
    :param task_ids: (N,) int task id per clip; required when ``per_task_gallery``.
    :param per_task_gallery: restrict every query's gallery to clips of its own task.
    :param chunk_size: rows per block; ``None`` derives it from ``memory_budget_bytes``.
    :param device: where to compute (``None``: the embeddings' device).
    :param memory_budget_bytes: working-memory budget used when ``chunk_size`` is None.
    :return: :class:`RetrievalRanks`, int64 (N,) CPU tensors.
    """
    dev = torch.device(device) if device is not None else (
        z_audio.device if isinstance(z_audio, torch.Tensor) else torch.device("cpu"))
    a = _as_embeddings(z_audio, "z_audio", dev)
    v = _as_embeddings(z_video, "z_video", dev)
    if a.shape != v.shape:
        raise ValueError(f"z_audio {tuple(a.shape)} and z_video {tuple(v.shape)} must have the same shape")
    n = a.shape[0]
    tasks: torch.Tensor | None = None
    if task_ids is not None:
        tasks = torch.as_tensor(task_ids).to(device=dev, dtype=torch.int64).reshape(-1)
        if tasks.numel() != n:
            raise ValueError(f"task_ids has {tasks.numel()} entries for {n} embeddings")
    if per_task_gallery and tasks is None:
        raise ValueError("per_task_gallery=True needs task_ids")
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return RetrievalRanks(empty, empty, empty, empty)
    c = int(chunk_size) if chunk_size else auto_chunk_size(n, memory_budget_bytes=memory_budget_bytes)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    # V->A positives S_jj are needed before the column counts start. They come from the diagonal
    # blocks Â_B V̂_Bᵀ, i.e. from a GEMM like the main one (a separate elementwise dot product can
    # differ in the last bit); the self-comparison is in addition excluded explicitly below, so the
    # item can never be counted against itself whatever the kernel does.
    pos_col = torch.empty(n, dtype=torch.float32, device=dev)
    for s in range(0, n, c):
        e = min(s + c, n)
        pos_col[s:e] = (a[s:e] @ v[s:e].T).diagonal()

    a2v = torch.empty(n, dtype=torch.int64, device=dev)
    a2v_ge = torch.empty(n, dtype=torch.int64, device=dev)
    v2a_gt = torch.zeros(n, dtype=torch.int64, device=dev)
    v2a_ge = torch.zeros(n, dtype=torch.int64, device=dev)
    for s in range(0, n, c):
        e = min(s + c, n)
        rows = torch.arange(e - s, device=dev)
        sim = a[s:e] @ v.T                                   # (c, N): the only large temporary
        diag = sim[rows, rows + s]                           # A->V positives, same product
        same = None
        if per_task_gallery:
            same = tasks[s:e, None] == tasks[None, :]        # (c, N) gallery mask
        # A->V: compare each row with its own positive. The diagonal entry equals `diag` bitwise, so
        # it is never "greater" and always "greater or equal" (counted once in the pessimistic rank).
        gt = sim > diag[:, None]
        ge = sim >= diag[:, None]
        if same is not None:
            gt &= same
            ge &= same
        a2v[s:e] = gt.sum(dim=1)
        a2v_ge[s:e] = ge.sum(dim=1)
        # V->A: column j against its own positive; self entries (row s+r, column s+r) removed below.
        gt = sim > pos_col[None, :]
        ge = sim >= pos_col[None, :]
        if same is not None:
            gt &= same
            ge &= same
        self_gt = gt[rows, rows + s]
        self_ge = ge[rows, rows + s]
        v2a_gt += gt.sum(dim=0)
        v2a_ge += ge.sum(dim=0)
        v2a_gt[s:e] -= self_gt.to(torch.int64)
        v2a_ge[s:e] -= self_ge.to(torch.int64)
        del sim, gt, ge, same

    return RetrievalRanks(
        a2v=(a2v + 1).cpu(),
        v2a=(v2a_gt + 1).cpu(),
        a2v_pess=a2v_ge.cpu(),            # includes the diagonal itself: 1 + #{j != i : S_ij >= S_ii}
        v2a_pess=(v2a_ge + 1).cpu(),      # self removed above, add the 1 back
    )


def median_rank(ranks: torch.Tensor) -> float | None:
    """Median of ``ranks``; with an even count the mean of the two middle values (None if empty)."""
    n = ranks.numel()
    if n == 0:
        return None
    s = torch.sort(ranks.reshape(-1).to(torch.float64)).values
    mid = n // 2
    return float(s[mid]) if n % 2 else float((s[mid - 1] + s[mid]) / 2)


def _recall_block(ranks: torch.Tensor, pess: torch.Tensor, tasks: torch.Tensor, task_list: list[int],
                  ks: Sequence[int]) -> dict:
    out: dict = {}
    counts = {t: int((tasks == t).sum()) for t in task_list}
    for k in ks:
        hit = ranks <= k
        per_task = {t: (100.0 * float(hit[tasks == t].double().mean()) if counts[t] else None)
                    for t in task_list}
        overall = 100.0 * float(hit.double().mean()) if ranks.numel() else None
        out[f"R@{k}"] = {"overall": overall, "per_task": per_task}
    out["MR"] = {"overall": median_rank(ranks),
                 "per_task": {t: median_rank(ranks[tasks == t]) for t in task_list}}
    out["MR_pessimistic"] = {"overall": median_rank(pess),
                             "per_task": {t: median_rank(pess[tasks == t]) for t in task_list}}
    return out


def recall_report(
    z_audio: torch.Tensor,
    z_video: torch.Tensor,
    task_ids: torch.Tensor | Sequence[int],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    gallery: Literal["pooled", "per_task"] = "pooled",
    num_tasks: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Recall@K (percent), median rank and pessimistic median rank, overall and per task.

    :param z_audio: (N, D) audio embeddings (normalised here).
    :param z_video: (N, D) video embeddings.
    :param task_ids: (N,) task id of every clip; per-task scores average over that task's query rows.
    :param ks: the K values of R@K.
    :param gallery: "pooled" (all N clips, paper default) or "per_task" (own task only; higher
        numbers, not comparable with the paper).
    :param num_tasks: report tasks ``0..num_tasks-1`` (absent ones get ``None``); default: the ids present.
    :param chunk_size: rows per block (see :func:`retrieval_ranks`).
    :param device: compute device.
    :return: ``{"a2v"|"v2a": {"R@K": {"overall": %, "per_task": {task: %}}, "MR": {...},
        "MR_pessimistic": {...}}, "num_queries": N, "gallery": gallery}`` with int task keys.
    """
    if gallery not in ("pooled", "per_task"):
        raise ValueError(f"gallery must be 'pooled' or 'per_task', got {gallery!r}")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {tuple(ks)}")
    tasks = torch.as_tensor(task_ids).to(torch.int64).reshape(-1).cpu()
    ranks = retrieval_ranks(z_audio, z_video, task_ids=tasks, per_task_gallery=gallery == "per_task",
                            chunk_size=chunk_size, device=device)
    if num_tasks is not None:
        task_list = list(range(int(num_tasks)))
        if tasks.numel() and (int(tasks.min()) < 0 or int(tasks.max()) >= num_tasks):
            raise ValueError(f"task ids must lie in [0, {num_tasks}), got range "
                             f"[{int(tasks.min())}, {int(tasks.max())}]")
    else:
        task_list = [int(t) for t in torch.unique(tasks).tolist()]
    report: dict = {d: _recall_block(ranks.strict(d), ranks.pessimistic(d), tasks, task_list, ks)
                    for d in DIRECTIONS}
    report["num_queries"] = int(tasks.numel())
    report["gallery"] = gallery
    return report
