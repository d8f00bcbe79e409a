"""Backbone configuration: :class:`CAVConfig`, the named size presets, and the one resolver from a preset
name (plus the benchmark's input geometry and field overrides) to a config.

Exact token-count arithmetic (``floor_fraction``, ``num_visible``) lives here too: the config's derived
counts and every selector use it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

__all__ = ["CAVConfig", "MODEL_PRESETS", "model_config_for", "floor_fraction", "num_visible", "Modality",
           "modality_name"]

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
    :param bf16_stream: an execution option, not a hyperparameter: under an active bf16 autocast the
        token stream is cast to bf16 once after each embedding / positional add and every LayerNorm of
        the backbone (blocks and final norms) normalises in its input's dtype, so the residual adds stay
        bf16 and the linears need no re-cast of their inputs. Autocast alone keeps the stream fp32
        (its ``layer_norm`` returns fp32), which costs dtype copies and fp32 norm traffic
        (docs/results/gpu_step.md, "bf16 residual stream"). Parameters stay fp32 and the losses are
        still computed in fp32. Without bf16 autocast (fp32, fp16 autocast) it changes nothing; False
        (default) keeps the reference numerics.
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
    bf16_stream: bool = False

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
        return self.num_audio_tokens if modality_name(modality) == "audio" else self.num_video_tokens

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
        # reaches: docs/synthetic.md, "Generator v2's default, measured" (the mean pooling saturated lower)
        embed_segments=4,
        # without it the stage-2 AVM sat at ln 2: uniform attention reads no synchrony, so nothing pulls
        # it towards time-aligned attention (docs/synthetic.md)
        avm_time_bias=5.0,
        # avm_features stays "joint" (paper): on unimodal features the AVM matched a little better
        # but its video attention turned away from the sounding object (docs/synthetic.md)
    ),
}



def modality_name(m: str) -> str:
    """``"audio"`` or ``"video"`` for a modality name or its one-letter alias (``"a"``, ``"v"``)."""
    try:
        return _MODALITY_ALIASES[m]
    except KeyError:
        raise ValueError(f"unknown modality {m!r}; expected 'audio' or 'video'") from None


def model_config_for(preset: str | CAVConfig, features: Any = None, **overrides: Any) -> CAVConfig:
    """The backbone config of a size preset, with the input geometry of the benchmark's preprocessing.

    The one preset resolver of the package (:func:`~stella_avalanche.models.cav.build_model` builds on it).

    :param preset: a name of :data:`MODEL_PRESETS` or a :class:`CAVConfig`.
    :param features: a ``FeatureConfig`` (or anything with ``num_frames``, ``frame_size``, ``target_length``
        and ``mel_bins``) whose geometry replaces the preset's; ``None`` keeps the preset's.
    :param overrides: further :class:`CAVConfig` fields, applied after the geometry.
    :raises ValueError: an unknown preset name or field.
    """
    if isinstance(preset, CAVConfig):
        cfg = preset
    elif preset in MODEL_PRESETS:
        cfg = MODEL_PRESETS[preset]
    else:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(CAVConfig)})
    if bad:
        raise ValueError(f"unknown CAVConfig field(s) {bad}")
    geometry = {}
    if features is not None:
        geometry = {"num_frames": features.num_frames, "img_size": features.frame_size,
                    "audio_length": features.target_length, "mel_bins": features.mel_bins}
    return dataclasses.replace(cfg, **{**geometry, **overrides})
