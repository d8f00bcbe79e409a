"""One entry point for loading stage-1 backbone weights, whatever file they come in.

The runner (``--init-checkpoint``) and the stage-2 script (``pretrain_avm.py --backbone``) both go
through :func:`load_backbone_weights`, so every format is accepted in both places:

- a project checkpoint: ``{"model": state, "meta": {...}}`` written by ``pretrain_init.py`` or the
  cached synthetic initialisation; loaded strictly;
- this package's own bare state dict (exactly the model's parameter names); loaded strictly;
- a CAV-MAE pre-training checkpoint (``blocks_a.*``, ``patch_embed_a.*``, possibly ``module.``
  prefixed), mapped by :func:`~stella_avalanche.models.weights.load_cavmae_checkpoint`;
- anything else is read as an ImageNet-MAE ViT checkpoint
  (:func:`~stella_avalanche.models.weights.load_imagenet_mae`), which names what it cannot map.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

__all__ = ["load_backbone_weights", "embed_segments_of"]

log = logging.getLogger(__name__)


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load backbone weights from ``path`` into ``model`` (formats: see the module docstring).

    :returns: ``{"format": "project" | "cavmae" | "imagenet_mae", "meta" | "report": ...}``.
    :raises RuntimeError: a project checkpoint or bare state dict that does not match the model,
        naming the first missing / unexpected keys.
    """
    obj = torch.load(path, map_location="cpu", weights_only=False)
    own = set(model.state_dict())
    if isinstance(obj, dict) and "model" in obj and "meta" in obj:
        _load_strict(model, obj["model"], path)
        return {"format": "project", "meta": obj.get("meta", {})}
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: not a checkpoint (found {type(state).__name__}, expected a state dict)")
    if set(state) == own:
        _load_strict(model, state, path)
        return {"format": "project", "meta": {}}
    from stella_avalanche.models import weights

    if any(k.replace("module.", "").startswith(("blocks_a.", "patch_embed_a.")) for k in state):
        fmt, report = "cavmae", weights.load_cavmae_checkpoint(model, state)
    else:
        fmt, report = "imagenet_mae", weights.load_imagenet_mae(model, state)
    log.info("loaded %s (%s): %s", path, fmt, report)
    return {"format": fmt, "report": report}


def embed_segments_of(state: dict, embed_dim: int) -> int:
    """The ``CAVConfig.embed_segments`` a project state dict was trained with (1 = no segment map)."""
    w = state.get("segment_proj_a.weight")
    return 1 if w is None else int(w.shape[1]) // embed_dim


def _load_strict(model: nn.Module, state: dict, path: Any) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        hint = ""
        if any(k.startswith("segment_proj_") for k in [*missing, *unexpected]):
            want = embed_segments_of(state, model.config.embed_dim)
            hint = (f" (the checkpoint pools its embeddings with embed_segments={want}, the model with "
                    f"{model.config.embed_segments}: set model.overrides.embed_segments={want})")
        raise RuntimeError(f"{path}: checkpoint does not match the model: missing {list(missing)[:5]}, "
                           f"unexpected {list(unexpected)[:5]}{hint}")
