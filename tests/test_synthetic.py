"""Synthetic benchmark: generator determinism, ground truth, controls, scenario and init data."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from stella_avalanche.data.features import FeatureConfig, compute_fbank, load_waveform
from stella_avalanche.data.media import read_frames
from stella_avalanche.data.synthetic import (PRESETS, SyntheticInitDataset, SyntheticInitRetrievalDataset,
                                             build_vocabulary, clip_rng, default_features, frame_indices,
                                             generate_synthetic, get_preset, load_ground_truth, render_clip,
                                             sample_from_clip, truth_patch_mask)
from stella_avalanche.data.synthetic.vocabulary import hz_to_mel, mel_step

TINY = PRESETS["tiny"]


def _hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (feature caches excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "feature_cache" not in p.parts:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Decoding and fbanks of tiny clips are dominated by thread hand-off on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "seed0", seed=0, preset="tiny", workers=2)


def test_vocabulary_twins_share_visuals_not_sounds() -> None:
    v = build_vocabulary(get_preset("default"), 0)
    k, off = 6, 4
    assert len(v.classes) == 48 and len(v.init_classes) == 12
    for c in v.classes[: off * k]:
        twin = v.classes[c.class_id + off * k]
        assert twin.visual == c.visual and twin.sound != c.sound
    # visual identities of different classes within the first 4 tasks are all distinct
    assert len({c.visual for c in v.classes[: off * k]}) == off * k
    # init classes reuse the families but not the combinations; all sounds distinct
    assert not {c.visual for c in v.init_classes} & {c.visual for c in v.classes}
    assert len({c.sound for c in v.classes + v.init_classes}) == 60


def test_same_seed_byte_identical_and_seeds_differ(tiny_root: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", seed=0, preset="tiny", workers=1)  # other worker count
    h0, h1 = _hashes(tiny_root), _hashes(again)
    assert len(h0) > 24 * 9 * 5 and h0 == h1
    other = _hashes(generate_synthetic(tmp_path / "seed1", seed=1, preset="tiny", workers=2))
    assert set(other) == set(h0)  # same layout ...
    differing = [k for k in h0 if h0[k] != other[k]]
    assert len(differing) > 0.9 * len(h0)  # ... different content


def test_reuse_and_refuse_foreign_directory(tiny_root: Path, tmp_path: Path) -> None:
    marker = tiny_root / "COMPLETE.json"
    before = marker.stat().st_mtime_ns
    assert generate_synthetic(tiny_root, seed=0, preset="tiny") == tiny_root
    assert marker.stat().st_mtime_ns == before  # reused, not regenerated
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="COMPLETE.json"):
        generate_synthetic(foreign, seed=0, preset="tiny")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".foreign")]  # no temp dir left


def test_manifest_layout(tiny_root: Path) -> None:
    rows = (tiny_root / "train.csv").read_text().splitlines()
    assert len(rows) == 24 * TINY.train_per_class
    fields = rows[0].split(",")
    assert len(fields) == 6 and fields[0] == "0" and fields[5] == "task0"
    assert fields[2] == f"frames/{fields[1]}" and fields[3] == f"audio/{fields[1]}.wav"
    labels = (tiny_root / "class_labels_indices.csv").read_text().splitlines()
    assert labels[0] == "index,mid,display_name,category" and len(labels) == 25
    keys = {r.split(",")[1] for s in ("train", "test", "retrieval") for r in (tiny_root / f"{s}.csv").read_text().splitlines()}
    assert len(keys) == 24 * (TINY.train_per_class + TINY.test_per_class + TINY.retrieval_per_class)


def test_ground_truth_boxes_match_object_pixels(tiny_root: Path) -> None:
    truth = load_ground_truth(tiny_root, "train")
    idx = frame_indices(TINY)
    checked = 0
    for key, tr in truth.items():
        pattern = tr["pattern"]
        assert 1 <= sum(pattern) <= TINY.num_segments - 1
        frames = read_frames(tiny_root / "frames" / key, [i / TINY.frames_fps for i in idx], fps=TINY.frames_fps,
                             size=TINY.image_size).numpy()
        bright = frames.max(axis=-1) > 0.35 * 255  # objects are saturated, the background is dark
        if tr["distractor"] is not None:
            x0, y0, x1, y1 = tr["distractor"]["box"]
            bright[:, max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
        for s in range(TINY.num_segments):
            box = tr["boxes"][s]
            if not pattern[s]:
                assert box is None
                if tr["distractor"] is None:
                    assert bright[s].sum() == 0
                continue
            x0, y0, x1, y1 = box
            d = tr["distractor"]
            if d is not None and not (d["box"][2] <= x0 or d["box"][0] >= x1 or d["box"][3] <= y0
                                      or d["box"][1] >= y1):
                continue  # overlapping distractor: its masked-out area hides object pixels
            inside = bright[s, y0:y1, x0:x1].sum()
            outside = bright[s].sum() - inside
            assert inside >= 0.3 * (x1 - x0) * (y1 - y0), key
            assert outside <= 0.05 * inside, key  # only JPEG ringing (or distractor overlap) outside
            # the patch mask covers exactly the patches the object's pixels fall in
            pm = truth_patch_mask(tr, image_size=TINY.image_size, patch_size=16)[s]
            ys, xs = np.nonzero(bright[s])
            hit = np.zeros_like(pm)
            hit[ys // 16, xs // 16] = True
            # at most one patch either way: a textured shape can put only dark pixels in a corner patch
            assert (hit & ~pm).sum() <= 1 and (pm & ~hit).sum() <= 1, key
            checked += 1
    assert checked > 100


def test_audio_events_follow_pattern_in_fbank(tiny_root: Path) -> None:
    cfg = default_features("tiny")
    truth = load_ground_truth(tiny_root, "retrieval")
    vocab = build_vocabulary(TINY, 0)
    step, lo = mel_step(TINY), float(hz_to_mel(20.0))
    frames_per_seg = int(TINY.segment_seconds * 100)
    margins = []
    for key, tr in list(truth.items())[:24]:
        fb = compute_fbank(load_waveform(tiny_root / "audio" / f"{key}.wav", cfg), cfg).numpy()
        snd = vocab.classes[tr["class_id"]].sound
        bins = [int(round((hz_to_mel(tr["f0"] * h) - lo) / step)) - 1 for h in snd.harmonics]
        level = np.array([fb[s * frames_per_seg + 8:(s + 1) * frames_per_seg - 8, bins].mean()
                          for s in range(TINY.num_segments)])
        on, off = level[np.array(tr["pattern"])], level[~np.array(tr["pattern"])]
        margins.append(on.min() - off.max())
    # the class bands stand well above the noise floor exactly in the sounding segments
    assert min(margins) > 0.5 and np.median(margins) > 1.0


def _recall_at(za: np.ndarray, zv: np.ndarray, k: int, ties: str = "pessimistic") -> float:
    """Brute-force a->v recall@k of paired rows; ``ties``: pessimistic rank or random tie-breaking."""
    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zv = zv / np.linalg.norm(zv, axis=1, keepdims=True)
    sim = za @ zv.T
    diag = np.diag(sim)[:, None]
    higher = (sim > diag + 1e-12).sum(axis=1)
    tied = (np.abs(sim - diag) <= 1e-12).sum(axis=1) - 1  # others scoring exactly like the partner
    if ties == "pessimistic":
        return float((higher + tied < k).mean())
    # expected recall@1 under random tie-breaking (k == 1)
    return float(np.where(higher == 0, 1.0 / (tied + 1), 0.0).mean())


def test_oracle_and_shuffled_controls() -> None:
    preset = get_preset("instance_cues")  # v2's default: the instance cues (pitch, loudness) are in play
    vocab = build_vocabulary(preset, 0)
    visuals, sounds = [c.visual for c in vocab.classes], [c.sound for c in vocab.classes]
    truths = [render_clip(c, clip_rng(0, "retrieval", c.class_id, i), preset, visuals, sounds).truth
              for c in vocab.classes for i in range(preset.retrieval_per_class)]
    n, H = len(truths), preset.image_size
    lo_c, hi_c = preset.object_size[0] / 2, H - preset.object_size[0] / 2

    def onehot(i: int, m: int) -> np.ndarray:
        e = np.zeros(m)
        e[i] = 1
        return e

    vis_ids = {v: i for i, v in enumerate(dict.fromkeys(visuals))}
    # video side: what the frames show (visual identity, on/off frames, box height and size)
    zv = np.stack([np.concatenate([
        3 * onehot(vis_ids[vocab.classes[t["class_id"]].visual], len(vis_ids)), 3 * np.array(t["pattern"], float),
        [2 * np.mean([(b[1] + b[3]) / 2 for b in t["boxes"] if b]) / H, 2 * t["size"] / preset.object_size[1]]])
        for t in truths])
    # audio side: what the sound carries (its class's visual partner, on/off segments, pitch -> height,
    # loudness -> size), inverted through the generator's mappings
    za = []
    for t in truths:
        cy = lo_c + (1 - t["pitch_shift"] / preset.max_pitch_shift) * (hi_c - lo_c)
        size = preset.object_size[0] + (t["loudness"] - preset.loudness[0]) / (
            preset.loudness[1] - preset.loudness[0]) * (preset.object_size[1] - preset.object_size[0])
        za.append(np.concatenate([3 * onehot(vis_ids[vocab.classes[t["class_id"]].visual], len(vis_ids)),
                                  3 * np.array(t["pattern"], float), [2 * cy / H, 2 * size / preset.object_size[1]]]))
    za = np.stack(za)
    assert _recall_at(za, zv, 1) >= 0.97
    # class identity alone is not enough: instance-blind embeddings stay far below
    blind = np.stack([onehot(vis_ids[vocab.classes[t["class_id"]].visual], len(vis_ids)) for t in truths])
    assert _recall_at(blind, blind, 1, ties="random") < 0.1  # 1 / 20: twins share the visual identity
    # shuffled pairs: chance level R@10 ~ 10 / n
    rng = np.random.default_rng(0)
    shuffled = np.mean([_recall_at(za[rng.permutation(n)], zv, 10) for _ in range(10)])
    assert abs(shuffled - 10 / n) < 0.03


def test_benchmark_streams_and_samples(tiny_root: Path) -> None:
    from stella_avalanche.benchmarks.synthetic import synthetic_benchmark

    sc = synthetic_benchmark(tiny_root, seed=0, preset="tiny")
    assert sc.name == "synthetic" and sc.task_names == [f"task{t}" for t in range(8)]
    assert sc.data_root == tiny_root and sc.features == FeatureConfig.synthetic()
    assert len(sc.train_stream) == 8 and len(sc.test_stream) == 8 and len(sc.retrieval_stream) == 8
    for t, exp in enumerate(sc.retrieval_stream):
        ds = exp.dataset
        assert len(ds) == 3 * TINY.retrieval_per_class
        cats = {int(ds[i]["category"]) for i in range(len(ds))}
        labels = {int(ds[i]["label"]) for i in range(len(ds))}
        assert cats == {t} and labels == {3 * t, 3 * t + 1, 3 * t + 2}
    s = sc.train_stream[5].dataset[0]
    assert set(s) == {"video", "audio", "category", "label", "index"}
    assert s["video"].shape == (4, 3, 64, 64) and s["video"].dtype == torch.float32
    assert s["audio"].shape == (1, 256, 64) and s["audio"].dtype == torch.float32
    assert s["category"].dtype == torch.int64 and int(s["category"]) == 5
    # the decode-once cache and the uncached path give the same eval samples
    plain = synthetic_benchmark(tiny_root, seed=0, preset="tiny", cache=False)
    a, b = sc.retrieval_stream[2].dataset[1], plain.retrieval_stream[2].dataset[1]
    assert torch.allclose(a["video"], b["video"]) and torch.allclose(a["audio"], b["audio"], atol=2e-2)


def test_features_must_fit_preset(tmp_path: Path) -> None:
    from stella_avalanche.benchmarks.synthetic import synthetic_benchmark

    with pytest.raises(ValueError, match="does not fit synthetic preset"):
        synthetic_benchmark(tmp_path / "x", preset="tiny", features=FeatureConfig.paper())
    assert not (tmp_path / "x").exists()  # rejected before generating anything


def test_init_dataset_matches_stored_pipeline_and_is_deterministic(tiny_root: Path) -> None:
    cfg = default_features("tiny")
    # an in-memory clip through the init transform == the same clip stored and read back by the loader
    vocab = build_vocabulary(TINY, 0)
    spec = vocab.classes[4]
    visuals = list(dict.fromkeys(c.visual for c in vocab.classes if c.visual != spec.visual))
    sounds = [c.sound for c in vocab.classes if c.class_id != 4]
    clip = render_clip(spec, clip_rng(0, "retrieval", 4, 1), TINY, visuals, sounds)
    video, audio = sample_from_clip(clip, cfg, train=False, jpeg_quality=TINY.jpeg_quality, generator=None)
    key = "syn_retrieval_t1_c1_00001"
    times = [i / TINY.frames_fps for i in frame_indices(TINY)]
    from stella_avalanche.data.features import video_from_frames

    stored_v = video_from_frames(read_frames(tiny_root / "frames" / key, times, cfg), cfg, train=False)
    stored_a = compute_fbank(load_waveform(tiny_root / "audio" / f"{key}.wav", cfg), cfg)
    assert (video - stored_v).abs().max() < 0.1  # JPEG decoder differences only
    assert torch.allclose(audio[0], stored_a, atol=1e-3)

    # the 12-fixed-class stream of generator v1 (the default stream draws per-clip identities)
    by_class = dataclasses.replace(TINY, init_identity="class")
    ds = SyntheticInitDataset(preset=by_class, seed=0, length=6)
    items = list(ds)
    assert [int(x["index"]) for x in items] == list(range(6))
    assert [int(x["label"]) for x in items] == list(range(6))  # balanced over the 12 init classes
    assert all(x["video"].shape == (4, 3, 64, 64) and x["audio"].shape == (1, 256, 64) for x in items)
    assert all(int(x["category"]) == 0 for x in items)
    again = SyntheticInitDataset(preset=by_class, seed=0, start=3, length=1)
    assert torch.equal(next(iter(again))["video"], items[3]["video"])
    other = SyntheticInitDataset(preset=by_class, seed=0, start=3 + 12, length=1)  # another clip
    assert not torch.equal(next(iter(other))["video"], items[3]["video"])
    # worker sharding keeps the stream identical
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = sorted((int(x["index"]), x["audio"]) for x in loader)
    assert [g[0] for g in got] == list(range(6))
    assert all(torch.equal(g[1], items[g[0]]["audio"]) for g in got)

    pool = SyntheticInitRetrievalDataset(preset=by_class, seed=0)
    assert len(pool) == 12 * TINY.init_retrieval_per_class
    assert pool.label.bincount().tolist() == [TINY.init_retrieval_per_class] * 12  # fixed init classes
    assert not torch.equal(pool[0]["video"], items[0]["video"])  # held out from the training stream
    # per-clip identities: one "class" per clip
    assert TINY.init_identity == "per_clip"
    pool = SyntheticInitRetrievalDataset(preset="tiny", seed=0)
    assert pool.label.tolist() == list(range(len(pool)))


def test_per_clip_init_identities_are_fresh_and_outside_the_benchmark() -> None:
    """No class shortcut in stage 1: every init clip draws its own appearance and sound, never one of
    the benchmark's identities, and uses the stronger init cue settings."""
    from stella_avalanche.data.synthetic import init_exclusions, init_render_preset, render_init_clip, sound_key

    PC = dataclasses.replace(TINY, init_identity="per_clip", init_tint=0.25, init_p_distractor=0.25,
                             init_p_offscreen=0.0)
    vocab = build_vocabulary(PC, 0)
    ex_v, ex_s = init_exclusions(vocab, PC, 0)
    from stella_avalanche.data.synthetic import VisualIdentity
    from stella_avalanche.data.synthetic.transfer import transfer_identities

    transfer = {VisualIdentity(*v) for v in transfer_identities(TINY, 0).visuals}
    assert set(ex_v) == {c.visual for c in vocab.classes} | transfer and transfer
    seen_v, seen_s = [], []
    import stella_avalanche.data.synthetic.init_stream as syn

    real = syn.render_clip
    captured = []
    try:
        syn.render_clip = lambda spec, *a, **k: captured.append((spec, a[1])) or real(spec, *a, **k)
        for i in range(40):
            render_init_clip(vocab, PC, 0, "init", i)
    finally:
        syn.render_clip = real
    for spec, preset in captured:
        assert spec.visual not in ex_v
        key = sound_key(spec.sound, TINY)
        assert not any(h == key[1] and t == key[2] and abs(b - key[0]) < 3 for b, h, t in ex_s)
        seen_v.append(spec.visual)
        seen_s.append(spec.sound)
        assert preset.tint == 0.25 and preset.p_offscreen == 0.0 and preset.p_distractor == 0.25
    assert len(set(seen_v)) > 25 and len(set(seen_s)) > 30   # fresh draws, not a handful of classes
    assert init_render_preset(dataclasses.replace(TINY, init_tint=None, init_p_distractor=None,
                                                  init_p_offscreen=None)) == dataclasses.replace(
        TINY, init_tint=None, init_p_distractor=None, init_p_offscreen=None)


def test_sounding_segments_fit_half_of_the_chunks() -> None:
    """half_sounding: 1..2 of 4 segments sound (so keeping half of the audio chunks can keep all of
    them); v2's default (instance_cues) allows 1..3; the v3 default sounds in exactly 2."""
    vocab = build_vocabulary(TINY, 0)
    v2 = dataclasses.replace(TINY, min_on_segments=1, max_on_segments=None)

    def counts(preset, n: int) -> set[int]:
        return {sum(render_clip(vocab.classes[0], clip_rng(0, "train", 0, i), preset, [], []).truth["pattern"])
                for i in range(n)}

    assert counts(dataclasses.replace(v2, max_on_segments=2), 30) == {1, 2}
    assert counts(v2, 40) == {1, 2, 3}
    assert counts(TINY, 30) == {2}
    assert get_preset("half_sounding").max_on_segments == 2
    assert get_preset("default").on_segments == (2, 2) == TINY.on_segments


def test_concurrent_generators_generate_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs started together on a fresh machine: one generates, the other waits and reuses it."""
    from concurrent.futures import ThreadPoolExecutor

    import stella_avalanche.data.synthetic.writer as syn

    calls = []
    real = syn._generate
    monkeypatch.setattr(syn, "_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: generate_synthetic(tmp_path / "d", seed=0, preset="tiny", workers=1),
                              range(2)))
    assert roots == [tmp_path / "d"] * 2 and len(calls) == 1
    assert syn.is_complete(tmp_path / "d", seed=0, preset="tiny")


def test_concurrent_initialisation_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel runs on a fresh cache: one builds the stage-1/2 initialisation, the other reuses it."""
    from concurrent.futures import ThreadPoolExecutor

    from stella_avalanche.data.synthetic import default_features
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.training import pretrain as P

    calls = []
    real = P._build_initialisation
    monkeypatch.setattr(P, "_build_initialisation", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = model_config_for("tiny", default_features("tiny"))
    sched = P.InitSchedule(backbone_steps=2, contrastive_only_steps=1, avm_steps=2, batch_size=4, warmup_steps=1)
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda _: P.synthetic_initialisation(cfg, preset="tiny", schedule=sched, cache_dir=tmp_path,
                                                                 num_workers=0, progress=False), range(2)))
    assert out[0] == out[1] and len(calls) == 1
    assert all(p.is_file() for p in out[0].values())


def test_init_only_fields_do_not_invalidate_the_written_splits(tiny_root: Path) -> None:
    """The init stream is rendered on the fly: changing how it is drawn must not regenerate the splits
    (and their feature cache), while a field that shapes the written clips must."""
    from stella_avalanche.data import synthetic as syn

    tiny = syn.get_preset("tiny")
    for field, value in (("init_identity", "class" if tiny.init_identity == "per_clip" else "per_clip"),
                         ("init_classes", 30), ("init_tint", 0.25)):
        changed = dataclasses.replace(tiny, **{field: value})
        assert syn.is_complete(tiny_root, seed=0, preset=changed), field
        # ... because the benchmark's classes do not depend on it
        assert syn.build_vocabulary(changed, 0).classes == syn.build_vocabulary(tiny, 0).classes, field
    assert not syn.is_complete(tiny_root, seed=0, preset=dataclasses.replace(tiny, tint=0.2))
