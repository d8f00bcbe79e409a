"""stella_avalanche/evaluation/bootstrap.py: planted differences, identical strategies, agreement with
the metrics of results.json, and runs without ranks."""
from __future__ import annotations

import numpy as np
import pytest

from stella_avalanche.evaluation import bootstrap as B
from stella_avalanche.evaluation.metrics import average_accuracy, forgetting
from stella_avalanche.evaluation.report import recall_from_ranks

T, PER = 4, 50
N = T * PER
TASKS = np.repeat(np.arange(T), PER)
INDEX = np.tile(np.arange(PER), T)


def _ranks(rng: np.random.Generator) -> np.ndarray:
    """(T, N) ranks of a run: ~30 % of the queries within rank 10, drifting over rows."""
    return rng.integers(1, 35, size=(T, N))


def _run(ranks: np.ndarray) -> B.RunRanks:
    return B.RunRanks(ranks, TASKS, INDEX, T)


def _metrics(ranks: np.ndarray) -> tuple[float, float]:
    rec = recall_from_ranks(ranks, TASKS, num_tasks=T)
    return (float(np.mean([average_accuracy(m) for m in rec.values()])),
            float(np.mean([forgetting(m) for m in rec.values()])))


def test_point_values_equal_the_metrics_of_results_json() -> None:
    ranks = _ranks(np.random.default_rng(0))
    A, F = B.run_replicates(_run(ranks), None)
    a_ref, f_ref = _metrics(ranks)
    assert A[0] == pytest.approx(a_ref) and F[0] == pytest.approx(f_ref)


def test_single_row_and_partial_runs_match_results_json() -> None:
    """A multitask run (one row, every task evaluated) averages its row over all tasks, like
    results.json; a partial run's ℱ counts only the tasks seen so far, like ``metrics.forgetting``.
    (The 𝒜 of a one-row run once came from task 0 alone.)"""
    ranks = _ranks(np.random.default_rng(3))
    ranks[0, TASKS == 0] = 1                     # task 0 far easier: averaging task 0 alone would show
    for rows in (1, 2):
        rec = recall_from_ranks(ranks[:rows], TASKS, num_tasks=T)
        A, F = B.run_replicates(_run(ranks[:rows]), None)
        assert A[0] == pytest.approx(np.mean([average_accuracy(m) for m in rec.values()]))
        if rows == 1:
            assert F is None
        else:
            assert F[0] == pytest.approx(np.mean([forgetting(m) for m in rec.values()]))


def test_query_weights_are_stratified_by_task() -> None:
    w = B.query_weights(TASKS, 50, np.random.default_rng(1))
    assert w.shape == (50, N) and np.all(w.sum(1) == N)
    per_task = np.stack([w[:, TASKS == t].sum(1) for t in range(T)], axis=1)
    assert np.all(per_task == PER) and w.std() > 0


def test_bootstrap_recovers_a_planted_difference() -> None:
    rng = np.random.default_rng(2)
    base = [_ranks(rng) for _ in range(4)]
    better = []
    lifted = np.concatenate([np.flatnonzero(TASKS == t)[:10] for t in range(T)])   # 10 queries per task
    for r in base:
        b = r.copy()
        b[-1, lifted] = 1            # after the last task these queries are found first
        better.append(b)
    planted = np.mean([_metrics(b)[0] - _metrics(r)[0] for r, b in zip(base, better)])
    assert planted > 5               # a real effect: 20 % of the queries become hits
    res = B.bootstrap({"x": [_run(r) for r in base], "y": [_run(b) for b in better]}, n_boot=1000, seed=0)
    diff = res.samples["y"]["A"] - res.samples["x"]["A"]
    lo, hi = B.interval(diff)
    assert res.point["y"]["A"] - res.point["x"]["A"] == pytest.approx(planted)
    assert lo <= planted <= hi and not B.contains_zero((lo, hi))
    assert res.without_ranks == [] and res.seeds == {"x": 4, "y": 4}


def test_identical_strategies_give_an_interval_containing_zero() -> None:
    rng = np.random.default_rng(3)
    runs = [_ranks(rng) for _ in range(3)]
    res = B.bootstrap({"x": [_run(r) for r in runs], "copy": [_run(r.copy()) for r in runs],
                       # same process, other seeds: still not distinguishable
                       "twin": [_run(_ranks(rng)) for _ in range(3)]}, n_boot=1000, seed=1)
    for other in ("copy", "twin"):
        for m in ("A", "F"):
            ci = B.interval(res.samples[other][m] - res.samples["x"][m])
            assert B.contains_zero(ci), (other, m, ci)
    # identical runs with queries resampled but not seeds: the paired difference is exactly zero
    fixed = B.bootstrap({"x": [_run(r) for r in runs], "copy": [_run(r.copy()) for r in runs]},
                        n_boot=200, resample_seeds=False)
    assert np.all(fixed.samples["copy"]["A"] == fixed.samples["x"]["A"])
    assert np.ptp(fixed.samples["x"]["A"]) > 0      # the queries were resampled


def test_runs_without_ranks_use_their_summary_and_are_reported() -> None:
    results = {"tasks": [f"t{k}" for k in range(T)],
               "summary": {"a2v": {"Avg": {"A": 7.0, "F": 2.0, "F_standard": 2.0}}}}
    old = B.run_from_results(results, "a2v")
    assert not old.has_ranks
    ranks = _ranks(np.random.default_rng(4))
    new = B.run_from_results({**results, "ranks": {"task": TASKS.tolist(), "index": INDEX.tolist(),
                                                   "a2v": ranks.tolist()}}, "a2v")
    assert new.has_ranks
    res = B.bootstrap({"old": [old, old], "new": [new]}, n_boot=100)
    assert res.without_ranks == ["old"] and np.all(res.samples["old"]["A"] == 7.0)
    assert res.point["new"]["A"] == pytest.approx(_metrics(ranks)[0])
    # a multitask-like single-row run has no forgetting
    single = B.run_replicates(B.RunRanks(ranks[:1], TASKS, INDEX, T), None)
    assert single[1] is None


def test_runs_on_other_queries_are_refused() -> None:
    ranks = _ranks(np.random.default_rng(5))
    other = B.RunRanks(ranks, TASKS, INDEX[::-1].copy(), T)
    with pytest.raises(ValueError, match="other queries"):
        B.bootstrap({"a": [_run(ranks)], "b": [other]}, n_boot=10)


def test_query_sd_from_recall_matches_the_bootstrap_of_one_run() -> None:
    ranks = _ranks(np.random.default_rng(6))
    rec = recall_from_ranks(ranks, TASKS, num_tasks=T)
    sd = B.query_sd_from_recall({k: m[-1] for k, m in rec.items()}, PER)
    boot = B.run_replicates(_run(ranks), B.query_weights(TASKS, 4000, np.random.default_rng(7)))[0]
    assert sd == pytest.approx(boot.std(), rel=0.1)


def test_a_strategy_interval_does_not_depend_on_the_other_strategies() -> None:
    """Each strategy's seed draws have their own stream: adding strategies (as a re-run does, one batch
    at a time) leaves the replicates of the others unchanged."""
    rng = np.random.default_rng(4)
    x = [_run(_ranks(rng)) for _ in range(3)]
    y = [_run(_ranks(rng)) for _ in range(3)]
    extra = [_run(_ranks(rng)) for _ in range(5)]
    alone = B.bootstrap({"x": x, "y": y}, n_boot=300, seed=0)
    more = B.bootstrap({"a_first": extra, "x": x, "b_between": extra[:2], "y": y}, n_boot=300, seed=0)
    for s in ("x", "y"):
        assert np.array_equal(alone.samples[s]["A"], more.samples[s]["A"]), s


def test_strategies_with_the_same_seeds_are_paired_over_seeds() -> None:
    """Seed s moves both strategies alike (a shared initialisation): with seed labels the difference's
    interval is as narrow as its constant shift allows; unpaired, the seed spread widens it."""
    rng = np.random.default_rng(5)
    base = [np.clip(_ranks(rng) - 10 * s, 1, None) for s in range(4)]     # seeds far apart
    better = [np.maximum(r - 3, 1) for r in base]                          # same seed, a constant gain

    def width(labels):
        res = B.bootstrap({"a": [_run(r) for r in better], "b": [_run(r) for r in base]}, n_boot=400,
                          resample_queries=False, seed_labels=labels)
        lo, hi = B.interval(res.samples["a"]["A"] - res.samples["b"]["A"])
        return hi - lo

    paired = width({"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]})
    # labels in another order name the same runs: the pairing follows the labels, not list positions
    shuffled = B.bootstrap({"a": [_run(better[i]) for i in (2, 0, 3, 1)], "b": [_run(r) for r in base]},
                           n_boot=400, resample_queries=False, seed_labels={"a": [2, 0, 3, 1], "b": [0, 1, 2, 3]})
    assert B.interval(shuffled.samples["a"]["A"] - shuffled.samples["b"]["A"]) == pytest.approx(
        B.interval(B.bootstrap({"a": [_run(r) for r in better], "b": [_run(r) for r in base]}, n_boot=400,
                               resample_queries=False, seed_labels={"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
                               ).samples["a"]["A"] - shuffled.samples["b"]["A"]))
    unpaired = width(None)
    assert paired < 0.3 * unpaired
    assert width({"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}) > 0.6 * unpaired     # other seeds: not paired
    with pytest.raises(ValueError, match="seed labels"):
        B.bootstrap({"a": [_run(r) for r in better]}, n_boot=10, seed_labels={"a": [0, 0, 1, 2]})


def test_strategies_with_more_seeds_stay_paired_on_the_shared_ones() -> None:
    """A strategy with 5 seeds against one with 3 (the issue's design): their difference is taken over
    the 3 shared seeds, paired, so a fifth seed does not widen it to the unpaired width; each
    strategy's own value still uses all its seeds."""
    rng = np.random.default_rng(6)
    base = [np.clip(_ranks(rng) - 6 * s, 1, None) for s in range(5)]      # seeds far apart
    better = [np.maximum(r - 3, 1) for r in base]                         # a constant gain per seed
    runs = {"five": [_run(r) for r in better], "three": [_run(r) for r in base[:3]]}
    res = B.bootstrap(runs, n_boot=400, resample_queries=False,
                      seed_labels={"five": [0, 1, 2, 3, 4], "three": [0, 1, 2]})
    point, reps = res.difference("five", "three", "A")
    own = [B.run_replicates(r, None)[0][0] for r in runs["five"]]
    assert res.point["five"]["A"] == pytest.approx(np.mean(own))                     # all 5 seeds
    assert point == pytest.approx(np.mean(own[:3]) - res.point["three"]["A"])        # the 3 shared ones
    lo, hi = B.interval(reps)
    unpaired = B.interval(res.samples["five"]["A"] - res.samples["three"]["A"])
    assert lo > 0 and hi - lo < 0.3 * (unpaired[1] - unpaired[0])
    # the same pair on 3 seeds each gives the same difference and interval (one stream per seed set)
    three = B.bootstrap({"five": runs["five"][:3], "three": runs["three"]}, n_boot=400, resample_queries=False,
                        seed_labels={"five": [0, 1, 2], "three": [0, 1, 2]})
    p3, r3 = three.difference("five", "three", "A")
    assert p3 == pytest.approx(point) and np.allclose(r3, reps)
    # fewer than 2 shared seeds: nothing to pair over, the unpaired difference of the seed means
    apart = B.bootstrap(runs, n_boot=50, resample_queries=False, seed_labels={"five": [0, 1, 2, 3, 4], "three": [4, 5, 6]})
    p, r = apart.difference("five", "three", "A")
    assert p == pytest.approx(apart.point["five"]["A"] - apart.point["three"]["A"])
    assert np.array_equal(r, apart.samples["five"]["A"] - apart.samples["three"]["A"])


def test_a_key_over_a_subset_of_its_seeds_matches_a_run_of_those_seeds() -> None:
    """``over_seeds`` gives a key's statistic over some of its seeds exactly as a bootstrap of only those
    runs would (same point, std and replicates: one stream per seed set), and refuses unknown seeds."""
    rng = np.random.default_rng(8)
    runs = [_run(np.clip(_ranks(rng) - 5 * s, 1, None)) for s in range(5)]
    full = B.bootstrap({"k": runs}, n_boot=300, seed_labels={"k": [0, 1, 2, 3, 4]})
    part = B.bootstrap({"k": runs[:3]}, n_boot=300, seed_labels={"k": [0, 1, 2]})
    point, std, reps = full.over_seeds("k", "A", [2, 0, 1])
    assert point == pytest.approx(part.point["k"]["A"]) and std == pytest.approx(part.std["k"]["A"])
    assert point != pytest.approx(full.point["k"]["A"])          # seeds 3-4 shift the full mean
    assert np.allclose(reps, part.samples["k"]["A"])
    same = full.over_seeds("k", "A", [0, 1, 2, 3, 4])              # all seeds: the key's own statistic
    assert same[0] == pytest.approx(full.point["k"]["A"]) and np.allclose(same[2], full.samples["k"]["A"])
    assert full.over_seeds("missing", "A", [0, 1]) is None
    with pytest.raises(ValueError, match="not among"):
        full.over_seeds("k", "A", [0, 7])
