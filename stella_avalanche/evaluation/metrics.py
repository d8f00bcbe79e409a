"""Continual retrieval metrics: the recall matrix, 𝒜 and ℱ, and the Avalanche PluginMetrics.

Definitions (``docs/benchmarks.md`` §5), for a recall matrix ``a`` whose row ``l`` holds the
per-task recalls measured after training experience ``l`` (1-based in the formulas, 0-based in code):

* average accuracy ``𝒜 = mean_k a[T, k]`` (the last row);
* standard forgetting ``ℱ = 1/(T-1) Σ_{k<T} max_{k ≤ l ≤ T-1} (a[l,k] - a[T,k])``;
* official-code forgetting ``ℱ_off = 1/(T-1) Σ_{k ≤ T} max_{1 ≤ l ≤ T-1} (a[l,k] - a[T,k])``
  (the max includes rows measured before task k was trained; still divided by T-1).

Signs are kept (a term may be negative). Only end-of-experience rows enter the matrix; an evaluation
before any training is kept as the ``initial`` diagnostic row and evaluations in the middle of an
experience (periodic eval) as ``intermediate`` diagnostics.

The PluginMetrics watch only the retrieval stream (every metric sees every stream,
docs/avalanche.md §13 #13). The eval forward must put ``z_audio`` / ``z_video`` (B, D) into
``strategy.mb_output`` and the batch dict must carry ``category`` (task id) and ``index`` (sample id).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from avalanche.evaluation import GenericPluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name

from stella_avalanche.evaluation.loggers import JSONLLogger
from stella_avalanche.evaluation.retrieval import DEFAULT_KS, DIRECTIONS, recall_report, retrieval_ranks

__all__ = [
    "average_accuracy", "forgetting", "RecallMatrix", "RetrievalEmbeddingStore",
    "RetrievalRecallPerExperience", "RecallMatrixPlugin", "retrieval_metrics", "find_recall_matrix_plugin",
    "GatherFn", "JSONLLogger", "RANK_KEYS",
]

#: ``gather_fn(tensors) -> tensors``: concatenates every rank's tensors along dim 0 (DDP hook).
GatherFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
_DIR_LABEL = {"a2v": "A2V", "v2a": "V2A"}
#: per-query rank lists kept per matrix row: strict ranks in the matrix's gallery and, for a pooled
#: matrix, in the per-task gallery too (cheap: one more pass over the same embeddings)
RANK_KEYS: tuple[str, ...] = ("a2v", "v2a", "a2v_task_gallery", "v2a_task_gallery")


# --------------------------------------------------------------------------------------------- 𝒜, ℱ
def _as_matrix(matrix: Any) -> np.ndarray:
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # ragged rows or None entries
        raise ValueError(f"recall matrix must be a rectangular table of numbers: {exc}") from exc
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"recall matrix must be 2-D and non-empty, got shape {m.shape}")
    if np.isnan(m).any():
        bad = [tuple(map(int, ij)) for ij in np.argwhere(np.isnan(m))[:5]]
        raise ValueError(f"recall matrix has missing (None/NaN) entries at (row, task) {bad}")
    return m


def average_accuracy(matrix: Any) -> float:
    """𝒜: mean of the last row.

    :param matrix: (L, T) list of lists / array, row ``l`` = after training experience ``l``.
    :return: mean over tasks of the last row, in the matrix's unit (percent).
    """
    return float(_as_matrix(matrix)[-1].mean())


def forgetting(matrix: Any, definition: Literal["standard", "official"] = "standard") -> float | None:
    """ℱ of a recall matrix, sign kept; ``None`` for a single row (nothing to forget).

    :param matrix: (L, T) rows = after each training experience, L ≤ T. For a partial run (L < T)
        only the first L tasks count, i.e. the formulas are applied with T := L.
    :param definition: "standard" (max over rows measured after task k was trained) or "official"
        (max over all earlier rows, sum over every task, divided by T-1).
    :return: forgetting in the matrix's unit.
    """
    if definition not in ("standard", "official"):
        raise ValueError(f"definition must be 'standard' or 'official', got {definition!r}")
    m = _as_matrix(matrix)
    rows, cols = m.shape
    if rows > cols:
        raise ValueError(f"recall matrix has {rows} rows (training experiences) but only {cols} tasks")
    if rows == 1:
        return None
    m = m[:, :rows]
    last = m[-1]
    drop = m[:-1] - last[None, :]                      # (L-1, L): a[l,k] - a[T,k] for l < T
    if definition == "official":
        terms = drop.max(axis=0)                       # every k, every earlier row
    else:
        # rows l >= k only (task k trained at row k, 0-based); tasks k < T.
        valid = np.arange(rows - 1)[:, None] >= np.arange(rows)[None, :]
        masked = np.where(valid, drop, -np.inf)[:, : rows - 1]
        terms = masked.max(axis=0)
    return float(terms.sum() / (rows - 1))


# ------------------------------------------------------------------------------------ recall matrix
Row = dict[str, dict[str, list]]  # {direction: {"R@K": [per-task recall in %]}}


class RecallMatrix:
    """Per-task recalls after each training experience, for both directions and every K.

    Row key ``l`` (0-based) = the row measured after training experience ``l`` was completed, i.e.
    after ``l + 1`` completed training experiences (paper row ``l + 1``).

    :param ks: the K values of R@K.
    :param directions: retrieval directions kept.
    :param num_tasks: number of columns (tasks); inferred from the first row when None.
    :param gallery: "pooled" or "per_task" (recorded with the matrix).
    :param gallery_pools: number of disjoint sub-pools the gallery was split into (recorded).
    """

    def __init__(self, *, ks: Sequence[int] = DEFAULT_KS, directions: Sequence[str] = DIRECTIONS,
                 num_tasks: int | None = None, gallery: str = "pooled", gallery_pools: int = 1) -> None:
        self.ks = tuple(int(k) for k in ks)
        self.directions = tuple(directions)
        self.num_tasks = num_tasks
        self.gallery = gallery
        self.gallery_pools = int(gallery_pools)
        self.rows: dict[int, Row] = {}
        self.initial: Row | None = None
        self.intermediate: list[dict[str, Any]] = []
        self.modality_gap: dict[int, list] = {}
        self.initial_modality_gap: list | None = None
        #: row -> {rank key: N ints}; the queries' ``task`` / ``index`` (N,) are shared by all rows
        self.ranks: dict[int, dict[str, list[int]]] = {}
        self.rank_queries: dict[str, list[int]] | None = None

    # -- building
    def _check_row(self, row: Mapping[str, Mapping[str, Sequence]]) -> Row:
        out: Row = {}
        for d in self.directions:
            if d not in row:
                raise ValueError(f"recall row lacks direction {d!r} (has {sorted(row)})")
            out[d] = {}
            for k in self.ks:
                key = f"R@{k}"
                if key not in row[d]:
                    raise ValueError(f"recall row [{d}] lacks {key!r} (has {sorted(row[d])})")
                vals = [None if v is None else float(v) for v in row[d][key]]
                if self.num_tasks is None:
                    self.num_tasks = len(vals)
                if len(vals) != self.num_tasks:
                    raise ValueError(f"recall row [{d}][{key}] has {len(vals)} tasks, expected {self.num_tasks}")
                out[d][key] = vals
        return out

    def row_from_report(self, report: Mapping[str, Any]) -> Row:
        """Convert a :func:`recall_report` result to a row (tasks ``0..num_tasks-1`` in order)."""
        n = self.num_tasks
        if n is None:
            n = 1 + max(int(t) for t in report[self.directions[0]][f"R@{self.ks[0]}"]["per_task"])
        return self._check_row({d: {f"R@{k}": [report[d][f"R@{k}"]["per_task"].get(t) for t in range(n)]
                                    for k in self.ks} for d in self.directions})

    def set_row(self, exp_index: int, row: Mapping[str, Mapping[str, Sequence]], *,
                modality_gap: Sequence[float | None] | None = None,
                ranks: Mapping[str, Any] | None = None) -> None:
        """Store (or overwrite) the row measured after training experience ``exp_index`` (0-based).

        :param ranks: optional per-query strict ranks of this evaluation: ``task`` and ``index``
            (N,) identify the queries (the same N queries in every row), ``a2v`` / ``v2a`` (N,) and
            optionally ``a2v_task_gallery`` / ``v2a_task_gallery`` (N,) the ranks, all int sequences
            or tensors in one common query order.
        """
        if exp_index < 0:
            raise ValueError(f"exp_index must be >= 0, got {exp_index}")
        self.rows[int(exp_index)] = self._check_row(row)
        if modality_gap is not None:
            self.modality_gap[int(exp_index)] = list(modality_gap)
        if ranks is not None:
            self.ranks[int(exp_index)] = self._check_ranks(ranks)

    def _check_ranks(self, ranks: Mapping[str, Any]) -> dict[str, list[int]]:
        def ints(x: Any) -> list[int]:
            return [int(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]

        queries = {k: ints(ranks[k]) for k in ("task", "index") if k in ranks}
        if set(queries) != {"task", "index"}:
            raise ValueError(f"ranks need the queries' 'task' and 'index', got keys {sorted(ranks)}")
        n = len(queries["task"])
        if self.rank_queries is None:
            self.rank_queries = queries
        elif queries != self.rank_queries:
            raise ValueError("ranks of this row belong to other queries (task/index) than earlier rows")
        out = {k: ints(ranks[k]) for k in RANK_KEYS if k in ranks}
        for k in DIRECTIONS:
            if k not in out:
                raise ValueError(f"ranks lack direction {k!r} (have {sorted(ranks)})")
        for k, v in out.items():
            if len(v) != n or (v and min(v) < 1):
                raise ValueError(f"ranks[{k!r}] must hold {n} ranks >= 1, got {len(v)} values")
        return out

    def set_initial(self, row: Mapping[str, Mapping[str, Sequence]], *,
                    modality_gap: Sequence[float | None] | None = None) -> None:
        """Store the diagnostic row of the model before any training (never enters 𝒜 or ℱ)."""
        self.initial = self._check_row(row)
        self.initial_modality_gap = None if modality_gap is None else list(modality_gap)

    def add_intermediate(self, *, exp_index: int, epoch: int, iteration: int,
                         row: Mapping[str, Mapping[str, Sequence]]) -> None:
        """Record a mid-experience evaluation (diagnostics only)."""
        self.intermediate.append({"exp": int(exp_index), "epoch": int(epoch), "iteration": int(iteration),
                                  "recall": self._check_row(row)})

    # -- reading
    def __len__(self) -> int:
        return len(self.rows)

    def _ordered_rows(self) -> list[Row]:
        keys = sorted(self.rows)
        if keys != list(range(len(keys))):
            missing = sorted(set(range(keys[-1] + 1)) - set(keys)) if keys else []
            raise ValueError(f"recall matrix has no row for training experience(s) {missing}")
        return [self.rows[k] for k in keys]

    def matrix(self, direction: str, k: int) -> list[list]:
        """(L, T) list of lists of R@k in percent for ``direction``."""
        return [list(r[direction][f"R@{k}"]) for r in self._ordered_rows()]

    def as_lists(self) -> dict[str, dict[str, list[list]]]:
        """``{direction: {"R@K": L x T list of lists}}`` as stored in results.json."""
        rows = self._ordered_rows()
        return {d: {f"R@{k}": [list(r[d][f"R@{k}"]) for r in rows] for k in self.ks} for d in self.directions}

    def ranks_lists(self) -> dict[str, Any] | None:
        """Per-query ranks of every row as stored in results.json, when every row has them.

        ``{"task": [N], "index": [N], "a2v": L x N, "v2a": L x N[, "a2v_task_gallery": L x N,
        "v2a_task_gallery": L x N]}``: entry ``[l][q]`` is the strict rank of query ``q`` after
        training experience ``l`` in the matrix's gallery (``*_task_gallery``: its own task's clips).
        """
        keys = sorted(self.rows)
        if not keys or any(k not in self.ranks for k in keys) or self.rank_queries is None:
            return None
        present = [k for k in RANK_KEYS if all(k in self.ranks[r] for r in keys)]
        out: dict[str, Any] = {"gallery": self.gallery, "gallery_pools": int(self.gallery_pools),
                               **copy.deepcopy(self.rank_queries)}
        out.update({k: [list(self.ranks[r][k]) for r in keys] for k in present})
        return out

    def modality_gap_lists(self) -> list[list] | None:
        """(L, T) modality gap per row, when every row has one."""
        keys = sorted(self.rows)
        if not keys or any(k not in self.modality_gap for k in keys):
            return None
        return [list(self.modality_gap[k]) for k in keys]

    def summary(self, definition: Literal["standard", "official"] = "standard") -> dict:
        """``{direction: {"R@K": {"A": 𝒜, "F": ℱ}}}`` (ℱ None for one row)."""
        return {d: {f"R@{k}": {"A": average_accuracy(self.matrix(d, k)),
                               "F": forgetting(self.matrix(d, k), definition)}
                    for k in self.ks} for d in self.directions}

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (safe for ``torch.save`` and JSON)."""
        return copy.deepcopy({"ks": list(self.ks), "directions": list(self.directions),
                              "num_tasks": self.num_tasks, "gallery": self.gallery,
                              "rows": {str(k): v for k, v in self.rows.items()}, "initial": self.initial,
                              "intermediate": self.intermediate,
                              "modality_gap": {str(k): v for k, v in self.modality_gap.items()},
                              "initial_modality_gap": self.initial_modality_gap,
                              "ranks": {str(k): v for k, v in self.ranks.items()},
                              "rank_queries": self.rank_queries, "gallery_pools": self.gallery_pools})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        state = copy.deepcopy(dict(state))
        self.ks = tuple(state["ks"])
        self.directions = tuple(state["directions"])
        self.num_tasks = state["num_tasks"]
        self.gallery = state["gallery"]
        self.rows = {int(k): v for k, v in state["rows"].items()}
        self.initial = state["initial"]
        self.intermediate = list(state["intermediate"])
        self.modality_gap = {int(k): v for k, v in state.get("modality_gap", {}).items()}
        self.initial_modality_gap = state.get("initial_modality_gap")
        self.ranks = {int(k): v for k, v in (state.get("ranks") or {}).items()}
        self.rank_queries = state.get("rank_queries")
        self.gallery_pools = int(state.get("gallery_pools", 1))


# ---------------------------------------------------------------------------- embedding collection
class RetrievalEmbeddingStore:
    """Collects eval embeddings (Avalanche ``Metric`` protocol: ``update``/``result``/``reset``).

    Tensors are kept on the CPU in fp32. :meth:`result` gathers across ranks (``gather_fn``) and
    drops duplicates of the same (experience, sample index) pair, e.g. DistributedSampler padding,
    keeping the first occurrence.

    :param gather_fn: optional all-rank concatenation hook (DDP); identity when None.
    """

    _KEYS = ("z_audio", "z_video", "task", "index", "exp")

    def __init__(self, *, gather_fn: GatherFn | None = None) -> None:
        self.gather_fn = gather_fn
        self._parts: dict[str, list[torch.Tensor]] = {k: [] for k in self._KEYS}

    def reset(self) -> None:
        self._parts = {k: [] for k in self._KEYS}

    def has_data(self) -> bool:
        return bool(self._parts["index"])

    def update(self, *, z_audio: torch.Tensor, z_video: torch.Tensor, task: torch.Tensor,
               index: torch.Tensor, exp: int) -> None:
        """Append one batch: z_* (B, D), task / index (B,), exp = experience id of the batch."""
        b = z_audio.shape[0]
        if z_video.shape[0] != b or task.reshape(-1).shape[0] != b or index.reshape(-1).shape[0] != b:
            raise ValueError(f"batch sizes differ: z_audio {tuple(z_audio.shape)}, z_video "
                             f"{tuple(z_video.shape)}, category {tuple(task.shape)}, index {tuple(index.shape)}")
        self._parts["z_audio"].append(z_audio.detach().float().cpu())
        self._parts["z_video"].append(z_video.detach().float().cpu())
        self._parts["task"].append(task.detach().reshape(-1).to(torch.int64).cpu())
        self._parts["index"].append(index.detach().reshape(-1).to(torch.int64).cpu())
        self._parts["exp"].append(torch.full((b,), int(exp), dtype=torch.int64))

    def result(self) -> dict[str, torch.Tensor] | None:
        """De-duplicated ``{"z_audio", "z_video" (N, D), "task", "index", "exp" (N,)}`` or None."""
        if not self.has_data():
            return None
        data = {k: torch.cat(v) for k, v in self._parts.items()}
        if self.gather_fn is not None:
            data = {k: v.cpu() for k, v in self.gather_fn(data).items()}
        idx, exp = data["index"], data["exp"]
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError("sample 'index' values must be >= 0 to de-duplicate retrieval embeddings")
        key = exp * (int(idx.max()) + 1 if idx.numel() else 1) + idx
        uniq, inverse = torch.unique(key, return_inverse=True)
        if uniq.numel() != key.numel():
            pos = torch.arange(key.numel())
            first = torch.full((uniq.numel(),), key.numel(), dtype=torch.int64)
            first.scatter_reduce_(0, inverse, pos, reduce="amin")
            keep = torch.sort(first).values            # keep arrival order
            data = {k: v[keep] for k, v in data.items()}
        return data


def _on_stream(strategy: Any, stream_name: str) -> bool:
    exp = getattr(strategy, "experience", None)
    origin = getattr(exp, "origin_stream", None)
    return origin is not None and getattr(origin, "name", None) == stream_name


def _update_store(store: RetrievalEmbeddingStore, strategy: Any) -> None:
    out, batch = strategy.mb_output, strategy.mbatch
    if not isinstance(out, Mapping) or "z_audio" not in out or "z_video" not in out:
        raise KeyError("retrieval metrics need strategy.mb_output to be a dict with 'z_audio' and "
                       f"'z_video' in eval; got {type(out).__name__}"
                       + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else ""))
    if not isinstance(batch, Mapping) or "category" not in batch or "index" not in batch:
        raise KeyError("retrieval metrics need the eval batch dict to carry 'category' and 'index'")
    store.update(z_audio=out["z_audio"], z_video=out["z_video"], task=torch.as_tensor(batch["category"]),
                 index=torch.as_tensor(batch["index"]), exp=int(strategy.experience.current_experience))


def _metric_values(metric: Any, strategy: Any, report: Mapping[str, Any], ks: Sequence[int], suffix: str,
                   *, add_experience: bool, per_task: bool) -> list[MetricValue]:
    """One MetricValue per (direction, statistic) overall and, if ``per_task``, one per task (/TaskNNN)."""
    x = strategy.clock.train_iterations
    values: list[MetricValue] = []
    for d in DIRECTIONS:
        for name, stat in [(f"R@{k}", report[d][f"R@{k}"]) for k in ks] + [("MR", report[d]["MR"]),
                                                                           ("MRpess", report[d]["MR_pessimistic"])]:
            base = f"{_DIR_LABEL[d]}_{name}_{suffix}"
            if stat["overall"] is not None:
                full = get_metric_name(base, strategy, add_experience=add_experience, add_task=False)
                values.append(MetricValue(metric, full, stat["overall"], x))
            if per_task:
                for t, v in stat["per_task"].items():
                    if v is None:
                        continue
                    full = get_metric_name(base, strategy, add_experience=add_experience, add_task=int(t))
                    values.append(MetricValue(metric, full, v, x))
    return values


# ------------------------------------------------------------------------------------ PluginMetrics
class RetrievalRecallPerExperience(GenericPluginMetric):
    """Recall with the gallery = one retrieval experience's clips, emitted per experience.

    Names: ``A2V_R@1_Exp/eval_phase/retrieval_stream/Exp000`` (also R@5, R@10, MR, MRpess; V2A_...).

    :param ks: the K values of R@K.
    :param stream_name: the stream to score (others are ignored).
    :param gather_fn: optional all-rank concatenation hook (DDP).
    """

    def __init__(self, *, ks: Sequence[int] = DEFAULT_KS, stream_name: str = "retrieval",
                 gather_fn: GatherFn | None = None) -> None:
        super().__init__(RetrievalEmbeddingStore(gather_fn=gather_fn), reset_at="experience",
                         emit_at="experience", mode="eval")
        self.ks = tuple(int(k) for k in ks)
        self.stream_name = stream_name
        self.last_report: dict | None = None

    def update(self, strategy: Any) -> None:
        if _on_stream(strategy, self.stream_name):
            _update_store(self._metric, strategy)

    def result(self) -> dict | None:
        data = self._metric.result()
        if data is None:
            return None
        return recall_report(data["z_audio"], data["z_video"], data["task"], ks=self.ks, gallery="pooled")

    def _package_result(self, strategy: Any) -> list[MetricValue]:
        report = self.result()
        self.last_report = report
        if report is None:
            return []
        return _metric_values(self, strategy, report, self.ks, "Exp", add_experience=True, per_task=False)

    def after_eval_exp(self, strategy: Any):
        if not _on_stream(strategy, self.stream_name):
            return None
        return super().after_eval_exp(strategy)

    def __str__(self) -> str:
        return "RetrievalRecall_Exp"


class RecallMatrixPlugin(GenericPluginMetric):
    """Stream-level recall over the whole retrieval stream, recorded into a :class:`RecallMatrix`.

    At the end of every ``eval()`` that covered the full retrieval stream it scores all clips together
    (gallery "pooled": every clip; "per_task": the query's own task only), emits overall and per-task
    values (``A2V_R@1_Pooled/eval_phase/retrieval_stream`` and ``A2V_R@1_Pooled/.../Task003``;
    ``_TaskGallery`` instead of ``_Pooled`` for the per-task gallery; also ``_MR_``, ``_MRpess_`` and,
    pooled only, ``ModalityGap/.../TaskNNN``), and stores the per-task recalls (and modality gaps):

    * after ``n >= 1`` completed training experiences -> matrix row ``n - 1`` (overwritten by a later
      eval at the same point, which sees the same model);
    * before any training -> :attr:`RecallMatrix.initial` (diagnostics only);
    * during a training experience (periodic eval) -> :attr:`RecallMatrix.intermediate`.

    "Completed" is ``strategy.clock.train_exp_counter``, corrected for the final eval that runs inside
    ``after_training_exp`` (or after the last epoch, when PeriodicEval's epoch cadence covers it) before
    the Clock increments (this metric sees that callback
    first, since ``EvaluationPlugin`` precedes ``PeriodicEval`` and ``Clock``). A plugin that calls
    ``eval()`` from its own ``after_training_exp`` (before the EvaluationPlugin) is not supported.
    After a resume, restore the clock counters and :meth:`load_state_dict`.

    :param ks: the K values of R@K.
    :param gallery: "pooled" (paper) or "per_task".
    :param num_tasks: number of tasks (columns); default: the retrieval stream's length.
    :param stream_name: the stream to score.
    :param gather_fn: optional all-rank concatenation hook (DDP).
    :param emit_per_task: also emit one value per task (``/TaskNNN``).
    :param keep_ranks: store every end-of-experience evaluation's per-query ranks in the matrix
        (queries in (task, index) order; a pooled matrix also keeps the per-task-gallery ranks).
    :param gallery_pools: P > 1 splits the retrieval set into P disjoint sub-pools, clip ``index % P``,
        and ranks every query within its own sub-pool (with "per_task": within its task's part of it).
        A large retrieval set then gives P times the queries of a gallery of the usual size, so the
        recall keeps its scale (a larger gallery lowers every R@K) while its query noise shrinks. The
        pools are class-balanced when each task's retrieval clips are listed class by class with a
        multiple of P clips per class (the synthetic generator's layout).
    """

    def __init__(self, *, ks: Sequence[int] = DEFAULT_KS, gallery: Literal["pooled", "per_task"] = "pooled",
                 num_tasks: int | None = None, stream_name: str = "retrieval",
                 gather_fn: GatherFn | None = None, emit_per_task: bool = True,
                 keep_ranks: bool = True, gallery_pools: int = 1) -> None:
        if gallery not in ("pooled", "per_task"):
            raise ValueError(f"gallery must be 'pooled' or 'per_task', got {gallery!r}")
        super().__init__(RetrievalEmbeddingStore(gather_fn=gather_fn), reset_at="stream", emit_at="stream",
                         mode="eval")
        self.ks = tuple(int(k) for k in ks)
        self.gallery = gallery
        self.stream_name = stream_name
        self.emit_per_task = emit_per_task
        self.keep_ranks = bool(keep_ranks)
        if int(gallery_pools) < 1:
            raise ValueError(f"gallery_pools must be >= 1, got {gallery_pools}")
        self.gallery_pools = int(gallery_pools)
        self.matrix = RecallMatrix(ks=self.ks, num_tasks=num_tasks, gallery=gallery,
                                   gallery_pools=self.gallery_pools)
        self.last_report: dict | None = None
        self._stream_len: int | None = None
        self._seen_exps: set[int] = set()
        self._in_exp = False
        self._epoch = 0
        self._finished_counter: int | None = None

    # -- training-progress bookkeeping (all callbacks arrive through the EvaluationPlugin)
    def before_training(self, strategy: Any):
        self._finished_counter, self._in_exp = None, False
        return super().before_training(strategy)

    def before_training_exp(self, strategy: Any):
        self._finished_counter, self._in_exp = None, True
        return super().before_training_exp(strategy)

    def before_training_epoch(self, strategy: Any):
        self._epoch = int(strategy.clock.train_exp_epochs) + 1
        return super().before_training_epoch(strategy)

    def after_training_epoch(self, strategy: Any):
        # PeriodicEval skips the final eval when the last epoch's periodic eval coincides with it; that
        # eval runs here, after the last epoch, so it is the end-of-experience row, not an intermediate.
        epochs = getattr(strategy, "train_epochs", None)
        if epochs is not None and self._epoch >= int(epochs):
            self._in_exp = False
            self._finished_counter = int(strategy.clock.train_exp_counter)
        return super().after_training_epoch(strategy)

    def after_training_exp(self, strategy: Any):
        self._in_exp = False
        self._finished_counter = int(strategy.clock.train_exp_counter)  # Clock increments after us
        return super().after_training_exp(strategy)

    def after_training(self, strategy: Any):
        self._finished_counter, self._in_exp = None, False
        return super().after_training(strategy)

    def completed_experiences(self, strategy: Any) -> int:
        """Number of completed training experiences at this moment."""
        n = int(strategy.clock.train_exp_counter)
        if self._finished_counter is not None:
            n = max(n, self._finished_counter + 1)
        return n

    # -- eval
    def before_eval(self, strategy: Any):
        self._seen_exps, self._stream_len = set(), None
        return super().before_eval(strategy)

    def update(self, strategy: Any) -> None:
        if _on_stream(strategy, self.stream_name):
            _update_store(self._metric, strategy)
            self._seen_exps.add(int(strategy.experience.current_experience))
            self._stream_len = len(strategy.experience.origin_stream)

    def result(self) -> dict | None:
        data = self._metric.result()
        if data is None:
            return None
        num_tasks = self.matrix.num_tasks if self.matrix.num_tasks is not None else self._stream_len
        pools = data["index"] % self.gallery_pools if self.gallery_pools > 1 else None
        if pools is not None:
            sizes = torch.bincount(data["task"] * self.gallery_pools + pools)
            if int(sizes[sizes > 0].min()) != int(sizes.max()):
                warnings.warn(f"gallery_pools={self.gallery_pools}: the sub-pools of a task differ in size "
                              f"({int(sizes[sizes > 0].min())} to {int(sizes.max())} clips); list each task's "
                              "retrieval clips class by class with a multiple of gallery_pools clips per class")
        report = recall_report(data["z_audio"], data["z_video"], data["task"], ks=self.ks,
                               gallery=self.gallery, num_tasks=num_tasks, return_ranks=self.keep_ranks,
                               gallery_groups=pools)
        report["modality_gap"] = _modality_gap(data["z_audio"], data["z_video"], data["task"], num_tasks)
        if self.keep_ranks:
            ranks = dict(report.pop("ranks"))
            if self.gallery == "pooled":
                within = data["task"] if pools is None else data["task"] * self.gallery_pools + pools
                tg = retrieval_ranks(data["z_audio"], data["z_video"], task_ids=within, per_task_gallery=True)
                ranks["a2v_task_gallery"], ranks["v2a_task_gallery"] = tg.a2v, tg.v2a
            # one canonical query order, (task, index), whatever order the ranks' batches arrived in
            order = torch.from_numpy(np.lexsort((data["index"].numpy(), data["task"].numpy())))
            ranks = {k: v[order] for k, v in ranks.items()}
            ranks["task"], ranks["index"] = data["task"][order], data["index"][order]
            report["ranks"] = ranks
        return report

    def after_eval(self, strategy: Any):
        if not self._metric.has_data():        # no retrieval experience in this eval() call
            return None
        return super().after_eval(strategy)

    def _package_result(self, strategy: Any) -> list[MetricValue]:
        report = self.result()
        self.last_report = report
        if report is None:
            return []
        self._record(strategy, report)
        suffix = "Pooled" if self.gallery == "pooled" else "TaskGallery"
        values = _metric_values(self, strategy, report, self.ks, suffix, add_experience=False,
                                per_task=self.emit_per_task)
        if self.gallery == "pooled":  # the gap does not depend on the gallery: emit it once
            for t, g in enumerate(report["modality_gap"]):
                if g is not None:
                    name = get_metric_name("ModalityGap", strategy, add_experience=False, add_task=t)
                    values.append(MetricValue(self, name, g, strategy.clock.train_iterations))
        return values

    def _record(self, strategy: Any, report: dict) -> None:
        if self._stream_len is not None and len(self._seen_exps) < self._stream_len:
            warnings.warn(f"eval covered {len(self._seen_exps)} of {self._stream_len} experiences of the "
                          f"{self.stream_name} stream; not recorded in the recall matrix")
            return
        row = self.matrix.row_from_report(report)
        gap = report.get("modality_gap")
        done = self.completed_experiences(strategy)
        if self._in_exp:
            self.matrix.add_intermediate(exp_index=done, epoch=self._epoch,
                                         iteration=int(strategy.clock.train_iterations), row=row)
        elif done == 0:
            self.matrix.set_initial(row, modality_gap=gap)
        else:
            self.matrix.set_row(done - 1, row, modality_gap=gap, ranks=report.get("ranks"))

    def state_dict(self) -> dict[str, Any]:
        """The recall matrix state (for the project checkpoint)."""
        return self.matrix.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.matrix.load_state_dict(state)

    def __str__(self) -> str:
        return f"RecallMatrix_{self.gallery}"


def _modality_gap(z_audio: torch.Tensor, z_video: torch.Tensor, task: torch.Tensor,
                  num_tasks: int | None) -> list[float | None]:
    """‖mean_k â − mean_k v̂‖₂ per task k (L2-normalised embeddings), None for absent tasks."""
    a = torch.nn.functional.normalize(z_audio.float(), dim=1)
    v = torch.nn.functional.normalize(z_video.float(), dim=1)
    n = int(num_tasks) if num_tasks is not None else int(task.max()) + 1
    counts = torch.bincount(task, minlength=n).to(torch.float64)
    diff = torch.zeros(n, a.shape[1], dtype=torch.float64).index_add_(0, task, (a - v).double())
    gap = (diff / counts.clamp_min(1)[:, None]).norm(dim=1)
    return [float(g) if c > 0 else None for g, c in zip(gap.tolist(), counts.tolist())]


def retrieval_metrics(ks: Sequence[int] = DEFAULT_KS, gallery: Literal["pooled", "per_task"] = "pooled", *,
                      per_experience: bool = True, num_tasks: int | None = None,
                      stream_name: str = "retrieval", gather_fn: GatherFn | None = None,
                      gallery_pools: int = 1) -> list:
    """Metric objects for ``EvaluationPlugin``: per-experience recall and the recall-matrix metric.

    :param ks: the K values of R@K.
    :param gallery: gallery of the recall matrix ("pooled" = paper).
    :param per_experience: include :class:`RetrievalRecallPerExperience`.
    :param num_tasks: columns of the matrix (default: the retrieval stream's length).
    :param stream_name: the retrieval stream's name.
    :param gather_fn: optional all-rank concatenation hook (DDP).
    :param gallery_pools: sub-pools of the recall matrix's gallery (see :class:`RecallMatrixPlugin`).
    :return: list of PluginMetrics; find the matrix with :func:`find_recall_matrix_plugin`.
    """
    metrics: list = []
    if per_experience:
        metrics.append(RetrievalRecallPerExperience(ks=ks, stream_name=stream_name, gather_fn=gather_fn))
    metrics.append(RecallMatrixPlugin(ks=ks, gallery=gallery, num_tasks=num_tasks, stream_name=stream_name,
                                      gather_fn=gather_fn, gallery_pools=gallery_pools))
    return metrics


def find_recall_matrix_plugin(obj: Any) -> RecallMatrixPlugin:
    """The :class:`RecallMatrixPlugin` in a strategy, an EvaluationPlugin or a list of metrics."""
    evaluator = getattr(obj, "evaluator", obj)
    candidates = getattr(evaluator, "metrics", evaluator)
    for m in candidates if isinstance(candidates, (list, tuple)) else []:
        if isinstance(m, RecallMatrixPlugin):
            return m
    raise LookupError("no RecallMatrixPlugin found: pass retrieval_metrics(...) to the EvaluationPlugin")
