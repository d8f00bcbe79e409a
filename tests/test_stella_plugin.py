"""End-to-end tests of STELLAPlugin / STELLA+ on the tiny backbone and two tiny experiences."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from avalanche.benchmarks import benchmark_from_datasets
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training.plugins import SupervisedPlugin

from stella_avalanche.models.avm import AVMatching
from stella_avalanche.models.cav import build_model
from stella_avalanche.training.plugins.stella import STELLAPlugin
from stella_avalanche.training.template import AudioVideoPretraining

torch.set_num_threads(1)

BATCH, MEM = 4, 8


class _RandomAV(Dataset):
    """Random dict samples in the tiny preset's shapes (T=4, S=64; A=256, F=64)."""

    def __init__(self, n: int, category: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.video = torch.randn(n, 4, 3, 64, 64, generator=g)
        self.audio = torch.randn(n, 1, 256, 64, generator=g)
        self.category = category
        self.offset = 100 * category

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "audio": self.audio[i], "category": self.category,
                "label": self.category, "index": self.offset + i}


def _benchmark():
    wrap = lambda ds: AvalancheDataset([ds], collate_fn=default_collate)  # noqa: E731
    return benchmark_from_datasets(train=[wrap(_RandomAV(8, 0, 0)), wrap(_RandomAV(8, 1, 1))])


class _Recorder(SupervisedPlugin):
    """Records what the model saw and the loss before/after the STELLA plugin's terms."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []

    def after_forward(self, strategy, **kw):
        b = strategy.mbatch
        self.steps.append({
            "rows": int(b["category"].shape[0]),
            "video_keep": b["video_keep"].clone(), "audio_keep": b["audio_keep"].clone(),
            "index": b["index"].clone(), "label": b["label"].clone(),
            "has_patches": "video_patches" in b,
            "video_patch_rows": int(b["video_patches"].shape[0]) if "video_patches" in b else 0,
            "model_loss": float(strategy.mb_output["loss"].detach()),
            "video": b["video"].clone(), "audio": b["audio"].clone(),
        })
        stella = next(p for p in strategy.plugins if isinstance(p, STELLAPlugin))
        if "video_ids" in stella.buffer.data:  # STELLA+: the stored ids replay rows must come from
            self.steps[-1]["stored_ids"] = {tuple(sorted(r.tolist()))
                                            for r in stella.buffer.data["video_ids"][:len(stella.buffer)]}

    def after_backward(self, strategy, **kw):
        self.steps[-1]["total_loss"] = float(strategy.loss.detach().sum())
        stella = next(p for p in strategy.plugins if isinstance(p, STELLAPlugin))
        self.steps[-1]["stats"] = dict(stella.last_stats)


def _run(plus: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tiny")
    avm = AVMatching.from_config(model.config)
    plugin = STELLAPlugin(avm=avm, mem_size=MEM, plus=plus, seed=seed)
    plugin.initial_avm = copy.deepcopy(avm.state_dict())
    rec = _Recorder()
    strategy = AudioVideoPretraining(model=model, train_mb_size=BATCH, train_epochs=1, eval_mb_size=BATCH,
                                     device="cpu", plugins=[plugin, rec], seed=seed)
    bm = _benchmark()
    for exp in bm.train_stream:
        strategy.train(exp)
    return strategy, plugin, rec


@pytest.fixture(scope="module")
def stella_run():
    return _run(plus=False)


@pytest.fixture(scope="module")
def stella_plus_run():
    return _run(plus=True)


def _check_common(strategy, plugin, rec) -> None:
    sel = plugin.selector
    K_V, K_A = sel.keep_video, sel.keep_audio
    assert (K_V, K_A) == (32, 32)  # tiny: L_V = 64, L_A = 64, keep ratio 0.5
    # 2 experiences x 2 iterations of 4 samples
    assert len(rec.steps) == 4
    assert plugin.buffer.seen == 16 and len(plugin.buffer) == MEM
    first = rec.steps[0]
    assert first["rows"] == BATCH  # empty buffer: current rows only
    for step in rec.steps[1:]:
        assert step["rows"] == 2 * BATCH  # M = min(N, |B|) = 4 replay rows appended
    for step in rec.steps:
        vk, ak = step["video_keep"], step["audio_keep"]
        assert vk.shape == (step["rows"], K_V) and ak.shape == (step["rows"], K_A)
        assert all(len(set(r.tolist())) == K_V for r in vk)
        assert all(len(set(r.tolist())) == K_A for r in ak)
        assert int(vk.max()) < 64 and int(ak.max()) < 64
    # replay rows carry stored indices of past samples (seen before that step)
    idx = rec.steps[1]["index"]
    assert set(idx[BATCH:].tolist()) <= set(rec.steps[0]["index"].tolist())
    assert bool((rec.steps[1]["label"][BATCH:] == -1).all())  # label is not stored: placeholder
    # the penalty and the VAM loss are added to the model loss
    for step in rec.steps[1:]:
        assert step["total_loss"] > step["model_loss"] + 1e-6
    for step in rec.steps:  # loss = model loss + vam_weight * L_VAM + alpha * (MSE_a + MSE_v)
        st = step["stats"]
        assert st["loss_vam"] > 0
        assert (st["penalty"] > 0) == (step["rows"] > BATCH)
        assert step["total_loss"] == pytest.approx(step["model_loss"] + st["loss_vam"] + st["penalty"],
                                                   rel=1e-5)
    # the AVM is trained by its own optimizer
    assert any(not torch.equal(v, plugin.initial_avm[k]) for k, v in plugin.avm.state_dict().items())
    assert any(o is plugin.avm_optimizer for o in strategy.extra_optimizers)
    assert sum(o is plugin.avm_optimizer for o in strategy.extra_optimizers) == 1  # not re-added
    # stored items: category of both tasks present, z finite
    cats = set(plugin.buffer.data["category"].tolist())
    assert cats <= {0, 1} and 1 in cats
    assert bool(torch.isfinite(plugin.buffer.data["z_a"]).all())


def test_stella_end_to_end(stella_run) -> None:
    strategy, plugin, rec = stella_run
    _check_common(strategy, plugin, rec)
    assert not any(s["has_patches"] for s in rec.steps)
    # replay rows are the stored clips (uint8 video, 8-bit audio), identified by their index
    sets = {0: _RandomAV(8, 0, 0), 1: _RandomAV(8, 1, 1)}
    from stella_avalanche.training.buffer import video_from_uint8, video_to_uint8
    for step in rec.steps[1:]:
        for row in range(BATCH, step["rows"]):
            i = int(step["index"][row])
            ds = sets[i // 100]
            torch.testing.assert_close(step["video"][row], video_from_uint8(video_to_uint8(ds.video[i % 100])))
            span = float(ds.audio[i % 100].max() - ds.audio[i % 100].min())
            assert float((step["audio"][row] - ds.audio[i % 100]).abs().max()) <= span / 510 + 1e-5
    # first step: audio top-K without chunking == candidates; later steps: stored C and I present
    data = plugin.buffer.data
    assert data["video"].dtype == torch.uint8 and data["audio"].dtype == torch.uint8
    assert bool((data["I_v"].float().sum(1) - 1).abs().max() < 1e-2)
    # rows inserted after the first step have non-zero correlation probabilities on their candidates
    assert float(data["C_v"].float().abs().sum()) > 0
    assert bool(((data["C_v"].float() > 0).sum(1) <= plugin.selector.keep_video).all())


def test_stella_plus_end_to_end(stella_plus_run) -> None:
    strategy, plugin, rec = stella_plus_run
    _check_common(strategy, plugin, rec)
    assert all(s["has_patches"] for s in rec.steps)
    assert [s["video_patch_rows"] for s in rec.steps] == [BATCH] + [2 * BATCH] * 3
    data = plugin.buffer.data
    assert data["video_patches"].shape == (MEM, 32, 3 * 16 * 16)
    assert "I_v" not in data and "C_v" not in data
    # replay rows keep exactly their stored ids (not re-selected)
    for step in rec.steps[1:]:
        for r in step["video_keep"][BATCH:]:
            assert tuple(sorted(r.tolist())) in step["stored_ids"]
        # current rows are freshly selected (not copies of stored rows)
        assert step["video_keep"][:BATCH].shape == (BATCH, 32)


def test_plugin_state_round_trip(stella_run) -> None:
    _, plugin, _ = stella_run
    state = copy.deepcopy(plugin.state_dict())
    model = build_model("tiny")
    fresh = STELLAPlugin(avm=AVMatching.from_config(model.config), mem_size=MEM, seed=123)
    fresh.load_state_dict(state)  # before the plugin is built: applied in before_training
    strategy = AudioVideoPretraining(model=model, train_mb_size=BATCH, device="cpu", plugins=[fresh])
    fresh.before_training(strategy)
    assert fresh.buffer.seen == plugin.buffer.seen and len(fresh.buffer) == len(plugin.buffer)
    for k, v in plugin.buffer.data.items():
        assert torch.equal(v, fresh.buffer.data[k]), k
    for (k, v), (k2, v2) in zip(plugin.avm.state_dict().items(), fresh.avm.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(fresh.generator.get_state(), plugin.generator.get_state())
    assert torch.equal(fresh.buffer.generator.get_state(), plugin.buffer.generator.get_state())
    opt_a, opt_b = plugin.avm_optimizer.state_dict(), fresh.avm_optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for pid, st in opt_a["state"].items():
        assert torch.equal(st["exp_avg"], opt_b["state"][pid]["exp_avg"])
    # the optimizer actually trained the AVM (Adam state present)
    assert len(opt_a["state"]) > 0
    # same state -> identical next replay draw
    assert torch.equal(plugin.buffer.sample(3)[1], fresh.buffer.sample(3)[1])
    with pytest.raises(ValueError):
        STELLAPlugin(avm=AVMatching.from_config(model.config), plus=True).load_state_dict(state)


def test_refresh_replay_stats_option_runs_and_rejects_plus() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    avm = AVMatching.from_config(model.config)
    plugin = STELLAPlugin(avm=avm, mem_size=MEM, refresh_replay_stats=True, replay_batch=2, seed=1)
    rec = _Recorder()
    strategy = AudioVideoPretraining(model=model, train_mb_size=BATCH, device="cpu", plugins=[plugin, rec])
    strategy.train(_benchmark().train_stream[0])
    assert [s["rows"] for s in rec.steps] == [BATCH, BATCH + 2]  # replay_batch caps M
    assert rec.steps[1]["stats"]["penalty"] > 0
    with pytest.raises(ValueError):
        STELLAPlugin(avm=avm, plus=True, refresh_replay_stats=True)
