"""The backbone and AVM a diagnosis or probe reads: from a run checkpoint, from explicit stage-1 / stage-2
files, or from the cached synthetic initialisation (built on first use).

Apart from :mod:`stella_avalanche.evaluation.diagnostics` because it needs the initialisation builder
(:mod:`stella_avalanche.training.pretrain`), which itself uses the diagnostics' AVM matching measure.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from stella_avalanche.data.synthetic import default_features
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import CAVMAE
from stella_avalanche.models.config import model_config_for
from stella_avalanche.models.loading import embed_segments_of, load_backbone_weights
from stella_avalanche.paths import portable_path
from stella_avalanche.training.pretrain import load_avm_checkpoint, synthetic_initialisation

__all__ = ["load_models"]


def load_models(*, checkpoint: Optional[str] = None, backbone: Optional[str] = None, avm: Optional[str] = None,
                preset: str = "default", data_seed: int = 0, model_preset: str = "tiny"
                ) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """Backbone and AVM to diagnose: a run checkpoint, explicit stage-1 / stage-2 files, or (default)
    the cached synthetic initialisation of ``preset`` (built on first use, as ``run_stella.py`` does).

    :returns: (backbone, avm, a description of the source).
    """
    cfg = model_config_for(model_preset, default_features(preset))

    def build(state: Optional[dict]) -> tuple[torch.nn.Module, torch.nn.Module]:
        # a checkpoint made before the preset's segment pooling (or with another one) keeps its own
        c = cfg if state is None else dataclasses.replace(cfg, embed_segments=embed_segments_of(state, cfg.embed_dim))
        m = CAVMAE(c)
        return m, build_avm(m)

    if checkpoint:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=False)
        strategy = obj.get("strategy", {}) if isinstance(obj, dict) else {}
        if "model" not in strategy:
            raise ValueError(f"{checkpoint}: not a run checkpoint (no strategy.model); pass --backbone/--avm")
        model, net = build(strategy["model"])
        model.load_state_dict(strategy["model"])
        states = strategy.get("plugins", {})
        values = states.values() if isinstance(states, dict) else states
        avm_state = next((s["avm"] for s in values if isinstance(s, dict) and "avm" in s), None)
        if avm_state is None:
            raise ValueError(f"{checkpoint}: the run has no AVM (not a STELLA / STELLA+ run)")
        net.load_state_dict(avm_state)
        return model, net, f"checkpoint {portable_path(checkpoint)}"
    if backbone:
        obj = torch.load(backbone, map_location="cpu", weights_only=False)
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        model, net = build(state if isinstance(state, dict) else None)
        load_backbone_weights(model, backbone)
        load_avm_checkpoint(net, avm)
        return model, net, f"backbone {portable_path(backbone)}, avm {portable_path(avm)}"
    model, net = build(None)
    paths = synthetic_initialisation(cfg, preset=preset, seed=data_seed)
    load_backbone_weights(model, paths["backbone"])
    load_avm_checkpoint(net, paths["avm"])
    return model, net, f"cached synthetic initialisation {portable_path(paths['backbone'].parent)}"
