"""AudioVideoDataset and FeatureCache on tiny generated media (datasets.py)."""
from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import frame_level
from stella_avalanche.data import media
from stella_avalanche.data.datasets import AudioVideoDataset, FeatureCache, SkippedClip, collate_av
from stella_avalanche.data.features import FeatureConfig
from stella_avalanche.data.manifests import ClipRecord, LabelTable

torch.set_num_threads(1)
SYN = FeatureConfig.synthetic()
TASKS = ["sports", "music"]
TABLE = LabelTable(("/m/a", "/m/b", "/m/c"), ("a", "b", "c"), ("sports", "music", "music"), (0, 1, 2))


def rec(key, video, audio, category="sports", labels=("/m/a",)) -> ClipRecord:
    return ClipRecord(key=key, vid=key, video=str(video), audio=str(audio), labels=tuple(labels),
                      category=category, source="split.csv", row=1)


@pytest.fixture(scope="module")
def good(media_files):
    m = media_files
    return [rec("A", m.frames_dir, m.wav),
            rec("V", m.mp4, m.mp4, "music", ("/m/b",)),
            rec("M", m.frames_dir, m.mp3, "music", ("/m/c",)),
            rec("P", m.png_dir, m.stereo44k),
            rec("B", m.mp4_wide, m.wav_b, "music", ("/m/b",))]


@pytest.fixture(scope="module")
def bad(media_files):
    m = media_files
    return {"missing": rec("X", m.root / "gone", m.wav),
            "incomplete_frames": rec("S", m.short_frames_dir, m.wav),
            "corrupt": rec("C", m.frames_dir, m.corrupt_audio),
            "silent_audio": rec("Z", m.frames_dir, m.silent)}


def test_uncached_eval_samples(good):
    ds = AudioVideoDataset(good, features=SYN, train=False, task_names=TASKS, label_table=TABLE)
    assert len(ds) == 5 and not ds.skipped
    s = ds[1]
    assert set(s) == {"video", "audio", "category", "label", "index"}
    assert s["video"].shape == (4, 3, 64, 64) and s["video"].dtype == torch.float32
    assert s["audio"].shape == (1, 256, 64) and s["audio"].dtype == torch.float32
    assert s["category"].dtype == torch.int64 and int(s["category"]) == 1
    assert s["label"].dtype == torch.int64 and int(s["label"]) == 1 and int(s["index"]) == 1
    # eval frames are 0, 16, 32, 48 (the normalised grey levels give them away)
    std, mean = torch.tensor(SYN.std[0]), torch.tensor(SYN.mean[0])
    grey = (s["video"][:, 0].mean(dim=(1, 2)) * std + mean) * 255
    assert torch.allclose(grey, torch.tensor([frame_level(i) for i in (0, 16, 32, 48)], dtype=torch.float32), atol=2.5)
    assert int(ds[-1]["index"]) == 4
    with pytest.raises(IndexError):
        ds[5]


def test_labels_multi_hot_and_without_table(good):
    ds = AudioVideoDataset(good[:3], features=SYN, train=False, task_names=TASKS, label_table=TABLE,
                           multi_label=True)
    assert torch.equal(ds._labels, torch.eye(3))
    ds = AudioVideoDataset(good[:1], features=SYN, train=False, task_names=TASKS)
    assert int(ds[0]["label"]) == -1
    with pytest.raises(ValueError, match="category 'sports'"):
        AudioVideoDataset(good[:1], features=SYN, train=False, task_names=["music"])


@pytest.mark.parametrize("kind", ["missing", "incomplete_frames"])
def test_construction_raises_on_bad_files(good, bad, kind):
    with pytest.raises(media.MediaError) as info:
        AudioVideoDataset(good + [bad[kind]], features=SYN, train=False, task_names=TASKS)
    assert info.value.kind == kind and bad[kind].video in str(info.value)


def test_skip_counts_and_report(good, bad, caplog):
    with caplog.at_level("WARNING"):
        ds = AudioVideoDataset([bad["missing"]] + good + [bad["incomplete_frames"]], features=SYN,
                               train=False, task_names=TASKS, on_error="skip")
    assert ds.skipped == collections.Counter(missing=1, incomplete_frames=1)
    assert [r.key for r in ds.records] == [r.key for r in good] and int(ds[0]["index"]) == 0
    report = ds.skip_report()
    assert "skipped 2 of 7 clips (incomplete_frames=1, missing=1)" in report and "gone" in report
    assert any("skipped 2 of 7" in r.message for r in caplog.records)


def test_run_time_errors_are_raised_or_marked_never_substituted(good, bad):
    ds = AudioVideoDataset(good[:1] + [bad["corrupt"]], features=SYN, train=False, task_names=TASKS,
                           on_error="raise")   # files exist: the decode error surfaces at run time
    assert len(ds) == 2
    with pytest.raises(media.CorruptMediaError, match="corrupt.mp3"):
        ds[1]
    # skip: a marker naming the file comes back instead of a sample (collate_av drops it, see
    # tests/test_runtime_skip.py), never another clip
    ds = AudioVideoDataset(good[:1] + [bad["corrupt"]], features=SYN, train=False, task_names=TASKS,
                           on_error="skip")
    marker = ds[1]
    assert isinstance(marker, SkippedClip) and "corrupt.mp3" in marker.path and marker.index == 1


def test_cache_build_reuse_rebuild_and_skips(tmp_path, good, bad):
    recs = good + [bad["corrupt"], bad["silent_audio"]]
    ds = AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, cache=tmp_path,
                           on_error="skip", progress=False)
    assert ds.cache.built and ds.skipped == collections.Counter(corrupt=1, silent_audio=1)
    assert len(ds) == len(good) and (ds.cache.path / "COMPLETE").is_file()
    assert ds.cache.video.shape == (7, 4, 64, 64, 3) and ds.cache.audio.dtype.name == "float16"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]    # temp dir renamed away

    again = AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, cache=tmp_path,
                              on_error="skip", progress=False)
    assert not again.cache.built and again.cache.path == ds.cache.path and again.skipped == ds.skipped
    # a cache that recorded failures still raises under on_error="raise"
    with pytest.raises(media.CorruptMediaError, match="corrupt.mp3"):
        AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, cache=tmp_path, progress=False)

    changed = AudioVideoDataset(recs, features=dataclasses.replace(SYN, mel_bins=32), train=False,
                                task_names=TASKS, cache=tmp_path, on_error="skip", progress=False)
    assert changed.cache.built and changed.cache.path != ds.cache.path
    assert changed[0]["audio"].shape == (1, 256, 32)

    (ds.cache.path / "COMPLETE").unlink()                 # looks interrupted -> rebuilt
    cache = FeatureCache(tmp_path, records=good, features=SYN, progress=False)
    assert cache.built and not cache.failures
    assert FeatureCache(tmp_path, records=good, features=SYN, progress=False).built is False

    with pytest.raises(media.SilentAudioError):           # on_error="raise" aborts the build...
        FeatureCache(tmp_path / "r", records=[bad["silent_audio"]], features=SYN, progress=False)
    assert not list((tmp_path / "r").iterdir())           # ...and leaves nothing behind


def test_concurrent_cache_builders_build_once(tmp_path, good):
    """Two runs asking for the same cache at once: one builds, the other waits and reuses it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        caches = list(pool.map(lambda _: FeatureCache(tmp_path, records=good, features=SYN, progress=False),
                               range(2)))
    assert sorted(c.built for c in caches) == [False, True]
    assert caches[0].path == caches[1].path and (caches[0].path / "COMPLETE").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_cached_equals_uncached(tmp_path, good):
    kw = dict(features=SYN, task_names=TASKS, label_table=TABLE)
    for train in (False, True):
        plain = AudioVideoDataset(good, train=train, **kw)
        cached = AudioVideoDataset(good, train=train, cache=tmp_path, progress=False, **kw)
        plain.set_epoch(2)
        cached.set_epoch(2)
        for i in range(len(good)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["video"], b["video"]), (train, i)       # same uint8 frames
            assert torch.allclose(a["audio"], b["audio"], atol=4e-3), (train, i)  # fp16 storage
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["category"], b["category"])


def test_train_augmentation_is_seeded_per_epoch(tmp_path, good):
    ds = AudioVideoDataset(good, features=SYN, train=True, task_names=TASKS, cache=tmp_path, progress=False)
    ds.set_epoch(0)
    x0, y0 = ds[0], ds[0]
    assert torch.equal(x0["audio"], y0["audio"]) and torch.equal(x0["video"], y0["video"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["audio"], x0["audio"])
    ev = AudioVideoDataset(good, features=SYN, train=False, task_names=TASKS, cache=tmp_path, progress=False)
    assert not torch.equal(x0["audio"], ev[0]["audio"])          # noise + roll applied in training


def test_dataloader_collate_and_workers(tmp_path, good):
    ds = AudioVideoDataset(good, features=SYN, train=True, task_names=TASKS, label_table=TABLE,
                           cache=tmp_path, progress=False)
    for workers in (0, 1):
        batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_av, num_workers=workers))
        b = batches[0]
        assert b["video"].shape == (2, 4, 3, 64, 64) and b["audio"].shape == (2, 1, 256, 64)
        assert b["label"].tolist() == [0, 1] and b["index"].tolist() == [0, 1]
        assert sum(len(x["index"]) for x in batches) == len(good)
