"""Stages 1 and 2: the contrastive-only warm phase, the held-out stopping rule of the AVM, metadata."""
from __future__ import annotations

import math

import pytest
import torch

from stella_avalanche.data.synthetic import SyntheticInitDataset, SyntheticInitRetrievalDataset, default_features
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import CAVMAE
from stella_avalanche.models.config import model_config_for
from stella_avalanche.training import pretrain as P


def _loader(n: int = 8):
    return torch.utils.data.DataLoader(SyntheticInitDataset(preset="tiny", seed=0), batch_size=n)


def test_contrastive_only_steps_then_full_objective() -> None:
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", default_features("tiny")))
    hist = P.pretrain_backbone(model, _loader(), steps=3, lr=1e-3, progress=False, contrastive_only_steps=2)
    assert "loss_mae_audio" not in hist[0] and "loss_mae_audio" not in hist[1]
    assert "loss_mae_audio" in hist[2] and "loss_nce" in hist[2]
    assert hist[0]["loss"] == hist[0]["loss_nce"]


def test_stage2_stops_on_heldout_accuracy_and_records_it() -> None:
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", default_features("tiny")))
    held = SyntheticInitRetrievalDataset(preset="tiny", seed=0)
    heldout = {"video": held.video, "audio": held.audio, "label": held.label}
    rec: dict = {}
    hist = P.pretrain_avm(model, build_avm(model), _loader(), steps=6, lr=1e-4, progress=False, heldout=heldout,
                          target_accuracy=0.0, eval_every=2, record=rec)
    assert len(hist) == 2 and rec["criterion_met"] and rec["steps_run"] == 2   # stopped at the first check
    rec = {}
    hist = P.pretrain_avm(model, build_avm(model), _loader(), steps=5, lr=1e-4, progress=False, heldout=heldout,
                          target_accuracy=1.01, eval_every=2, record=rec)
    assert len(hist) == 5 and not rec["criterion_met"]                          # budget spent
    assert [e["step"] for e in rec["heldout"]] == [2, 4, 5]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in rec["heldout"])


#: a two-step stage 1 and stage 2 on the tiny preset
_TINY_SCHEDULE = P.InitSchedule(backbone_steps=2, contrastive_only_steps=1, avm_steps=2, batch_size=4,
                                warmup_steps=1, avm_eval_every=1)


def _tiny_init(cache_dir) -> dict:
    return P.synthetic_initialisation(model_config_for("tiny", default_features("tiny")), preset="tiny",
                                      schedule=_TINY_SCHEDULE, cache_dir=cache_dir, num_workers=0, progress=False)


def test_initialisation_checkpoint_records_stage2(tmp_path) -> None:
    sched = _TINY_SCHEDULE
    paths = _tiny_init(tmp_path)
    meta = torch.load(paths["avm"], weights_only=False)["meta"]
    assert set(meta["stage2"]) >= {"heldout", "steps_run", "criterion_met", "target_accuracy"}
    assert meta["stage2"]["target_accuracy"] == sched.avm_target_accuracy


def test_stage1_summary_tells_an_aligned_build_from_one_at_chance() -> None:
    chance = math.log(32)
    aligned_then_lost = [{"loss_nce": 2.0}] * 4 + [{"loss_nce": chance - 0.01}] * 4
    s = P.stage1_summary(aligned_then_lost, batch_size=32, contrastive_only_steps=4, window=3)
    assert s["nce_contrastive_end"] == pytest.approx(2.0) and s["nce_end"] == pytest.approx(chance - 0.01)
    assert s["nce_chance"] == pytest.approx(chance) and s["aligned"] is False
    s = P.stage1_summary([{"loss_nce": chance - 0.3}] * 5, batch_size=32)
    assert s["aligned"] is True and s["nce_contrastive_end"] is None
    assert P.stage1_summary([{"loss": 1.0}], batch_size=32)["aligned"] is None       # no InfoNCE logged


def test_a_build_whose_stage1_ends_at_chance_warns_and_records_it(tmp_path, monkeypatch, caplog) -> None:
    """The build records the stage-1 summary in the backbone's meta; at chance it also warns (on
    synthetic_v5, training seeds 4 and 5 of the default recipe ended there)."""
    def at_chance(model, loader, *, steps, contrastive_only_steps, **kw):
        at = math.log(_TINY_SCHEDULE.batch_size)       # aligned in the InfoNCE-only phase, then lost
        return [{"loss_nce": 0.5}] * contrastive_only_steps + [{"loss_nce": at}] * (steps - contrastive_only_steps)

    monkeypatch.setattr(P, "pretrain_backbone", at_chance)
    with caplog.at_level("WARNING", logger=P.__name__):
        paths = _tiny_init(tmp_path)
    meta = torch.load(paths["backbone"], weights_only=False)["meta"]
    assert meta["stage1"]["aligned"] is False and meta["stage1"]["nce_contrastive_end"] == pytest.approx(0.5)
    assert any("stage 1: the InfoNCE ended at" in r.getMessage() and "had ended at 0.500" in r.getMessage()
               for r in caplog.records)


def test_stage2_only_changes_reuse_the_stage1_backbone(tmp_path, monkeypatch) -> None:
    """A new AVM pooling, AVM input or stage-2 budget builds a new AVM next to the cached backbone,
    without retraining stage 1; a stage-1 field gives a new directory."""
    import dataclasses

    cfg = model_config_for("tiny", default_features("tiny"))
    sched = P.InitSchedule(backbone_steps=2, contrastive_only_steps=1, avm_steps=1, batch_size=4, warmup_steps=1,
                           avm_eval_every=1)
    first = P.synthetic_initialisation(cfg, preset="tiny", schedule=sched, cache_dir=tmp_path, num_workers=0,
                                       progress=False)
    stage1_calls: list[int] = []
    real = P.pretrain_backbone
    monkeypatch.setattr(P, "pretrain_backbone", lambda *a, **k: stage1_calls.append(1) or real(*a, **k))
    for variant_cfg, variant_sched in ((dataclasses.replace(cfg, avm_features="unimodal"), sched),
                                       (dataclasses.replace(cfg, avm_pooling="mean"), sched),
                                       (cfg, dataclasses.replace(sched, avm_steps=2))):
        paths = P.synthetic_initialisation(variant_cfg, preset="tiny", schedule=variant_sched, cache_dir=tmp_path,
                                           num_workers=0, progress=False)
        assert paths["backbone"] == first["backbone"] and paths["avm"] != first["avm"] and paths["avm"].exists()
    assert stage1_calls == []
    other = P.synthetic_initialisation(cfg, preset="tiny", schedule=dataclasses.replace(sched, lr=5e-4),
                                       cache_dir=tmp_path, num_workers=0, progress=False)
    assert other["backbone"].parent != first["backbone"].parent and stage1_calls == [1]


def test_decoder_only_after_contrastive_keeps_the_encoder() -> None:
    """After the contrastive-only steps only the decoder learns; every parameter is trainable again
    afterwards (the continual phase trains the whole model)."""
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", default_features("tiny")))
    P.pretrain_backbone(model, _loader(), steps=1, lr=1e-3, progress=False, contrastive_only_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = P.pretrain_backbone(model, _loader(), steps=2, lr=1e-3, progress=False, contrastive_only_steps=0,
                               decoder_only_after_contrastive=True)
    assert all("loss_mae_audio" in h for h in hist)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    decoder = {n for n in before if n.startswith(P._DECODER_PREFIXES)}
    assert changed and changed <= decoder, sorted(changed - decoder)[:5]
    assert "decoder_pred_v.weight" in changed
    assert all(p.requires_grad for p in model.parameters())


def test_init_schedule_refuses_more_contrastive_steps_than_steps() -> None:
    import pytest

    with pytest.raises(ValueError, match="contrastive_only_steps"):
        P.InitSchedule(backbone_steps=10, contrastive_only_steps=20)
    assert P.InitSchedule().contrastive_only_steps < P.InitSchedule().backbone_steps


def test_decoder_only_phase_unfreezes_the_encoder_even_when_a_step_fails() -> None:
    """A non-finite loss in the decoder-only phase ends stage 1 with an error, never with a model
    whose encoder stays frozen."""
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", default_features("tiny")))
    real = model.forward
    model.forward = lambda **kw: {**real(**kw), "loss": torch.tensor(float("nan"))}  # type: ignore[method-assign]
    import pytest

    with pytest.raises(FloatingPointError, match="non-finite"):
        P.pretrain_backbone(model, _loader(), steps=2, lr=1e-3, progress=False, contrastive_only_steps=0,
                            decoder_only_after_contrastive=True)
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_field_added_later_keeps_the_keys_of_existing_caches() -> None:
    """``embed_segments`` at 1 and ``avm_time_bias`` at 0 (what every cache before them was built
    with) give the key of a config without those fields, so published runs find their initialisation
    again; another segment count gives a new backbone, another bias only a new AVM."""
    import dataclasses

    from stella_avalanche.training.pretrain import _MODEL_FIELDS_ADDED_LATER, InitSchedule, _init_keys

    cfg = model_config_for("tiny", default_features("tiny"), embed_segments=1, avm_time_bias=0.0)
    legacy_cls = dataclasses.make_dataclass(
        "CAVConfig", [(f.name, f.type, dataclasses.field(default=getattr(cfg, f.name)))
                      for f in dataclasses.fields(cfg) if f.name not in _MODEL_FIELDS_ADDED_LATER])
    sched = InitSchedule()
    assert _init_keys(cfg, "tiny", 0, sched) == _init_keys(legacy_cls(), "tiny", 0, sched)
    other = dataclasses.replace(cfg, embed_segments=4)
    assert _init_keys(other, "tiny", 0, sched)[0] != _init_keys(cfg, "tiny", 0, sched)[0]
    biased = _init_keys(dataclasses.replace(cfg, avm_time_bias=5.0), "tiny", 0, sched)
    assert biased[0] == _init_keys(cfg, "tiny", 0, sched)[0] and biased[1] != _init_keys(cfg, "tiny", 0, sched)[1]


def test_init_schedule_from_the_config_reaches_the_initialisation(monkeypatch) -> None:
    """``init.schedule`` replaces fields of the default recipe (e.g. to rebuild an older
    initialisation); an unknown field is an error naming it."""
    from stella_avalanche import experiment
    from stella_avalanche.config import load_config
    from stella_avalanche.training.pretrain import InitSchedule

    seen = {}

    def fake(model_cfg, **kw):
        seen.update(kw)
        return {"backbone": "b.pt", "avm": "a.pt"}

    monkeypatch.setattr(P, "synthetic_initialisation", fake)
    cfg = load_config(overrides=["init.schedule.backbone_steps=1200", "init.schedule.contrastive_only_steps=1000"])
    experiment._resolve_init(cfg, object(), torch.device("cpu"), need_avm=True)
    assert seen["schedule"] == InitSchedule(backbone_steps=1200, contrastive_only_steps=1000)
    experiment._resolve_init(load_config(), object(), torch.device("cpu"), need_avm=True)
    assert seen["schedule"] == InitSchedule()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['backbone_step'\]"):
        InitSchedule.from_config({"backbone_step": 10})


def test_the_avm_is_the_same_whether_stage_1_ran_in_the_process_or_was_cached(tmp_path) -> None:
    """Stage 2 after a fresh stage 1 (as in a first ``make demo``) and stage 2 alone beside a cached
    backbone (after a stage-2-only change) build the same AVM: stage 1 must not move the global RNG
    that initialises the AVM."""
    first = _tiny_init(tmp_path)
    built_with_stage1 = torch.load(first["avm"], weights_only=False)["avm"]
    first["avm"].unlink()
    again = _tiny_init(tmp_path)
    assert again["avm"] == first["avm"]
    alone = torch.load(again["avm"], weights_only=False)["avm"]
    assert all(torch.equal(built_with_stage1[k], alone[k]) for k in alone)


def test_contrastive_input_is_not_part_of_the_init_keys() -> None:
    """Neither stage reads the model's ``contrastive_input`` (stage 1 takes the schedule's), so runs
    with the masked and the unmasked InfoNCE share one initialisation."""
    import dataclasses

    from stella_avalanche.training.pretrain import InitSchedule, _init_keys

    cfg = model_config_for("tiny", default_features("tiny"))
    kept = dataclasses.replace(cfg, contrastive_input="kept")
    visible = dataclasses.replace(cfg, contrastive_input="visible")
    assert _init_keys(kept, "tiny", 0, InitSchedule()) == _init_keys(visible, "tiny", 0, InitSchedule())


def test_a_train_seed_builds_another_initialisation_from_the_same_clips(tmp_path, monkeypatch) -> None:
    """``train_seed`` changes the weights (and the cache directory) but not the init stream's clips."""
    import dataclasses

    seen_seeds: list[int] = []
    real = P.pretrain_backbone

    def spy(model, loader, **kw):
        seen_seeds.append(loader.dataset.seed)
        return real(model, loader, **kw)

    monkeypatch.setattr(P, "pretrain_backbone", spy)
    cfg = model_config_for("tiny", default_features("tiny"))
    runs = [P.synthetic_initialisation(cfg, preset="tiny", schedule=dataclasses.replace(_TINY_SCHEDULE, train_seed=s),
                                       cache_dir=tmp_path, num_workers=0, progress=False) for s in (None, 0, 1)]
    assert seen_seeds == [0, 0]  # the data seed's clips every time; train seed 0 = data seed 0 reuses the cache
    assert runs[1]["backbone"].parent == runs[0]["backbone"].parent
    weights = [torch.load(r["backbone"], weights_only=False)["model"] for r in runs]
    name = next(k for k in weights[0] if k.endswith("weight") and weights[0][k].dim() == 2)
    assert torch.equal(weights[0][name], weights[1][name])  # train_seed 0 = the data seed 0
    assert not torch.equal(weights[0][name], weights[2][name])
    assert runs[2]["backbone"].parent != runs[0]["backbone"].parent
