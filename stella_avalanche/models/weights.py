"""Load public pretrained weights into the two-stream backbone (docs/method.md §10).

- :func:`load_cavmae_checkpoint`: a CAV-MAE pre-training checkpoint (§10.1). Build the target with
  ``depth_modality=11, depth_fusion=1`` for a function-preserving load.
- :func:`load_imagenet_mae`: ImageNet MAE ViT-B weights (timm ``vit_base_patch16_224.mae`` encoder, or
  the FAIR "full" checkpoint with decoder) adapted into both streams (§10.2).

Both read local files only (``torch.load(weights_only=True)``, or ``.safetensors``), never download,
and return a :class:`LoadReport` that is also logged. The conversion functions
(:func:`convert_cavmae_state_dict`, :func:`convert_imagenet_mae_state_dict`) are pure and work on
``meta`` tensors, so the full-size mapping can be checked without allocating a ViT-B.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LoadReport",
    "read_state_dict",
    "convert_cavmae_state_dict",
    "convert_imagenet_mae_state_dict",
    "load_cavmae_checkpoint",
    "load_imagenet_mae",
]

log = logging.getLogger(__name__)

_UNUSED_NORMS = {"norm1_a", "norm1_v", "norm2_a", "norm2_v"}


@dataclass
class LoadReport:
    """What a checkpoint load did.

    :param loaded: target keys written from the source.
    :param missing: target keys the source did not provide (they keep their current values).
    :param unexpected: source keys no rule recognises.
    :param skipped: source key -> reason, for keys deliberately dropped (unused norms, no slot, CLS).
    :param filled: target key -> rule, for keys set by a rule rather than copied (e.g. zero inter-pos).
    :param source: where the weights came from (path or ``"<state_dict>"``).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    source: str = "<state_dict>"

    @property
    def mapped(self) -> list[str]:
        """Alias of :attr:`loaded` (name used in docs/contracts.md)."""
        return self.loaded

    def summary(self) -> str:
        """One-line human summary."""
        return (f"{self.source}: loaded {len(self.loaded)}, filled {len(self.filled)}, "
                f"skipped {len(self.skipped)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_state_dict(path_or_state: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """Read a local checkpoint into a flat ``{name: tensor}`` dict with ``module.`` prefixes stripped.

    Accepts a mapping, a ``torch.save`` file (loaded with ``weights_only=True``; a top-level ``model``
    / ``state_dict`` entry is unwrapped) or a ``.safetensors`` file.

    :returns: (state dict, source description).
    """
    if isinstance(path_or_state, Mapping):
        state: Any = path_or_state
        source = "<state_dict>"
    else:
        path = Path(path_or_state)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:  # pragma: no cover - safetensors ships with timm
                raise ImportError(f"{path}: reading .safetensors needs the `safetensors` package") from exc
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping) \
                and not all(isinstance(v, Tensor) for v in state.values()):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: expected a state dict (mapping name -> tensor), got {type(state).__name__}")
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out, source


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _cfg(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("model has no `config`: pass a stella_avalanche.models.cav.CAVMAE")
    return cfg


def _tile_frames(t: Tensor, key: str, cfg: Any, *, drop_cls: bool = False) -> Tensor:
    """(1, [1+]G², C) -> (1, T*G², C): one frame's spatial table repeated for each of the T frames."""
    g2 = cfg.grid**2
    if drop_cls and t.shape[1] == g2 + 1:
        t = t[:, 1:]
    if t.shape[1] == cfg.num_video_tokens:
        return t
    if t.shape[1] != g2:
        raise ValueError(f"{key}: {t.shape[1]} rows do not match a {cfg.grid}x{cfg.grid} grid "
                         f"({g2} rows per frame; img_size={cfg.img_size}, patch_size={cfg.patch_size})")
    return t.repeat(1, cfg.num_frames, 1)


def _freq_to_time_major(t: Tensor, key: str, cfg: Any) -> Tensor:
    """(1, L_A, C) rows f*T_a + t (CAV-MAE) -> rows t*F_a + f (this backbone)."""
    fa, ta = cfg.audio_freq_tokens, cfg.audio_time_tokens
    if t.shape[1] != fa * ta:
        raise ValueError(f"{key}: {t.shape[1]} rows, expected F_a*T_a = {fa}*{ta} = {fa * ta} "
                         f"(mel_bins={cfg.mel_bins}, audio_length={cfg.audio_length})")
    return t.reshape(1, fa, ta, t.shape[-1]).transpose(1, 2).reshape(1, fa * ta, t.shape[-1])


def _patch_rows_ft_to_tf(t: Tensor, p: int) -> Tensor:
    """Output rows (freq-in-patch j, time-in-patch i) -> (i, j): new row i*p + j = old row j*p + i."""
    rest = t.shape[1:]
    return t.reshape(p, p, *rest).transpose(0, 1).reshape(p * p, *rest)


def _finish(new: dict[str, Tensor], report: LoadReport, target: Mapping[str, Tensor]) -> None:
    """Check shapes against the model and fill ``report.loaded`` / ``report.missing``."""
    for k, v in new.items():
        if k not in target:
            raise KeyError(f"internal mapping produced unknown target key {k!r}")
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{report.source}: {k} has shape {tuple(v.shape)} after conversion, the model "
                             f"expects {tuple(target[k].shape)}; check the model config (embed_dim, "
                             f"num_frames, img_size, audio_length, mel_bins, patch_size)")
    report.loaded = sorted(k for k in new if k not in report.filled)
    report.missing = sorted(k for k in target if k not in new)


def _apply(model: nn.Module, new: Mapping[str, Tensor], report: LoadReport, strict: bool, what: str) -> None:
    if strict and (report.missing or report.unexpected):
        raise RuntimeError(f"{what} (strict): missing {report.missing}, unexpected {report.unexpected}")
    target = model.state_dict()
    with torch.no_grad():
        for k, v in new.items():
            target[k].copy_(v.to(dtype=target[k].dtype))
    log.info("%s %s", what, report.summary())
    if report.unexpected:
        log.warning("%s: unrecognised source keys: %s", what, report.unexpected)
    if report.missing:
        log.info("%s: target keys kept at their current values: %s", what, report.missing)


# ---------------------------------------------------------------------------------------------
# CAV-MAE (§10.1)
# ---------------------------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"^(blocks_a|blocks_v|blocks_u|decoder_blocks)\.(\d+)\.(.+)$")
_CAVMAE_DIRECT = {
    "patch_embed_v.proj.weight", "patch_embed_v.proj.bias", "patch_embed_a.proj.bias",
    "modality_a", "modality_v", "norm.weight", "norm.bias", "norm_a.weight", "norm_a.bias",
    "norm_v.weight", "norm_v.bias", "decoder_embed.weight", "decoder_embed.bias",
    "decoder_norm.weight", "decoder_norm.bias", "decoder_modality_a", "decoder_modality_v",
    "decoder_pred_v.weight", "decoder_pred_v.bias",
    # present only when re-loading an already converted checkpoint
    "inter_pos_embed_a", "inter_pos_embed_v", "mask_token_a", "mask_token_v",
}


def convert_cavmae_state_dict(state: Mapping[str, Tensor], model: nn.Module, *, source: str = "<state_dict>"
                              ) -> tuple[dict[str, Tensor], LoadReport]:
    """Map a CAV-MAE pre-training state dict onto ``model``'s names and layouts (§10.1 table).

    Pure function (no model mutation); works with ``meta`` tensors.

    :param state: source tensors, ``module.`` prefix allowed.
    :param model: target :class:`~stella_avalanche.models.cav.CAVMAE` (only its config and
        ``state_dict()`` shapes are read).
    :returns: (converted tensors keyed by target name, report).
    """
    cfg = _cfg(model)
    target = model.state_dict()
    report = LoadReport(source=source)
    new: dict[str, Tensor] = {}
    depth = {"blocks_a": cfg.depth_modality, "blocks_v": cfg.depth_modality, "blocks_u": cfg.depth_fusion,
             "decoder_blocks": cfg.decoder_depth}
    for raw_key, t in state.items():
        key = raw_key[len("module."):] if raw_key.startswith("module.") else raw_key
        m = _BLOCK_RE.match(key)
        if m:
            group, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            if group != "blocks_u" and rest.split(".")[0] in _UNUSED_NORMS:
                report.skipped[key] = "unused _a/_v norm of a non-fusion block"
            elif idx >= depth[group]:
                report.skipped[key] = f"no slot: target has {depth[group]} {group}"
            else:
                new[key] = t
        elif key == "patch_embed_a.proj.weight":
            new[key] = t.transpose(2, 3)  # CAV-MAE kernel axes are [freq, time]
        elif key in ("pos_embed_v", "decoder_pos_embed_v"):
            new[key] = _tile_frames(t, key, cfg)
        elif key in ("pos_embed_a", "decoder_pos_embed_a"):
            new[key] = _freq_to_time_major(t, key, cfg)
        elif key == "mask_token":
            new["mask_token_a"] = t
            new["mask_token_v"] = t
        elif key in ("decoder_pred_a.weight", "decoder_pred_a.bias"):
            new[key] = _patch_rows_ft_to_tf(t, cfg.patch_size)
        elif key in _CAVMAE_DIRECT:
            new[key] = t
        else:
            report.unexpected.append(key)
    for key in ("inter_pos_embed_a", "inter_pos_embed_v"):
        if key not in new:
            # zero tables keep the loaded network exactly CAV-MAE's function; they learn from there
            ref = target[key]
            new[key] = torch.zeros(ref.shape, dtype=ref.dtype, device=ref.device)
            report.filled[key] = "zeros (CAV-MAE has no inter positional table)"
    _finish(new, report, target)
    return new, report


def load_cavmae_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Tensor],
                           *, strict: bool = False) -> LoadReport:
    """Load a CAV-MAE pre-training checkpoint into ``model`` in place (§10.1).

    :param model: target backbone; use ``depth_modality=11, depth_fusion=1`` for a function-preserving load.
    :param path_or_state_dict: local ``.pth``/``.pt``/``.safetensors`` file or a state dict.
    :param strict: raise if any target key stays unloaded or any source key is unrecognised.
    :returns: the :class:`LoadReport` (also logged).
    """
    state, source = read_state_dict(path_or_state_dict)
    new, report = convert_cavmae_state_dict(state, model, source=source)
    _apply(model, new, report, strict, "load_cavmae_checkpoint")
    return report


# ---------------------------------------------------------------------------------------------
# ImageNet MAE (§10.2)
# ---------------------------------------------------------------------------------------------
_MAE_BLOCK_RE = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$")


def _map_mae_block(key: str, m: re.Match, t: Tensor, cfg: Any, new: dict[str, Tensor], report: LoadReport) -> None:
    """Map one encoder (``blocks.i.*``) or decoder (``decoder_blocks.k.*``) tensor into ``new``.

    Encoder block ``i`` feeds both modality streams when ``i < depth_modality``, else fusion block
    ``i - depth_modality``; blocks beyond the target's depth are recorded as skipped.
    """
    d_mod, d_fus = cfg.depth_modality, cfg.depth_fusion
    if m.group(1) != "blocks":  # decoder_blocks
        if int(m.group(2)) < cfg.decoder_depth:
            new[key] = t
        else:
            report.skipped[key] = f"no slot: target has {cfg.decoder_depth} decoder blocks"
        return
    i, rest = int(m.group(2)), m.group(3)
    if i < d_mod:
        new[f"blocks_a.{i}.{rest}"] = t
        new[f"blocks_v.{i}.{rest}"] = t
    elif i < d_mod + d_fus:
        j = i - d_mod
        new[f"blocks_u.{j}.{rest}"] = t
        head = rest.split(".")[0]
        if head in ("norm1", "norm2"):  # one LN pair becomes the joint, audio and video pairs
            tail = rest[len(head):]
            new[f"blocks_u.{j}.{head}_a{tail}"] = t
            new[f"blocks_u.{j}.{head}_v{tail}"] = t
    else:
        report.skipped[key] = f"no slot: target has {d_mod} + {d_fus} encoder blocks"


def _map_mae_other(key: str, t: Tensor, cfg: Any, new: dict[str, Tensor], report: LoadReport, *,
                   legacy_audio_head: bool) -> None:
    """Map one non-block MAE tensor (norms, patch embedding, positions, tokens, decoder ends) into ``new``;
    a key with no counterpart is recorded as skipped (known) or unexpected (unknown)."""
    if key in ("norm.weight", "norm.bias"):
        leaf = key.split(".")[1]
        for name in ("norm", "norm_a", "norm_v"):
            new[f"{name}.{leaf}"] = t
    elif key == "patch_embed.proj.weight":
        new["patch_embed_v.proj.weight"] = t
        # grey audio patch replicated to RGB gives the same response as the summed kernel
        new["patch_embed_a.proj.weight"] = t.sum(dim=1, keepdim=True)
    elif key == "patch_embed.proj.bias":
        new["patch_embed_v.proj.bias"] = t
        new["patch_embed_a.proj.bias"] = t
    elif key == "pos_embed":
        tiled = _tile_frames(t, key, cfg, drop_cls=True)
        new["pos_embed_v"] = tiled
        new["inter_pos_embed_v"] = tiled
    elif key == "cls_token":
        report.skipped[key] = "no CLS token in the two-stream backbone"
    elif key in ("decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight", "decoder_norm.bias"):
        new[key] = t
    elif key == "decoder_pos_embed":
        new["decoder_pos_embed_v"] = _tile_frames(t, key, cfg, drop_cls=True)
    elif key == "mask_token":
        new["mask_token_a"] = t
        new["mask_token_v"] = t
    elif key in ("decoder_pred.weight", "decoder_pred.bias"):
        leaf = key.split(".")[1]
        new[f"decoder_pred_v.{leaf}"] = t
        if legacy_audio_head:
            new[f"decoder_pred_a.{leaf}"] = t[: cfg.audio_patch_dim]
    else:
        report.unexpected.append(key)


def _zero_unmapped(new: dict[str, Tensor], target: Mapping[str, Tensor], report: LoadReport) -> None:
    """Zero the audio positional tables and modality tokens that MAE does not provide (official parity)."""
    for key in ("pos_embed_a", "inter_pos_embed_a", "decoder_pos_embed_a", "modality_a", "modality_v",
                "decoder_modality_a", "decoder_modality_v"):
        if key not in new:
            ref = target[key]
            new[key] = torch.zeros(ref.shape, dtype=ref.dtype, device=ref.device)
            report.filled[key] = "zeros (official MAE adaptation parity, D4)"


def convert_imagenet_mae_state_dict(state: Mapping[str, Tensor], model: nn.Module, *,
                                    source: str = "<state_dict>", legacy_audio_head: bool = False,
                                    zero_unmapped: bool = False) -> tuple[dict[str, Tensor], LoadReport]:
    """Map ImageNet MAE ViT weights (timm encoder, or FAIR full with decoder) onto ``model`` (§10.2).

    :param legacy_audio_head: initialise ``decoder_pred_a`` from the first p² rows of MAE's pixel head,
        as the official code did (D5); default keeps it random.
    :param zero_unmapped: official parity for D4: zero the audio positional tables and the modality
        tokens instead of keeping the model's sin-cos / N(0, .02) initialisation.
    :returns: (converted tensors keyed by target name, report).
    """
    cfg = _cfg(model)
    target = model.state_dict()
    report = LoadReport(source=source)
    new: dict[str, Tensor] = {}
    for raw_key, t in state.items():
        key = raw_key[len("module."):] if raw_key.startswith("module.") else raw_key
        m = _MAE_BLOCK_RE.match(key)
        if m:
            _map_mae_block(key, m, t, cfg, new, report)
        else:
            _map_mae_other(key, t, cfg, new, report, legacy_audio_head=legacy_audio_head)
    if zero_unmapped:
        _zero_unmapped(new, target, report)
    _finish(new, report, target)
    return new, report


def load_imagenet_mae(model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Tensor], *,
                      strict: bool = False, legacy_audio_head: bool = False, zero_unmapped: bool = False
                      ) -> LoadReport:
    """Adapt ImageNet MAE ViT weights into ``model`` in place (§10.2).

    Unmapped tensors (audio positional tables, decoder when the source has none, tokens) keep the
    model's §1.2 initialisation. See :func:`convert_imagenet_mae_state_dict` for the flags.

    :param strict: raise if a target key stays unloaded or a source key is unrecognised (the timm
        encoder-only file always leaves the decoder missing).
    :returns: the :class:`LoadReport` (also logged).
    """
    state, source = read_state_dict(path_or_state_dict)
    new, report = convert_imagenet_mae_state_dict(state, model, source=source,
                                                  legacy_audio_head=legacy_audio_head,
                                                  zero_unmapped=zero_unmapped)
    _apply(model, new, report, strict, "load_imagenet_mae")
    return report
