"""Audio-video matching (AVM) module and its matching objective (docs/method.md §3).

One bidirectional cross-attention layer over the pre-norm features E_a, E_v of a clip (the joint
fusion pass as in the paper, or each modality's own fusion pass: the backbone config's
``avm_features``, :func:`avm_inputs`), followed by a matching head that scores whether audio and video
belong together. STELLA uses its attention logits for patch importance (§4) and trains it with the
matching loss (VAM).

Parameter names follow the official module: ``norm_a``, ``norm_v``, ``to_{a,v}_{q,k,v}``,
``matching_score.pooler.dense``, ``matching_score.fc``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_avalanche.models.cav import init_linear_and_norm_, time_segment
from stella_avalanche.utils import cached_arange

__all__ = ["AVMatching", "matching_pairs", "build_avm", "avm_inputs", "avm_feature_source",
           "token_time_segments"]


def matching_pairs(batch_size: int, *, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Labels and video partners for the matching objective (§3.2 steps 1-2), fully vectorised.

    ``floor(B/2)`` rows are positives (label 1, own video) and the rest negatives, chosen by a random
    permutation; with ``B <= 2`` every row is positive. Negatives are paired by a derangement of the
    negative set built without rejection loops: the negatives, in the random order π of the
    permutation, map π_k -> π_{(k+1) mod m} (a single random cycle; an allowed deviation from the
    official uniform derangement).

    :param batch_size: B.
    :param device: device of the returned tensors.
    :param generator: randomness source (on CPU or on ``device``).
    :returns: labels (B,) float32 in {0, 1}; video_index (B,) int64, the video row paired with
        each audio row (``video_index[n] == n`` iff label 1); negatives (ceil(B/2),) int64 (empty when
        B <= 2), the rows with label 0.
    """
    device = torch.device(device)
    idx = cached_arange(batch_size, device)  # read-only: video_index below is a clone
    if batch_size <= 2:
        return torch.ones(batch_size, device=device), idx.clone(), idx[:0]
    gdev = generator.device if generator is not None else device
    # non-blocking: a host-to-device copy from pageable memory is staged at once, no stream wait
    perm = torch.rand(batch_size, generator=generator, device=gdev).argsort().to(device, non_blocking=True)
    n_pos = batch_size // 2
    neg = perm[n_pos:]  # >= 2 entries, in random order
    video_index = idx.clone()
    video_index[neg] = neg.roll(-1)
    # the cycle has no fixed point, so label 1 <=> own video; derived on the device because
    # ``labels[neg] = 0.0`` copies the Python scalar from the host and waits for the stream
    labels = (video_index == idx).float()
    return labels, video_index, neg


def avm_feature_source(backbone: nn.Module) -> str:
    """``"joint"`` or ``"unimodal"``: the backbone config's ``avm_features`` (``"joint"`` when absent)."""
    return getattr(getattr(backbone, "config", None), "avm_features", "joint")


def avm_inputs(backbone: nn.Module, U_a: Tensor, U_v: Tensor) -> tuple[Tensor, Tensor]:
    """The AVM's inputs for full clips whose rows are paired (audio row n with video row n).

    :param backbone: a :class:`~stella_avalanche.models.cav.CAVMAE` (``fuse_joint`` or ``fuse_unimodal``).
    :param U_a: (B, L_A, D) unimodal codes of unmasked clips; ``U_v`` (B, L_V, D).
    :returns: (E_a (B, L_A, D), E_v (B, L_V, D)), pre-norm. With ``avm_features="joint"`` both come
        from one joint fusion pass over the pair; with ``"unimodal"`` each from its modality's own
        fusion pass, so E_v does not depend on the audio it is paired with.
    """
    if avm_feature_source(backbone) == "unimodal":
        return (backbone.fuse_unimodal(U_a, None, "audio", final_norm=False),
                backbone.fuse_unimodal(U_v, None, "video", final_norm=False))
    return backbone.fuse_joint(U_a, None, U_v, None)


def _paired_inputs(backbone: nn.Module, U_a: Tensor, U_v: Tensor, vidx: Tensor, neg: Tensor,
                   own: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """AVM inputs of audio row n with video row ``vidx[n]`` (rows ``neg`` are the mismatched ones).

    ``own`` = :func:`avm_inputs` of the matched rows, when the caller already has it. Unimodal
    features of a mismatched pair are the rows of its two clips; joint ones need a fusion pass over
    the new pairs (only those rows are recomputed, D12).
    """
    if avm_feature_source(backbone) == "unimodal":
        E_a, E_v = own if own is not None else avm_inputs(backbone, U_a, U_v)
        return E_a, E_v[vidx]
    if own is None:
        return backbone.fuse_joint(U_a, None, U_v[vidx], None)
    E_a, E_v = own[0].clone(), own[1].clone()
    if neg.numel():  # size known on the host: no device sync
        Ea_n, Ev_n = backbone.fuse_joint(U_a[neg], None, U_v[vidx[neg]], None)
        E_a[neg] = Ea_n.to(E_a.dtype)
        E_v[neg] = Ev_n.to(E_v.dtype)
    return E_a, E_v


class _Pooler(nn.Module):
    """``dense`` + tanh (name kept for checkpoint compatibility)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x))


class _MatchingHead(nn.Module):
    """pooler (Linear 2D->2D, tanh) then ``fc`` (Linear 2D->1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pooler = _Pooler(dim)
        self.fc = nn.Linear(dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.pooler(h)).squeeze(-1)


class AVMatching(nn.Module):
    """Bidirectional cross-attention + matching head (§3.1).

    :param dim: feature width D of the backbone.
    :param num_heads: attention heads H (12 for the paper; d_h = D / H).
    :param legacy_pooling: reproduce the official head/token merge bug (D1) for bit-for-bit parity
        with official AVM weights; the default merges heads correctly.
    :param norm_eps: LayerNorm eps (1e-5, D15).
    :param time_bias: added to the cross-attention logits of audio-video token pairs in the same time
        segment, in the matching forward only (``CAVConfig.avm_time_bias``; 0 = paper). Needs
        ``token_segments``.
    :param token_segments: (segment of each audio token (L_A,), segment of each video token (L_V,)),
        int64; kept as non-persistent buffers, so the state dict is the paper's.
    :param pooling: how the attention outputs are pooled for the matching head. ``"mean"`` (the
        paper's): the token mean of each modality's cross-attended values. ``"product"``: the token
        mean of (the token's own value) x (its cross-attended value), so that "this frame shows the
        object and the audio it attends to is loud" is a first-order feature of the pooled vector
        instead of something the head must infer from two averages (docs/diagnostics.md). Same
        parameters either way, so checkpoints load in both modes.
    """

    def __init__(self, dim: int, num_heads: int, *, legacy_pooling: bool = False, norm_eps: float = 1e-5,
                 pooling: str = "mean", time_bias: float = 0.0,
                 token_segments: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AVMatching: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.legacy_pooling = legacy_pooling
        if pooling not in ("mean", "product"):
            raise ValueError(f"AVMatching: pooling={pooling!r} must be 'mean' or 'product'")
        if pooling == "product" and legacy_pooling:
            raise ValueError("AVMatching: legacy_pooling reproduces the official mean pooling only")
        self.pooling = pooling
        if time_bias and token_segments is None:
            raise ValueError("AVMatching: time_bias needs token_segments (the time segment of every token)")
        self.time_bias = float(time_bias)
        if token_segments is not None:
            self.register_buffer("segments_a", token_segments[0].long(), persistent=False)
            self.register_buffer("segments_v", token_segments[1].long(), persistent=False)
        self.norm_a = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_v = nn.LayerNorm(dim, eps=norm_eps)
        self.to_a_q = nn.Linear(dim, dim, bias=False)
        self.to_a_k = nn.Linear(dim, dim, bias=False)
        self.to_a_v = nn.Linear(dim, dim, bias=False)
        self.to_v_q = nn.Linear(dim, dim, bias=False)
        self.to_v_k = nn.Linear(dim, dim, bias=False)
        self.to_v_v = nn.Linear(dim, dim, bias=False)
        self.matching_score = _MatchingHead(2 * dim)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: object, **kwargs: object) -> "AVMatching":
        """AVM sized for a backbone config (``embed_dim``, ``num_heads``, ``norm_eps``; ``avm_pooling``
        when the config has it)."""
        kwargs.setdefault("norm_eps", getattr(config, "norm_eps"))
        kwargs.setdefault("pooling", getattr(config, "avm_pooling", "mean"))
        kwargs.setdefault("time_bias", getattr(config, "avm_time_bias", 0.0))
        if kwargs["time_bias"]:
            kwargs.setdefault("token_segments", token_time_segments(config))
        return cls(getattr(config, "embed_dim"), getattr(config, "num_heads"), **kwargs)  # type: ignore[arg-type]

    def _time_mask(self, l_a: int, l_v: int, dtype: torch.dtype) -> Tensor | None:
        """(L_A, L_V) additive logits: ``time_bias`` where the two tokens share a time segment."""
        if not self.time_bias:
            return None
        if (l_a, l_v) != (self.segments_a.numel(), self.segments_v.numel()):
            raise ValueError(f"AVMatching: time_bias needs full clips ({self.segments_a.numel()} audio, "
                             f"{self.segments_v.numel()} video tokens), got {l_a} / {l_v}")
        same = self.segments_a[:, None] == self.segments_v[None, :]
        return same.to(dtype) * self.time_bias

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear N(0, 0.02) with zero bias; LayerNorm weight 1, bias 0 (§3.1)."""
        init_linear_and_norm_(self)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, E_a: Tensor, E_v: Tensor) -> dict[str, Tensor]:
        """Per-head projections of the normed joint features.

        :param E_a: (B, L_A, D) pre-norm audio features (:func:`avm_inputs`); ``E_v``: (B, L_V, D).
        :returns: dict ``q_a, k_a, v_a`` (B, H, L_A, d_h) from ``norm_a(E_a)`` and ``q_v, k_v, v_v``
            (B, H, L_V, d_h) from ``norm_v(E_v)``. Raw logits are ``q_a @ k_v^T / sqrt(d_h)`` (S_av) and
            ``q_v @ k_a^T / sqrt(d_h)`` (S_va).
        """
        xa, xv = self.norm_a(E_a), self.norm_v(E_v)
        return {
            "q_a": self._heads(self.to_a_q(xa)), "k_a": self._heads(self.to_a_k(xa)),
            "v_a": self._heads(self.to_a_v(xa)),
            "q_v": self._heads(self.to_v_q(xv)), "k_v": self._heads(self.to_v_k(xv)),
            "v_v": self._heads(self.to_v_v(xv)),
        }

    def _merge_mean(self, z: Tensor) -> Tensor:
        """(B, H, L, d_h) -> token mean of the merged (B, L, D) features."""
        b, h, n, dh = z.shape
        if self.legacy_pooling:
            # D1: the official code reshapes without moving the head axis, interleaving heads and tokens
            return z.reshape(b, n, h * dh).mean(dim=1)
        # correct merge: (B, L, H, d_h) -> (B, L, D); mean over tokens commutes with the merge
        return z.mean(dim=2).reshape(b, h * dh)

    def forward(self, E_a: Tensor, E_v: Tensor) -> Tensor:
        """Matching logit per clip.

        :param E_a: (B, L_A, D); ``E_v``: (B, L_V, D).
        :returns: logit (B,).
        """
        p = self.project(E_a, E_v)
        mask = self._time_mask(E_a.shape[1], E_v.shape[1], p["q_a"].dtype)
        # audio queries over video, video queries over audio
        z_a = F.scaled_dot_product_attention(p["q_a"], p["k_v"], p["v_v"], attn_mask=mask)
        z_v = F.scaled_dot_product_attention(p["q_v"], p["k_a"], p["v_a"],
                                             attn_mask=None if mask is None else mask.t())
        if self.pooling == "product":  # each token's own value gates what it read from the other modality
            z_a = z_a * p["v_a"]
            z_v = z_v * p["v_v"]
        h = torch.cat([self._merge_mean(z_v), self._merge_mean(z_a)], dim=-1)  # video first
        return self.matching_score(h)

    def matching_loss(self, backbone: nn.Module, U_a: Tensor, U_v: Tensor, *,
                      own: tuple[Tensor, Tensor] | None = None,
                      generator: torch.Generator | None = None, weight: float = 1.0) -> Tensor:
        """VAM loss (§3.2): BCE-with-logits on matched / deranged audio-video pairs.

        The backbone's fusion runs under ``torch.no_grad`` and its outputs are detached, so the
        gradient reaches only this module's parameters (D7).

        :param backbone: a :class:`~stella_avalanche.models.cav.CAVMAE` (:func:`avm_inputs`).
        :param U_a: (B, L_A, D) unimodal codes of unmasked clips; ``U_v`` (B, L_V, D).
        :param own: optional ``avm_inputs(backbone, U_a, U_v)`` already computed by the caller; reused
            so that only the mismatched pairs need new features (D12).
        :param generator: source of labels and derangement.
        :param weight: λ_m.
        :returns: scalar loss.
        """
        b = U_a.shape[0]
        labels, vidx, neg = matching_pairs(b, device=U_a.device, generator=generator)
        with torch.no_grad():
            E_a, E_v = _paired_inputs(backbone, U_a, U_v, vidx, neg, own)
        logit = self(E_a.detach(), E_v.detach())
        # matching accuracy of this batch, kept as a tensor (no device sync) for per-epoch logging
        self.last_accuracy = ((logit.detach() > 0).float() == labels).float().mean()
        return weight * F.binary_cross_entropy_with_logits(logit.float(), labels)


def token_time_segments(config: object) -> tuple[Tensor, Tensor]:
    """Time segment of every audio and video token of a backbone config: one segment per video frame;
    audio time token t of T_a falls in segment ``t * T // T_a`` (tokens are time-major / frame-major).

    :returns: (L_A,) and (L_V,) int64.
    """
    frames = config.num_frames  # type: ignore[attr-defined]
    return (time_segment(torch.arange(config.num_audio_tokens), "audio", config, frames),  # type: ignore[attr-defined]
            time_segment(torch.arange(config.num_video_tokens), "video", config, frames))  # type: ignore[attr-defined]


def build_avm(backbone: nn.Module, **kwargs: object) -> AVMatching:
    """An AVM sized for ``backbone`` (its ``config``: embed_dim, num_heads, norm_eps)."""
    return AVMatching.from_config(backbone.config, **kwargs)
