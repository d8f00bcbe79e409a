"""Continual-VS / Continual-AS factories end to end on tiny real media (JPEG frames + wav audio).

The media are written by this file (PIL + ``wave``), the split CSVs by the prepare step from fake
CAV-MAE json lists, and the scenarios are built with a reduced FeatureConfig (2 frames of 32², a
(48, 16) fbank) so that decoding every sample stays fast.
"""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stella_avalanche.benchmarks import splits as S
from stella_avalanche.benchmarks.audioset import audioset_benchmark
from stella_avalanche.benchmarks.common import multitask_train_dataset
from stella_avalanche.benchmarks.vggsound import vggsound_benchmark
from stella_avalanche.data.features import FeatureConfig

KEYS = {"video", "audio", "category", "label", "index"}
FEATURES = FeatureConfig.paper(num_frames=2, frame_interval_s=1.0, clip_seconds=3.0, frames_fps=2.0,
                               window_step_s=0.5, source_size=32, frame_size=32, audio_seconds=0.5,
                               mel_bins=16, target_length=48)


def _clip(root: Path, prefix: str, key: str, seed: int) -> None:
    """7 JPEG frames (frame_0..frame_6, 2 fps over 3 s) and a 0.5 s 16 kHz wav of noise."""
    rng = np.random.default_rng(seed)
    d = root / prefix / "frames" / key
    d.mkdir(parents=True, exist_ok=True)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"frame_{i}.jpg")
    (root / prefix / "audio").mkdir(parents=True, exist_ok=True)
    pcm = (rng.standard_normal(8000) * 3000).astype(np.int16)
    with wave.open(str(root / prefix / "audio" / f"{key}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _json(path: Path, entries: list[tuple[str, str]]) -> Path:
    path.write_text(json.dumps({"data": [{"video_id": v, "wav": "x", "video_path": "x", "labels": lab}
                                         for v, lab in entries]}))
    return path


@pytest.fixture(scope="module")
def vgg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared Continual-VS layout with clips of two tasks (sports, music) only."""
    tmp = tmp_path_factory.mktemp("vgg")
    root = tmp / "data"
    lists: dict[str, list[tuple[str, str]]] = {"train": [], "test": [], "retr": []}
    plan = [("train", "/m/golf", 2), ("train", "/m/bask", 1), ("train", "/m/church", 2),
            ("test", "/m/golf", 1), ("test", "/m/church", 1),
            ("retr", "/m/golf", 1), ("retr", "/m/bowl", 1), ("retr", "/m/church", 1)]
    n = 0
    for split, mid, count in plan:
        for _ in range(count):
            n += 1
            ytid = f"v_{split}-{n}"
            lists[split].append((f"{ytid}_{n:03d}", mid))
            _clip(root, "vggsound/data", S.vggsound_clip_key(ytid, n), n)
    labels = tmp / "labels.csv"
    labels.write_text("index,mid,display_name\n0,/m/golf,golf driving\n1,/m/church,church bell ringing\n"
                      "2,/m/bask,basketball bounce\n3,/m/bowl,bowling impact\n")
    S.prepare_vggsound_splits(_json(tmp / "tr.json", lists["train"]), _json(tmp / "te.json", lists["test"]),
                              _json(tmp / "re.json", lists["retr"]), labels, root, root, classes_per_task=2,
                              max_per_class=3, verbose=False)
    return root


def test_vggsound_benchmark_streams(vgg_root: Path) -> None:
    bm = vggsound_benchmark(vgg_root, features=FEATURES, tasks=["sports", "music"])
    assert bm.task_names == ["sports", "music"] and bm.name == "continual_vs" and bm.features == FEATURES
    assert [len(e.dataset) for e in bm.train_stream] == [3, 2]
    assert [len(e.dataset) for e in bm.test_stream] == [1, 1]
    assert [len(e.dataset) for e in bm.retrieval_stream] == [2, 1]  # untrained bowling is in retrieval
    for stream in (bm.train_stream, bm.test_stream, bm.retrieval_stream):
        for t, exp in enumerate(stream):
            assert exp.current_experience == t
            batch = exp.dataset.collate_fn([exp.dataset[i] for i in range(len(exp.dataset))])
            assert set(batch) == KEYS
            n = len(exp.dataset)
            assert batch["video"].shape == (n, 2, 3, 32, 32) and batch["video"].dtype == torch.float32
            assert batch["audio"].shape == (n, 1, 48, 16) and torch.isfinite(batch["audio"]).all()
            assert (batch["category"] == t).all()
    # class ids = rows of the 160-class table (here golf, church, basketball); retrieval carries -1
    train_labels = torch.cat([torch.stack([e.dataset[i]["label"] for i in range(len(e.dataset))])
                              for e in bm.train_stream])
    assert sorted(train_labels.tolist()) == [0, 0, 1, 1, 2]
    assert all(int(bm.retrieval_stream[0].dataset[i]["label"]) == -1 for i in range(2))
    joint = multitask_train_dataset(bm)
    assert len(joint) == 5
    assert sorted(int(joint[i]["category"]) for i in range(5)) == [0, 0, 0, 1, 1]


def test_vggsound_benchmark_task_order_and_errors(vgg_root: Path) -> None:
    bm = vggsound_benchmark(vgg_root, features=FEATURES, tasks=["music", "sports"])
    assert [len(e.dataset) for e in bm.train_stream] == [2, 3]
    assert int(bm.retrieval_stream[1].dataset[0]["category"]) == 1
    with pytest.raises(ValueError, match=r"unknown task name\(s\) \['sport'\].*valid names.*'sports'"):
        vggsound_benchmark(vgg_root, features=FEATURES, tasks=["sport"])
    # all 8 tasks: the first task without clips is named, with the file
    with pytest.raises(ValueError, match=r"task\(s\) \['vehicle', 'people'.*no clips in .*vgg_train_cleaned_shrink8.csv"):
        vggsound_benchmark(vgg_root, features=FEATURES)


def test_audioset_benchmark_multi_hot(tmp_path: Path) -> None:
    root, P = tmp_path / "data", "AudioSet/data"
    whoop, convo, toot, alarm = "/m/07rwj3x", "/m/01h8n0", "/m/07qv_d5", "/m/02mfyn"
    segs = {"h1": (0.0, 10.0, f"{whoop},{convo}"), "h2": (1.0, 11.0, whoop), "v1": (2.0, 12.0, toot),
            "v2": (3.0, 13.0, f"{toot},{alarm}"), "h3": (4.0, 14.0, convo), "v3": (5.0, 15.0, alarm)}
    with open(tmp_path / "seg.csv", "w") as fh:
        fh.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for i, (y, (s, e, lab)) in enumerate(segs.items()):
            fh.write(f'{y}, {s}, {e}, "{lab}"\n')
            _clip(root, P, S.audioset_clip_key(y, s, e), 100 + i)
    js = {name: _json(tmp_path / f"{name}.json", [(y, segs[y][2]) for y in ys])
          for name, ys in {"tr": ["h1", "v1", "v2"], "ev": ["h2", "v3"], "re": ["h3", "v3"]}.items()}
    S.prepare_audioset_splits(js["tr"], js["ev"], js["re"], tmp_path / "seg.csv", root, root, verbose=False)
    bm = audioset_benchmark(root, features=FEATURES, tasks=["human", "vehicle"])
    assert bm.name == "continual_as" and [len(e.dataset) for e in bm.train_stream] == [1, 2]
    s = bm.train_stream[0].dataset[0]
    assert s["label"].shape == (171,) and s["label"].dtype == torch.float32
    table = S.load_audioset_tasks()
    ids = table.index[table["mid"].isin([whoop, convo])].tolist()
    assert torch.nonzero(s["label"]).flatten().tolist() == ids
    assert [int(e.dataset[0]["category"]) for e in bm.retrieval_stream] == [0, 1]
    with pytest.raises(ValueError, match=r"\['nature'\] have no clips"):
        audioset_benchmark(root, features=FEATURES, tasks=["human", "nature"])
