"""Benchmarks: Continual-VS, Continual-AS (prepared real data) and the synthetic benchmark.

Every factory returns an Avalanche ``CLScenario`` with ``train_stream``, ``test_stream`` and
``retrieval_stream`` (one experience per task) built by :func:`make_av_scenario`. Names are resolved
lazily so that importing the package does not import Avalanche (several seconds).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_av_scenario": "stella_avalanche.benchmarks.common",
    "multitask_train_dataset": "stella_avalanche.benchmarks.common",
    "wrap_dataset": "stella_avalanche.benchmarks.common",
    "vggsound_benchmark": "stella_avalanche.benchmarks.vggsound",
    "audioset_benchmark": "stella_avalanche.benchmarks.audioset",
    "synthetic_benchmark": "stella_avalanche.benchmarks.synthetic",
    "VGGSOUND_TASKS": "stella_avalanche.benchmarks.splits",
    "AUDIOSET_TASKS": "stella_avalanche.benchmarks.splits",
    "prepare_vggsound_splits": "stella_avalanche.benchmarks.splits",
    "prepare_audioset_splits": "stella_avalanche.benchmarks.splits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stella_avalanche.benchmarks' has no attribute {name!r}")
