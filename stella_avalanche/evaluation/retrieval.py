"""Zero-shot audio<->video retrieval: strict ranks, recall@K and median rank.

Protocol (``docs/benchmarks.md`` §4):

* similarity ``S = Â V̂ᵀ`` of the L2-normalised fp32 embeddings, query ``i``'s positive is item ``i``;
* A→V rank of row ``i``: ``1 + #{j : S_ij > S_ii}`` (strict, so exact ties are optimistic);
  V→A rank of column ``j``: ``1 + #{i : S_ij > S_jj}``;
* pessimistic diagnostic rank: ``1 + #{j ≠ i : S_ij ≥ S_ii}``; a large gap to the strict rank flags
  collapsed (tied) embeddings;
* gallery: the whole pool (paper-faithful default) or, optionally, only the query's own task.

Algorithm: one pass over c×c tiles of S. Each tile ``S_RC = Â_R V̂_Cᵀ`` is computed once and serves
both directions: its row counts accumulate the A→V ranks of rows R, its column counts the V→A ranks
of columns C. Time O(N²·D), memory O(N·D + c²) (c ≤ N, so within the O(c·N) budget of the design);
the N×N matrix is never materialised and nothing is sorted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RetrievalRanks", "retrieval_ranks", "recall_report", "median_rank", "auto_chunk_size",
           "DIRECTIONS", "DEFAULT_KS"]

DIRECTIONS: tuple[str, str] = ("a2v", "v2a")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: Bytes per similarity element held at once in a tile: fp32 value + bool masks + temporaries.
_BYTES_PER_ELEMENT = 16
_DEFAULT_MEMORY_BUDGET = 512 * 2**20
_TILE_ALIGN = 64
_CPU_TILE_MAX = 1024
_TILE_MAX = 16384  # per-tile counts are summed in fp32, exact below 2**24


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
    """Tile side c so that one c x c tile's working set (~16 bytes per similarity) fits the budget.

    :param n: gallery size N.
    :param memory_budget_bytes: bytes allowed for one tile's temporaries.
    :return: tile side in [1, max(n, 1)].
    """
    c = math.isqrt(max(1, memory_budget_bytes // _BYTES_PER_ELEMENT))
    return int(max(1, min(max(n, 1), c)))


def _as_embeddings(x: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    # fp32 on purpose: fp16 embeddings create spurious exact ties (design §4).
    x = x.detach().to(device=device, dtype=torch.float32)
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).reshape(-1)[:5].tolist()
        raise ValueError(f"{name} has non-finite values (NaN/inf) in rows {bad}; ranks would be meaningless")
    return F.normalize(x, dim=1)


def _checked_inputs(z_audio: torch.Tensor, z_video: torch.Tensor, task_ids: torch.Tensor | Sequence[int] | None,
                    per_task_gallery: bool, dev: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Normalised (N, D) fp32 embeddings on ``dev`` and (N,) int64 task ids (or None), validated."""
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
    return a, v, tasks


def _tile_side(n: int, chunk_size: int | None, memory_budget_bytes: int, dev: torch.device) -> int:
    """Aligned tile side c (a multiple of ``_TILE_ALIGN``, at most ``_TILE_MAX`` rounded up) for N >= 1."""
    if chunk_size:
        c = int(chunk_size)
    else:
        c = auto_chunk_size(n, memory_budget_bytes=memory_budget_bytes)
        if dev.type == "cpu":
            c = min(c, _CPU_TILE_MAX)  # cache-sized tiles are faster on CPUs; GPUs prefer large ones
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Tile side: a multiple of _TILE_ALIGN (and at least that). With ragged GEMM shapes (e.g. 7 columns)
    # MKL rounds entries differently depending on their position, so two duplicate clips would no
    # longer tie exactly (verified on the project machine); aligned shapes keep every entry's
    # rounding independent of where it sits.
    return _TILE_ALIGN * -(-min(c, n, _TILE_MAX) // _TILE_ALIGN)


def _pad_rows(a: torch.Tensor, v: torch.Tensor, tasks: torch.Tensor | None, npad: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Zero-pad embeddings (and pad task ids with -1) to ``npad`` rows.

    Padding to a whole number of c x c tiles makes every similarity come from a GEMM call of the same
    aligned shape: a block of another shape may take another kernel path and round differently.
    """
    n = a.shape[0]
    if npad == n:
        return a, v, tasks
    a = torch.cat([a, a.new_zeros(npad - n, a.shape[1])])
    v = torch.cat([v, v.new_zeros(npad - n, v.shape[1])])
    if tasks is not None:
        tasks = torch.cat([tasks, tasks.new_full((npad - n,), -1)])
    return a, v, tasks


def _diagonal_positives(a: torch.Tensor, v: torch.Tensor, c: int, sim: torch.Tensor) -> torch.Tensor:
    """(Npad,) positives S_ii, read from the diagonal c x c tiles (``sim`` is the reused tile buffer).

    Reading them from the very GEMM call that produces the diagonal tiles in :func:`_rank_counts` keeps
    them bit-equal to the self entries there (a separately computed dot product can differ in the last
    bit). Both directions compare against this one vector.
    """
    npad = a.shape[0]
    pos = torch.empty(npad, dtype=torch.float32, device=a.device)
    for b in range(npad // c):
        blk = slice(b * c, (b + 1) * c)
        torch.matmul(a[blk], v[blk].T, out=sim)
        pos[blk] = sim.diagonal()
    return pos


def _rank_counts(a: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, tasks: torch.Tensor | None, *, n: int,
                 c: int, per_task_gallery: bool, sim: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query counts of gallery entries > and >= the positive, both directions, tile by tile.

    :param a: (Npad, D) padded audio embeddings; ``v`` the video ones; ``pos`` (Npad,) positives.
    :param n: number of real (unpadded) rows.
    :returns: ``{"a2v_gt", "a2v_ge", "v2a_gt", "v2a_ge"}``, each float64 (Npad,) holding exact integers.
    """
    dev, nb = a.device, a.shape[0] // c
    # fp64 accumulators hold exact integer counts (< 2**53) and take the fp32 tile sums without a cast op
    counts = {k: torch.zeros(nb * c, dtype=torch.float64, device=dev) for k in ("a2v_gt", "a2v_ge", "v2a_gt", "v2a_ge")}
    hits = torch.empty(c, c, dtype=torch.float32, device=dev)
    flag = torch.empty(c, c, dtype=torch.bool, device=dev) if per_task_gallery else None
    tail = n - (nb - 1) * c                                # valid rows/columns in the last tile
    for rb in range(nb):                                   # query audio rows
        rows = slice(rb * c, (rb + 1) * c)
        p_row = pos[rows, None]
        for cb in range(nb):                               # gallery video columns
            cols = slice(cb * c, (cb + 1) * c)
            torch.matmul(a[rows], v[cols].T, out=sim)      # the only large temporaries: sim and hits
            if rb == cb:
                # self entry = its own positive exactly: never strictly better, tied once (pessimistic)
                sim.diagonal().copy_(pos[rows])
            # entries outside the gallery become -inf: never > or >= any (finite) positive
            if per_task_gallery:
                torch.ne(tasks[rows, None], tasks[None, cols], out=flag)
                sim.masked_fill_(flag, float("-inf"))
            if tail < c and rb == nb - 1:
                sim[tail:].fill_(float("-inf"))            # zero-padding rows
            if tail < c and cb == nb - 1:
                sim[:, tail:].fill_(float("-inf"))         # zero-padding columns
            for op, thr, dim, key, idx in ((torch.gt, p_row, 1, "a2v_gt", rows),
                                           (torch.ge, p_row, 1, "a2v_ge", rows),
                                           (torch.gt, pos[None, cols], 0, "v2a_gt", cols),
                                           (torch.ge, pos[None, cols], 0, "v2a_ge", cols)):
                # 0/1 written as fp32 and summed in fp32 (exact: c <= _TILE_MAX < 2**24): several times
                # faster on CPU than a bool tensor, whose reduction first casts a copy (measured)
                op(sim, thr, out=hits)
                counts[key][idx] += hits.sum(dim=dim)
    return counts


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
    :param chunk_size: tile side c (rows and columns per tile), rounded up to a multiple of 64;
        ``None`` derives it from ``memory_budget_bytes``.
    :param device: where to compute (``None``: the embeddings' device).
    :param memory_budget_bytes: working-memory budget of one tile, used when ``chunk_size`` is None.
    :return: :class:`RetrievalRanks`, int64 (N,) CPU tensors.
    """
    dev = torch.device(device) if device is not None else (
        z_audio.device if isinstance(z_audio, torch.Tensor) else torch.device("cpu"))
    a, v, tasks = _checked_inputs(z_audio, z_video, task_ids, per_task_gallery, dev)
    n = a.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return RetrievalRanks(empty, empty, empty, empty)
    c = _tile_side(n, chunk_size, memory_budget_bytes, dev)
    a, v, tasks = _pad_rows(a, v, tasks, c * -(-n // c))
    # One preallocated tile buffer for both passes: a fresh multi-MB tensor per tile would page-fault
    # on every allocation.
    sim = torch.empty(c, c, dtype=torch.float32, device=dev)
    pos = _diagonal_positives(a, v, c, sim)
    counts = _rank_counts(a, v, pos, tasks, n=n, c=c, per_task_gallery=per_task_gallery, sim=sim)
    # strict: 1 + #{j : S_ij > S_ii}; pessimistic: 1 + #{j != i : S_ij >= S_ii} = #{j : S_ij >= S_ii}
    out = {k: x[:n].to(torch.int64).cpu() for k, x in counts.items()}
    return RetrievalRanks(a2v=out["a2v_gt"] + 1, v2a=out["v2a_gt"] + 1, a2v_pess=out["a2v_ge"], v2a_pess=out["v2a_ge"])


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
    return_ranks: bool = False,
    gallery_groups: torch.Tensor | Sequence[int] | None = None,
) -> dict:
    """Recall@K (percent), median rank and pessimistic median rank, overall and per task.

    :param z_audio: (N, D) audio embeddings (normalised here).
    :param z_video: (N, D) video embeddings.
    :param task_ids: (N,) task id of every clip; per-task scores average over that task's query rows.
    :param ks: the K values of R@K.
    :param gallery: "pooled" (all N clips, paper default) or "per_task" (own task only; higher
        numbers, not comparable with the paper).
    :param num_tasks: report tasks ``0..num_tasks-1`` (absent ones get ``None``); default: the ids present.
    :param chunk_size: tile side (see :func:`retrieval_ranks`).
    :param device: compute device.
    :param gallery_groups: (N,) optional group id per clip: every query's gallery is further
        restricted to the clips of its own group (e.g. disjoint sub-pools of a large retrieval set, each
        a gallery of the protocol's size, so that more queries do not make the task harder).
    :param return_ranks: also return the strict per-query ranks under ``"ranks"``:
        ``{"a2v": (N,), "v2a": (N,)}`` int64 CPU tensors in query order (so any statistic of the
        evaluation can be recomputed offline).
    :return: ``{"a2v"|"v2a": {"R@K": {"overall": %, "per_task": {task: %}}, "MR": {...},
        "MR_pessimistic": {...}}, "num_queries": N, "gallery": gallery}`` with int task keys.
    """
    if gallery not in ("pooled", "per_task"):
        raise ValueError(f"gallery must be 'pooled' or 'per_task', got {gallery!r}")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {tuple(ks)}")
    tasks = torch.as_tensor(task_ids).to(torch.int64).reshape(-1).cpu()
    restrict = tasks if gallery == "per_task" else None
    if gallery_groups is not None:
        groups = torch.as_tensor(gallery_groups).to(torch.int64).reshape(-1).cpu()
        if groups.shape != tasks.shape or (groups.numel() and int(groups.min()) < 0):
            raise ValueError(f"gallery_groups must hold {tasks.numel()} ids >= 0, got shape {tuple(groups.shape)}")
        # one id per (task, group) pair when both restrict the gallery
        restrict = groups if restrict is None else restrict * (int(groups.max()) + 1) + groups
    ranks = retrieval_ranks(z_audio, z_video, task_ids=restrict, per_task_gallery=restrict is not None,
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
    if return_ranks:
        report["ranks"] = {d: ranks.strict(d) for d in DIRECTIONS}
    return report
