"""Shared helpers: seed derivation, the rank helper, batch-key constants, plugin states in
checkpoints keyed by plugin identity."""
from __future__ import annotations

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from stella_avalanche import batch_keys as K
from stella_avalanche.checkpoint import PluginStateMismatch, load_plugin_states, plugin_states
from stella_avalanche.distributed import get_rank, is_main_process
from stella_avalanche.utils import SEED_PURPOSES, SEED_STRIDE, derive_seed


def test_derive_seed_keeps_the_historical_rank0_seeds():
    # the formulas seeded runs have always used: a refactor must not change their numbers
    for seed in (0, 1, 7, 123):
        assert derive_seed(seed, "plugin") == seed
        assert derive_seed(seed, "replay_draws") == seed
        assert derive_seed(seed, "replay_buffer") == seed + 7919
        assert derive_seed(seed, "stella_steps") == seed * 7919 + 1
        assert derive_seed(seed, "stella_buffer") == seed * 7919 + 2


def test_derive_seed_applies_the_rank_once_and_separates_streams():
    seed, rank = 3, 2
    plugin_seed = derive_seed(seed, "plugin", rank=rank)
    assert plugin_seed == seed + SEED_STRIDE * rank
    # a plugin derives its streams from its (already per-rank) seed: no second rank offset
    assert derive_seed(plugin_seed, "stella_steps") == (seed + SEED_STRIDE * rank) * SEED_STRIDE + 1
    # STELLA's two streams never coincide across ranks or with each other
    stella = [derive_seed(derive_seed(seed, "plugin", rank=r), p)
              for r in range(8) for p in ("stella_steps", "stella_buffer")]
    assert len(set(stella)) == len(stella)
    assert len({derive_seed(seed, "plugin", rank=r) for r in range(8)}) == 8
    with pytest.raises(ValueError, match="unknown seed purpose"):
        derive_seed(0, "nope")


def test_rank_helper_without_process_group():
    assert not torch.distributed.is_initialized()
    assert get_rank() == 0 and is_main_process()


def test_batch_keys_cover_the_model_inputs():
    assert K.MODEL_INPUT_KEYS == ("video", "audio", "video_keep", "audio_keep", "video_patches", "audio_patches")
    assert set(K.SAMPLE_KEYS) == {"video", "audio", "category", "label", "index"}
    from stella_avalanche.training.template import MODEL_INPUT_KEYS

    assert MODEL_INPUT_KEYS == K.MODEL_INPUT_KEYS


class _Counter(SupervisedPlugin):
    def __init__(self, value: int, key: str | None = None) -> None:
        super().__init__()
        self.value = value
        if key:
            self.state_key = key

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class _Other(_Counter):
    pass


class _Stateless(SupervisedPlugin):
    pass


def test_plugin_states_follow_identity_not_position():
    saved = plugin_states([_Counter(1), _Stateless(), _Other(2)])
    assert len(saved) == 2 and all(k.endswith(("_Counter", "_Other")) for k in saved)
    a, b = _Counter(0), _Other(0)
    load_plugin_states([b, _Stateless(), a], saved)          # reordered: each gets its own state
    assert (a.value, b.value) == (1, 2)


def test_plugin_state_mismatch_names_both_sides():
    saved = plugin_states([_Counter(1), _Other(2)])
    with pytest.raises(PluginStateMismatch, match=r"states without a plugin: \['.*_Other'\]"):
        load_plugin_states([_Counter(0)], saved)
    with pytest.raises(PluginStateMismatch, match=r"plugins without a state: \['.*_Other'\]"):
        load_plugin_states([_Counter(0), _Other(0)], {k: v for k, v in saved.items() if "_Other" not in k})


def test_same_class_plugins_use_state_key_or_order():
    saved = plugin_states([_Counter(1, key="fast"), _Counter(2, key="slow")])
    slow, fast = _Counter(0, key="slow"), _Counter(0, key="fast")
    load_plugin_states([slow, fast], saved)
    assert (fast.value, slow.value) == (1, 2)
    saved = plugin_states([_Counter(1), _Counter(2)])        # no state_key: matched in list order
    x, y = _Counter(0), _Counter(0)
    load_plugin_states([x, y], saved)
    assert (x.value, y.value) == (1, 2)


def test_position_keyed_checkpoints_still_load():
    legacy = {"0:_Counter": {"value": 5}, "2:_Other": {"value": 6}}
    a, b = _Counter(0), _Other(0)
    load_plugin_states([b, a], legacy)
    assert (a.value, b.value) == (5, 6)


def test_strategy_resumes_with_reordered_plugins():
    from stella_avalanche.models.cav import build_model
    from stella_avalanche.training.template import AudioVideoPretraining

    torch.manual_seed(0)
    s1 = AudioVideoPretraining(model=build_model("tiny"), plugins=[_Counter(7), _Other(8)], device="cpu")
    state = s1.training_state_dict()
    s2 = AudioVideoPretraining(model=build_model("tiny"), plugins=[_Other(0), _Counter(0)], device="cpu")
    s2.load_training_state_dict(state)
    assert [p.value for p in s2.plugins if isinstance(p, _Counter)] == [8, 7]  # _Other first, then _Counter


def test_strategy_factory_offsets_the_rank_once():
    from stella_avalanche.models.avm import AVMatching
    from stella_avalanche.models.cav import build_model
    from stella_avalanche.training.strategies import make_strategy

    torch.manual_seed(0)
    model = build_model("tiny")
    s = make_strategy("stella", model=model, avm=AVMatching.from_config(model.config), rank=1, world_size=2,
                      device="cpu", seed=3)
    plugin = s.stella_plugin
    assert plugin.seed == 3 + SEED_STRIDE
    # the step stream is (seed + stride * rank) * stride + 1, with no second "+ rank"
    want = torch.Generator().manual_seed((3 + SEED_STRIDE) * SEED_STRIDE + 1).get_state()
    assert torch.equal(plugin.generator.get_state(), want)
    d = make_strategy("derpp", model=model, rank=1, world_size=2, device="cpu", seed=3)
    assert d.plugins[0].seed == 3 + SEED_STRIDE
    assert torch.equal(d.plugins[0].storage.generator.get_state(),
                       torch.Generator().manual_seed(3 + 2 * SEED_STRIDE).get_state())


def test_one_backbone_loader_reads_every_format(tmp_path, monkeypatch):
    from stella_avalanche.models import weights
    from stella_avalanche.models.cav import build_model
    from stella_avalanche.models.loading import load_backbone_weights

    torch.manual_seed(1)
    src = build_model("tiny")
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save({"model": src.state_dict(), "meta": {"steps": 3}}, tmp_path / "project.pt")
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    for name in ("project.pt", "bare.pt"):
        torch.manual_seed(2)
        dst = build_model("tiny")
        out = load_backbone_weights(dst, tmp_path / name)
        assert out["format"] == "project"
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in ref.items())
    assert load_backbone_weights(build_model("tiny"), tmp_path / "project.pt")["meta"] == {"steps": 3}
    # a project checkpoint of another model size is an error naming the keys, not a partial load
    torch.save({"model": {"blocks_x.0.w": torch.zeros(1)}, "meta": {}}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="does not match the model: missing"):
        load_backbone_weights(build_model("tiny"), tmp_path / "other.pt")
    # foreign formats go to their mappers
    calls = []
    monkeypatch.setattr(weights, "load_cavmae_checkpoint", lambda m, s: calls.append(("cavmae", sorted(s))))
    monkeypatch.setattr(weights, "load_imagenet_mae", lambda m, s: calls.append(("mae", sorted(s))))
    torch.save({"state_dict": {"module.blocks_a.0.norm1.weight": torch.ones(2)}}, tmp_path / "cav.pt")
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(2)}}, tmp_path / "mae.pt")
    assert load_backbone_weights(build_model("tiny"), tmp_path / "cav.pt")["format"] == "cavmae"
    assert load_backbone_weights(build_model("tiny"), tmp_path / "mae.pt")["format"] == "imagenet_mae"
    assert [c[0] for c in calls] == ["cavmae", "mae"]
