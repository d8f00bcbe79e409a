"""Retrieval ranks / recall against a brute-force full-matrix reference, with planted exact ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stella_avalanche.evaluation.retrieval import (auto_chunk_size, median_rank, recall_report,
                                                   retrieval_ranks)


def _brute_force(a: torch.Tensor, v: torch.Tensor, tasks: torch.Tensor | None, per_task: bool):
    """Full N x N similarity, per-query loops: strict and pessimistic ranks in both directions."""
    s = (F.normalize(a.float(), dim=1) @ F.normalize(v.float(), dim=1).T).numpy()
    n = s.shape[0]
    t = None if tasks is None else tasks.numpy()
    out = {k: np.zeros(n, dtype=np.int64) for k in ("a2v", "v2a", "a2v_pess", "v2a_pess")}
    for i in range(n):
        gal = np.ones(n, dtype=bool) if not per_task else (t == t[i])
        others = gal.copy()
        others[i] = False
        row, col = s[i], s[:, i]
        out["a2v"][i] = 1 + np.sum(row[gal] > s[i, i])
        out["v2a"][i] = 1 + np.sum(col[gal] > s[i, i])
        out["a2v_pess"][i] = 1 + np.sum(row[others] >= s[i, i])
        out["v2a_pess"][i] = 1 + np.sum(col[others] >= s[i, i])
    return out


def _planted(n: int = 200, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    v = torch.randn(n, d, generator=g)
    # exact duplicate clips (both modalities), e.g. DistributedSampler padding
    a[5], v[5] = a[17], v[17]
    # a class-constant group (collapse): 8 identical pairs
    a[30:38], v[30:38] = a[30].clone(), v[30].clone()
    # audio-only duplicate: ties in the V->A column of clip 50, not in its A->V row
    a[51] = a[50]
    # make the collapsed group rank well so ties sit at the top of the list
    v[30:38] = a[30:38] + 0.01 * v[30:38]
    tasks = torch.arange(n) % 4
    return a, v, tasks


@pytest.mark.parametrize("chunk", [1, 64, 100, 1000])
@pytest.mark.parametrize("per_task", [False, True])
def test_ranks_match_brute_force_with_ties(chunk: int, per_task: bool) -> None:
    a, v, tasks = _planted()
    got = retrieval_ranks(a, v, task_ids=tasks, per_task_gallery=per_task, chunk_size=chunk)
    ref = _brute_force(a, v, tasks, per_task)
    for key in ("a2v", "v2a", "a2v_pess", "v2a_pess"):
        assert getattr(got, key).dtype == torch.int64
        np.testing.assert_array_equal(getattr(got, key).numpy(), ref[key], err_msg=f"{key} chunk={chunk}")
    # the collapsed group: strict ranks are optimistic, the pessimistic ones expose the 8-way tie
    # (tasks = i % 4, so a per-task gallery holds only 2 of the 8 tied clips)
    grp = slice(30, 38)
    assert torch.all(got.a2v[grp] == 1)
    assert torch.all(got.a2v_pess[grp] - got.a2v[grp] == (1 if per_task else 7))
    # audio-only duplicate: tie only in V->A for clips 50/51 (pooled gallery keeps both in the gallery)
    if not per_task:
        assert got.v2a_pess[50] == got.v2a[50] + 1
        assert got.a2v_pess[50] == got.a2v[50]


def test_ranks_match_argsort_without_ties() -> None:
    g = torch.Generator().manual_seed(3)
    a, v = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    got = retrieval_ranks(a, v, chunk_size=13)
    s = F.normalize(a, dim=1) @ F.normalize(v, dim=1).T
    # official-style: position of the positive in the descending sort (no ties -> identical)
    order = torch.argsort(-s, dim=1)
    ref_a2v = (order == torch.arange(200)[:, None]).float().argmax(dim=1) + 1
    order_t = torch.argsort(-s.T, dim=1)
    ref_v2a = (order_t == torch.arange(200)[:, None]).float().argmax(dim=1) + 1
    assert torch.equal(got.a2v, ref_a2v)
    assert torch.equal(got.v2a, ref_v2a)
    assert torch.equal(got.a2v, got.a2v_pess) and torch.equal(got.v2a, got.v2a_pess)


def test_pooled_vs_per_task_gallery() -> None:
    # clip 0 (task 0) and clip 2 (task 1): audio 0 is closer to video 2 than to its own video 0.
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    v = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [1.0, 0.0, 0.0], [0.2, 0.0, 1.0]])
    tasks = torch.tensor([0, 0, 1, 1])
    pooled = retrieval_ranks(a, v, task_ids=tasks, per_task_gallery=False)
    own = retrieval_ranks(a, v, task_ids=tasks, per_task_gallery=True)
    assert pooled.a2v[0] == 2 and own.a2v[0] == 1      # the task-1 distractor only counts when pooled
    rep_p = recall_report(a, v, tasks, ks=(1,), gallery="pooled")
    rep_t = recall_report(a, v, tasks, ks=(1,), gallery="per_task")
    assert rep_p["a2v"]["R@1"]["per_task"][0] == pytest.approx(50.0)
    assert rep_t["a2v"]["R@1"]["per_task"][0] == pytest.approx(100.0)
    assert rep_p["gallery"] == "pooled" and rep_t["gallery"] == "per_task"


def test_recall_report_values() -> None:
    a, v, tasks = _planted(n=80, seed=5)
    rep = recall_report(a, v, tasks, ks=(1, 5, 10), num_tasks=5)
    ref = _brute_force(a, v, tasks, per_task=False)
    for d in ("a2v", "v2a"):
        r = torch.as_tensor(ref[d])
        for k in (1, 5, 10):
            assert rep[d][f"R@{k}"]["overall"] == pytest.approx(100.0 * float((r <= k).double().mean()))
            for t in range(4):
                exp = 100.0 * float((r[tasks == t] <= k).double().mean())
                assert rep[d][f"R@{k}"]["per_task"][t] == pytest.approx(exp)
            assert rep[d][f"R@{k}"]["per_task"][4] is None       # task 4 has no clips
        assert rep[d]["MR"]["overall"] == pytest.approx(float(np.median(ref[d])))
        assert rep[d]["MR_pessimistic"]["overall"] == pytest.approx(float(np.median(ref[f"{d}_pess"])))
        assert rep[d]["MR"]["per_task"][2] == pytest.approx(float(np.median(ref[d][tasks.numpy() == 2])))
    assert rep["num_queries"] == 80


def test_median_rank_even_count_and_empty() -> None:
    assert median_rank(torch.tensor([4, 1, 3, 2])) == pytest.approx(2.5)
    assert median_rank(torch.tensor([5, 1, 3])) == pytest.approx(3.0)
    assert median_rank(torch.tensor([], dtype=torch.int64)) is None


def test_errors_and_chunk_budget() -> None:
    a = torch.randn(10, 4)
    with pytest.raises(ValueError, match="same shape"):
        retrieval_ranks(a, torch.randn(9, 4))
    with pytest.raises(ValueError, match="task_ids"):
        retrieval_ranks(a, a, per_task_gallery=True)
    nan = a.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"z_video has non-finite values .* rows \[3\]"):
        retrieval_ranks(a, nan)
    with pytest.raises(ValueError, match="gallery"):
        recall_report(a, a, torch.zeros(10, dtype=torch.long), gallery="bogus")
    # the tile working set stays within the budget: c * c * 16 bytes
    c = auto_chunk_size(100_000, memory_budget_bytes=256 * 2**20)
    assert 1 <= c < 100_000 and c * c * 16 <= 256 * 2**20
    assert auto_chunk_size(50, memory_budget_bytes=2**30) == 50
    # identical embeddings everywhere: all strict ranks 1, pessimistic ranks N
    same = retrieval_ranks(torch.ones(6, 3), torch.ones(6, 3), chunk_size=4)
    assert torch.all(same.a2v == 1) and torch.all(same.v2a_pess == 6)


def test_gallery_groups_rank_every_query_within_its_sub_pool() -> None:
    g = torch.Generator().manual_seed(3)
    n = 48
    a, v = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    tasks = torch.arange(n) // 24                      # 2 tasks
    groups = torch.arange(n) % 3                       # 3 sub-pools, 8 clips per task each
    for gallery in ("pooled", "per_task"):
        rep = recall_report(a, v, tasks, gallery=gallery, gallery_groups=groups, return_ranks=True, ks=(1, 5))
        for p in range(3):
            sub = groups == p
            ref = retrieval_ranks(a[sub], v[sub], task_ids=tasks[sub], per_task_gallery=gallery == "per_task")
            assert torch.equal(rep["ranks"]["a2v"][sub], ref.a2v) and torch.equal(rep["ranks"]["v2a"][sub], ref.v2a)
        hits = (rep["ranks"]["a2v"] <= 5).double()
        assert rep["a2v"]["R@5"]["per_task"][1] == pytest.approx(100 * float(hits[tasks == 1].mean()))
    with pytest.raises(ValueError, match="gallery_groups"):
        recall_report(a, v, tasks, gallery_groups=groups[:-1])
