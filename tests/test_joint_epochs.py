"""The multitask upper bound's epochs (``train.joint_epochs``): the joint run gets the rows of a replay
run on the synthetic preset, and every other strategy keeps ``train.epochs``."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from stella_avalanche import experiment as E
from stella_avalanche.training import strategies
from stella_avalanche.training.strategies import REGISTRY


def test_joint_epochs_apply_to_the_joint_strategy_only():
    tr = {"epochs": 4, "joint_epochs": 8}
    assert E.train_epochs(tr, REGISTRY["multitask"]) == 8
    assert E.train_epochs(tr, REGISTRY["derpp"]) == 4 and E.train_epochs(tr, REGISTRY["finetune"]) == 4
    assert E.train_epochs({"epochs": 4}, REGISTRY["multitask"]) == 4           # unset: the paper's protocol
    assert E.train_epochs({"epochs": 4, "joint_epochs": None}, REGISTRY["multitask"]) == 4


def test_synthetic_preset_gives_the_ceiling_the_rows_of_a_replay_run():
    tr = E.load_config(benchmark="synthetic")["train"]
    assert tr["joint_epochs"] == 2 * tr["epochs"]      # a replay step = current batch + an equal replay batch
    for name in ("vggsound", "audioset"):              # the paper's benchmarks keep equal epochs
        assert E.load_config(benchmark=name)["train"].get("joint_epochs") is None


def test_build_strategy_passes_the_joint_epochs(tmp_path, monkeypatch):
    seen = {}

    def fake_make_strategy(name, **kw):
        seen[name] = kw["train_epochs"]
        return None

    monkeypatch.setattr(strategies, "make_strategy", fake_make_strategy)
    cfg = E.load_config(benchmark="synthetic", overrides=["train.epochs=3", "train.joint_epochs=5"])
    ctx = SimpleNamespace(enabled=False, rank=0, world_size=1)
    tracker = SimpleNamespace(state_dict=lambda: {})
    for name in ("multitask", "derpp"):
        E._build_strategy(cfg, REGISTRY[name], model=torch.nn.Linear(2, 2), avm=None, plugin_kwargs={},
                          ctx=ctx, dev="cpu", seed=0, evaluator=None, tracker=tracker,
                          ckpt_dir=tmp_path / name)
    assert seen == {"multitask": 5, "derpp": 3}
