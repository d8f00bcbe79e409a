"""Downstream suite: linear probe, transfer split, localisation head, modality gap, geometry checks."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from stella_avalanche.data.synthetic import build_vocabulary, get_preset
from stella_avalanche.data.synthetic.transfer import (SyntheticTransferDataset, sounds_clash, transfer_classes,
                                                      transfer_identities)
from stella_avalanche.evaluation.downstream import (DownstreamConfig, GeometryMismatchError, LocalisationSet,
                                                    check_geometry, check_state_geometry, fit_localisation_head,
                                                    gap_summary, linear_probe, mean_iou, score_localisation)



@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is much faster than several on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------ probe
def _planted(n_per_class: int, classes: int, dim: int, rng: np.random.Generator, means: np.ndarray):
    y = np.repeat(np.arange(classes), n_per_class)
    return means[y] + rng.normal(0, 1.0, size=(len(y), dim)), y


def test_probe_planted_signal_and_shuffled_labels():
    rng = np.random.default_rng(0)
    classes, dim = 6, 16
    means = rng.normal(0, 1, size=(classes, dim))
    means *= 4.0 / np.linalg.norm(means, axis=1, keepdims=True)  # class means 4 noise-std away from 0
    x_tr, y_tr = _planted(40, classes, dim, rng, means)
    x_te, y_te = _planted(60, classes, dim, rng, means)
    groups = y_te // 3  # two "tasks" of three classes
    res = linear_probe(x_tr, y_tr, x_te, y_te, test_groups=groups, group_names=["t0", "t1"])
    assert res["metric"] == "top1" and res["num_classes"] == classes
    assert res["score"] >= 95.0
    assert set(res["per_task"]) == {"t0", "t1"} and min(res["per_task"].values()) >= 90.0
    assert res["C"] in (0.01, 0.1, 1.0, 10.0)

    shuffled = linear_probe(x_tr, rng.permutation(y_tr), x_te, y_te)
    assert shuffled["chance"] == pytest.approx(100.0 / classes)
    assert shuffled["score"] <= shuffled["chance"] + 10.0


def test_probe_multilabel_map():
    rng = np.random.default_rng(1)
    n, c, dim = 300, 4, 12
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[y.sum(1) == 0, 0] = 1
    w = rng.normal(0, 1, size=(c, dim))
    x = y @ w * 3.0 + rng.normal(0, 1, size=(n, dim))
    res = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert res["metric"] == "mAP" and res["score"] >= 90.0
    rand = linear_probe(x[:200], y[rng.permutation(200)], x[200:], y[200:])
    assert rand["score"] < res["score"] - 30.0


# ------------------------------------------------------------------------------------------ transfer split
@pytest.mark.parametrize("preset", ["default", "tiny"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transfer_classes_disjoint_from_stream_and_init(preset, seed):
    p = get_preset(preset)
    vocab = build_vocabulary(p, seed)
    known = list(vocab.classes) + list(vocab.init_classes)
    ids = transfer_identities(p, seed)
    assert len(ids.visuals) == len(ids.sounds) == 12
    assert len(set(ids.visuals)) == 12
    known_visuals = {(c.visual.shape, c.visual.texture, c.visual.colour) for c in known}
    assert not known_visuals & set(ids.visuals)
    for s in ids.sounds:
        assert not any(sounds_clash(s, c.sound, p) for c in known)
        assert s not in {c.sound for c in known}
    for i, a in enumerate(ids.sounds):
        assert not any(sounds_clash(a, b, p) for b in ids.sounds[i + 1:])
    assert transfer_identities(p, seed) == ids  # deterministic per seed
    assert transfer_identities(p, seed + 10) != ids


def test_sounds_clash_rule():
    p = get_preset("default")
    a = transfer_classes(p, 0)[0].sound
    near = dataclasses.replace(a, f0=a.f0 * 1.01)
    other_timbre = dataclasses.replace(a, timbre=(a.timbre + 1) % 5)
    assert sounds_clash(a, near, p) and not sounds_clash(a, other_timbre, p)


def test_transfer_dataset_masks_follow_ground_truth():
    ds = SyntheticTransferDataset(preset="tiny", seed=0, part="eval", per_class=2, num_classes=3)
    assert len(ds) == 6 and ds.video.shape == (6, 4, 3, 64, 64) and ds.audio.shape == (6, 1, 256, 64)
    assert sorted(ds.label.tolist()) == [0, 0, 1, 1, 2, 2]
    px = ds.masks(patch_size=1)           # (N, T, 64, 64)
    patches = ds.masks(patch_size=16)     # (N, T, 4, 4)
    on = ds.sounding()
    assert (px.reshape(6, 4, -1).any(-1) == on).all()  # the object is drawn exactly in sounding frames
    # a patch is marked iff one of its pixels is
    pooled = px.reshape(6, 4, 4, 16, 4, 16).any(axis=(3, 5))
    assert (pooled == patches).all()
    # the drawn object is where the mask says: mask pixels are brighter than the background
    frames = ds.video.mean(2)  # (N, T, 64, 64) normalised grey
    inside = frames[torch.from_numpy(px)].mean()
    outside = frames[torch.from_numpy(~px) & torch.from_numpy(on)[:, :, None, None]].mean()
    assert inside > outside + 0.5
    fit = SyntheticTransferDataset(preset="tiny", seed=0, part="fit", per_class=2, num_classes=3)
    assert not torch.equal(fit.video, ds.video)  # disjoint clip streams
    again = SyntheticTransferDataset(preset="tiny", seed=0, part="eval", per_class=2, num_classes=3)
    assert torch.equal(again.video, ds.video) and torch.equal(again.audio, ds.audio)


# ------------------------------------------------------------------------------------------ localisation
def _planted_localisation(m: int, seed: int, grid: int = 4, dim: int = 24, patch: int = 4) -> LocalisationSet:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(m, dim, generator=g)
    tokens = torch.randn(m, grid * grid, dim, generator=g)
    masks = torch.zeros(m, grid, grid, dtype=torch.bool)
    r = torch.randint(0, grid - 1, (m, 2), generator=g)
    for i in range(m):  # a 2x2 object at a random place
        masks[i, r[i, 0]:r[i, 0] + 2, r[i, 1]:r[i, 1] + 2] = True
    flat = masks.reshape(m, -1)
    # the object's patches resemble the clip's audio embedding
    tokens[flat] = (audio[:, None, :].expand(m, grid * grid, dim) + 0.5 * torch.randn(m, grid * grid, dim,
                                                                                   generator=g))[flat]
    pixel = masks.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return LocalisationSet(tokens=tokens, audio=audio, patch_masks=masks, pixel_masks=pixel)


def test_localisation_head_planted_and_shuffled():
    fit, test = _planted_localisation(300, 0), _planted_localisation(200, 1)
    head = fit_localisation_head(fit, steps=150, lr=5e-2, seed=0)
    res = score_localisation(head, fit, test)
    assert res["miou_patch"] >= 85.0 and res["miou_pixel"] >= 85.0
    assert res["similarity_patch"] >= 80.0  # the raw audio-to-patch map already finds the object
    assert res["chance_patch"] <= 35.0
    # per-frame IoUs (claim 7 of the comparison resamples them): one per test frame, their mean the mIoU
    for k in ("patch", "pixel"):
        assert len(res[f"iou_{k}"]) == len(test) and np.mean(res[f"iou_{k}"]) == pytest.approx(res[f"miou_{k}"], abs=1e-3)

    bad = fit.shuffled(seed=0)
    head_bad = fit_localisation_head(bad, steps=150, lr=5e-2, seed=0)
    res_bad = score_localisation(head_bad, bad, test)
    assert res_bad["miou_patch"] <= res["chance_patch"] + 8.0
    assert res_bad["miou_pixel"] <= res["chance_pixel"] + 8.0


def test_mean_iou():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert mean_iou(a, b) == pytest.approx(100.0 * (0.5 + 1.0 + 0.0) / 3)


# ------------------------------------------------------------------------------------------ gap
def test_gap_summary_definition():
    g = [[0.50, 0.70, None],
         [0.40, 0.60, 0.80],
         [0.45, 0.55, 0.65]]
    s = gap_summary(g)
    assert s["final"] == pytest.approx((0.45 + 0.55 + 0.65) / 3)
    # task 0: max(0.50 - 0.45, 0.40 - 0.45) = 0.05; task 1: max(0.70 - 0.55, 0.60 - 0.55) = 0.15
    assert s["difference_per_task"] == pytest.approx([0.05, 0.15])
    assert s["difference"] == pytest.approx(0.10)
    single = gap_summary([[0.3, 0.4]])
    assert single["difference"] is None and single["final"] == pytest.approx(0.35)


# ------------------------------------------------------------------------------------------ config / geometry
def test_geometry_refusal_names_both():
    from stella_avalanche.data.features import FeatureConfig
    from stella_avalanche.models.cav import MODEL_PRESETS

    tiny = MODEL_PRESETS["tiny"]
    check_geometry(tiny, FeatureConfig.synthetic(), model_name="tiny", benchmark_name="synthetic")
    with pytest.raises(GeometryMismatchError) as e:
        check_geometry(tiny, FeatureConfig.paper(), model_name="ckpt.pt", benchmark_name="continual_vs")
    msg = str(e.value)
    assert "ckpt.pt" in msg and "continual_vs" in msg and "img_size=64" in msg and "img_size=224" in msg

    other = dataclasses.replace(tiny, img_size=32)
    state = {"pos_embed_v": torch.zeros(1, other.num_video_tokens, other.embed_dim),
             "pos_embed_a": torch.zeros(1, other.num_audio_tokens, other.embed_dim)}
    with pytest.raises(GeometryMismatchError) as e:
        check_state_geometry(state, tiny, checkpoint="runs/x/ckpt.pt", benchmark_name="synthetic")
    assert "runs/x/ckpt.pt" in str(e.value) and "synthetic" in str(e.value) and "video_tokens=16" in str(e.value)
    ok = {"pos_embed_v": torch.zeros(1, tiny.num_video_tokens, tiny.embed_dim),
          "pos_embed_a": torch.zeros(1, tiny.num_audio_tokens, tiny.embed_dim)}
    check_state_geometry(ok, tiny, checkpoint="c", benchmark_name="synthetic")


def test_config_from_dict():
    cfg = DownstreamConfig.from_dict({"tasks": "probe, gap", "probe_cs": [1, 10]})
    assert cfg.tasks == ("probe", "gap") and cfg.probe_cs == (1, 10)
    with pytest.raises(ValueError, match="unknown downstream task"):
        DownstreamConfig.from_dict({"tasks": "probe,segment"})
    with pytest.raises(ValueError, match="unknown key"):
        DownstreamConfig.from_dict({"prob_cs": [1]})


# ------------------------------------------------------------------------------------------ end to end
def test_run_downstream_end_to_end(tmp_path, monkeypatch):
    """The whole suite on a 2-task synthetic benchmark with an untrained tiny backbone."""
    from stella_avalanche.benchmarks.synthetic import synthetic_benchmark
    from stella_avalanche.data.synthetic import SyntheticPreset
    from stella_avalanche.evaluation.downstream import FIRST_TASK_EMBEDDINGS, run_downstream, snapshot_embeddings
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for

    monkeypatch.setenv("STELLA_CACHE", str(tmp_path / "cache"))
    preset = SyntheticPreset(name="dstest", num_tasks=2, classes_per_task=3, twin_offset=0, train_per_class=4,
                             test_per_class=2, retrieval_per_class=2, init_classes=4, init_retrieval_per_class=1)
    bm = synthetic_benchmark(tmp_path / "data", seed=0, preset=preset, workers=1)
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", bm.features))
    out = tmp_path / "run"
    out.mkdir()
    snapshot_embeddings(model, bm, out / FIRST_TASK_EMBEDDINGS, task=0)
    cfg = {"transfer_classes": 3, "transfer_per_class": 3, "localise_fit_per_class": 3, "localise_steps": 20}
    results = {"modality_gap": [[0.5, 0.6], [0.4, 0.55]], "tasks": bm.task_names, "strategy": "finetune"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block = run_downstream(model, bm, cfg=cfg, results=results, out_dir=out, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen
    assert block["tasks"] == ["probe", "transfer", "localise", "gap"]
    for feat in ("audio", "video", "concat"):
        p = block["probe"][feat]
        assert p["num_train"] == 24 and p["num_test"] == 12 and p["num_classes"] == 6
        assert 0.0 <= p["score"] <= 100.0 and set(p["per_task"]) == {"task0", "task1"}
    tr = block["transfer"]
    assert tr["dataset"] == "synthetic_transfer" and tr["num_clips"] == 9
    assert tr["a2v"]["R@10"] == 100.0  # 9 clips: every match is in the top 10
    loc = block["localise"]
    assert loc["num_test_frames"] > 0 and 0.0 <= loc["miou_pixel"] <= 100.0
    assert block["gap"]["difference"] == pytest.approx(0.1)
    assert block["gap"]["pca_first_task"] is True
    assert sorted(block["pictures"]) == ["downstream_gap.png", "downstream_pca.png"]
    assert all((out / p).stat().st_size > 0 for p in block["pictures"])
    json.dumps(block)  # JSON-ready


# ------------------------------------------------------------------------------------------ comparison columns
def test_compare_downstream_columns(tmp_path):
    from stella_avalanche.evaluation import comparison as compare
    from stella_avalanche.evaluation.report import build_results

    def res(strategy, seed, probe, gap, with_block=True):
        m = {d: {f"R@{k}": [[10.0, 20.0], [15.0, 25.0]] for k in (1, 5, 10)} for d in ("a2v", "v2a")}
        r = build_results(strategy=strategy, benchmark="synthetic", seed=seed, tasks=["t0", "t1"], recall_matrix=m)
        if with_block:
            r["downstream"] = {"probe": {"concat": {"score": probe}, "audio": {"score": probe - 10},
                                         "video": {"score": probe - 20}},
                               "transfer": {"a2v": {"R@5": 30.0}, "v2a": {"R@5": 40.0}},
                               "localise": {"miou_pixel": 50.0, "miou_patch": 60.0}, "gap": {"final": gap}}
        return r

    runs = {"finetune": [res("finetune", 0, 80.0, 0.4), res("finetune", 1, 90.0, 0.6)],
            "er": [res("er", 0, 0.0, 0.0, with_block=False)]}
    rows = compare.aggregate(runs, keys=["finetune", "er"])
    ft = next(r for r in rows if r["strategy"] == "finetune")
    assert ft["downstream/probe_concat"] == pytest.approx((85.0, 5.0))
    assert ft["downstream/final_gap"] == pytest.approx((0.5, 0.1))
    md = compare.write_tables(rows, tmp_path, "synthetic")
    table = md.split("## Downstream")[1]
    assert "| Finetune | 2 | 85.00 ± 5.00 | 75.00 ± 5.00 | 65.00 ± 5.00 | 30.00 ± 0.00 | 40.00 ± 0.00 | " \
           "50.00 ± 0.00 | 60.00 ± 0.00 | 0.500 ± 0.100 |" in table
    assert "| ER | 0 | – |" in table
    header = (tmp_path / "comparison.csv").read_text().splitlines()[0]
    assert "downstream/transfer_a2v_R@5/mean" in header and "downstream/miou_pixel/std" in header
    assert compare.downstream_table(compare.aggregate({"er": runs["er"]}, keys=["er"])) == []


# ------------------------------------------------------------------------------------------ run_stella flag
@pytest.mark.parametrize("argv, enabled", [([], True), (["--no-downstream"], False), (["--downstream"], True),
                                           (["--benchmark", "vggsound", "--data-root", "/x"], False),
                                           (["--benchmark", "vggsound", "--data-root", "/x", "--downstream"], True)])
def test_run_stella_downstream_flag(monkeypatch, tmp_path, argv, enabled):
    import importlib.util

    import stella_avalanche.evaluation.report as report
    import stella_avalanche.experiment as experiment
    from stella_avalanche.evaluation.downstream import downstream_enabled

    seen = {}
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(report, "summary_table_markdown", lambda results: "")
    spec = importlib.util.spec_from_file_location(
        "run_stella_cli", Path(__file__).resolve().parent.parent / "experiments" / "run_stella.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path / "o"), "--quiet", *argv])
    assert downstream_enabled(seen["cfg"]) is enabled


def test_pixel_score_of_patch_maps_bounds_the_pixel_column():
    """A head that learned the any-pooled patch target perfectly: at one-pixel patches its pixel score is
    100; on a 4x4 grid of 8-pixel patches with 6x6-pixel objects it draws whole boundary patches and
    scores far below, and a map that grades each patch by its coverage scores clearly higher."""
    from stella_avalanche.evaluation.downstream import _any_pooled, patch_coverage, pixel_score_of_patch_maps

    g = torch.Generator().manual_seed(0)
    px = torch.zeros(60, 32, 32, dtype=torch.bool)
    for i, (y, x) in enumerate(torch.randint(0, 27, (60, 2), generator=g).tolist()):
        px[i, y:y + 6, x:x + 6] = True
    fit, test = px[:30], px[30:]
    cov = patch_coverage(px, 8)
    assert cov.shape == (60, 4, 4) and torch.allclose(cov.sum((1, 2)) * 64, px.sum((1, 2)).float())
    assert torch.equal(cov > 0, _any_pooled(px, 8))

    def ideal(m, p):
        return (_any_pooled(m, p).reshape(len(m), -1).float() * 2 - 1) * 4

    assert pixel_score_of_patch_maps(ideal(fit, 1), ideal(test, 1), fit, test)["miou_pixel"] == pytest.approx(100)
    coarse = pixel_score_of_patch_maps(ideal(fit, 8), ideal(test, 8), fit, test)["miou_pixel"]
    assert coarse < 40   # about 35

    def graded(m):
        return torch.logit(patch_coverage(m, 8).reshape(len(m), -1).clamp(0.02, 0.98))

    assert pixel_score_of_patch_maps(graded(fit), graded(test), fit, test)["miou_pixel"] > coarse + 5   # about 43


def test_the_quoted_localisation_rank_correlation_is_the_published_one():
    """docs/downstream.md quotes the pixel-vs-patch rank correlation of the published runs; it must be the
    figure and run count that ``localisation_ceiling.json`` holds (it goes stale as runs are added)."""
    root = Path(__file__).resolve().parents[1]
    runs = json.loads((root / "docs/results/synthetic_v5/localisation_ceiling.json").read_text())["runs"]
    text = " ".join((root / "docs/downstream.md").read_text(encoding="utf-8").split())
    quoted = re.search(r"Spearman (−?[0-9.]+) over ([0-9]+) runs", text)
    assert quoted, "docs/downstream.md no longer quotes the rank correlation"
    assert float(quoted.group(1).replace("−", "-")) == runs["spearman_patch_vs_pixel"]
    assert int(quoted.group(2)) == runs["count"]
