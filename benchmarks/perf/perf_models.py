"""Model sizes used by the perf scripts: the presets plus ``small``, a base-width model with fewer
tokens and blocks so that a CPU can time it (same D, heads, MLP ratio, decoder width as ``base``)."""
from __future__ import annotations

import dataclasses

from stella_avalanche.models.config import MODEL_PRESETS, CAVConfig, model_config_for

__all__ = ["model_config", "SMALL"]

#: base widths (768 / 12 heads, decoder 512 / 16 heads), 2 + 1 encoder blocks, 2 decoder blocks,
#: 2 frames of 112 x 112 (98 video tokens) and a 256 x 128 fbank (128 audio tokens)
SMALL = dataclasses.replace(MODEL_PRESETS["base"], depth_modality=2, depth_fusion=1, decoder_depth=2,
                            num_frames=2, img_size=112, audio_length=256)


def model_config(name: str) -> CAVConfig:
    """``tiny`` / ``base`` (``MODEL_PRESETS``) or ``small`` (:data:`SMALL`)."""
    if name == "small":
        return SMALL
    try:
        return model_config_for(name)
    except ValueError:
        raise SystemExit(f"unknown model {name!r}: choose tiny, small or base") from None
