"""STELLA patch selection: LPIS importance, replay-guided correlation (RCA) and the probabilistic
video / audio-chunk selection (``docs/method.md`` §4 steps 4-9, §5, D8, D9, D10, D11, D13).

Every function is batched over rows (no per-sample Python loops), computes in fp32 and draws all of its
randomness from an optional ``torch.Generator`` so that a run is reproducible. Token orders follow the
backbone: video frame-major (``t*G*G + r*G + c``), audio time-major (``t*F_a + f``).

Shapes used below: ``N`` current rows, ``M`` replay rows, ``R = N + M``, ``H`` AVM heads, ``d`` head dim,
``L_V`` / ``L_A`` video / audio tokens, ``K`` kept tokens.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Optional

import torch
from torch import Tensor

from stella_avalanche.utils import cached_arange as _arange

__all__ = [
    "keep_count",
    "patch_importance",
    "importance_from_projections",
    "candidate_ids",
    "uniform_candidate_ids",
    "summary_queries",
    "rca_probability",
    "bernoulli_exclusion",
    "sample_video_ids",
    "select_audio_chunks",
    "select_audio_chunks_given_order",
    "weighted_permutation",
    "candidate_mask",
    "PatchSelector",
    "SelectionResult",
    "Scores",
]


def keep_count(num_tokens: int, ratio: float) -> int:
    """``floor(num_tokens * ratio)`` in exact rational arithmetic (D11).

    The ratio is read through its shortest decimal representation (``0.8`` -> 4/5), so e.g.
    ``keep_count(40, 0.2) == 8`` where ``int(40 * (1 - 0.8))`` in floating point gives 7.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return int(Fraction(repr(float(ratio))) * int(num_tokens))


@functools.lru_cache(maxsize=64)
def _pair_index(n: int, m: int, device: torch.device) -> Tensor:
    """(n,) int64 ``arange(n) % m``: current row n is paired with replay item n mod m (D8); built
    once per shape (one launch less per RCA map and step), shared read-only like :func:`_arange`."""
    with torch.inference_mode(False), torch.no_grad():
        return _arange(n, device) % m


def _generator_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _rand(shape: tuple[int, ...], *, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Uniform [0, 1) fp32 noise drawn on the generator's device, then moved to ``device``."""
    gdev = _generator_device(generator, device)
    # non-blocking: a host-to-device copy from pageable memory is staged at once, no stream wait
    return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float32).to(device, non_blocking=True)


def _log_exponential(shape: tuple[int, ...], *, generator: Optional[torch.Generator],
                     device: torch.device) -> Tensor:
    """``log E`` with ``E ~ Exp(1)``, drawn as ``log(-log U)``, ``U`` in (0, 1)."""
    u = _rand(shape, generator=generator, device=device)
    tiny = torch.finfo(torch.float32).tiny
    e = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)   # E = -log U > 0
    return torch.log(e)


def _safe_log_weight(w: Tensor) -> Tensor:
    """``log w`` with zero weights mapped to the log of the smallest normal float.

    Callers decide separately which entries may be drawn at all; this only keeps the keys finite so
    that positive-weight entries always rank above (underflowed) zero-weight ones.
    """
    return torch.log(w.float().clamp_min(torch.finfo(torch.float32).tiny))


# ---------------------------------------------------------------------------------------------
# step 4: LPIS importance
# ---------------------------------------------------------------------------------------------
def patch_importance(S_av: Tensor, S_va: Tensor, tau: float, *, head_chunk: int = 1) -> tuple[Tensor, Tensor]:
    """Localised patch importance from raw AVM cross-attention logits (§4 step 4).

    ``I_v[n, j] = 1/(H L_A) sum_h sum_i softmax_j(S_av[n,h,i,:]/tau)[j]`` and symmetrically ``I_a``.

    :param S_av: (N, H, L_A, L_V) audio-query / video-key logits (already scaled by 1/sqrt(d)).
    :param S_va: (N, H, L_V, L_A) video-query / audio-key logits.
    :param tau: softmax temperature tau_att (0.4 in the paper).
    :param head_chunk: heads processed at once; bounds the fp32 softmax temporaries.
    :return: ``(I_v (N, L_V), I_a (N, L_A))`` fp32, each row summing to 1.
    """
    if S_av.ndim != 4 or S_va.ndim != 4:
        raise ValueError(f"S_av/S_va must be (N,H,L,L'), got {tuple(S_av.shape)} / {tuple(S_va.shape)}")
    n, h, l_a, l_v = S_av.shape
    if tuple(S_va.shape) != (n, h, l_v, l_a):
        raise ValueError(f"S_va shape {tuple(S_va.shape)} does not match S_av {tuple(S_av.shape)}")
    I_v = torch.zeros(n, l_v, dtype=torch.float32, device=S_av.device)
    I_a = torch.zeros(n, l_a, dtype=torch.float32, device=S_av.device)
    step = max(1, int(head_chunk))
    for h0 in range(0, h, step):  # loop over head chunks only (memory bound), never over samples
        I_v += torch.softmax(S_av[:, h0:h0 + step].float() / tau, dim=-1).sum(dim=(1, 2))
        I_a += torch.softmax(S_va[:, h0:h0 + step].float() / tau, dim=-1).sum(dim=(1, 2))
    return I_v / (h * l_a), I_a / (h * l_v)


def importance_from_projections(q_a: Tensor, k_a: Tensor, q_v: Tensor, k_v: Tensor, tau: float, *,
                                head_chunk: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`patch_importance` computed from AVM projections without materialising all heads.

    :param q_a, k_a: (N, H, L_A, d); :param q_v, k_v: (N, H, L_V, d).
    :return: ``(I_v (N, L_V), I_a (N, L_A))`` fp32.
    """
    n, h, l_a, d = q_a.shape
    l_v = q_v.shape[2]
    scale = 1.0 / math.sqrt(d)
    I_v = torch.zeros(n, l_v, dtype=torch.float32, device=q_a.device)
    I_a = torch.zeros(n, l_a, dtype=torch.float32, device=q_a.device)
    step = max(1, int(head_chunk))
    for h0 in range(0, h, step):
        sl = slice(h0, h0 + step)
        s_av = torch.matmul(q_a[:, sl].float(), k_v[:, sl].float().transpose(-1, -2)) * scale
        I_v += torch.softmax(s_av / tau, dim=-1).sum(dim=(1, 2))
        del s_av
        s_va = torch.matmul(q_v[:, sl].float(), k_a[:, sl].float().transpose(-1, -2)) * scale
        I_a += torch.softmax(s_va / tau, dim=-1).sum(dim=(1, 2))
        del s_va
    return I_v / (h * l_a), I_a / (h * l_v)


# ---------------------------------------------------------------------------------------------
# steps 5, 6, 8: candidates, summary queries, RCA
# ---------------------------------------------------------------------------------------------
def candidate_ids(I: Tensor, K: int) -> Tensor:
    """Indices of the ``K`` largest importances per row, in descending importance (§4 step 5).

    :param I: (N, L). :return: (N, K) int64.
    """
    if not 0 < K <= I.shape[-1]:
        raise ValueError(f"K={K} must be in [1, {I.shape[-1]}]")
    return torch.topk(I.float(), K, dim=-1, largest=True, sorted=True).indices


def uniform_candidate_ids(rows: int, L: int, K: int, *, generator: Optional[torch.Generator] = None,
                          device: torch.device | str = "cpu") -> Tensor:
    """``K`` distinct ids per row drawn uniformly at random: :func:`candidate_ids` of a constant
    importance, its ties broken at random (the ``importance="uniform"`` ablation).

    :return: (rows, K) int64.
    """
    if not 0 < K <= L:
        raise ValueError(f"K={K} must be in [1, {L}]")
    return torch.topk(_rand((rows, L), generator=generator, device=torch.device(device)), K, dim=-1).indices


def candidate_mask(cand: Tensor, L: int) -> Tensor:
    """(N, L) bool, True at the candidate ids ``cand`` (N, K): shared by :func:`summary_queries` and
    :func:`rca_probability` of one modality, so that it is built once per step."""
    return torch.zeros((cand.shape[0], L), dtype=torch.bool, device=cand.device).scatter_(1, cand, True)


def _candidate_weights(I: Tensor, cand: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """(N, L) weights equal to ``I`` on the candidates and 0 elsewhere.

    With the :func:`candidate_mask` at hand one multiply gives the same bits as the scatter of the
    gathered values (``I`` is a finite importance >= 0, so ``I * 0`` is +0 and ``I * 1`` is ``I``).
    """
    I = I.float()
    if mask is not None:
        return I * mask
    return torch.zeros_like(I).scatter_(1, cand, I.gather(1, cand))


def summary_queries(q: Tensor, I: Tensor, cand: Tensor, *, mask: Optional[Tensor] = None) -> Tensor:
    """Importance-weighted mean of the candidates' queries, per head (§4 step 6).

    :param q: (N, H, L, d) queries of one modality.
    :param I: (N, L) that modality's importance.
    :param cand: (N, K) candidate ids.
    :param mask: optional ``candidate_mask(cand, L)`` already built by the caller (same result).
    :return: (N, H, d) fp32.
    """
    w = _candidate_weights(I, cand, mask)                           # (N, L)
    denom = w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (N,)
    return torch.einsum("nl,nhld->nhd", w, q.float()) / denom[:, None, None]


def rca_probability(k: Tensor, qbar_buf: Tensor, qbar_cur: Tensor, cand: Tensor, *,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Replay-guided correlation probability (§4 step 8.3 / 8.4), via the linear identity.

    ``C[n, j] = 1/H sum_h sigmoid(<k[n,h,j], qbar_buf[n mod M, h] - qbar_cur[n, h]> / sqrt(d))`` for
    ``j`` in ``cand[n]``, 0 elsewhere. For video RCA pass ``k = k_v`` with the *audio* summary queries,
    for audio RCA ``k = k_a`` with the *video* summary queries. Current row ``n`` is paired with replay
    item ``n mod M`` (D8), so ``qbar_buf`` may have fewer rows than ``k``.

    :param k: (N, H, L, d) current keys.
    :param qbar_buf: (M, H, d) stored summary queries of the replay items, M >= 1.
    :param qbar_cur: (N, H, d) current summary queries of the other modality.
    :param cand: (N, K) candidate ids.
    :param mask: optional ``candidate_mask(cand, L)`` already built by the caller (same result).
    :return: (N, L) fp32 in [0, 1], zero outside the candidates.
    """
    n, h, L, d = k.shape
    m = qbar_buf.shape[0]
    if m < 1:
        raise ValueError("rca_probability needs at least one replay item")
    pair = _pair_index(n, m, k.device)
    delta = qbar_buf.to(k.device).float()[pair] - qbar_cur.float()          # (N, H, d)
    logits = torch.einsum("nhld,nhd->nhl", k.float(), delta) / math.sqrt(d)  # (N, H, L)
    prob = torch.sigmoid(logits).mean(dim=1)                                 # (N, L)
    return prob * (candidate_mask(cand, L) if mask is None else mask)


# ---------------------------------------------------------------------------------------------
# step 9: exclusion and selection
# ---------------------------------------------------------------------------------------------
def bernoulli_exclusion(C: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``X ~ Bernoulli(C)`` elementwise (§4 step 9.1). Entries with ``C == 0`` are never excluded.

    :param C: (R, L) probabilities. :return: (R, L) bool.
    """
    return _rand(tuple(C.shape), generator=generator, device=C.device) < C.float()


def weighted_permutation(weights: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Full weighted random permutation of each row (exponential top-k keeping every entry).

    The first element is drawn with probability proportional to its weight, the next among the
    remaining ones, and so on (sampling without replacement). Zero weights come last.

    :param weights: (R, K) non-negative. :return: (R, K) int64 permutation.
    """
    keys = _safe_log_weight(weights) - _log_exponential(tuple(weights.shape), generator=generator,
                                                        device=weights.device)
    return torch.argsort(keys, dim=-1, descending=True, stable=True)


def sample_video_ids(I_v: Tensor, excluded: Tensor, K: int,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Draw ``K`` video ids per row without replacement, with weights ``I_v * (1 - X)`` (§4 step 9.2).

    Vectorised as exponential top-k: key = ``log w - log E``, ``E ~ Exp(1)``. Non-excluded tokens always
    come first (zero-importance ones after the positive ones). D9: if fewer than ``K`` tokens are
    non-excluded (only possible for keep ratios above 0.5), the remaining slots are filled with excluded
    tokens in descending importance.

    :param I_v: (R, L_V) importance. :param excluded: (R, L_V) bool. :param K: tokens to keep.
    :return: (R, K) int64 ids, distinct within a row; the non-excluded draws in key order first.
    """
    if excluded.shape != I_v.shape:
        raise ValueError(f"excluded {tuple(excluded.shape)} does not match I_v {tuple(I_v.shape)}")
    if not 0 < K <= I_v.shape[-1]:
        raise ValueError(f"K={K} must be in [1, {I_v.shape[-1]}]")
    I = I_v.float()
    avail = ~excluded
    keys = _safe_log_weight(I) - _log_exponential(tuple(I.shape), generator=generator, device=I.device)
    keys = keys.masked_fill(excluded, float("-inf"))
    drawn = torch.topk(keys, K, dim=-1).indices                                  # (R, K)
    fill = torch.topk(I.masked_fill(avail, float("-inf")), K, dim=-1).indices     # excluded, by I desc
    n_avail = avail.sum(dim=-1, keepdim=True)                                     # (R, 1)
    pos = _arange(K, I.device).expand_as(drawn)
    # slot p < n_avail takes the p-th draw; later slots take excluded tokens in importance order
    src = torch.where(pos < n_avail, pos, K + pos - n_avail)
    return torch.cat([drawn, fill], dim=-1).gather(1, src)


def _check_audio_layout(L_A: int, time_tokens: int, freq_tokens: int, chunk: int) -> None:
    if time_tokens * freq_tokens != L_A:
        raise ValueError(f"audio tokens {L_A} != time_tokens {time_tokens} x freq_tokens {freq_tokens}")
    if chunk < 1 or time_tokens % chunk != 0:
        raise ValueError(f"chunk {chunk} must divide the audio time tokens {time_tokens}")


def select_audio_chunks_given_order(I_a: Tensor, excluded: Tensor, K: int, *, order: Tensor,
                                    coin: Tensor, time_tokens: int, freq_tokens: int,
                                    chunk: int) -> Tensor:
    """Audio time-chunk selection (§4, 8-step vectorised formulation) for a given chunk visiting order.

    :param I_a: (R, L_A) importance (used only for the D9 fill when fewer than ``K`` are free).
    :param excluded: (R, L_A) bool exclusion mask X.
    :param K: audio tokens to keep, K_A.
    :param order: (R, K_c) chunk visiting order pi (a permutation per row).
    :param coin: (R,) bool side coin: True = keep the beginning of the boundary chunk when neither or
        both of its neighbours were visited before it.
    :param time_tokens, freq_tokens: T_a, F_a (L_A = T_a F_a, time-major tokens).
    :param chunk: c, time tokens per chunk.
    :return: (R, K) int64 kept ids (kept tokens first in ascending position, then D9 fill).
    """
    R, L = excluded.shape
    _check_audio_layout(L, time_tokens, freq_tokens, chunk)
    Kc, Q = time_tokens // chunk, chunk * freq_tokens
    dev = excluded.device
    rows = _arange(R, dev)
    ranks = _arange(Kc, dev).expand(R, Kc)
    # 2. rank = inverse permutation of the visiting order
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    # 3. free tokens and their cumulative count in visiting order
    free = (~excluded).view(R, Kc, Q)
    u = free.sum(dim=-1)                                            # (R, Kc)
    ccum = torch.cumsum(u.gather(1, order), dim=1)                  # (R, Kc)
    # 4. boundary chunk: first visit whose cumulative count overflows K
    over = ccum > K
    has_b = over.any(dim=1)
    r_star = torch.where(has_b, over.int().argmax(dim=1), Kc)
    r_idx = r_star.clamp(max=Kc - 1)
    b = order.gather(1, r_idx[:, None]).squeeze(1)                  # (R,)
    prev = torch.where(r_star > 0, ccum.gather(1, (r_star - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    need = K - prev                                                 # (R,)
    # 5. side: continue from the neighbour visited before the boundary chunk
    left = (b > 0) & (rank.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1) < r_star)
    right = (b < Kc - 1) & (rank.gather(1, (b + 1).clamp(max=Kc - 1)[:, None]).squeeze(1) < r_star)
    from_start = torch.where(left ^ right, left, coin.to(dev))
    # 6. partial boundary chunk
    g = free[rows, b]                                               # (R, Q)
    fwd = torch.cumsum(g, dim=1)                                    # free tokens up to and including q
    bwd = fwd[:, -1:] - fwd + g                                     # from q to the end (exact integers)
    keep_b = g & (torch.where(from_start[:, None], fwd, bwd) <= need[:, None])
    # 7. keep mask
    keep = free & (rank < r_star[:, None])[..., None]
    keep[rows, b] = torch.where(has_b[:, None], keep_b, keep[rows, b])
    keep = keep.view(R, L)
    # 8. ids: kept tokens first (ascending position); then (D9) excluded tokens by importance
    # by construction n_keep <= K (== K whenever at least K tokens are free); no host-side check so
    # that the step stays free of device syncs (tests compare against a reference loop)
    n_keep = keep.sum(dim=1)
    secondary = torch.argsort(I_a.float(), dim=1, descending=True, stable=True)
    primary = (~keep).gather(1, secondary).int()
    order_all = secondary.gather(1, torch.argsort(primary, dim=1, stable=True))
    # kept ids in ascending position for readability (stable argsort of ~keep)
    kept_sorted = torch.argsort((~keep).int(), dim=1, stable=True)
    pos = _arange(K, dev).expand(R, K)
    return torch.where(pos < n_keep[:, None], kept_sorted[:, :K], order_all[:, :K])


def select_audio_chunks(I_a: Tensor, excluded: Tensor, K: int, *, time_tokens: int, freq_tokens: int,
                        chunk: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Select exactly ``K`` audio tokens as contiguous whole-frequency time chunks (§4 step 9.3).

    Chunks of ``chunk`` time tokens (all ``freq_tokens`` bands) are visited in a weighted random order
    (chunk score = mean over its time rows of the summed importance); every non-excluded token of a
    visited chunk is taken until the budget would overflow; the boundary chunk contributes only the
    tokens that still fit, from the side touching an already visited neighbour (fair coin otherwise).

    :param I_a: (R, L_A) importance (stored ``I_a`` for replay rows).
    :param excluded: (R, L_A) bool exclusion mask.
    :param K: tokens to keep (K_A).
    :param time_tokens, freq_tokens: T_a, F_a. :param chunk: c.
    :param generator: source of the chunk order and side coins.
    :return: (R, K) int64 ids.
    """
    R, L = I_a.shape
    _check_audio_layout(L, time_tokens, freq_tokens, chunk)
    Kc = time_tokens // chunk
    score = I_a.float().view(R, Kc, chunk, freq_tokens).sum(dim=-1).mean(dim=-1)   # 1. (R, Kc)
    order = weighted_permutation(score, generator)                                  # 2.
    coin = _rand((R,), generator=generator, device=I_a.device) < 0.5
    return select_audio_chunks_given_order(I_a, excluded, K, order=order, coin=coin,
                                           time_tokens=time_tokens, freq_tokens=freq_tokens,
                                           chunk=chunk)


# ---------------------------------------------------------------------------------------------
# the selector object (steps 4-9)
# ---------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """Output of :meth:`PatchSelector.score` for R rows: importance ``I_v`` (R, L_V), ``I_a``
    (R, L_A); correlation ``C_v``, ``C_a`` (same shapes, zero off the candidates and without
    replay); summary queries ``qbar_a``, ``qbar_v`` (R, H, d); candidates ``cand_v`` (R, K_V),
    ``cand_a`` (R, K_A)."""

    I_v: Tensor
    I_a: Tensor
    C_v: Tensor
    C_a: Tensor
    qbar_a: Tensor
    qbar_v: Tensor
    cand_v: Tensor
    cand_a: Tensor


@dataclass
class SelectionResult(Scores):
    """Output of :meth:`PatchSelector.select`: the :class:`Scores` of the N current rows (what the
    buffer stores; C is zero on the first step) and the kept ids ``video_ids`` (R', K_V),
    ``audio_ids`` (R', K_A), with R' = N + M when replay rows were selected, else N. ``first_step``
    is True when no replay statistics were given (deterministic top-K path).
    """

    video_ids: Tensor
    audio_ids: Tensor
    first_step: bool


class PatchSelector:
    """STELLA's patch selection (§4 steps 4-9) with exact integer token counts (D11).

    :param keep_ratio_video: kappa_v, fraction of video tokens selected (0.5).
    :param keep_ratio_audio: kappa_a, fraction of audio tokens selected (0.5).
    :param chunk: c, audio chunk length in time tokens (4).
    :param tau: LPIS softmax temperature tau_att (0.4).
    :param video_tokens: L_V.
    :param audio_time_tokens: T_a.
    :param audio_freq_tokens: F_a.
    :param head_chunk: AVM heads processed at once when computing importance (memory bound).
    :param importance: ``"avm"`` (LPIS, the method) or ``"uniform"`` (ablation): every token of a
        modality gets importance ``1/L``, candidates are a uniformly random ``K``-subset, so the video
        draw is uniform and the audio chunks are visited in uniform random order.
    :param rca: replay-guided exclusion (the method); ``False`` (ablation) sets ``C = 0``: no token
        is ever excluded and no exclusion coin is drawn.
    """

    def __init__(self, *, keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5, chunk: int = 4,
                 tau: float = 0.4, video_tokens: int, audio_time_tokens: int, audio_freq_tokens: int,
                 head_chunk: int = 1, importance: str = "avm", rca: bool = True) -> None:
        if importance not in ("avm", "uniform"):
            raise ValueError(f"importance must be 'avm' or 'uniform', got {importance!r}")
        self.importance = importance
        self.rca = bool(rca)
        self.video_tokens = int(video_tokens)
        self.audio_time_tokens = int(audio_time_tokens)
        self.audio_freq_tokens = int(audio_freq_tokens)
        self.audio_tokens = self.audio_time_tokens * self.audio_freq_tokens
        self.chunk = int(chunk)
        self.tau = float(tau)
        self.head_chunk = int(head_chunk)
        _check_audio_layout(self.audio_tokens, self.audio_time_tokens, self.audio_freq_tokens, self.chunk)
        self.keep_video = keep_count(self.video_tokens, keep_ratio_video)
        self.keep_audio = keep_count(self.audio_tokens, keep_ratio_audio)
        if self.keep_video < 1 or self.keep_audio < 1:
            raise ValueError(f"keep ratios select no token: K_V={self.keep_video}, K_A={self.keep_audio}")
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")

    def __repr__(self) -> str:
        return (f"PatchSelector(K_V={self.keep_video}/{self.video_tokens}, K_A={self.keep_audio}/"
                f"{self.audio_tokens}, chunk={self.chunk}, tau={self.tau}, importance={self.importance}, "
                f"rca={self.rca})")

    def score(self, *, proj: Mapping[str, Tensor], replay: Optional[Mapping[str, Tensor]] = None,
              generator: Optional[torch.Generator] = None) -> Scores:
        """Steps 4-6 and 8 for the rows of ``proj``: importance, candidates, summary queries and RCA.

        The current rows' path (:meth:`select`) and the D2 refresh of replay rows (:meth:`rescore`)
        both score through here.

        :param proj: AVM projections ``q_a``, ``k_a`` (N, H, L_A, d) and ``q_v``, ``k_v`` (N, H, L_V, d).
        :param replay: ``qbar_a``, ``qbar_v`` (M, H, d) that row n is compared with (item n mod M,
            D8); None = no RCA (the first step): C = 0.
        :param generator: source of the random candidates of ``importance="uniform"`` (the method
            draws nothing here).
        """
        q_a, k_a, q_v, k_v = (proj[k] for k in ("q_a", "k_a", "q_v", "k_v"))
        if q_v.shape[2] != self.video_tokens or q_a.shape[2] != self.audio_tokens:
            raise ValueError(f"projections have L_V={q_v.shape[2]}, L_A={q_a.shape[2]}; selector expects "
                             f"{self.video_tokens}, {self.audio_tokens}")
        if self.importance == "avm":
            I_v, I_a = importance_from_projections(q_a, k_a, q_v, k_v, self.tau, head_chunk=self.head_chunk)
            cand_v = candidate_ids(I_v, self.keep_video)
            cand_a = candidate_ids(I_a, self.keep_audio)
        else:  # ablation: equal importance, ties broken uniformly at random
            n, dev = q_v.shape[0], q_v.device
            I_v = torch.full((n, self.video_tokens), 1.0 / self.video_tokens, device=dev)
            I_a = torch.full((n, self.audio_tokens), 1.0 / self.audio_tokens, device=dev)
            cand_v = uniform_candidate_ids(n, self.video_tokens, self.keep_video, generator=generator, device=dev)
            cand_a = uniform_candidate_ids(n, self.audio_tokens, self.keep_audio, generator=generator, device=dev)
        # each modality's candidate mask serves its summary queries and its RCA map
        mask_v, mask_a = candidate_mask(cand_v, self.video_tokens), candidate_mask(cand_a, self.audio_tokens)
        qbar_v = summary_queries(q_v, I_v, cand_v, mask=mask_v)
        qbar_a = summary_queries(q_a, I_a, cand_a, mask=mask_a)
        if replay is not None and self.rca:  # step 8 (D13: both maps from the candidate sets)
            C_v = rca_probability(k_v, replay["qbar_a"], qbar_a, cand_v, mask=mask_v)
            C_a = rca_probability(k_a, replay["qbar_v"], qbar_v, cand_a, mask=mask_a)
        else:  # first step, or the ablation without RCA: C = 0, nothing is excluded
            C_v, C_a = torch.zeros_like(I_v), torch.zeros_like(I_a)
        return Scores(I_v, I_a, C_v, C_a, qbar_a, qbar_v, cand_v, cand_a)

    def rescore(self, *, proj: Mapping[str, Tensor], qbar_a: Tensor, qbar_v: Tensor) -> dict[str, Tensor]:
        """D2 option: I and C of M stored rows recomputed from their current projections, C against
        the stored summary queries of another replay item (item m+1 mod M).

        :param proj: the replay rows' projections (as in :meth:`score`, M rows).
        :param qbar_a, qbar_v: (M, H, d) their stored summary queries.
        :return: ``I_v``, ``I_a``; with M >= 2 also ``C_v``, ``C_a`` (one item has no other to pair with).
        """
        m = qbar_a.shape[0]
        other = (_arange(m, qbar_a.device) + 1) % m
        pair = {"qbar_a": qbar_a[other], "qbar_v": qbar_v[other]} if m >= 2 else None
        s = self.score(proj=proj, replay=pair)
        out = {"I_v": s.I_v, "I_a": s.I_a}
        if pair is not None:
            out.update(C_v=s.C_v, C_a=s.C_a)
        return out

    def select(self, *, proj: Mapping[str, Tensor], replay: Optional[Mapping[str, Tensor]] = None,
               select_replay: bool = True, generator: Optional[torch.Generator] = None) -> SelectionResult:
        """Run steps 4-9 for the N current rows and, when ``select_replay``, the M replay rows.

        :param proj: current AVM projections ``q_a``, ``k_a`` (N, H, L_A, d) and ``q_v``, ``k_v``
            (N, H, L_V, d) of the unmasked clips.
        :param replay: stored statistics of the M replay items, or None on the first step (empty
            buffer). Always ``qbar_a``, ``qbar_v`` (M, H, d) for RCA; with ``select_replay`` also
            ``I_v``, ``C_v`` (M, L_V) and ``I_a``, ``C_a`` (M, L_A), used as stored (D2).
        :param select_replay: False for STELLA+ (replay rows enter as stored patches, §5): the ids
            are returned for the current rows only.
        :param generator: source of all draws (exclusion, video sampling, chunk order, side coins).
        """
        s = self.score(proj=proj, replay=replay, generator=generator)
        I_v, I_a, C_v, C_a = s.I_v, s.I_a, s.C_v, s.C_a
        if replay is None:  # step 7: first step, deterministic top-K, audio without chunking
            return SelectionResult(**vars(s), video_ids=s.cand_v, audio_ids=s.cand_a, first_step=True)
        if select_replay:
            dev = I_v.device
            all_I_v = torch.cat([I_v, replay["I_v"].to(dev).float()])
            all_I_a = torch.cat([I_a, replay["I_a"].to(dev).float()])
            all_C_v = torch.cat([C_v, replay["C_v"].to(dev).float()])
            all_C_a = torch.cat([C_a, replay["C_a"].to(dev).float()])
        else:
            all_I_v, all_I_a, all_C_v, all_C_a = I_v, I_a, C_v, C_a
        # step 9
        if self.rca:
            X_v = bernoulli_exclusion(all_C_v, generator)
            X_a = bernoulli_exclusion(all_C_a, generator)
        else:  # stored C of replay rows are ignored too (they are 0 when stored by this variant)
            X_v = torch.zeros(all_C_v.shape, dtype=torch.bool, device=all_C_v.device)
            X_a = torch.zeros(all_C_a.shape, dtype=torch.bool, device=all_C_a.device)
        video_ids = sample_video_ids(all_I_v, X_v, self.keep_video, generator)
        audio_ids = select_audio_chunks(all_I_a, X_a, self.keep_audio, time_tokens=self.audio_time_tokens,
                                        freq_tokens=self.audio_freq_tokens, chunk=self.chunk,
                                        generator=generator)
        return SelectionResult(**vars(s), video_ids=video_ids, audio_ids=audio_ids, first_step=False)
