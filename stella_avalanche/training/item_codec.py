"""How replay plugins turn batch rows into stored items and back (``docs/method.md`` §6).

A codec sits between a plugin and its :class:`~stella_avalanche.training.buffer.ReservoirBuffer`:
``encode`` maps float batch rows to the compact stored form (the buffer then casts each field to its
declared dtype), ``decode`` maps stored rows back to float training tensors on the training device.

- :class:`ClipCodec`: the replay baselines (uint8 video, fp16 audio; or fp32 throughout).
- :class:`StellaCodec`: STELLA's full clips with their I, C, q̄ and z, or STELLA+'s selected patches
  with their ids (uint8 video, per-item 8-bit audio or fp16, statistics in ``stats_dtype``); it also
  names the buffer layout (:meth:`StellaCodec.fields`).

Keys a codec does not know pass through unchanged (``category``, ``index``, ``z_a``, ...); the buffer
ignores keys that are not among its fields (``label``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from stella_avalanche.batch_keys import AUDIO, AUDIO_PATCHES, INDEX, VIDEO, VIDEO_PATCHES
from stella_avalanche.training.buffer import (audio_from_uint8, audio_to_uint8, stella_fields, stella_plus_fields,
                                              video_from_uint8, video_patches_from_uint8, video_patches_to_uint8,
                                              video_to_uint8)

__all__ = ["ClipCodec", "StellaCodec"]


class ClipCodec:
    """The baselines' storage: video as uint8 pixels and audio as fp16 when ``compact``, else fp32.

    :param compact: compact storage (§6); ``False`` stores fp32 (GMED edits stored clips by far less
        than one uint8 step).
    """

    def __init__(self, *, compact: bool = True) -> None:
        self.compact = bool(compact)

    def encode(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Batch rows -> stored form (other keys as given, detached)."""
        out = {}
        for k, v in rows.items():
            v = v.detach()
            if k == VIDEO:
                v = video_to_uint8(v) if self.compact else v.float()
            elif k == AUDIO:
                v = v.to(torch.float16) if self.compact else v.float()
            out[k] = v
        return out

    def decode(self, stored: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Stored rows -> float training tensors on ``device`` (inverse of :meth:`encode`)."""
        out = {}
        for k, v in stored.items():
            v = v.to(device, non_blocking=True)
            if k == VIDEO:
                v = video_from_uint8(v) if v.dtype == torch.uint8 else v.float()
            elif k == AUDIO:
                v = v.float()
            out[k] = v
        return out


#: STELLA's stored statistics, decoded to fp32 (z are the DER targets; I, C, q̄ feed the selection)
_STATS = ("z_a", "z_v", "qbar_a", "qbar_v", "I_v", "I_a", "C_v", "C_a")
#: STELLA's stored pixels: (encode, decode) of the uint8 clip and of STELLA+'s uint8 patch rows
_PIXELS = {VIDEO: (video_to_uint8, video_from_uint8), VIDEO_PATCHES: (video_patches_to_uint8, video_patches_from_uint8)}


class StellaCodec:
    """STELLA / STELLA+ storage (``buffer.stella_fields`` / ``buffer.stella_plus_fields``).

    STELLA stores the clip (``video``, ``audio``), STELLA+ the selected patches (``video_patches``,
    ``audio_patches``) and their ids (``video_ids``, ``audio_ids``); both store ``z_a``, ``z_v``,
    ``qbar_a``, ``qbar_v``, ``category``, ``index``, and STELLA also ``I_v``, ``I_a``, ``C_v``, ``C_a``.

    :param plus: STELLA+ layout.
    :param audio_storage: ``"uint8"`` (per-item affine: ``<key>``, ``<key>_lo``, ``<key>_scale``) or
        ``"float16"``.
    :param stats_dtype: dtype of the stored I, C and q̄.
    """

    def __init__(self, *, plus: bool, audio_storage: str = "uint8",
                 stats_dtype: torch.dtype = torch.float16) -> None:
        if audio_storage not in ("uint8", "float16"):
            raise ValueError(f"audio_storage must be 'uint8' or 'float16', got {audio_storage!r}")
        self.plus = bool(plus)
        self.audio_storage = audio_storage
        self.stats_dtype = stats_dtype
        # the rows of the other layout are not stored (STELLA+ keeps patches, not clips)
        self._dropped = (VIDEO, AUDIO) if self.plus else (VIDEO_PATCHES, AUDIO_PATCHES)

    def fields(self, *, config: Any, keep_video: int, keep_audio: int, num_heads: int) -> dict:
        """The buffer layout for a backbone ``config`` (sizes as ``CAVMAE.config``), K_V / K_A kept
        tokens and the AVM's head count."""
        if max(config.num_video_tokens, config.num_audio_tokens) > torch.iinfo(torch.int16).max:
            raise ValueError("token ids exceed int16: STELLA+ id storage needs L <= 32767")
        if self.plus:
            return stella_plus_fields(keep_video=keep_video, keep_audio=keep_audio,
                                      patch_size=config.patch_size, embed_dim=config.embed_dim,
                                      num_heads=num_heads, audio_storage=self.audio_storage,
                                      stats_dtype=self.stats_dtype)
        return stella_fields(num_frames=config.num_frames, img_size=config.img_size,
                             audio_length=config.audio_length, mel_bins=config.mel_bins,
                             embed_dim=config.embed_dim, num_heads=num_heads,
                             video_tokens=config.num_video_tokens, audio_tokens=config.num_audio_tokens,
                             audio_storage=self.audio_storage, stats_dtype=self.stats_dtype)

    def encode(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Current rows -> stored form: uint8 video / video patches, encoded audio, the rest as given;
        ``index`` -1 when the rows have none."""
        out: dict[str, Tensor] = {}
        if INDEX not in rows:
            ref = next(iter(rows.values()))
            out[INDEX] = torch.full((ref.shape[0],), -1, dtype=torch.long, device=ref.device)
        for k, v in rows.items():
            if k in self._dropped:
                continue
            v = v.detach()
            if k in _PIXELS:
                out[k] = _PIXELS[k][0](v)
            elif k in (AUDIO, AUDIO_PATCHES):
                out.update(self._encode_audio(v, k))
            else:
                out[k] = v
        return out

    def decode(self, stored: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Stored rows -> fp32 clips or patches, int64 ids and fp32 statistics on ``device``
        (``category`` / ``index`` keep their stored dtype)."""
        items = {k: v.to(device, non_blocking=True) for k, v in stored.items()}
        out: dict[str, Tensor] = {}
        for k, v in items.items():
            if k.endswith(("_lo", "_scale")):
                continue
            if k in _PIXELS:
                out[k] = _PIXELS[k][1](v)
            elif k in (AUDIO, AUDIO_PATCHES):
                out[k] = self._decode_audio(items, k)
            elif k in ("video_ids", "audio_ids"):
                out[k] = v.long()
            elif k in _STATS:
                out[k] = v.float()
            else:
                out[k] = v
        return out

    def _encode_audio(self, x: Tensor, name: str) -> dict[str, Tensor]:
        if self.audio_storage == "uint8":
            q, lo, scale = audio_to_uint8(x)
            return {name: q, f"{name}_lo": lo, f"{name}_scale": scale}
        return {name: x.to(torch.float16)}

    def _decode_audio(self, items: Mapping[str, Tensor], name: str) -> Tensor:
        if self.audio_storage == "uint8":
            return audio_from_uint8(items[name], items[f"{name}_lo"], items[f"{name}_scale"])
        return items[name].float()
