"""Two-stream CAV-MAE-style audio-video backbone (docs/method.md §1).

Layout: per-modality patch embedding + modality token + positional table, ``depth_modality``
modality-specific ViT blocks per stream (output: *unimodal codes* ``U``), a second positional table
(``inter_pos_embed``) and ``depth_fusion`` shared fusion blocks that are run either jointly over
``[audio ; video]`` or on one modality alone (each pass with its own LayerNorm pair). A light MAE
decoder reconstructs each modality separately; a symmetric InfoNCE aligns the pooled unimodal
latents.

Token order (the contract every other module relies on):
- video: frame-major ``t*G*G + r*G + c``; patch vectors in (row, col, channel) order, ``3*p*p`` values;
- audio: time-major ``t*F_a + f``; patch vectors in (time-in-patch, freq-in-patch) order, ``p*p`` values.

The patch embeddings keep CAV-MAE's Conv2d parameters (so checkpoints load by renaming) but are
applied to *patch vectors* with a permuted view of the kernel. One code path therefore serves full
clips and pre-gathered patches (STELLA+ replay rows arrive as patches).

Parameter names follow CAV-MAE (§1.2, §10.1) so that :mod:`stella_avalanche.models.weights` only
renames and reorders.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = [
    "CAVConfig",
    "CAVMAE",
    "MODEL_PRESETS",
    "build_model",
    "time_segment",
    "floor_fraction",
    "num_visible",
    "sincos_2d",
    "gather_tokens",
    "info_nce",
    "ViTBlock",
    "FusionBlock",
]

Modality = Literal["audio", "video"]
_MODALITY_ALIASES = {"audio": "audio", "a": "audio", "video": "video", "v": "video"}
_POOL_ORDERS = ("norm_then_pool", "pool_then_norm")
_AVM_FEATURES = ("joint", "unimodal")


# ---------------------------------------------------------------------------------------------
# exact count arithmetic (D11)
# ---------------------------------------------------------------------------------------------
def _as_fraction(ratio: float | Fraction) -> Fraction:
    """Exact rational version of a user ratio (0.8 -> 4/5, not 0.8000000000000000444)."""
    if isinstance(ratio, Fraction):
        return ratio
    return Fraction(str(float(ratio))).limit_denominator(1_000_000)


def floor_fraction(n: int, ratio: float | Fraction) -> int:
    """``floor(n * ratio)`` computed exactly (D11: ``int(40 * 0.2)`` is 7 in floating point).

    :param n: a non-negative token count.
    :param ratio: a fraction in [0, 1], e.g. a keep ratio κ.
    """
    return math.floor(n * _as_fraction(ratio))


def num_visible(num_tokens: int, mask_ratio: float | Fraction) -> int:
    """Encoder-visible token count ``floor(L * (1 - ρ))``, exactly (D11). ``L=40, ρ=0.8 -> 8``."""
    return math.floor(num_tokens * (1 - _as_fraction(mask_ratio)))


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CAVConfig:
    """Backbone hyperparameters (§0, §7). Derived sizes are properties.

    :param embed_dim: encoder width D.
    :param num_heads: encoder heads H.
    :param depth_modality: modality-specific blocks per stream (d_mod).
    :param depth_fusion: shared fusion blocks (d_fus).
    :param mlp_ratio: MLP hidden width / D.
    :param decoder_dim: decoder width D'.
    :param decoder_heads: decoder heads H'.
    :param decoder_depth: decoder blocks.
    :param num_frames: video frames per clip T.
    :param img_size: frame side S.
    :param patch_size: patch side p (video and audio).
    :param audio_length: fbank frames A.
    :param mel_bins: mel bins F.
    :param mask_ratio: MAE mask ratio ρ.
    :param norm_pix_loss: normalise each target patch by its mean / unbiased std.
    :param contrastive_weight: w_c, weight of the symmetric InfoNCE.
    :param temperature: InfoNCE temperature τ.
    :param norm_eps: LayerNorm eps (1e-5 as the official code, D15).
    :param pool_order: ``"norm_then_pool"`` (paper: mean of final-normed tokens) or
        ``"pool_then_norm"`` (mean of pre-norm tokens, then the final LayerNorm; tiny preset).
    :param contrastive_input: which tokens the InfoNCE embeddings of a pre-training step see:
        ``"visible"`` (paper / CAV-MAE: the encoder-visible tokens of the masked pass) or
        ``"kept"`` (a second, unmasked encoder pass over all kept tokens: a lower InfoNCE on the
        synthetic benchmark but ~2.4x the step time, so no preset uses it by default).
    :param video_time_code: temporal part of the video positional tables at initialisation.
        ``"none"`` (paper / CAV-MAE): the 2-D grid code repeated identically for every frame, so at
        initialisation the video encoder cannot tell frames apart and its pooled embedding is the same
        for any order of the frames; a temporal code can only be learned from zero. ``"sincos"``: a
        1-D sin-cos code of the frame index added to every row of a frame, so "the object is on in
        frames 1 and 3" is visible from the first step. The synthetic benchmark's transferable cue
        (the sound is on exactly when the object is shown) needs it (docs/synthetic.md, "temporal
        code"); published CAV-MAE weights overwrite the tables, so the paper presets keep ``"none"``.
    :param avm_pooling: pooling of the AVM built for this backbone (``build_avm``; see
        :class:`~stella_avalanche.models.avm.AVMatching`): ``"mean"`` (paper) or ``"product"``. It lives
        here, beside the sizes the AVM already takes from the backbone, so stage 2, the continual run,
        resumption and the diagnostics always build the same AVM for a given model preset.
    :param avm_features: what the AVM reads (``stella_avalanche.models.avm.avm_inputs``). ``"joint"``
        (paper): the pre-norm outputs of the joint fusion pass over both modalities. ``"unimodal"``:
        each modality's own fusion pass (pre-norm), the features the retrieval embeddings pool and the
        InfoNCE trains; a mismatched pair is then a re-indexing, not a second fusion pass. Measured on
        the synthetic benchmark (docs/synthetic.md): the AVM matches a little better on unimodal
        features, but its video importance avoids the sounding object, and STELLA's retrieval was
        lower; every preset keeps ``"joint"``.
    :param avm_time_bias: added to the AVM's cross-attention logits between an audio token and a
        video token of the same time segment (one segment per video frame), in both directions; 0
        (paper) adds nothing. It gives the matching head "the audio at my time" from its first step:
        with uniform attention every token reads the clip's average, which carries no synchrony, so
        the matching loss had no gradient towards time-aligned attention and stage 2 stayed at ln 2
        (docs/synthetic.md, "Why stage 2 stayed at chance"). The bias enters the matching forward
        only; the patch importance STELLA selects with uses the raw logits (§4). Not a parameter, so
        AVM checkpoints load with any value.
    :param embed_segments: how the retrieval / InfoNCE embedding pools a modality's tokens. 1 (paper):
        the mean of all tokens. S > 1: the clip is cut into S equal time segments (video frames,
        audio time tokens), each segment's tokens are averaged, and a learned linear map of the S
        concatenated means gives the embedding; it starts as their plain average, i.e. the paper's
        mean when every segment holds the same number of tokens. A global mean keeps *which* segment
        shows the object only if the encoder writes each segment's content in its own direction,
        which the tiny encoder did not learn: measured on the cached synthetic backbone, linear probes
        read the on/off pattern from the segment means at 0.95-1.0 balanced accuracy and from the
        global mean at 0.55-0.81 (docs/synthetic.md, "Where the on/off pattern was lost").
        ``num_frames`` and the audio time tokens must be multiples of S.
    :param gather_negatives: under torch.distributed with world size > 1, gather the InfoNCE
        columns (negatives) from all ranks as the paper does (§1.5, D16); every rank must then call
        the loss at the same point with the same batch size. ``False`` keeps the loss per rank
        (local negatives only). No effect in a single process.
    """

    embed_dim: int = 768
    num_heads: int = 12
    depth_modality: int = 10
    depth_fusion: int = 2
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_heads: int = 16
    decoder_depth: int = 8
    num_frames: int = 4
    img_size: int = 224
    patch_size: int = 16
    audio_length: int = 1024
    mel_bins: int = 128
    mask_ratio: float = 0.8
    norm_pix_loss: bool = True
    contrastive_weight: float = 0.1
    temperature: float = 0.05
    norm_eps: float = 1e-5
    pool_order: str = "norm_then_pool"
    contrastive_input: str = "visible"
    video_time_code: str = "none"
    avm_pooling: str = "mean"
    avm_features: str = "joint"
    avm_time_bias: float = 0.0
    embed_segments: int = 1
    gather_negatives: bool = True

    def __post_init__(self) -> None:
        problems = []
        p = self.patch_size
        for name in ("img_size", "audio_length", "mel_bins"):
            if getattr(self, name) % p:
                problems.append(f"{name}={getattr(self, name)} is not divisible by patch_size={p}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.decoder_dim % self.decoder_heads:
            problems.append(f"decoder_dim={self.decoder_dim} is not divisible by decoder_heads={self.decoder_heads}")
        if self.embed_dim % 4 or self.decoder_dim % 4:
            problems.append("embed_dim and decoder_dim must be multiples of 4 (2-D sin-cos tables)")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio={self.mask_ratio} must lie in [0, 1)")
        if self.pool_order not in _POOL_ORDERS:
            problems.append(f"pool_order={self.pool_order!r} must be one of {_POOL_ORDERS}")
        if self.contrastive_input not in ("visible", "kept"):
            problems.append(f"contrastive_input={self.contrastive_input!r} must be 'visible' or 'kept'")
        if self.video_time_code not in ("none", "sincos"):
            problems.append(f"video_time_code={self.video_time_code!r} must be 'none' or 'sincos'")
        if self.avm_pooling not in ("mean", "product"):
            problems.append(f"avm_pooling={self.avm_pooling!r} must be 'mean' or 'product'")
        if self.avm_features not in _AVM_FEATURES:
            problems.append(f"avm_features={self.avm_features!r} must be one of {_AVM_FEATURES}")
        if not self.avm_time_bias >= 0:
            problems.append(f"avm_time_bias={self.avm_time_bias} must be >= 0")
        if self.embed_segments < 1:
            problems.append(f"embed_segments={self.embed_segments} must be >= 1")
        elif self.embed_segments > 1 and (self.num_frames % self.embed_segments
                                          or self.audio_time_tokens % self.embed_segments):
            problems.append(f"embed_segments={self.embed_segments} must divide num_frames={self.num_frames} "
                            f"and the audio time tokens ({self.audio_time_tokens})")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0")
        for name in ("depth_modality", "depth_fusion", "decoder_depth", "num_frames"):
            if getattr(self, name) < (1 if name in ("depth_fusion", "num_frames") else 0):
                problems.append(f"{name}={getattr(self, name)} is too small")
        if problems:
            raise ValueError("invalid CAVConfig: " + "; ".join(problems))

    # derived sizes (§0) -------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """G, patches per frame side."""
        return self.img_size // self.patch_size

    @property
    def num_video_tokens(self) -> int:
        """L_V = T * G²."""
        return self.num_frames * self.grid**2

    @property
    def audio_time_tokens(self) -> int:
        """T_a = A / p."""
        return self.audio_length // self.patch_size

    @property
    def audio_freq_tokens(self) -> int:
        """F_a = F / p."""
        return self.mel_bins // self.patch_size

    @property
    def num_audio_tokens(self) -> int:
        """L_A = T_a * F_a."""
        return self.audio_time_tokens * self.audio_freq_tokens

    @property
    def video_patch_dim(self) -> int:
        """P_V = 3 p²."""
        return 3 * self.patch_size**2

    @property
    def audio_patch_dim(self) -> int:
        """P_A = p²."""
        return self.patch_size**2

    def num_tokens(self, modality: str) -> int:
        """L_A or L_V."""
        return self.num_audio_tokens if _modality(modality) == "audio" else self.num_video_tokens

    def num_visible(self, modality: str, mask_ratio: float | None = None) -> int:
        """n_A / n_V = floor(L (1 - ρ)) (exact)."""
        return num_visible(self.num_tokens(modality), self.mask_ratio if mask_ratio is None else mask_ratio)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and results.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CAVConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CAVConfig.from_dict: unknown field(s) {unknown}")
        return cls(**d)


MODEL_PRESETS: dict[str, CAVConfig] = {
    # the paper's backbone (§7): ViT-B split 10 + 2, decoder 512/16/8
    "base": CAVConfig(),
    # CPU-sized model used by the synthetic benchmark; pool-then-norm and τ = 0.1 were found to let
    # a tiny model escape chance-level InfoNCE (``docs/benchmarks.md`` §7)
    "tiny": CAVConfig(
        embed_dim=192, num_heads=3, depth_modality=2, depth_fusion=1, decoder_dim=128, decoder_heads=4,
        decoder_depth=1, num_frames=4, img_size=64, patch_size=16, audio_length=256, mel_bins=64,
        mask_ratio=0.75, temperature=0.1, contrastive_weight=1.0, pool_order="pool_then_norm",
        # the synthetic benchmark's transferable cue is "the object shows in the frames where the sound
        # is on": without a frame code the video encoder starts blind to frame order (docs/synthetic.md)
        video_time_code="sincos",
        # with the paper's mean pooling the AVM stayed at chance on held-out pairs even on a backbone
        # that matches them; the product pooling learns synchrony (docs/synthetic.md)
        avm_pooling="product",
        # a global token mean loses *which* segments show the object; pooling each segment (a learned
        # map over the 4 segment means, starting as their average) keeps it; the pair AUC stage 1 then
        # reaches: docs/synthetic.md, "The current default, measured" (the mean pooling saturated lower)
        embed_segments=4,
        # without it the stage-2 AVM sat at ln 2: uniform attention reads no synchrony, so nothing pulls
        # it towards time-aligned attention (docs/synthetic.md)
        avm_time_bias=5.0,
        # avm_features stays "joint" (paper): on unimodal features the AVM matched a little better
        # but its video attention turned away from the sounding object (docs/synthetic.md)
    ),
}


@torch.no_grad()
def init_linear_and_norm_(module: nn.Module) -> None:
    """In place: every Linear N(0, 0.02) with zero bias, every LayerNorm weight 1 / bias 0 (§1.2, §3.1)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _modality(m: str) -> str:
    try:
        return _MODALITY_ALIASES[m]
    except KeyError:
        raise ValueError(f"unknown modality {m!r}; expected 'audio' or 'video'") from None


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """MAE 1-D code: ``[sin(x ω_k)]_k ‖ [cos(x ω_k)]_k`` with ω_k = 10000^(-2k/dim); (N,) -> (N, dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, first: Tensor, second: Tensor) -> Tensor:
    """2-D sin-cos rows ``[sc_{dim/2}(first) ‖ sc_{dim/2}(second)]``; (N,), (N,) -> (N, dim) float32.

    Video row (t, r, c) uses ``first = c, second = r``; audio row (t, f) uses ``first = t, second = f``
    (§1.2), each table laid out in the token order actually used (D3).
    """
    return torch.cat([_sincos_1d(dim // 2, first), _sincos_1d(dim // 2, second)], dim=1).float()


def _video_table(dim: int, grid: int, frames: int, time_code: str = "none") -> Tensor:
    """(1, T*G*G, dim): the 2-D grid code repeated per frame, plus (``time_code="sincos"``) a 1-D
    sin-cos code of the frame index over all ``dim`` channels, so rows of different frames differ."""
    idx = torch.arange(grid * grid)
    table = sincos_2d(dim, idx % grid, idx // grid).repeat(frames, 1)
    if time_code == "sincos":
        t = torch.arange(frames).repeat_interleave(grid * grid)
        table = table + _sincos_1d(dim, t).float()
    return table[None]


def _audio_table(dim: int, t_tokens: int, f_tokens: int) -> Tensor:
    """(1, T_a*F_a, dim), time-major rows t*F_a + f."""
    idx = torch.arange(t_tokens * f_tokens)
    return sincos_2d(dim, idx // f_tokens, idx % f_tokens)[None]


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Rows of ``x`` at ``ids`` per sample: x (B|1, L, C), ids (B, K) int64 -> (B, K, C).

    A shared table (leading dim 1, e.g. a positional embedding) is looked up with ``F.embedding``,
    whose backward accumulates straight into (L, C) instead of materialising a (B, L, C) gradient.
    """
    b, k = ids.shape
    if x.shape[0] == 1 and b != 1:
        return F.embedding(ids, x[0])
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(b, k, x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# contrastive objective (§1.5)
# ---------------------------------------------------------------------------------------------
def _distributed_world() -> int:
    """World size of the initialised default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gather_columns(cols: Tensor) -> tuple[Tensor, int]:
    """All-gather ``cols`` (B, C) over ranks; this rank's slice is ``cols`` itself (keeps its grad).

    The other ranks' slices arrive without gradient (§1.5: "the local slice keeping its gradient"),
    so backward never communicates. All ranks must hold the same B: the sizes are exchanged first
    and every rank raises the same error, so a mismatch cannot deadlock the next collective.

    :returns: (gathered (W*B, C) in rank order, column offset of this rank's first row = rank*B).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    b = cols.shape[0]
    size = torch.tensor([b], device=cols.device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    if any(c != b for c in counts):
        raise ValueError(f"info_nce: gathering negatives needs the same batch size on every rank, got "
                         f"per-rank sizes {counts}; shard the data evenly (drop_last / padded sampler) "
                         f"or set CAVConfig.gather_negatives=False")
    buf = [torch.empty_like(cols) for _ in range(world)]
    dist.all_gather(buf, cols.detach().contiguous())
    buf[rank] = cols  # the autograd-tracked local slice replaces its detached copy
    return torch.cat(buf, dim=0), rank * b


def info_nce(z_a: Tensor, z_v: Tensor, *, temperature: float, weight: float = 1.0, gather: bool = True
             ) -> tuple[Tensor, Tensor]:
    """Weighted symmetric InfoNCE between audio and video embeddings (§1.5), in fp32.

    ``a = normalize(z_a)``, ``v = normalize(z_v)``; per local sample n
    ``per[n] = weight * ½ [CE(v_n · A / τ, n') + CE(a_n · V / τ, n')]`` where the columns A, V are this
    rank's batch alone, or, when ``gather`` is set and torch.distributed runs with world size W > 1,
    the batches of all ranks in rank order (the positive column is ``n' = rank * B + n``). The rows
    stay local and only the local column slice carries gradient, so under DDP (which averages the
    parameter gradients) the update is the gradient of the mean over ranks of the per-rank losses
    with the other ranks' columns held constant. A single process computes exactly the plain
    B x B loss whatever ``gather`` says.

    :param z_a: (B, D) un-normalised audio embeddings (any float dtype).
    :param z_v: (B, D) un-normalised video embeddings, row n paired with ``z_a[n]``.
    :param temperature: τ > 0.
    :param weight: w_c, multiplies every term.
    :param gather: gather the columns over ranks when distributed (collective call: every rank
        must call with the same B).
    :returns: (mean over local rows (scalar), per-sample loss (B,)), both fp32.
    """
    if z_a.shape != z_v.shape or z_a.dim() != 2:
        raise ValueError(f"info_nce: z_a and z_v must both be (B, D), got {tuple(z_a.shape)} and "
                         f"{tuple(z_v.shape)}")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a = F.normalize(z_a.float(), dim=-1)
        v = F.normalize(z_v.float(), dim=-1)
        if not gather or _distributed_world() == 1:
            logits = v @ a.t() / temperature  # rows: video queries over audio keys
            target = torch.arange(logits.shape[0], device=logits.device)
            per = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                         + F.cross_entropy(logits.t(), target, reduction="none"))
        else:
            # one collective for both modalities: columns [a | v] side by side
            cols, offset = _gather_columns(torch.cat([a, v], dim=1))
            a_all, v_all = cols.split(a.shape[1], dim=1)
            target = offset + torch.arange(a.shape[0], device=a.device)
            per = 0.5 * (F.cross_entropy(v @ a_all.t() / temperature, target, reduction="none")
                         + F.cross_entropy(a @ v_all.t() / temperature, target, reduction="none"))
        per = weight * per
    return per.mean(), per


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
class ViTBlock(Block):
    """Pre-LN ViT block, timm's :class:`~timm.models.vision_transformer.Block` with CAV-MAE's settings.

    ``x + Attn(LN1 x)``, then ``x + MLP(LN2 x)``; qkv with bias, GELU :class:`~timm.layers.Mlp`,
    LayerNorm eps ``eps`` (``CAVConfig.norm_eps``), no dropout, drop-path nor layer scale. Parameter
    names are CAV-MAE's (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``),
    which :mod:`stella_avalanche.models.weights` relies on.

    :param dim: token width D.
    :param num_heads: attention heads (D must be divisible by it).
    :param mlp_ratio: MLP hidden width / D.
    :param eps: LayerNorm eps.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5) -> None:
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, act_layer=nn.GELU,
                         norm_layer=partial(nn.LayerNorm, eps=eps), mlp_layer=Mlp)
        # timm picks fused attention from the TIMM_FUSED_ATTN environment variable; its fallback
        # materialises the (B, H, L, L) score matrix and rounds differently. Always use
        # F.scaled_dot_product_attention so a run's numbers and memory do not depend on that variable.
        self.attn.fused_attn = True


class FusionBlock(ViTBlock):
    """Fusion block: shared attention/MLP, three LayerNorm pairs (§1.3).

    ``norm1/norm2`` serve the joint pass, ``norm1_a/norm2_a`` the audio-only pass and
    ``norm1_v/norm2_v`` the video-only pass. timm's ``Block.forward`` always uses ``norm1/norm2``,
    so the forward pass is written here over the inherited ``attn`` and ``mlp`` (the block's layer
    scale and drop-path are identities, see :class:`ViTBlock`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5) -> None:
        super().__init__(dim, num_heads, mlp_ratio, eps)
        self.norm1_a = nn.LayerNorm(dim, eps=eps)
        self.norm2_a = nn.LayerNorm(dim, eps=eps)
        self.norm1_v = nn.LayerNorm(dim, eps=eps)
        self.norm2_v = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, mode: str = "joint") -> Tensor:  # type: ignore[override]
        """x (B, L, D) -> (B, L, D); ``mode`` in {"joint", "audio", "video"} picks the norm pair."""
        if mode == "joint":
            n1, n2 = self.norm1, self.norm2
        elif mode == "audio":
            n1, n2 = self.norm1_a, self.norm2_a
        elif mode == "video":
            n1, n2 = self.norm1_v, self.norm2_v
        else:
            raise ValueError(f"FusionBlock mode must be joint/audio/video, got {mode!r}")
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))


class _PatchEmbed(nn.Module):
    """Holder for a CAV-MAE ``Conv2d`` patch embedding (name ``proj``), applied to patch vectors."""

    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)


def time_segment(ids: Tensor, modality: str, config: CAVConfig, segments: int) -> Tensor:
    """Which of ``segments`` equal time segments token positions ``ids`` (any shape, int64) fall in.

    Video tokens are frame-major (frame ``ids // G²`` of T), audio tokens time-major (time token
    ``ids // F_a`` of T_a); position t of n lies in segment ``t * segments // n``.
    """
    if _modality(modality) == "audio":
        return (ids // config.audio_freq_tokens) * segments // config.audio_time_tokens
    return (ids // config.grid**2) * segments // config.num_frames


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class CAVMAE(nn.Module):
    """Two-stream CAV-MAE-style backbone with MAE decoder and contrastive head (§1).

    :param config: a :class:`CAVConfig` (see :data:`MODEL_PRESETS`).
    """

    def __init__(self, config: CAVConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d, dd, p = cfg.embed_dim, cfg.decoder_dim, cfg.patch_size
        eps = cfg.norm_eps
        # --- encoder ---------------------------------------------------------------------
        self.patch_embed_a = _PatchEmbed(1, d, p)  # kernel axes [time, freq]
        self.patch_embed_v = _PatchEmbed(3, d, p)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, cfg.num_audio_tokens, d))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, cfg.num_video_tokens, d))
        self.inter_pos_embed_a = nn.Parameter(torch.zeros(1, cfg.num_audio_tokens, d))
        self.inter_pos_embed_v = nn.Parameter(torch.zeros(1, cfg.num_video_tokens, d))
        self.blocks_a = nn.ModuleList(
            [ViTBlock(d, cfg.num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.depth_modality)])
        self.blocks_v = nn.ModuleList(
            [ViTBlock(d, cfg.num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.depth_modality)])
        self.blocks_u = nn.ModuleList(
            [FusionBlock(d, cfg.num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.depth_fusion)])
        self.norm = nn.LayerNorm(d, eps=eps)
        self.norm_a = nn.LayerNorm(d, eps=eps)
        self.norm_v = nn.LayerNorm(d, eps=eps)
        # --- decoder ---------------------------------------------------------------------
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.mask_token_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, cfg.num_audio_tokens, dd))
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, cfg.num_video_tokens, dd))
        self.decoder_blocks = nn.ModuleList(
            [ViTBlock(dd, cfg.decoder_heads, cfg.mlp_ratio, eps) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=eps)
        self.decoder_pred_a = nn.Linear(dd, cfg.audio_patch_dim)
        self.decoder_pred_v = nn.Linear(dd, cfg.video_patch_dim)
        # --- segment pooling of the embeddings (embed_segments > 1 only, so the paper presets and
        # their checkpoints have no such parameters) ---------------------------------------
        if cfg.embed_segments > 1:
            self.segment_proj_a = nn.Linear(cfg.embed_segments * d, d)
            self.segment_proj_v = nn.Linear(cfg.embed_segments * d, d)
        self.reset_parameters()

    def transformer_blocks(self) -> list[nn.Module]:
        """Every encoder, fusion and decoder block, in forward order."""
        return [*self.blocks_a, *self.blocks_v, *self.blocks_u, *self.decoder_blocks]

    def compile_blocks(self, **compile_kwargs: Any) -> int:
        """``torch.compile`` each transformer block in place (``nn.Module.compile``).

        Parameter names and the state dict stay unchanged, so checkpoints load either way. The rest
        of the forward (masking, gathers, losses) stays eager: its shapes change with the strategy and
        the batch, and a whole-model graph would recompile for each.

        :param compile_kwargs: passed to ``torch.compile`` (e.g. ``mode``, ``backend``).
        :returns: the number of blocks compiled.
        """
        blocks = self.transformer_blocks()
        for blk in blocks:
            blk.compile(**compile_kwargs)
        return len(blocks)

    # ------------------------------------------------------------------------------------
    # initialisation and optimiser helpers
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """§1.2 initialisation: sin-cos tables, N(0, .02) tokens/Linear, Xavier patch kernels, LN 1/0."""
        cfg = self.config
        init_linear_and_norm_(self)
        for pe in (self.patch_embed_a, self.patch_embed_v):
            w = pe.proj.weight
            # Xavier on the (D, in*p*p) view, as for a Linear layer over flattened patches
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(pe.proj.bias)
        for tok in (self.modality_a, self.modality_v, self.mask_token_a, self.mask_token_v,
                    self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(tok, std=0.02)
        dev = self.pos_embed_a.device
        v_enc = _video_table(cfg.embed_dim, cfg.grid, cfg.num_frames, cfg.video_time_code).to(dev)
        a_enc = _audio_table(cfg.embed_dim, cfg.audio_time_tokens, cfg.audio_freq_tokens).to(dev)
        self.pos_embed_v.copy_(v_enc)
        self.inter_pos_embed_v.copy_(v_enc)
        self.pos_embed_a.copy_(a_enc)
        self.inter_pos_embed_a.copy_(a_enc)
        self.decoder_pos_embed_v.copy_(
            _video_table(cfg.decoder_dim, cfg.grid, cfg.num_frames, cfg.video_time_code).to(dev))
        self.decoder_pos_embed_a.copy_(
            _audio_table(cfg.decoder_dim, cfg.audio_time_tokens, cfg.audio_freq_tokens).to(dev))
        if cfg.embed_segments > 1:  # start as the average of the segment means
            s_ = cfg.embed_segments
            eye = torch.eye(cfg.embed_dim, device=dev) / s_
            for proj in (self.segment_proj_a, self.segment_proj_v):
                proj.weight.copy_(eye.repeat(1, s_))
                nn.init.zeros_(proj.bias)

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay: 1-D params (LN, biases), positional/modality/mask tokens."""
        out = set()
        for name, prm in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if prm.ndim <= 1 or leaf == "bias" or "pos_embed" in leaf or "modality" in leaf \
                    or leaf.startswith("mask_token"):
                out.add(name)
        return out

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two optimiser groups: decayed weights and the :meth:`no_weight_decay` set (wd 0).

        Only parameters with ``requires_grad`` are included.
        """
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, prm in self.named_parameters():
            if prm.requires_grad:
                (no_decay if name in skip else decay).append(prm)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------------
    # tokenisation
    # ------------------------------------------------------------------------------------
    def patchify_video(self, video: Tensor) -> Tensor:
        """video (B, T, 3, S, S) -> (B, L_V, 3p²), frame-major tokens, (row, col, channel) vectors."""
        cfg = self.config
        b, t, c, h, w = video.shape
        if (t, c, h, w) != (cfg.num_frames, 3, cfg.img_size, cfg.img_size):
            raise ValueError(f"video must be (B, {cfg.num_frames}, 3, {cfg.img_size}, {cfg.img_size}), "
                             f"got {tuple(video.shape)}")
        p, g = cfg.patch_size, cfg.grid
        x = video.reshape(b, t, c, g, p, g, p).permute(0, 1, 3, 5, 4, 6, 2)  # b t gr gc i j ch
        return x.reshape(b, t * g * g, p * p * c)

    def patchify_audio(self, audio: Tensor) -> Tensor:
        """audio (B, 1, A, F) -> (B, L_A, p²), time-major tokens, (time, freq)-in-patch vectors."""
        cfg = self.config
        b = audio.shape[0]
        if tuple(audio.shape[1:]) != (1, cfg.audio_length, cfg.mel_bins):
            raise ValueError(f"audio must be (B, 1, {cfg.audio_length}, {cfg.mel_bins}), got {tuple(audio.shape)}")
        p, ta, fa = cfg.patch_size, cfg.audio_time_tokens, cfg.audio_freq_tokens
        x = audio.reshape(b, ta, p, fa, p).permute(0, 1, 3, 2, 4)  # b t f i j
        return x.reshape(b, ta * fa, p * p)

    def _patch_weight(self, modality: str) -> tuple[Tensor, Tensor]:
        """Conv kernel viewed as a Linear over patch vectors: (D, P), (D,)."""
        if modality == "audio":
            conv = self.patch_embed_a.proj  # (D, 1, p_time, p_freq): already (time, freq) order
            return conv.weight.flatten(1), conv.bias
        conv = self.patch_embed_v.proj  # (D, 3, p, p) -> (D, p, p, 3) = (row, col, channel)
        return conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias

    # ------------------------------------------------------------------------------------
    # encoder
    # ------------------------------------------------------------------------------------
    def encode_modality(self, patches: Tensor, ids: Tensor | None, modality: str) -> Tensor:
        """Patch embedding + modality token + ``pos_embed`` at ``ids`` + modality-specific blocks.

        :param patches: (B, K, P) patch vectors (P = 3p² video / p² audio).
        :param ids: (B, K) int64 token positions of the patches, or ``None`` for all L positions in order.
        :param modality: "audio" or "video".
        :returns: unimodal codes U (B, K, D).
        """
        m = _modality(modality)
        w, bias = self._patch_weight(m)
        x = F.linear(patches, w, bias)
        if m == "audio":
            x = x + self.modality_a + self._pos(self.pos_embed_a, ids, x.shape[1])
            blocks = self.blocks_a
        else:
            x = x + self.modality_v + self._pos(self.pos_embed_v, ids, x.shape[1])
            blocks = self.blocks_v
        for blk in blocks:
            x = blk(x)
        return x

    @staticmethod
    def _pos(table: Tensor, ids: Tensor | None, k: int) -> Tensor:
        if ids is None:
            if k != table.shape[1]:
                raise ValueError(f"ids=None requires all {table.shape[1]} tokens, got {k}")
            return table
        return gather_tokens(table, ids)

    def fuse_joint(self, U_a: Tensor, a_ids: Tensor | None, U_v: Tensor, v_ids: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
        """Joint fusion pass over ``[U_a + P^int_a ; U_v + P^int_v]`` (audio first), pre-final-norm.

        :param U_a: (B, K_a, D) audio codes; ``a_ids`` (B, K_a) or None (all positions).
        :param U_v: (B, K_v, D) video codes; ``v_ids`` (B, K_v) or None.
        :returns: (E_a (B, K_a, D), E_v (B, K_v, D)), the AVM inputs.
        """
        ka = U_a.shape[1]
        x = torch.cat([U_a + self._pos(self.inter_pos_embed_a, a_ids, ka),
                       U_v + self._pos(self.inter_pos_embed_v, v_ids, U_v.shape[1])], dim=1)
        for blk in self.blocks_u:
            x = blk(x, "joint")
        return x[:, :ka], x[:, ka:]

    def fuse_unimodal(self, U: Tensor, ids: Tensor | None, modality: str, *, final_norm: bool = True
                      ) -> Tensor:
        """Fusion blocks on one modality alone (its own norm pair), then ``norm_a`` / ``norm_v``.

        :param U: (B, K, D) unimodal codes; ``ids`` (B, K) positions or None.
        :param final_norm: apply ``norm_a``/``norm_v`` (``latent_c``); False returns the pre-norm tokens,
            which :meth:`pool` needs for ``pool_order="pool_then_norm"``.
        :returns: (B, K, D).
        """
        m = _modality(modality)
        table = self.inter_pos_embed_a if m == "audio" else self.inter_pos_embed_v
        x = U + self._pos(table, ids, U.shape[1])
        for blk in self.blocks_u:
            x = blk(x, m)
        if final_norm:
            x = (self.norm_a if m == "audio" else self.norm_v)(x)
        return x

    def pool(self, tokens: Tensor, modality: str, *, normed: bool = True, ids: Tensor | None = None) -> Tensor:
        """Pool unimodal fusion tokens into one vector per clip, in the configured ``pool_order``.

        :param tokens: (B, K, D), either ``latent_c`` (``normed=True``, output of
            :meth:`fuse_unimodal`) or the pre-final-norm tokens (``normed=False``).
        :param ids: (B, K) token positions of ``tokens`` (None: all L positions in order); with
            ``embed_segments`` > 1 they say which time segment each token belongs to.
        :returns: z (B, D), not L2-normalised.
        :raises ValueError: ``pool_then_norm`` with already-normed tokens (the order cannot be undone).
        """
        m = _modality(modality)
        ln = self.norm_a if m == "audio" else self.norm_v
        if self.config.pool_order == "norm_then_pool":
            return self._mean_tokens(tokens if normed else ln(tokens), m, ids)
        if normed:
            raise ValueError("pool_order='pool_then_norm' needs pre-norm tokens: call "
                             "fuse_unimodal(..., final_norm=False) and pool(..., normed=False)")
        return ln(self._mean_tokens(tokens, m, ids))

    def segment_of(self, ids: Tensor, modality: str) -> Tensor:
        """Time segment (0 .. ``embed_segments`` - 1) of token positions ``ids`` (any shape, int64)."""
        return time_segment(ids, modality, self.config, self.config.embed_segments)

    def _mean_tokens(self, x: Tensor, modality: str, ids: Tensor | None) -> Tensor:
        """(B, K, D) -> (B, D): the token mean, or the segment pooling of ``embed_segments``."""
        s = self.config.embed_segments
        if s == 1:
            return x.mean(dim=1)
        b, k, d = x.shape
        if ids is None:
            if k != self.config.num_tokens(modality):
                raise ValueError(f"{modality}: {k} tokens without ids; pass the token positions")
            ids = torch.arange(k, device=x.device).expand(b, k)
        seg = self.segment_of(ids, modality)                                  # (B, K)
        sums = x.new_zeros(b, s, d).scatter_add_(1, seg[..., None].expand(-1, -1, d), x)
        counts = torch.zeros(b, s, device=x.device, dtype=x.dtype).scatter_add_(
            1, seg, torch.ones_like(seg, dtype=x.dtype))
        means = sums / counts.clamp_min(1.0)[..., None]                       # empty segment -> 0
        proj = self.segment_proj_a if modality == "audio" else self.segment_proj_v
        return proj(means.reshape(b, s * d))

    def embed(self, video: Tensor | None, audio: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Retrieval embeddings of unmasked clips (§1.6).

        :param video: (B, T, 3, S, S) or None; ``audio``: (B, 1, A, F) or None.
        :returns: (z_audio, z_video), each (B, D) L2-normalised float32 (None for a missing input).
        """
        outs: list[Tensor | None] = []
        for m, x in (("audio", audio), ("video", video)):
            if x is None:
                outs.append(None)
                continue
            patches = self.patchify_audio(x) if m == "audio" else self.patchify_video(x)
            U = self.encode_modality(patches, None, m)
            z = self.pool(self.fuse_unimodal(U, None, m, final_norm=False), m, normed=False)  # all tokens
            # fp16 norms of 768-d vectors can overflow/underflow; normalise in fp32 outside autocast
            with torch.autocast(device_type=z.device.type, enabled=False):
                outs.append(F.normalize(z.float(), dim=-1))
        return outs[0], outs[1]

    # ------------------------------------------------------------------------------------
    # pre-training
    # ------------------------------------------------------------------------------------
    def _rand(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        gdev = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=gdev).to(device)

    def _split_tokens(self, patches: Tensor, ids: Tensor, n_vis: int, generator: torch.Generator | None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Random per-sample split of K tokens into n_vis visible + (K - n_vis) targets.

        :returns: vis_patches (B, n, P), vis_ids (B, n), tgt_patches (B, K-n, P), tgt_ids (B, K-n).
        """
        b, k = ids.shape
        order = self._rand((b, k), generator, ids.device).argsort(dim=1)
        vis, tgt = order[:, :n_vis], order[:, n_vis:]
        return (gather_tokens(patches, vis), torch.gather(ids, 1, vis),
                gather_tokens(patches, tgt), torch.gather(ids, 1, tgt))

    def _decode(self, x_vis: Tensor, vis_ids: Tensor, tgt_ids: Tensor, modality: str) -> Tensor:
        """Decode one modality: visible (B, n, D') + mask tokens at targets -> predictions (B, K-n, P)."""
        b, n, dd = x_vis.shape
        nt = tgt_ids.shape[1]
        if modality == "audio":
            mask, table, mod, head = self.mask_token_a, self.decoder_pos_embed_a, self.decoder_modality_a, \
                self.decoder_pred_a
        else:
            mask, table, mod, head = self.mask_token_v, self.decoder_pos_embed_v, self.decoder_modality_v, \
                self.decoder_pred_v
        # token order inside the decoder is irrelevant (positions live in the embeddings), so the
        # targets are simply appended after the visible tokens: no unshuffle needed
        x = torch.cat([x_vis, mask.expand(b, nt, dd)], dim=1)
        x = x + gather_tokens(table, torch.cat([vis_ids, tgt_ids], dim=1)) + mod
        for blk in self.decoder_blocks:
            x = blk(x)
        return head(self.decoder_norm(x[:, n:]))

    def _mae_loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(batch-level mean, per-sample mean (B,)) of the per-patch MSE; computed in fp32."""
        pred, target = pred.float(), target.float()
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, unbiased=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, n_tgt)
        # every sample has the same target count, so the batch mean equals the mean of sample means
        return per_patch.mean(), per_patch.mean(dim=1)

    def _nce(self, z_a: Tensor, z_v: Tensor, gather: bool | None = None) -> tuple[Tensor, Tensor]:
        """Weighted symmetric InfoNCE (§1.5, :func:`info_nce`): (scalar, per-sample (B,)), fp32."""
        cfg = self.config
        return info_nce(z_a, z_v, temperature=cfg.temperature, weight=cfg.contrastive_weight,
                        gather=cfg.gather_negatives if gather is None else gather)

    def _prepare(self, full: Tensor | None, patches: Tensor | None, keep: Tensor | None, modality: str
                 ) -> tuple[Tensor, Tensor]:
        """Resolve the (patches (B, K, P), ids (B, K)) pair of one modality from the accepted inputs."""
        cfg = self.config
        name = "video" if modality == "video" else "audio"
        if (full is None) == (patches is None):
            raise ValueError(f"pretrain_forward: give exactly one of `{name}` and `{name}_patches`")
        L = cfg.num_tokens(modality)
        if full is not None:
            patches = self.patchify_video(full) if modality == "video" else self.patchify_audio(full)
            if keep is not None:
                patches = gather_tokens(patches, keep)
        assert patches is not None
        b, k, pdim = patches.shape
        want = cfg.video_patch_dim if modality == "video" else cfg.audio_patch_dim
        if pdim != want:
            raise ValueError(f"{name}_patches: patch vectors must have {want} values, got {pdim}")
        if keep is None:
            if k != L:
                raise ValueError(f"{name}_patches without {name}_keep must hold all {L} tokens, got {k}")
            keep = torch.arange(L, device=patches.device).expand(b, L)
        elif tuple(keep.shape) != (b, k):
            raise ValueError(f"{name}_keep must be ({b}, {k}) to match the patches, got {tuple(keep.shape)}")
        return patches, keep.long()

    def pretrain_forward(self, video: Tensor | None = None, audio: Tensor | None = None, *,
                         video_keep: Tensor | None = None, audio_keep: Tensor | None = None,
                         video_patches: Tensor | None = None, audio_patches: Tensor | None = None,
                         mask_ratio: float | None = None, generator: torch.Generator | None = None,
                         gather_negatives: bool | None = None) -> dict[str, Tensor]:
        """MAE + contrastive pre-training step (§1.4, §1.5; guided masking §4 step 10).

        Each modality is given either as a full clip (``video`` (B, T, 3, S, S) / ``audio`` (B, 1, A, F))
        or as patch vectors (``video_patches`` (B, K_V, 3p²) / ``audio_patches`` (B, K_A, p²)).
        ``*_keep`` (B, K) are the kept token ids: with a full clip they select its patches, with patch
        vectors they are the patches' positions. Without keep ids all L tokens are candidates (random
        masking). Per sample the K candidates are permuted at random; the first
        ``n = floor(L (1 - ρ))`` are encoder-visible, the other K - n are reconstruction targets and
        everything not kept is ignored (not encoded, decoded nor scored).

        :param mask_ratio: overrides ``config.mask_ratio`` (ρ).
        :param generator: source of the masking permutation.
        :param gather_negatives: overrides ``config.gather_negatives`` for this call, e.g. ``False``
            for per-rank scoring passes that the other ranks do not run at the same time.
        :returns: dict with ``loss``, ``loss_mae_audio``, ``loss_mae_video``, ``loss_nce`` (scalars),
            ``z_audio``, ``z_video`` (B, D) un-normalised pooled embeddings of the visible tokens
            (``contrastive_input="kept"``: of all kept tokens) and ``per_sample_loss`` (B,) =
            per-sample MAE_a + MAE_v + weighted NCE.
        """
        rho = self.config.mask_ratio if mask_ratio is None else mask_ratio
        pa, ida = self._prepare(audio, audio_patches, audio_keep, "audio")
        pv, idv = self._prepare(video, video_patches, video_keep, "video")
        if pa.shape[0] != pv.shape[0]:
            raise ValueError(f"audio batch {pa.shape[0]} != video batch {pv.shape[0]}")
        n_a = self.config.num_visible("audio", rho)
        n_v = self.config.num_visible("video", rho)
        for name, n, k in (("audio", n_a, pa.shape[1]), ("video", n_v, pv.shape[1])):
            if not 0 < n < k:
                raise ValueError(f"{name}: {k} kept tokens cannot hold {n} visible tokens plus >= 1 target "
                                 f"(mask_ratio={rho})")
        va, vida, ta, tida = self._split_tokens(pa, ida, n_a, generator)
        vv, vidv, tv, tidv = self._split_tokens(pv, idv, n_v, generator)

        U_a = self.encode_modality(va, vida, "audio")
        U_v = self.encode_modality(vv, vidv, "video")
        E_a, E_v = self.fuse_joint(U_a, vida, U_v, vidv)
        lat = self.decoder_embed(self.norm(torch.cat([E_a, E_v], dim=1)))
        pred_a = self._decode(lat[:, :n_a], vida, tida, "audio")
        pred_v = self._decode(lat[:, n_a:], vidv, tidv, "video")
        mae_a, mae_a_ps = self._mae_loss(pred_a, ta)
        mae_v, mae_v_ps = self._mae_loss(pred_v, tv)

        if self.config.contrastive_input == "kept":
            U_a, vida = self.encode_modality(pa, ida, "audio"), ida
            U_v, vidv = self.encode_modality(pv, idv, "video"), idv
        z_a = self.pool(self.fuse_unimodal(U_a, vida, "audio", final_norm=False), "audio", normed=False, ids=vida)
        z_v = self.pool(self.fuse_unimodal(U_v, vidv, "video", final_norm=False), "video", normed=False, ids=vidv)
        nce, nce_ps = self._nce(z_a, z_v, gather_negatives)
        return {
            "loss": mae_a + mae_v + nce,
            "loss_mae_audio": mae_a,
            "loss_mae_video": mae_v,
            "loss_nce": nce,
            "z_audio": z_a,
            "z_video": z_v,
            "per_sample_loss": mae_a_ps + mae_v_ps + nce_ps,
        }

    def forward(self, video: Tensor | None = None, audio: Tensor | None = None, **kwargs: Any
                ) -> dict[str, Tensor]:
        """Same as :meth:`pretrain_forward` (so DDP hooks and ``model(**batch)`` work)."""
        return self.pretrain_forward(video, audio, **kwargs)


def build_model(name_or_cfg: str | CAVConfig = "tiny", **overrides: Any) -> CAVMAE:
    """Build a :class:`CAVMAE` from a preset name (``MODEL_PRESETS``) or a config, with field overrides.

    Example: ``build_model("base", depth_modality=11, depth_fusion=1, num_frames=1)``.
    """
    if isinstance(name_or_cfg, CAVConfig):
        cfg = name_or_cfg
    else:
        try:
            cfg = MODEL_PRESETS[name_or_cfg]
        except KeyError:
            raise ValueError(f"unknown model preset {name_or_cfg!r}; choose from {sorted(MODEL_PRESETS)}") from None
    if overrides:
        known = {f.name for f in dataclasses.fields(CAVConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"build_model: unknown CAVConfig field(s) {bad}")
        cfg = dataclasses.replace(cfg, **overrides)
    return CAVMAE(cfg)
