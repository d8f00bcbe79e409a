"""The small objects STELLAPlugin is built from: one scoring path in the selector (current rows and the
D2 refresh), the item codecs beside the buffer, the shared replay pieces (batch extension, DER penalty,
buffer layout check), the AVM step's state and the per-epoch scalars."""
from __future__ import annotations

import types

import pytest
import torch

from stella_avalanche.models.avm import AVMatching
from stella_avalanche.models.cav import build_model
from stella_avalanche.training.avm_step import AVMStep
from stella_avalanche.training.buffer import ReservoirBuffer
from stella_avalanche.training.epoch_log import EpochMeans, StepScalars
from stella_avalanche.training.item_codec import ClipCodec, StellaCodec
from stella_avalanche.training.plugins.der import DERPPPlugin
from stella_avalanche.training.plugins.replay_base import der_penalty, extend_batch
from stella_avalanche.training.selection import (PatchSelector, candidate_ids, importance_from_projections,
                                                 rca_probability, summary_queries)

torch.set_num_threads(1)

L_V, T_A, F_A, C, H, D = 16, 4, 4, 2, 2, 8
L_A = T_A * F_A


def _proj(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, H, L, D, generator=g) for k, L in (("q_a", L_A), ("k_a", L_A), ("q_v", L_V),
                                                                ("k_v", L_V))}


def _selector(**kw) -> PatchSelector:
    return PatchSelector(video_tokens=L_V, audio_time_tokens=T_A, audio_freq_tokens=F_A, chunk=C, **kw)


# ------------------------------------------------------------------------------------------ scoring
def test_select_reports_the_scores_of_its_current_rows() -> None:
    sel = _selector()
    past = sel.score(proj=_proj(3, 1))
    replay = {"qbar_a": past.qbar_a, "qbar_v": past.qbar_v, "I_v": past.I_v, "I_a": past.I_a,
              "C_v": past.C_v, "C_a": past.C_a}
    proj = _proj(5, 2)
    s = sel.score(proj=proj, replay=replay)
    out = sel.select(proj=proj, replay=replay, generator=torch.Generator().manual_seed(0))
    for name in ("I_v", "I_a", "C_v", "C_a", "qbar_a", "qbar_v", "cand_v", "cand_a"):
        assert torch.equal(getattr(out, name), getattr(s, name)), name
    assert float(s.C_v.sum()) > 0 and float(past.C_v.abs().sum()) == 0  # no replay: C = 0


def test_rescore_pairs_each_replay_row_with_the_next_stored_item() -> None:
    sel = _selector()
    proj, qa, qv = _proj(4, 3), torch.randn(4, H, D), torch.randn(4, H, D)
    out = sel.rescore(proj=proj, qbar_a=qa, qbar_v=qv)
    I_v, I_a = importance_from_projections(proj["q_a"], proj["k_a"], proj["q_v"], proj["k_v"], sel.tau)
    cv, ca = candidate_ids(I_v, sel.keep_video), candidate_ids(I_a, sel.keep_audio)
    nxt = torch.tensor([1, 2, 3, 0])
    want_v = rca_probability(proj["k_v"], qa[nxt], summary_queries(proj["q_a"], I_a, ca), cv)
    want_a = rca_probability(proj["k_a"], qv[nxt], summary_queries(proj["q_v"], I_v, cv), ca)
    assert torch.equal(out["I_v"], I_v) and torch.equal(out["I_a"], I_a)
    assert torch.equal(out["C_v"], want_v) and torch.equal(out["C_a"], want_a)
    one = sel.rescore(proj=_proj(1, 4), qbar_a=qa[:1], qbar_v=qv[:1])
    assert set(one) == {"I_v", "I_a"}  # a single item has no other to pair with: stored C are kept


# ------------------------------------------------------------------------------------------ codecs
def _clips(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # normalised frames inside the pixel range (uint8 storage clamps outside it)
    return {"video": torch.rand(n, 2, 3, 8, 8, generator=g) * 2 - 1, "audio": torch.randn(n, 1, 16, 8, generator=g),
            "category": torch.arange(n), "label": torch.arange(n) + 5}


def test_clip_codec_round_trip() -> None:
    rows = _clips(3)
    stored = ClipCodec(compact=True).encode(rows)
    assert stored["video"].dtype == torch.uint8 and stored["audio"].dtype == torch.float16
    back = ClipCodec().decode(stored, torch.device("cpu"))
    assert float((back["video"] - rows["video"]).abs().max()) < 0.5 / 255 / 0.224 + 1e-6
    assert torch.equal(ClipCodec(compact=False).encode(rows)["video"], rows["video"])


@pytest.mark.parametrize("storage", ["uint8", "float16"])
def test_stella_codec_round_trip_through_the_buffer(storage: str) -> None:
    cfg = types.SimpleNamespace(num_frames=2, img_size=8, patch_size=4, audio_length=16, mel_bins=8, embed_dim=16,
                                num_video_tokens=8, num_audio_tokens=8)
    codec = StellaCodec(plus=False, audio_storage=storage)
    buf = ReservoirBuffer(4, fields=codec.fields(config=cfg, keep_video=4, keep_audio=4, num_heads=H))
    rows = {**_clips(3), "z_a": torch.randn(3, 16), "z_v": torch.randn(3, 16), "qbar_a": torch.randn(3, H, D),
            "qbar_v": torch.randn(3, H, D), "I_v": torch.rand(3, 8), "I_a": torch.rand(3, 8),
            "C_v": torch.rand(3, 8), "C_a": torch.rand(3, 8)}
    buf.add(codec.encode(rows))
    stored, slots = buf.sample(3)
    back = codec.decode(stored, torch.device("cpu"))
    i = slots.tolist()
    assert set(back) == set(buf.fields) - {"audio_lo", "audio_scale"}
    assert torch.equal(back["index"], torch.full((3,), -1, dtype=torch.int32))  # rows without index
    assert torch.equal(back["z_a"], rows["z_a"][i]) and back["I_v"].dtype == torch.float32
    span = float(rows["audio"].max() - rows["audio"].min())
    assert float((back["audio"] - rows["audio"][i]).abs().max()) <= span / 255
    with pytest.raises(ValueError, match="audio_storage"):
        StellaCodec(plus=False, audio_storage="int4")


def test_stella_plus_codec_stores_patches_not_clips() -> None:
    codec = StellaCodec(plus=True)
    rows = {**_clips(2), "video_patches": torch.rand(2, 4, 48) * 2 - 1, "audio_patches": torch.randn(2, 4, 16),
            "video_ids": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), "index": torch.tensor([7, 8])}
    out = codec.encode(rows)
    assert "video" not in out and "audio" not in out
    assert out["video_patches"].dtype == torch.uint8 and out["audio_patches"].dtype == torch.uint8
    assert torch.equal(out["index"], rows["index"])
    back = codec.decode({**out, "video_ids": out["video_ids"].to(torch.int16)}, torch.device("cpu"))
    assert back["video_ids"].dtype == torch.int64
    assert float((back["video_patches"] - rows["video_patches"]).abs().max()) < 0.5 / 255 / 0.224 + 1e-6


# ------------------------------------------------------------------------------------------ replay pieces
def test_extend_batch_strict_and_with_placeholders() -> None:
    rep = {"video": torch.ones(2, 3), "index": torch.tensor([7, 8], dtype=torch.int32)}
    batch = {"video": torch.zeros(3, 3), "index": torch.arange(3), "label": torch.arange(3), "path": ["a", "b", "c"]}
    with pytest.raises(KeyError, match="label"):
        extend_batch(dict(batch), 3, rep)
    extend_batch(batch, 3, rep, placeholders=True, skip=("video",))
    assert batch["video"].shape == (3, 3)  # skipped
    assert batch["index"].tolist() == [0, 1, 2, 7, 8] and batch["index"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 1, 2, -1, -1] and batch["path"] == ["a", "b", "c", None, None]


def test_der_penalty_checks_rows() -> None:
    za, zv = torch.randn(3, 4), torch.randn(3, 4)
    want = 0.5 * (((za - 1) ** 2).mean() + (zv ** 2).mean())
    torch.testing.assert_close(der_penalty(za, zv, torch.ones(3, 4), torch.zeros(3, 4), 0.5), want)
    with pytest.raises(RuntimeError, match="replay rows"):
        der_penalty(za[:2], zv[:2], torch.ones(3, 4), torch.zeros(3, 4), 0.5)


def test_a_loaded_buffer_of_another_layout_is_refused() -> None:
    plugin = DERPPPlugin(mem_size=4)
    fields = {"video": ((2, 3, 8, 8), torch.uint8), "z_a": ((4,), torch.float32)}
    plugin.ensure_buffer(fields, torch.device("cpu"))
    assert plugin.buffer.capacity == 4 and plugin.ensure_buffer(fields, torch.device("cpu")) is plugin.buffer
    other = DERPPPlugin(mem_size=5)  # a checkpoint of a 4-item buffer
    other.load_buffer_state(plugin.buffer.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        other.ensure_buffer(fields, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not fit"):
        plugin.ensure_buffer({**fields, "z_a": ((5,), torch.float32)}, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ AVM step, scalars
def test_avm_step_state_waits_for_the_optimizer() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    step = AVMStep(avm=AVMatching.from_config(model.config), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    strategy = types.SimpleNamespace(device=torch.device("cpu"), extra_optimizers=[])
    step.attach(strategy)
    step.attach(strategy)
    assert strategy.extra_optimizers == [step.optimizer]  # registered once
    video, audio = torch.randn(2, 4, 3, 64, 64), torch.randn(2, 1, 256, 64)
    out = step.run(model, video, audio, autocast=torch.autocast("cpu", enabled=False),
                   generator=torch.Generator().manual_seed(0))
    assert out.proj["q_v"].shape[2] == model.config.num_video_tokens and out.loss.requires_grad
    vp, ap = out.selected_patches(torch.tensor([[2, 0]] * 2), torch.tensor([[1]] * 2))
    assert torch.equal(vp[:, 0], out.video_patches[:, 2]) and ap.shape == (2, 1, out.audio_patches.shape[-1])
    out.loss.backward()
    step.optimizer.step()
    fresh = AVMStep(avm=AVMatching.from_config(model.config), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    fresh.load_state_dict(step.state_dict())
    assert fresh.optimizer is None and "avm_optimizer" in fresh.state_dict()  # kept until built
    fresh.to("cpu")
    a, b = step.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_epoch_means_and_step_scalars() -> None:
    m = EpochMeans()
    m.add({"a": torch.tensor(1.0), "b": None})
    m.add({"a": 3.0, "b": torch.tensor(4.0)})
    assert m.pop() == {"a": 2.0, "b": 2.0} and m.pop() == {}  # a skipped value still counts its step
    s = StepScalars(prefix="x")
    s.last = {"loss": torch.tensor(2.0), "rows": 3}
    assert s.floats() == {"loss": 2.0, "rows": 3.0}
    s.end_step(("acc", "loss"), acc=torch.tensor(0.5))
    clock = types.SimpleNamespace(train_exp_counter=1, train_exp_epochs=2, train_iterations=9)
    logged = []
    logger = types.SimpleNamespace(log_single_metric=lambda k, v, x: logged.append((k, v, x)))
    s.end_epoch(types.SimpleNamespace(clock=clock, evaluator=types.SimpleNamespace(loggers=[logger])))
    assert s.epochs == [{"experience": 1, "epoch": 2, "acc": 0.5, "loss": 2.0}]
    assert logged == [("x/acc", 0.5, 9), ("x/loss", 2.0, 9)]
