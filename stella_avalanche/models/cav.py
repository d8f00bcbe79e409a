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

A pre-training step reads as MAE's: :meth:`CAVMAE.forward_encoder` (mask, encode, fuse),
:meth:`CAVMAE.forward_decoder` (reconstruct the targets), :meth:`CAVMAE.forward_loss` (MAE + InfoNCE),
composed by :meth:`CAVMAE.pretrain_forward`. Config and presets: :mod:`stella_avalanche.models.config`;
the InfoNCE: :mod:`stella_avalanche.models.contrastive`.

Parameter names follow CAV-MAE (§1.2, §10.1) so that :mod:`stella_avalanche.models.weights` only
renames and reorders.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from stella_avalanche.models.config import (MODEL_PRESETS, CAVConfig, floor_fraction, model_config_for,
                                            modality_name, num_visible)
from stella_avalanche.models.contrastive import info_nce

__all__ = [
    "CAVConfig",
    "CAVMAE",
    "MaskedModality",
    "MODEL_PRESETS",
    "build_model",
    "model_config_for",
    "time_segment",
    "floor_fraction",
    "num_visible",
    "sincos_2d",
    "gather_tokens",
    "ViTBlock",
    "FusionBlock",
    "StreamLayerNorm",
]

@torch.no_grad()
def init_linear_and_norm_(module: nn.Module) -> None:
    """In place: every Linear N(0, 0.02) with zero bias, every LayerNorm weight 1 / bias 0 (§1.2, §3.1)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):  # StreamLayerNorm too
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


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
# blocks
# ---------------------------------------------------------------------------------------------
class StreamLayerNorm(nn.LayerNorm):
    """:class:`~torch.nn.LayerNorm` that can keep a bf16 input in bf16 (``CAVConfig.bf16_stream``).

    Autocast runs ``layer_norm`` in fp32 and returns fp32, so a bf16 token stream would turn fp32 at
    the first norm. With ``keep_dtype`` set, a bf16 input is normalised by ``F.layer_norm`` in bf16
    (the kernels accumulate mean and variance in fp32) with the weight and bias cast to bf16, outside
    autocast, and a bf16 tensor comes out. Any other input, or ``keep_dtype`` unset, takes
    ``nn.LayerNorm.forward`` unchanged. Same parameters and state-dict names as ``nn.LayerNorm``.
    """

    #: set per instance by :class:`CAVMAE` from ``CAVConfig.bf16_stream``
    keep_dtype: bool = False

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not (self.keep_dtype and x.dtype == torch.bfloat16 and self.weight.dtype != x.dtype):
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


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
                         norm_layer=partial(StreamLayerNorm, eps=eps), mlp_layer=Mlp)
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
        self.norm1_a = StreamLayerNorm(dim, eps=eps)
        self.norm2_a = StreamLayerNorm(dim, eps=eps)
        self.norm1_v = StreamLayerNorm(dim, eps=eps)
        self.norm2_v = StreamLayerNorm(dim, eps=eps)

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
    if modality_name(modality) == "audio":
        return (ids // config.audio_freq_tokens) * segments // config.audio_time_tokens
    return (ids // config.grid**2) * segments // config.num_frames


class MaskedModality(NamedTuple):
    """One modality after masking and encoding (:meth:`CAVMAE.forward_encoder`); n visible of K kept.

    :param patches: (B, K, P) kept patch vectors (P = p² audio, 3p² video).
    :param ids: (B, K) int64 token positions of ``patches``.
    :param visible_ids: (B, n) positions of the encoder-visible tokens.
    :param target_patches: (B, K - n, P) patch vectors to reconstruct.
    :param target_ids: (B, K - n) their positions.
    :param codes: (B, n, D) unimodal codes U of the visible tokens.
    :param fused: (B, n, D) the visible tokens after the joint fusion blocks (the AVM's inputs E).
    """

    patches: Tensor
    ids: Tensor
    visible_ids: Tensor
    target_patches: Tensor
    target_ids: Tensor
    codes: Tensor
    fused: Tensor


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
        self.norm = StreamLayerNorm(d, eps=eps)
        self.norm_a = StreamLayerNorm(d, eps=eps)
        self.norm_v = StreamLayerNorm(d, eps=eps)
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
        self.decoder_norm = StreamLayerNorm(dd, eps=eps)
        self.decoder_pred_a = nn.Linear(dd, cfg.audio_patch_dim)
        self.decoder_pred_v = nn.Linear(dd, cfg.video_patch_dim)
        # --- segment pooling of the embeddings (embed_segments > 1 only, so the paper presets and
        # their checkpoints have no such parameters) ---------------------------------------
        if cfg.embed_segments > 1:
            self.segment_proj_a = nn.Linear(cfg.embed_segments * d, d)
            self.segment_proj_v = nn.Linear(cfg.embed_segments * d, d)
        for m in self.modules():
            if isinstance(m, StreamLayerNorm):
                m.keep_dtype = cfg.bf16_stream
        self.reset_parameters()

    def _stream_on(self, x: Tensor) -> bool:
        """Whether the bf16 residual stream is on for this forward: ``config.bf16_stream`` and a bf16
        autocast active on ``x``'s device."""
        if not self.config.bf16_stream:
            return False
        dev = x.device.type
        return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16

    def _to_stream(self, x: Tensor) -> Tensor:
        """``x`` cast to bf16 when :meth:`_stream_on`, otherwise ``x`` itself. Called after every add
        of an fp32 table (position, modality), which type promotion would otherwise turn into fp32."""
        return x.to(torch.bfloat16) if self._stream_on(x) else x

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
        m = modality_name(modality)
        w, bias = self._patch_weight(m)
        x = F.linear(patches, w, bias)
        if m == "audio":
            x = x + self.modality_a + self._pos(self.pos_embed_a, ids, x.shape[1])
            blocks = self.blocks_a
        else:
            x = x + self.modality_v + self._pos(self.pos_embed_v, ids, x.shape[1])
            blocks = self.blocks_v
        x = self._to_stream(x)
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
        # cast before the concatenation, so that it moves bf16 rows under the bf16 stream
        x = torch.cat([self._to_stream(U_a + self._pos(self.inter_pos_embed_a, a_ids, ka)),
                       self._to_stream(U_v + self._pos(self.inter_pos_embed_v, v_ids, U_v.shape[1]))], dim=1)
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
        m = modality_name(modality)
        table = self.inter_pos_embed_a if m == "audio" else self.inter_pos_embed_v
        x = self._to_stream(U + self._pos(table, ids, U.shape[1]))
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
        m = modality_name(modality)
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
        # at least fp32 sums: a bf16 stream (bf16_stream) would otherwise add the tokens in bf16;
        # a no-op for the fp32 stream
        acc = torch.promote_types(x.dtype, torch.float32)
        sums = x.new_zeros(b, s, d, dtype=acc).scatter_add_(1, seg[..., None].expand(-1, -1, d), x.to(acc))
        counts = torch.zeros(b, s, device=x.device, dtype=acc).scatter_add_(
            1, seg, torch.ones_like(seg, dtype=acc))
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
        if self._stream_on(x_vis):  # concatenate in bf16 (plain autocast promotes to fp32 here)
            x_vis, mask = x_vis.to(torch.bfloat16), mask.to(torch.bfloat16)
        x = torch.cat([x_vis, mask.expand(b, nt, dd)], dim=1)
        x = self._to_stream(x + gather_tokens(table, torch.cat([vis_ids, tgt_ids], dim=1)) + mod)
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

    def forward_encoder(self, video: Tensor | None = None, audio: Tensor | None = None, *,
                        video_keep: Tensor | None = None, audio_keep: Tensor | None = None,
                        video_patches: Tensor | None = None, audio_patches: Tensor | None = None,
                        mask_ratio: float | None = None, generator: torch.Generator | None = None
                        ) -> dict[str, MaskedModality]:
        """Mask and encode (MAE's ``forward_encoder``): split each modality's kept tokens into visible
        tokens and reconstruction targets, encode the visible ones and fuse them jointly.

        Each modality is given either as a full clip (``video`` (B, T, 3, S, S) / ``audio`` (B, 1, A, F))
        or as patch vectors (``video_patches`` (B, K_V, 3p²) / ``audio_patches`` (B, K_A, p²)).
        ``*_keep`` (B, K) are the kept token ids: with a full clip they select its patches, with patch
        vectors they are the patches' positions. Without keep ids all L tokens are candidates (random
        masking). Per sample the K candidates are permuted at random (audio first, then video, from
        ``generator``); the first ``n = floor(L (1 - ρ))`` are encoder-visible, the other K - n are
        reconstruction targets and everything not kept is ignored (not encoded, decoded nor scored).

        :param mask_ratio: overrides ``config.mask_ratio`` (ρ).
        :param generator: source of the masking permutation.
        :returns: ``{"audio": ..., "video": ...}``, each a :class:`MaskedModality`: kept ``patches``
            (B, K, P) and ``ids`` (B, K), ``visible_ids`` (B, n), ``target_patches`` (B, K - n, P),
            ``target_ids`` (B, K - n), unimodal ``codes`` (B, n, D) and jointly ``fused`` tokens (B, n, D).
        :raises ValueError: inputs given twice or not at all, shapes that do not match, or a kept
            count that leaves no target.
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
        return {"audio": MaskedModality(pa, ida, vida, ta, tida, U_a, E_a),
                "video": MaskedModality(pv, idv, vidv, tv, tidv, U_v, E_v)}

    def forward_decoder(self, encoded: dict[str, MaskedModality]) -> tuple[Tensor, Tensor]:
        """Reconstruct the targets of each modality (MAE's ``forward_decoder``).

        The fused visible tokens of both modalities go through the final norm and the decoder embedding
        together; each modality is then decoded separately with mask tokens at its targets.

        :param encoded: the output of :meth:`forward_encoder`.
        :returns: (pred_audio (B, K_A - n_A, p²), pred_video (B, K_V - n_V, 3p²)), rows in the order of
            ``target_ids``.
        """
        a, v = encoded["audio"], encoded["video"]
        n_a = a.fused.shape[1]
        lat = self.decoder_embed(self.norm(torch.cat([a.fused, v.fused], dim=1)))
        pred_a = self._decode(lat[:, :n_a], a.visible_ids, a.target_ids, "audio")
        pred_v = self._decode(lat[:, n_a:], v.visible_ids, v.target_ids, "video")
        return pred_a, pred_v

    def forward_loss(self, encoded: dict[str, MaskedModality], pred_audio: Tensor, pred_video: Tensor, *,
                     gather_negatives: bool | None = None) -> dict[str, Tensor]:
        """MAE reconstruction loss of both modalities plus the weighted symmetric InfoNCE (MAE's
        ``forward_loss``, §1.4, §1.5).

        :param encoded: the output of :meth:`forward_encoder`.
        :param pred_audio: (B, K_A - n_A, p²) and ``pred_video`` (B, K_V - n_V, 3p²) from
            :meth:`forward_decoder`.
        :param gather_negatives: overrides ``config.gather_negatives`` for this call, e.g. ``False``
            for per-rank scoring passes that the other ranks do not run at the same time.
        :returns: dict with ``loss``, ``loss_mae_audio``, ``loss_mae_video``, ``loss_nce`` (scalars, fp32),
            ``z_audio``, ``z_video`` (B, D) un-normalised pooled embeddings of the visible tokens
            (``contrastive_input="kept"``: of all kept tokens) and ``per_sample_loss`` (B,) =
            per-sample MAE_a + MAE_v + weighted NCE.
        """
        a, v = encoded["audio"], encoded["video"]
        mae_a, mae_a_ps = self._mae_loss(pred_audio, a.target_patches)
        mae_v, mae_v_ps = self._mae_loss(pred_video, v.target_patches)
        U_a, ids_a, U_v, ids_v = a.codes, a.visible_ids, v.codes, v.visible_ids
        if self.config.contrastive_input == "kept":
            U_a, ids_a = self.encode_modality(a.patches, a.ids, "audio"), a.ids
            U_v, ids_v = self.encode_modality(v.patches, v.ids, "video"), v.ids
        z_a = self.pool(self.fuse_unimodal(U_a, ids_a, "audio", final_norm=False), "audio", normed=False, ids=ids_a)
        z_v = self.pool(self.fuse_unimodal(U_v, ids_v, "video", final_norm=False), "video", normed=False, ids=ids_v)
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

    def pretrain_forward(self, video: Tensor | None = None, audio: Tensor | None = None, *,
                         video_keep: Tensor | None = None, audio_keep: Tensor | None = None,
                         video_patches: Tensor | None = None, audio_patches: Tensor | None = None,
                         mask_ratio: float | None = None, generator: torch.Generator | None = None,
                         gather_negatives: bool | None = None) -> dict[str, Tensor]:
        """MAE + contrastive pre-training step (§1.4, §1.5; guided masking §4 step 10):
        :meth:`forward_encoder`, :meth:`forward_decoder`, :meth:`forward_loss`.

        Inputs as :meth:`forward_encoder`; ``gather_negatives`` as :meth:`forward_loss`, whose dict is
        returned.
        """
        encoded = self.forward_encoder(video, audio, video_keep=video_keep, audio_keep=audio_keep,
                                       video_patches=video_patches, audio_patches=audio_patches,
                                       mask_ratio=mask_ratio, generator=generator)
        pred_audio, pred_video = self.forward_decoder(encoded)
        return self.forward_loss(encoded, pred_audio, pred_video, gather_negatives=gather_negatives)

    def forward(self, video: Tensor | None = None, audio: Tensor | None = None, **kwargs: Any
                ) -> dict[str, Tensor]:
        """Same as :meth:`pretrain_forward` (so DDP hooks and ``model(**batch)`` work)."""
        return self.pretrain_forward(video, audio, **kwargs)


def build_model(name_or_cfg: str | CAVConfig = "tiny", features: Any = None, **overrides: Any) -> CAVMAE:
    """Build a :class:`CAVMAE` from a preset name (``MODEL_PRESETS``) or a config, with field overrides
    (resolved by :func:`~stella_avalanche.models.config.model_config_for`).

    Example: ``build_model("base", depth_modality=11, depth_fusion=1, num_frames=1)``.
    """
    return CAVMAE(model_config_for(name_or_cfg, features, **overrides))
