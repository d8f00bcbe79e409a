"""experiments/probe_avm_negatives.py: the AVM trained further with random or same-pattern other-class
negatives (does a class-reading AVM make RCA informative?)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from stella_avalanche.data.synthetic import default_features, render_split
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import CAVMAE
from stella_avalanche.models.config import model_config_for

_SPEC = importlib.util.spec_from_file_location(
    "probe_avm_negatives", Path(__file__).resolve().parents[1] / "experiments" / "probe_avm_negatives.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


def test_same_pattern_negatives_share_the_pattern_and_not_the_class():
    labels = torch.tensor([0, 0, 1, 1, 0, 2])
    patterns = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    part = probe.negative_partners(labels, patterns, "same_pattern", g)
    has = part >= 0
    assert has.tolist() == [True, True, True, True, False, False]   # rows 4 and 5: no same-pattern partner
    assert torch.equal(patterns[part[has]], patterns[has]) and bool((labels[part[has]] != labels[has]).all())
    rand = probe.negative_partners(labels, patterns, "random", g)
    assert bool((rand != torch.arange(6)).all())                    # never the clip itself


def test_train_avm_moves_only_the_avm():
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", default_features("tiny")))
    avm = build_avm(model)
    for q in model.parameters():
        q.requires_grad_(False)
    clips = render_split("tiny", 0, "train", per_class=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    avm_before = [p.detach().clone() for p in avm.parameters()]
    losses = probe.train_avm(model, avm, clips, kind="same_pattern", steps=2, batch=8, lr=1e-3, seed=0)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(a, p) for a, p in zip(avm_before, avm.parameters()))
