"""Backbone (:mod:`.cav`; its config, size presets and the preset resolver: :mod:`.config`), audio-video
matching module (:mod:`.avm`) and pretrained-weight loading (:mod:`.weights`)."""
from __future__ import annotations

from .avm import AVMatching, matching_pairs
from .cav import CAVMAE, build_model
from .config import MODEL_PRESETS, CAVConfig, floor_fraction, model_config_for, num_visible
from .weights import LoadReport, load_cavmae_checkpoint, load_imagenet_mae, read_state_dict

__all__ = [
    "AVMatching",
    "CAVConfig",
    "CAVMAE",
    "LoadReport",
    "MODEL_PRESETS",
    "build_model",
    "floor_fraction",
    "load_cavmae_checkpoint",
    "load_imagenet_mae",
    "matching_pairs",
    "model_config_for",
    "num_visible",
    "read_state_dict",
]
