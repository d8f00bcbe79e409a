"""Bootstrap intervals of 𝒜 and ℱ from per-query ranks (pure numpy, no torch).

What is resampled (one bootstrap replicate ``b``):

* **queries**, stratified by task: each task's ``n_t`` queries are drawn ``n_t`` times with replacement,
  giving a weight (a count) per query. The same weights are used for every row of a run's recall matrix
  (the same clips are evaluated after every task), for every seed and for every strategy, so the
  difference of two strategies is *paired* over queries: the clips that are hard for both cancel.
* **seeds**: a strategy's ``S`` runs are drawn ``S`` times with replacement and the statistic is the
  mean over the drawn runs. With seed labels, strategies that ran the same seeds draw the same seeds
  (one draw per seed set), so their difference is *paired* over seeds too: seed s of every strategy
  shares its initialisation and data order, and what the seed changes for all of them cancels.
  The difference of two strategies with other seed sets (5 seeds against 3) is taken over the seeds
  both ran (:meth:`BootstrapResult.difference`): its point is the mean difference on those seeds, and
  its replicates draw them with the stream of that seed set, so it stays paired. Each strategy's own
  value and interval use all its seeds.

The statistic of one run under query weights ``w`` is computed exactly as in
``stella_avalanche/evaluation/metrics.py``: per-task recall ``a[l, t] = 100 Σ_{q∈t} w_q 1[r_lq ≤ K] / n_t``,
``𝒜 = mean_t a[T, t]``, standard ``ℱ = 1/(T-1) Σ_{t<T} max_{t≤l<T} (a[l,t] − a[T,t])``, each averaged over
K ∈ {1, 5, 10} ("Avg"). With all weights 1 it reproduces the run's summary.

A run without ranks (older results.json) enters with its summary value in every replicate: only its
seeds are resampled; :func:`bootstrap` reports which strategies lacked ranks.

Vectorised: one (B, N) x (N, L·T·K) matrix product per run.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["RunRanks", "query_weights", "run_replicates", "BootstrapResult", "bootstrap", "interval",
           "contains_zero", "run_from_results", "query_sd_from_recall", "SUPPORTED", "CONTRADICTED",
           "NOT_DISTINGUISHABLE", "MISSING_RUNS", "VERDICTS", "decide", "verdict_summary"]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


@dataclass(frozen=True)
class RunRanks:
    """One run of one direction: its per-query ranks, or only its summary values.

    :param ranks: (L, N) strict ranks (row l = after training experience l), or ``None``.
    :param tasks: (N,) task id of each query (``None`` without ranks).
    :param index: (N,) sample index of each query (with ``tasks`` it identifies the clip).
    :param num_tasks: T (columns of the recall matrix).
    :param summary: ``{"A": 𝒜, "F": ℱ or None}`` (Avg over K), used when ``ranks`` is None.
    """

    ranks: Optional[np.ndarray]
    tasks: Optional[np.ndarray]
    index: Optional[np.ndarray]
    num_tasks: int
    summary: Mapping[str, Optional[float]] = field(default_factory=dict)

    @property
    def has_ranks(self) -> bool:
        return self.ranks is not None


def run_from_results(results: Mapping, direction: str) -> RunRanks:
    """A :class:`RunRanks` from a results.json dict (its pooled-gallery ranks when present)."""
    num_tasks = len(results["tasks"])
    avg = results["summary"][direction]["Avg"]
    summary = {"A": avg.get("A"), "F": avg.get("F_standard", avg.get("F"))}
    rk = results.get("ranks")
    if not rk or direction not in rk:
        return RunRanks(None, None, None, num_tasks, summary)
    return RunRanks(np.asarray(rk[direction], dtype=np.int64), np.asarray(rk["task"], dtype=np.int64),
                    np.asarray(rk["index"], dtype=np.int64), num_tasks, summary)


def query_weights(tasks: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(B, N) stratified bootstrap counts: each task's queries resampled with replacement.

    :param tasks: (N,) task id per query. :param n_boot: B. :param rng: numpy generator.
    :return: (B, N) float64 counts; every row sums to N and to ``n_t`` within each task.
    """
    tasks = np.asarray(tasks)
    n = tasks.shape[0]
    flat = np.empty((n_boot, n), dtype=np.int64)
    col = 0
    for t in np.unique(tasks):  # loop over tasks only; the draws of a task are one array
        members = np.flatnonzero(tasks == t)
        flat[:, col:col + members.size] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
        col += members.size
    rows = np.repeat(np.arange(n_boot), n)
    return np.bincount(rows * n + flat.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _stats_from_recall(a: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """𝒜 and standard ℱ per replicate from recall ``a`` (B, L, T, K); both averaged over K.

    As ``metrics.average_accuracy`` / ``metrics.forgetting``: 𝒜 is the mean of the last row over all T
    tasks (a single-row run such as multitask is evaluated on every task), ℱ uses the first L tasks
    when L < T (a partial run).
    """
    b, rows, cols, nk = a.shape
    A = a[:, -1].mean(axis=1).mean(axis=-1)                         # (B,)
    if rows == 1:
        return A, None
    m = a[:, :, :rows] if rows < cols else a                       # partial run: tasks seen so far
    drop = m[:, :-1] - m[:, -1:]                                    # (B, L-1, T', K)
    valid = np.arange(rows - 1)[:, None] >= np.arange(m.shape[2])[None, :]
    masked = np.where(valid[None, :, :, None], drop, -np.inf)[:, :, : rows - 1]
    F = masked.max(axis=1).sum(axis=1) / (rows - 1)                 # (B, K)
    return A, F.mean(axis=-1)


def run_replicates(run: RunRanks, weights: Optional[np.ndarray], *, ks: Sequence[int] = DEFAULT_KS
                   ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """𝒜 and ℱ (Avg over ``ks``) of one run under each replicate's query weights.

    :param run: the run. :param weights: (B, N) query counts in the run's query order, or ``None``
        for the point estimate (all weights 1). Without ranks the summary value is repeated B times.
    :return: ``(A (B,), F (B,) or None)``.
    """
    if not run.has_ranks:
        b = 1 if weights is None else weights.shape[0]
        f = run.summary.get("F")
        return (np.full(b, float(run.summary["A"])), None if f is None else np.full(b, float(f)))
    ranks = np.asarray(run.ranks)
    tasks = np.asarray(run.tasks)
    rows, n = ranks.shape
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    onehot = (tasks[:, None] == np.arange(run.num_tasks)[None, :]).astype(np.float64)   # (N, T)
    counts = np.maximum(onehot.sum(axis=0), 1.0)                                         # n_t
    hits = (ranks[:, :, None] <= np.asarray(ks)[None, None, :]).astype(np.float64)      # (L, N, K)
    design = np.einsum("nt,lnk->nltk", onehot, hits).reshape(n, -1)                      # (N, L·T·K)
    a = (w @ design).reshape(w.shape[0], rows, run.num_tasks, len(ks))
    a = 100.0 * a / counts[None, None, :, None]
    return _stats_from_recall(a)


@dataclass
class BootstrapResult:
    """Replicates of every strategy's seed-mean statistic.

    ``point[s]`` = ``{"A", "F"}`` means over seeds with all query weights 1 (F None when undefined);
    ``samples[s]`` = ``{"A": (B,), "F": (B,) or None}``; ``std[s]`` = population std over seeds;
    ``seeds[s]`` = number of runs; ``without_ranks`` = strategies with at least one run lacking ranks.
    """

    point: dict[str, dict[str, Optional[float]]]
    samples: dict[str, dict[str, Optional[np.ndarray]]]
    std: dict[str, dict[str, Optional[float]]]
    seeds: dict[str, int]
    without_ranks: list[str]
    n_boot: int
    #: strategy -> its sorted seed labels (None when unlabelled); with ``run_points`` and ``run_replicates``
    #: (strategy -> statistic -> (S,) point values / (S, B) replicates per run, in label order) they let
    #: :meth:`difference` pair two strategies over the seeds they share.
    labels: dict[str, Optional[list[int]]] = field(default_factory=dict)
    run_points: dict[str, dict[str, Optional[np.ndarray]]] = field(default_factory=dict)
    run_replicates: dict[str, dict[str, Optional[np.ndarray]]] = field(default_factory=dict)
    resample_seeds: bool = True
    rng_seed: int = 0

    def over_seeds(self, key: str, m: str, seeds: Sequence[int]
                   ) -> Optional[tuple[float, float, np.ndarray]]:
        """Point value (seed mean), population std over seeds and (B,) replicates of ``key``'s statistic
        ``m`` taken over ``seeds`` only, drawn with that seed set's stream: a key that ran exactly
        ``seeds`` gets its own ``point`` / ``std`` / ``samples``, and keys shown side by side over one
        seed set stay paired. None when the key or its statistic is missing.

        :raises ValueError: when ``seeds`` are not all among the key's labelled seeds.
        """
        if self.point.get(key, {}).get(m) is None:
            return None
        lab, shared = self.labels.get(key), sorted({int(x) for x in seeds})
        if not shared or lab is None or not set(shared) <= set(lab) or key not in self.run_replicates:
            raise ValueError(f"seeds {shared} are not among the labelled seeds of {key!r} ({lab})")
        idx = (_seed_draws("", shared, len(shared), self.n_boot, self.rng_seed) if self.resample_seeds
               else np.broadcast_to(np.arange(len(shared)), (self.n_boot, len(shared))))
        rows = [lab.index(x) for x in shared]
        vals = self.run_points[key][m][rows]
        reps = self.run_replicates[key][m][rows][idx, np.arange(self.n_boot)[:, None]].mean(axis=1)
        return float(vals.mean()), float(vals.std()), reps

    def difference(self, a: str, b: str, m: str, seeds: Optional[Sequence[int]] = None
                   ) -> Optional[tuple[float, np.ndarray]]:
        """Point value and (B,) replicates of statistic ``m`` of ``a`` minus ``b``.

        With the same seed set (or an unlabelled strategy) it is the difference of the two seed means
        and of their replicates. With different seed sets sharing at least 2 seeds it is taken over the
        shared seeds only, both strategies drawing them with that seed set's stream, so the difference
        stays paired over seeds (a fifth seed of one strategy does not unpair it from a strategy with
        three). ``seeds`` restricts it to those seeds (they must be among both strategies' seeds), so
        that several differences over one seed set add up. None when a strategy or its statistic is
        missing.
        """
        pa, pb = self.point.get(a, {}).get(m), self.point.get(b, {}).get(m)
        if pa is None or pb is None:
            return None
        la, lb = self.labels.get(a), self.labels.get(b)
        if seeds is not None:
            shared = sorted({int(x) for x in seeds})
            if not shared or la is None or lb is None or not set(shared) <= set(la) & set(lb):
                raise ValueError(f"seeds {shared} are not among the labelled seeds of both {a!r} {la} and {b!r} {lb}")
        else:
            shared = [] if la is None or lb is None or la == lb else sorted(set(la) & set(lb))
        if (seeds is None and len(shared) < 2) or a not in self.run_replicates or b not in self.run_replicates:
            return pa - pb, self.samples[a][m] - self.samples[b][m]
        (qa, _, ra), (qb, _, rb) = self.over_seeds(a, m, shared), self.over_seeds(b, m, shared)
        return qa - qb, ra - rb


def _check_same_queries(runs: Mapping[str, Sequence[RunRanks]]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    ref = None
    for s, group in runs.items():
        for i, r in enumerate(group):
            if not r.has_ranks:
                continue
            if ref is None:
                ref = (np.asarray(r.tasks), np.asarray(r.index), s, i)
            elif not (np.array_equal(ref[0], r.tasks) and np.array_equal(ref[1], r.index)):
                raise ValueError(f"run {i} of {s!r} was evaluated on other queries (task/index) than run "
                                 f"{ref[3]} of {ref[2]!r}: paired resampling needs one retrieval set")
    return None if ref is None else (ref[0], ref[1])


def _seed_draws(name: str, labels: Optional[Sequence[int]], n_runs: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, S) run positions drawn with replacement. Without labels the stream is keyed by the strategy's
    name (adding or removing another strategy must not move this one's interval); with labels by the
    seed set, so every strategy with the same seeds draws the same ones (paired over seeds)."""
    key = (zlib.crc32(name.encode()) if labels is None
           else zlib.crc32(("seeds:" + ",".join(str(int(x)) for x in labels)).encode()))
    return np.random.default_rng([seed, key]).integers(0, n_runs, size=(n_boot, n_runs))


def bootstrap(runs: Mapping[str, Sequence[RunRanks]], *, n_boot: int = 2000, seed: int = 0,
              ks: Sequence[int] = DEFAULT_KS, resample_queries: bool = True,
              resample_seeds: bool = True, seed_labels: Optional[Mapping[str, Sequence[int]]] = None
              ) -> BootstrapResult:
    """Joint bootstrap of all strategies (queries shared and paired; seeds paired where labelled).

    :param runs: strategy -> its runs (one direction). All runs with ranks must share the queries.
    :param n_boot: replicates B. :param seed: numpy seed (the result is reproducible).
    :param ks: the K values averaged into "Avg".
    :param resample_queries: resample queries (stratified by task).
    :param resample_seeds: resample each strategy's runs.
    :param seed_labels: strategy -> the seed of each of its runs (same order as ``runs``); strategies
        with the same set of seeds are then resampled over seeds together. Unlabelled strategies (or
        ``None``) draw their own seeds.
    :raises ValueError: when a strategy's labels do not match its runs or repeat a seed.
    """
    rng = np.random.default_rng(seed)
    queries = _check_same_queries(runs)
    weights = query_weights(queries[0], n_boot, rng) if (queries is not None and resample_queries) else None
    point, samples, std, seeds, missing = {}, {}, {}, {}, []
    all_labels: dict[str, Optional[list[int]]] = {}
    run_points: dict[str, dict[str, Optional[np.ndarray]]] = {}
    run_reps: dict[str, dict[str, Optional[np.ndarray]]] = {}
    for s, group in runs.items():
        if not group:
            continue
        if any(not r.has_ranks for r in group):
            missing.append(s)
        pts = [run_replicates(r, None, ks=ks) for r in group]
        if weights is None:  # queries fixed: every replicate of a run is its point value
            reps = [tuple(None if x is None else np.repeat(x, n_boot) for x in p) for p in pts]
        else:
            reps = [run_replicates(r, weights, ks=ks) for r in group]
        labels = None if seed_labels is None else seed_labels.get(s)
        if labels is not None:
            if len(labels) != len(group) or len(set(labels)) != len(labels):
                raise ValueError(f"seed labels of {s!r} {list(labels)} do not name its {len(group)} runs once each")
            order = np.argsort(np.asarray(labels), kind="stable")   # draw positions refer to sorted seeds
            reps, pts = [reps[i] for i in order], [pts[i] for i in order]
            labels = sorted(labels)
        idx = (_seed_draws(s, labels, len(group), n_boot, seed) if resample_seeds
               else np.broadcast_to(np.arange(len(group)), (n_boot, len(group))))
        cols = np.arange(n_boot)[:, None]
        point[s], samples[s], std[s] = {}, {}, {}
        all_labels[s], run_points[s], run_reps[s] = labels, {}, {}
        for j, key in enumerate(("A", "F")):
            if any(r[j] is None for r in reps):
                point[s][key], samples[s][key], std[s][key] = None, None, None
                run_points[s][key], run_reps[s][key] = None, None
                continue
            per_run = np.stack([r[j] for r in reps])                    # (S, B)
            samples[s][key] = per_run[idx, cols].mean(axis=1)           # (B,)
            vals = np.array([float(p[j][0]) for p in pts])
            point[s][key], std[s][key] = float(vals.mean()), float(vals.std())
            run_points[s][key], run_reps[s][key] = vals, per_run
        seeds[s] = len(group)
    return BootstrapResult(point, samples, std, seeds, missing, n_boot, labels=all_labels, run_points=run_points,
                           run_replicates=run_reps, resample_seeds=resample_seeds, rng_seed=seed)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` at ``level``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def contains_zero(ci: tuple[float, float]) -> bool:
    """Whether an interval does not exclude zero (the difference is not distinguishable from zero)."""
    return ci[0] <= 0.0 <= ci[1]


#: the verdicts of a claim about a paired difference (:func:`decide`), and of one whose runs are missing
SUPPORTED, CONTRADICTED, NOT_DISTINGUISHABLE = "supported", "contradicted", "not distinguishable"
MISSING_RUNS = "missing runs"
VERDICTS = (SUPPORTED, CONTRADICTED, NOT_DISTINGUISHABLE)


def decide(ci: tuple[float, float], side: int) -> str:
    """The verdict on "difference > 0" (``side`` +1) or "< 0" (``side`` −1) from its interval ``ci``.

    Entirely on the claimed side of 0: supported; entirely on the other side: contradicted; an
    interval that contains 0 (bounds included, as :func:`contains_zero`): not distinguishable.
    """
    if side not in (1, -1):
        raise ValueError(f"side must be +1 or -1, got {side}")
    if contains_zero(ci):
        return NOT_DISTINGUISHABLE
    return SUPPORTED if ci[0] * side > 0 else CONTRADICTED


def verdict_summary(verdicts: Sequence[str]) -> str:
    """One line counting ``verdicts``: every decided kind (zeros too), then each undecided kind if any,
    e.g. "1 supported, 2 contradicted, 0 not distinguishable; not decided: 3 (missing runs)"."""
    line = ", ".join(f"{sum(v == kind for v in verdicts)} {kind}" for kind in VERDICTS)
    other = [kind for kind in dict.fromkeys(verdicts) if kind not in VERDICTS]
    if other:
        line += "; not decided: " + ", ".join(f"{sum(v == kind for v in verdicts)} ({kind})" for kind in other)
    return line


def query_sd_from_recall(last_row: Mapping[str, Sequence[float]], queries_per_task: int | Sequence[int]) -> float:
    """Standard deviation of one run's Avg 𝒜 due to the finite query set, from its recall alone.

    For runs without per-query ranks. A query's Avg hit ``h = mean_K 1[r <= K]`` has, within task t,
    ``Var(h) = 1/|K|² Σ_{K,K'} (p_min(K,K') − p_K p_K')`` (the indicators are nested, so this is exact
    from the per-task recalls ``p_K``); ``Var(𝒜) = Σ_t Var_t / (T² n_t)``.

    :param last_row: ``{"R@K": [per-task recall in %]}`` of the last matrix row.
    :param queries_per_task: n_t (one number for all tasks, or one per task).
    :return: the standard deviation in percentage points.
    """
    labels = sorted(last_row, key=lambda k: int(k[2:]))
    ks = [int(k[2:]) for k in labels]
    p = {k: np.asarray(last_row[lab], dtype=np.float64) / 100.0 for k, lab in zip(ks, labels)}
    var = sum(p[min(a, b)] - p[a] * p[b] for a in ks for b in ks) / len(ks) ** 2
    n = np.broadcast_to(np.asarray(queries_per_task, dtype=np.float64), var.shape)
    return float(100.0 * np.sqrt((var / n).sum()) / var.shape[0])
