"""Retrieval oracles from the generator's ground truth: the expected-recall formula and the headroom
the default synthetic benchmark leaves between the instance cues and the class."""
from __future__ import annotations

import pytest
import torch

from stella_avalanche.evaluation.oracle import instance_keys, oracle_recall, retrieval_oracles, split_truths


def test_oracle_recall_is_the_expected_recall_over_ties() -> None:
    keys = torch.tensor([0, 0, 1, 1, 1, 2])
    out = oracle_recall(keys, torch.zeros(6, dtype=torch.long), ks=(1, 2))
    assert out["R@1"] == pytest.approx(100 * (0.5 + 0.5 + 1 / 3 * 3 + 1) / 6)
    assert out["R@2"] == pytest.approx(100 * (1 + 1 + 2 / 3 * 3 + 1) / 6)
    assert out["avg"] == pytest.approx((out["R@1"] + out["R@2"]) / 2)
    # pools split the ties: each query only meets its own pool
    split = oracle_recall(keys, torch.tensor([0, 1, 0, 1, 1, 0]), ks=(1,))
    assert split["R@1"] == pytest.approx(100 * (1 + 1 + 1 + 0.5 + 0.5 + 1) / 6)


def test_instance_keys_separate_patterns_and_optionally_binned_cues() -> None:
    truths = [{"pattern": [True, False], "pitch_shift": 0.0, "loudness": 0.6},
              {"pattern": [True, False], "pitch_shift": 8.0, "loudness": 0.6},
              {"pattern": [False, True], "pitch_shift": 0.0, "loudness": 0.6}]
    k0 = instance_keys(truths)
    assert k0[0] == k0[1] != k0[2]
    k2 = instance_keys(truths, cue_bins=2)
    assert len(set(k2.tolist())) == 3


def test_the_default_benchmark_leaves_room_between_instance_cues_and_class() -> None:
    """Knowing each clip's class must raise the oracle far above the instance cues alone, or the stream
    has nothing to teach that the initialisation could not already know."""
    s = split_truths("default", 0)
    out = retrieval_oracles(s["truth"], s["label"], s["index"], gallery_pools=4)
    assert out["gallery"]["clips_per_pool"] == 240
    assert out["class_aware"]["avg"] - out["instance_only"]["avg"] >= 40.0
    assert out["class_aware"]["avg"] >= 2 * out["instance_only"]["avg"]
