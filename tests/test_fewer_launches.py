"""The launch-saving forms of STELLA's selection (issue 27 item 2) give the same bits as the forms they
replaced: the shared candidate mask, the cached index ranges, the suffix count of the audio boundary
chunk and the scalar ``where`` operands. The references below are the replaced code, kept verbatim."""
from __future__ import annotations

import math

import torch

from stella_avalanche.models.avm import matching_pairs
from stella_avalanche.training.selection import (
    PatchSelector,
    candidate_ids,
    candidate_mask,
    rca_probability,
    select_audio_chunks_given_order,
    summary_queries,
)
from stella_avalanche.utils import cached_arange

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the replaced computations
def _weights_ref(I: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    I = I.float()
    return torch.zeros_like(I).scatter_(1, cand, I.gather(1, cand))


def _summary_ref(q: torch.Tensor, I: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    w = _weights_ref(I, cand)
    denom = w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.einsum("nl,nhld->nhd", w, q.float()) / denom[:, None, None]


def _rca_ref(k: torch.Tensor, qbar_buf: torch.Tensor, qbar_cur: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    n, h, _, d = k.shape
    pair = torch.arange(n, device=k.device) % qbar_buf.shape[0]
    delta = qbar_buf.to(k.device).float()[pair] - qbar_cur.float()
    prob = torch.sigmoid(torch.einsum("nhld,nhd->nhl", k.float(), delta) / math.sqrt(d)).mean(dim=1)
    return prob * torch.zeros_like(prob, dtype=torch.bool).scatter_(1, cand, True)


def _chunks_ref(I_a, excluded, K, *, order, coin, time_tokens, freq_tokens, chunk):
    R, L = excluded.shape
    Kc, Q = time_tokens // chunk, chunk * freq_tokens
    dev = excluded.device
    rows = torch.arange(R, device=dev)
    ranks = torch.arange(Kc, device=dev).expand(R, Kc)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    free = (~excluded).view(R, Kc, Q)
    u = free.sum(dim=-1)
    ccum = torch.cumsum(u.gather(1, order), dim=1)
    over = ccum > K
    has_b = over.any(dim=1)
    r_star = torch.where(has_b, over.int().argmax(dim=1), torch.full_like(has_b, Kc, dtype=torch.long))
    r_idx = r_star.clamp(max=Kc - 1)
    b = order.gather(1, r_idx[:, None]).squeeze(1)
    prev = torch.where(r_star > 0, ccum.gather(1, (r_star - 1).clamp(min=0)[:, None]).squeeze(1),
                       torch.zeros_like(r_star))
    need = K - prev
    left = (b > 0) & (rank.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1) < r_star)
    right = (b < Kc - 1) & (rank.gather(1, (b + 1).clamp(max=Kc - 1)[:, None]).squeeze(1) < r_star)
    from_start = torch.where(left ^ right, left, coin.to(dev))
    g = free[rows, b]
    fwd = torch.cumsum(g.int(), dim=1)
    bwd = torch.flip(torch.cumsum(torch.flip(g.int(), dims=[1]), dim=1), dims=[1])
    keep_b = g & (torch.where(from_start[:, None], fwd, bwd) <= need[:, None])
    keep = free & (rank < r_star[:, None])[..., None]
    keep[rows, b] = torch.where(has_b[:, None], keep_b, keep[rows, b])
    keep = keep.view(R, L)
    n_keep = keep.sum(dim=1)
    secondary = torch.argsort(I_a.float(), dim=1, descending=True, stable=True)
    primary = (~keep).gather(1, secondary).int()
    order_all = secondary.gather(1, torch.argsort(primary, dim=1, stable=True))
    kept_sorted = torch.argsort((~keep).int(), dim=1, stable=True)
    pos = torch.arange(K, device=dev).expand(R, K)
    return torch.where(pos < n_keep[:, None], kept_sorted[:, :K], order_all[:, :K])


# ------------------------------------------------------------------ tests
def test_candidate_mask_paths_equal_the_scatter_forms_bit_for_bit() -> None:
    g = _gen(0)
    n, m, h, L, d, K = 7, 3, 4, 40, 8, 17
    q, k = torch.randn(n, h, L, d, generator=g), torch.randn(n, h, L, d, generator=g)
    I = torch.softmax(torch.randn(n, L, generator=g), -1)
    I[0, :5] = 0.0  # zero importances among the candidates too
    cand = candidate_ids(I, K)
    mask = candidate_mask(cand, L)
    assert mask.dtype == torch.bool and mask.sum().item() == n * K
    qbar = summary_queries(q, I, cand, mask=mask)
    assert torch.equal(qbar, _summary_ref(q, I, cand))
    assert torch.equal(summary_queries(q, I, cand), qbar)  # without a mask: built inside
    qbuf = torch.randn(m, h, d, generator=g)
    C = rca_probability(k, qbuf, qbar, cand, mask=mask)
    assert torch.equal(C, _rca_ref(k, qbuf, qbar, cand))
    assert torch.equal(rca_probability(k, qbuf, qbar, cand), C)


def test_audio_chunk_selection_equals_the_replaced_formulas_bit_for_bit() -> None:
    g = _gen(1)
    T, F, c = 16, 4, 4
    L, Kc = T * F, T // c
    for R, K, strength in ((50, L // 2, 0.0), (50, L // 2, 0.4), (50, L // 2, 0.9), (30, 3 * L // 4, 0.6)):
        I = torch.softmax(torch.randn(R, L, generator=g), -1)
        X = torch.rand(R, L, generator=g) < strength
        order = torch.argsort(torch.rand(R, Kc, generator=g), dim=1)
        coin = torch.rand(R, generator=g) < 0.5
        kw = dict(order=order, coin=coin, time_tokens=T, freq_tokens=F, chunk=c)
        assert torch.equal(select_audio_chunks_given_order(I, X, K, **kw), _chunks_ref(I, X, K, **kw))


def test_selector_scores_equal_the_unshared_computation() -> None:
    """:meth:`PatchSelector.score` with the shared masks against the per-call forms it replaced."""
    g = _gen(2)
    sel = PatchSelector(video_tokens=32, audio_time_tokens=8, audio_freq_tokens=4, chunk=2)
    n, m, h, d = 5, 3, 2, 6
    proj = {key: torch.randn(n, h, 32, d, generator=g) for key in ("q_a", "k_a", "q_v", "k_v")}
    replay = {"qbar_a": torch.randn(m, h, d, generator=g), "qbar_v": torch.randn(m, h, d, generator=g)}
    s = sel.score(proj=proj, replay=replay)
    qv, qa = _summary_ref(proj["q_v"], s.I_v, s.cand_v), _summary_ref(proj["q_a"], s.I_a, s.cand_a)
    assert torch.equal(s.qbar_v, qv) and torch.equal(s.qbar_a, qa)
    assert torch.equal(s.C_v, _rca_ref(proj["k_v"], replay["qbar_a"], qa, s.cand_v))
    assert torch.equal(s.C_a, _rca_ref(proj["k_a"], replay["qbar_v"], qv, s.cand_a))


def test_cached_arange_is_shared_and_outside_inference_mode() -> None:
    with torch.inference_mode():
        a = cached_arange(11, torch.device("cpu"))
    assert not a.is_inference()
    assert a is cached_arange(11, torch.device("cpu"))
    assert torch.equal(a, torch.arange(11))
    # matching_pairs hands out a clone, never the cached range
    for b in (2, 9):
        _, vidx, _ = matching_pairs(b, generator=_gen(3))
        assert vidx.data_ptr() != cached_arange(b, torch.device("cpu")).data_ptr()
    assert torch.equal(cached_arange(9, torch.device("cpu")), torch.arange(9))
