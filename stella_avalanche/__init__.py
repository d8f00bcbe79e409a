"""stella_avalanche: STELLA continual audio-video pre-training as an Avalanche plugin.

Public API is re-exported lazily so that ``import stella_avalanche`` stays cheap (Avalanche's own
import costs several seconds).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "synthetic_benchmark": "stella_avalanche.benchmarks.synthetic",
    "vggsound_benchmark": "stella_avalanche.benchmarks.vggsound",
    "audioset_benchmark": "stella_avalanche.benchmarks.audioset",
    "AudioVideoDataset": "stella_avalanche.data.datasets",
    "FeatureConfig": "stella_avalanche.data.features",
    "CAVMAE": "stella_avalanche.models.cav",
    "CAVConfig": "stella_avalanche.models.config",
    "build_model": "stella_avalanche.models.cav",
    "AVMatching": "stella_avalanche.models.avm",
    "AudioVideoPretraining": "stella_avalanche.training.template",
    "STELLAPlugin": "stella_avalanche.training.plugins.stella",
    "STELLA": "stella_avalanche.training.strategies",
    "make_strategy": "stella_avalanche.training.strategies",
    "ReservoirBuffer": "stella_avalanche.training.buffer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stella_avalanche' has no attribute {name!r}")
