"""Tests for stella_avalanche.training.selection (STELLA steps 4-9) on planted data."""
from __future__ import annotations

import math

import pytest
import torch

from stella_avalanche.training.selection import (
    PatchSelector,
    bernoulli_exclusion,
    candidate_ids,
    importance_from_projections,
    keep_count,
    patch_importance,
    rca_probability,
    sample_video_ids,
    select_audio_chunks,
    select_audio_chunks_given_order,
    summary_queries,
    weighted_permutation,
)

torch.set_num_threads(1)

# tiny layout of docs/method.md §0: L_V = 32, T_a = 8, F_a = 4, L_A = 32, c = 2, K = 16
L_V, T_A, F_A, C = 32, 8, 4, 2
L_A = T_A * F_A
K = 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ importance
def test_importance_rows_sum_to_one_and_chunking_is_exact() -> None:
    g = _gen(1)
    S_av = torch.randn(3, 4, L_A, L_V, generator=g)
    S_va = torch.randn(3, 4, L_V, L_A, generator=g)
    I_v, I_a = patch_importance(S_av, S_va, 0.4, head_chunk=4)
    I_v1, I_a1 = patch_importance(S_av, S_va, 0.4, head_chunk=1)
    torch.testing.assert_close(I_v, I_v1)
    torch.testing.assert_close(I_a, I_a1)
    torch.testing.assert_close(I_v.sum(1), torch.ones(3))
    torch.testing.assert_close(I_a.sum(1), torch.ones(3))
    # definition check against an explicit formula
    ref_v = torch.softmax(S_av / 0.4, -1).sum(dim=(1, 2)) / (4 * L_A)
    torch.testing.assert_close(I_v, ref_v)


def test_importance_from_projections_matches_logit_form() -> None:
    g = _gen(2)
    q_a, k_a = torch.randn(2, 3, L_A, 8, generator=g), torch.randn(2, 3, L_A, 8, generator=g)
    q_v, k_v = torch.randn(2, 3, L_V, 8, generator=g), torch.randn(2, 3, L_V, 8, generator=g)
    S_av = q_a @ k_v.transpose(-1, -2) / math.sqrt(8)
    S_va = q_v @ k_a.transpose(-1, -2) / math.sqrt(8)
    a = patch_importance(S_av, S_va, 0.4)
    b = importance_from_projections(q_a, k_a, q_v, k_v, 0.4, head_chunk=2)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_planted_correlated_patches_get_importance_and_are_kept() -> None:
    """A few video patches / audio chunks carry the cross-modal signal: they dominate I and the selection."""
    g = _gen(3)
    n, h = 4, 3
    S_av = 0.1 * torch.randn(n, h, L_A, L_V, generator=g)
    S_va = 0.1 * torch.randn(n, h, L_V, L_A, generator=g)
    hot_v = torch.tensor([3, 7, 19, 30])
    hot_a = torch.arange(2 * F_A, 4 * F_A)  # time tokens 2 and 3 = audio chunk 1 (c = 2), all bands
    S_av[:, :, :, hot_v] += 3.0   # every audio query attends to the planted video patches
    S_va[:, :, :, hot_a] += 3.0   # every video query attends to the planted audio chunk
    I_v, I_a = patch_importance(S_av, S_va, 0.4)
    top_v = candidate_ids(I_v, hot_v.numel())
    top_a = candidate_ids(I_a, hot_a.numel())
    for r in range(n):
        assert set(top_v[r].tolist()) == set(hot_v.tolist())
        assert set(top_a[r].tolist()) == set(hot_a.tolist())
    assert float(I_v[:, hot_v].sum(1).min()) > 0.5  # mass concentrates on 4 of 32 patches
    # probabilistic selection without exclusion keeps the planted tokens with overwhelming probability
    none = torch.zeros(n, L_V, dtype=torch.bool)
    hits_v = hits_a = 0
    for seed in range(20):
        ids_v = sample_video_ids(I_v, none, K, _gen(seed))
        ids_a = select_audio_chunks(I_a, none, K, time_tokens=T_A, freq_tokens=F_A, chunk=C,
                                    generator=_gen(100 + seed))
        hits_v += sum(int(torch.isin(hot_v, ids_v[r]).all()) for r in range(n))
        hits_a += sum(int(torch.isin(hot_a, ids_a[r]).all()) for r in range(n))
    assert hits_v >= 78 and hits_a >= 78  # of 80


# ------------------------------------------------------------------------------------------ queries / RCA
def test_summary_queries_is_importance_weighted_candidate_mean() -> None:
    g = _gen(4)
    q = torch.randn(2, 3, 10, 5, generator=g)
    I = torch.rand(2, 10, generator=g)
    cand = candidate_ids(I, 4)
    out = summary_queries(q, I, cand)
    for r in range(2):
        w = I[r, cand[r]]
        ref = (w[None, :, None] * q[r][:, cand[r]]).sum(1) / w.sum()
        torch.testing.assert_close(out[r], ref)


def test_rca_linear_identity_and_masking() -> None:
    """C via <k, qbar_buf - qbar_cur> equals the definition with the averaged current logit."""
    g = _gen(5)
    n, h, d = 2, 3, 8
    k_v = torch.randn(n, h, L_V, d, generator=g)
    q_a = torch.randn(n, h, L_A, d, generator=g)
    I_a = torch.softmax(torch.randn(n, L_A, generator=g), -1)
    cand_a = candidate_ids(I_a, K)
    qbar_a = summary_queries(q_a, I_a, cand_a)
    qbar_buf = torch.randn(n, h, d, generator=g)
    cand_v = candidate_ids(torch.rand(n, L_V, generator=g), K)
    C = rca_probability(k_v, qbar_buf, qbar_a, cand_v)
    S_av = q_a @ k_v.transpose(-1, -2) / math.sqrt(d)           # (n, h, L_A, L_V)
    w = torch.zeros(n, L_A).scatter(1, cand_a, I_a.gather(1, cand_a))
    cur = torch.einsum("ni,nhij->nhj", w, S_av) / w.sum(1)[:, None, None]
    past = torch.einsum("nhjd,nhd->nhj", k_v, qbar_buf) / math.sqrt(d)
    ref = torch.sigmoid(past - cur).mean(1)
    mask = torch.zeros(n, L_V, dtype=torch.bool).scatter(1, cand_v, True)
    torch.testing.assert_close(C, ref * mask, atol=1e-5, rtol=1e-5)
    assert bool((C[~mask] == 0).all())


def test_rca_pairs_current_row_n_with_replay_item_n_mod_m() -> None:
    g = _gen(6)
    k = torch.randn(5, 2, L_V, 4, generator=g)
    qcur = torch.randn(5, 2, 4, generator=g)
    qbuf = torch.randn(2, 2, 4, generator=g)
    cand = candidate_ids(torch.rand(5, L_V, generator=g), K)
    C = rca_probability(k, qbuf, qcur, cand)
    C_ref = rca_probability(k, qbuf[torch.tensor([0, 1, 0, 1, 0])], qcur, cand)
    torch.testing.assert_close(C, C_ref)


def test_patches_aligned_with_past_query_are_excluded_more() -> None:
    """Video keys aligned with a stored past audio query get high C, and are excluded more often."""
    g = _gen(7)
    n, h, d = 3, 2, 16
    past = torch.randn(n, h, d, generator=g)
    cur = torch.zeros(n, h, d)
    k = 0.05 * torch.randn(n, h, L_V, d, generator=g)
    aligned = torch.tensor([1, 5, 9, 12])
    k[:, :, aligned] += 2.0 * past[:, :, None, :] / past.norm(dim=-1, keepdim=True)[..., None]
    cand = torch.arange(L_V).expand(n, L_V)[:, :K]  # candidates: first 16 tokens (contain `aligned`)
    C = rca_probability(k, past, cur, cand)
    others = torch.tensor([j for j in range(K) if j not in aligned.tolist()])
    assert float(C[:, aligned].min()) > 0.8
    assert float(C[:, others].max()) < 0.7
    assert bool((C[:, K:] == 0).all())
    X = torch.stack([bernoulli_exclusion(C, _gen(s)) for s in range(200)]).float().mean(0)
    assert float(X[:, aligned].mean()) > float(X[:, others].mean()) + 0.25
    assert float(X[:, K:].max()) == 0.0  # non-candidates are never excluded


# ------------------------------------------------------------------------------------------ video sampling
def test_video_sampling_exact_count_distinct_and_never_excluded() -> None:
    g = _gen(8)
    I = torch.softmax(torch.randn(50, L_V, generator=g), -1)
    X = torch.zeros(50, L_V, dtype=torch.bool)
    cand = candidate_ids(I, K)
    X.scatter_(1, cand, torch.rand(50, K, generator=g) < 0.5)
    ids = sample_video_ids(I, X, K, _gen(9))
    assert ids.shape == (50, K)
    assert all(len(set(r.tolist())) == K for r in ids)
    assert not bool(X.gather(1, ids).any())


def test_video_sampling_follows_weights() -> None:
    """First draw of the exponential top-k is distributed as w / sum(w)."""
    I = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(20000, 1)
    X = torch.zeros_like(I, dtype=torch.bool)
    first = sample_video_ids(I, X, 1, _gen(10))[:, 0]
    freq = torch.bincount(first, minlength=4).float() / first.numel()
    torch.testing.assert_close(freq, I[0], atol=0.015, rtol=0)


def test_video_sampling_is_reproducible() -> None:
    I = torch.softmax(torch.randn(4, L_V, generator=_gen(11)), -1)
    X = torch.zeros_like(I, dtype=torch.bool)
    assert torch.equal(sample_video_ids(I, X, K, _gen(3)), sample_video_ids(I, X, K, _gen(3)))
    assert not torch.equal(sample_video_ids(I, X, K, _gen(3)), sample_video_ids(I, X, K, _gen(4)))


def test_video_fill_rule_d9_when_too_few_unexcluded() -> None:
    I = torch.tensor([[0.05, 0.3, 0.1, 0.2, 0.15, 0.2]])
    X = torch.tensor([[False, True, False, True, True, False]])
    ids = sample_video_ids(I, X, 5, _gen(12))[0].tolist()
    assert set(ids[:3]) == {0, 2, 5}          # every non-excluded token first
    assert ids[3:] == [1, 3]                   # then excluded ones in descending importance


# ------------------------------------------------------------------------------------------ audio chunks
def _reference_chunk_loop(excluded: torch.Tensor, K: int, order: list[int], coin: bool) -> set[int]:
    """Straightforward per-row reading of the official loop (docs/method.md §4 step 9.3)."""
    Q = C * F_A
    visited: list[int] = []
    kept: set[int] = set()
    total = 0
    for ch in order:
        toks = [t for t in range(ch * Q, (ch + 1) * Q) if not bool(excluded[t])]
        if total + len(toks) <= K:
            kept.update(toks)
            total += len(toks)
            visited.append(ch)
            continue
        need = K - total
        left = ch - 1 in visited
        right = ch + 1 in visited
        from_start = left if left != right else coin
        kept.update(toks[:need] if from_start else toks[len(toks) - need:])
        break
    return kept


def test_audio_chunks_match_reference_loop_property() -> None:
    g = _gen(13)
    R = 400
    I = torch.softmax(torch.randn(R, L_A, generator=g), -1)
    cand = candidate_ids(I, K)
    p = torch.rand(R, 1, generator=g)  # per-row exclusion strength, from none to heavy
    X = torch.zeros(R, L_A, dtype=torch.bool).scatter(1, cand, torch.rand(R, K, generator=g) < p)
    Kc = T_A // C
    order = torch.stack([torch.randperm(Kc, generator=g) for _ in range(R)])
    coin = torch.rand(R, generator=g) < 0.5
    ids = select_audio_chunks_given_order(I, X, K, order=order, coin=coin, time_tokens=T_A,
                                          freq_tokens=F_A, chunk=C)
    assert ids.shape == (R, K)
    for r in range(R):
        ref = _reference_chunk_loop(X[r], K, order[r].tolist(), bool(coin[r]))
        assert set(ids[r].tolist()) == ref, f"row {r}"
        assert len(ref) == K


def test_audio_chunks_without_exclusion_are_whole_contiguous_time_chunks() -> None:
    g = _gen(14)
    R = 200
    I = torch.softmax(torch.randn(R, L_A, generator=g), -1)
    X = torch.zeros(R, L_A, dtype=torch.bool)
    ids = select_audio_chunks(I, X, K, time_tokens=T_A, freq_tokens=F_A, chunk=C, generator=g)
    Q = C * F_A
    for r in range(R):
        s = set(ids[r].tolist())
        assert len(s) == K
        chunks = {t // Q for t in s}
        assert len(chunks) == K // Q
        for ch in chunks:  # every touched chunk is taken whole: all c time rows x all F_a bands
            assert set(range(ch * Q, (ch + 1) * Q)) <= s


def test_audio_partial_chunk_is_contiguous_and_time_ordered() -> None:
    """With a budget that is not a multiple of the chunk size, the partial chunk is a time prefix/suffix."""
    g = _gen(15)
    R, Kodd = 300, 13
    I = torch.softmax(torch.randn(R, L_A, generator=g), -1)
    X = torch.zeros(R, L_A, dtype=torch.bool)
    ids = select_audio_chunks(I, X, Kodd, time_tokens=T_A, freq_tokens=F_A, chunk=C, generator=g)
    Q = C * F_A
    for r in range(R):
        s = set(ids[r].tolist())
        assert len(s) == Kodd
        for ch in {t // Q for t in s}:
            part = sorted(t - ch * Q for t in s if t // Q == ch)
            assert part == list(range(len(part))) or part == list(range(Q - len(part), Q))


def test_audio_chunk_order_favours_important_chunks() -> None:
    w = torch.tensor([[8.0, 1.0, 1.0, 0.0]]).repeat(5000, 1)
    first = weighted_permutation(w, _gen(16))[:, 0]
    freq = torch.bincount(first, minlength=4).float() / first.numel()
    torch.testing.assert_close(freq, torch.tensor([0.8, 0.1, 0.1, 0.0]), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------------ selector
def _proj(n: int, h: int = 2, d: int = 8, seed: int = 17) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"q_a": torch.randn(n, h, L_A, d, generator=g), "k_a": torch.randn(n, h, L_A, d, generator=g),
            "q_v": torch.randn(n, h, L_V, d, generator=g), "k_v": torch.randn(n, h, L_V, d, generator=g)}


def test_keep_counts_use_exact_arithmetic() -> None:
    assert keep_count(40, 0.2) == 8 and int(40 * (1 - 0.8)) == 7  # D11
    assert keep_count(784, 0.5) == 392 and keep_count(512, 0.5) == 256
    sel = PatchSelector(video_tokens=784, audio_time_tokens=64, audio_freq_tokens=8)
    assert (sel.keep_video, sel.keep_audio) == (392, 256)
    with pytest.raises(ValueError):
        PatchSelector(video_tokens=32, audio_time_tokens=7, audio_freq_tokens=4, chunk=2)


def test_first_step_is_deterministic_top_k() -> None:
    sel = PatchSelector(video_tokens=L_V, audio_time_tokens=T_A, audio_freq_tokens=F_A, chunk=C)
    proj = _proj(3)
    a = sel.select(proj=proj, generator=_gen(1))
    b = sel.select(proj=proj, generator=_gen(2))
    assert a.first_step
    assert torch.equal(a.video_ids, b.video_ids) and torch.equal(a.audio_ids, b.audio_ids)
    I_v, I_a = importance_from_projections(proj["q_a"], proj["k_a"], proj["q_v"], proj["k_v"], 0.4)
    assert torch.equal(a.video_ids, candidate_ids(I_v, K))
    assert torch.equal(a.audio_ids, candidate_ids(I_a, K))  # no chunking on the first step
    assert float(a.C_v.abs().sum() + a.C_a.abs().sum()) == 0.0


def test_selector_with_replay_rows() -> None:
    sel = PatchSelector(video_tokens=L_V, audio_time_tokens=T_A, audio_freq_tokens=F_A, chunk=C)
    cur = sel.select(proj=_proj(4), generator=_gen(0))
    past = sel.select(proj=_proj(2, seed=99), generator=_gen(0))
    replay = {"qbar_a": past.qbar_a, "qbar_v": past.qbar_v, "I_v": past.I_v, "I_a": past.I_a,
              "C_v": torch.full((2, L_V), 0.0), "C_a": torch.full((2, L_A), 0.0)}
    replay["C_v"][:, :3] = 1.0  # stored C = 1: these replay tokens must be excluded (fresh draw)
    out = sel.select(proj=_proj(4), replay=replay, generator=_gen(5))
    assert not out.first_step
    assert out.video_ids.shape == (6, K) and out.audio_ids.shape == (6, K)
    assert all(len(set(r.tolist())) == K for r in torch.cat([out.video_ids, out.audio_ids], 1).view(12, K))
    assert not bool(torch.isin(out.video_ids[4:], torch.arange(3)).any())
    assert out.C_v.shape == (4, L_V) and float(out.C_v.max()) > 0
    assert bool(((out.C_v > 0).sum(1) <= K).all())
    torch.testing.assert_close(out.I_v, cur.I_v)
    plus = sel.select(proj=_proj(4), replay={"qbar_a": past.qbar_a, "qbar_v": past.qbar_v},
                      select_replay=False, generator=_gen(5))
    assert plus.video_ids.shape == (4, K)
