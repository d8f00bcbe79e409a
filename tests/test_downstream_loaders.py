"""Real-data loaders of the downstream suite: MSR-VTT-style json and AVSBench-S4 layout (media made here)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stella_avalanche.benchmarks.avsbench import AVSBenchS4Dataset, pick_frames, read_s4_csv
from stella_avalanche.benchmarks.msrvtt import msrvtt_dataset, read_msrvtt_json
from stella_avalanche.data.features import FeatureConfig
from stella_avalanche.data.manifests import ManifestError
from stella_avalanche.data.media import MissingMediaError

from conftest import SR, sine, write_wav

FEATURES = FeatureConfig.synthetic()  # 4 x 64² frames, (256, 64) fbank


# ------------------------------------------------------------------------------------------ MSR-VTT
def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps({"data": data}))
    return path


def test_msrvtt_reads_video_with_own_track(media_files, tmp_path):
    lst = _write_json(tmp_path / "msrvtt.json", [
        {"video_id": "v0", "video_path": str(media_files.mp4), "wav": "", "labels": ""},
        {"video_id": "v1", "video_path": "clipA", "wav": "clipB.wav"},  # relative to data_root
    ])
    recs = read_msrvtt_json(lst, data_root=media_files.root)
    assert [r.key for r in recs] == ["v0", "v1"]
    assert recs[0].audio == str(media_files.mp4)  # no wav: the video's own audio track
    assert recs[1].video == str(media_files.frames_dir) and recs[1].audio == str(media_files.wav_b)
    ds = msrvtt_dataset(lst, data_root=media_files.root, features=FEATURES, progress=False)
    s = ds[0]
    assert s["video"].shape == (4, 3, 64, 64) and s["audio"].shape == (1, 256, 64)
    assert int(s["category"]) == 0 and int(s["label"]) == -1


@pytest.mark.parametrize("data, needle", [
    ([{"video_id": "a", "video_path": "x.mp4"}, {"video_id": "b"}], "entry 1: missing key 'video_path'"),
    ([{"video_id": "a", "video_path": "x.mp4"}, {"video_id": "a", "video_path": "y.mp4"}],
     "entry 1: video_id 'a' repeats entry 0"),
    ([{"video_id": "a", "video_path": "x.mp4"}, ["not", "an", "object"]], "entry 1: not an object"),
    ([{"video_id": "a", "video_path": "x.mp4"}, {"video_id": "", "video_path": "y.mp4"}], "entry 1: empty video_id"),
    ([{"video_id": "a", "video_path": 3}], "entry 0: 'video_path' must be a string"),
])
def test_msrvtt_rejects_malformed_entries(tmp_path, data, needle):
    lst = _write_json(tmp_path / "bad.json", data)
    with pytest.raises(ManifestError) as e:
        read_msrvtt_json(lst)
    assert str(lst) in str(e.value) and needle in str(e.value)


def test_msrvtt_rejects_invalid_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"data": [\n{"video_id": "a",,}]}')
    with pytest.raises(ManifestError, match=r"broken\.json:2: invalid JSON"):
        read_msrvtt_json(p)
    p.write_text('{"rows": []}')
    with pytest.raises(ManifestError, match="list under 'data'"):
        read_msrvtt_json(p)


def test_msrvtt_missing_media_named(tmp_path):
    lst = _write_json(tmp_path / "m.json", [{"video_id": "a", "video_path": "nowhere.mp4"}])
    with pytest.raises(MissingMediaError, match="nowhere.mp4"):
        msrvtt_dataset(lst, features=FEATURES, progress=False)


# ------------------------------------------------------------------------------------------ AVSBench-S4
def _square_frame(x0: int, y0: int, side: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    frame = np.full((size, size, 3), 20, np.uint8)
    frame[y0:y0 + side, x0:x0 + side] = 230
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y0 + side, x0:x0 + side] = 255
    return frame, mask


def _make_s4(root: Path, clips: list[tuple[str, str, str]]) -> Path:
    """S4 layout with one bright square per frame (moving right), its mask and a wav."""
    rows = ["name,start,category,split"]
    for name, cat, split in clips:
        rows.append(f"{name},0,{cat},{split}")
        fdir = root / "visual_frames" / split / cat / name
        mdir = root / "gt_masks" / split / cat / name
        fdir.mkdir(parents=True)
        mdir.mkdir(parents=True)
        for i in range(1, 6):
            frame, mask = _square_frame(4 + 8 * i, 16, 20)
            Image.fromarray(frame).save(fdir / f"{name}_{i}.png")
            if split != "train" or i == 1:
                Image.fromarray(mask).save(mdir / f"{name}_{i}.png")
        (root / "audio_wav" / split / cat).mkdir(parents=True, exist_ok=True)
        write_wav(root / "audio_wav" / split / cat / f"{name}.wav", sine(5.0, SR), SR)
    (root / "s4_meta_data.csv").write_text("\n".join(rows) + "\n")
    return root


def test_avsbench_layout_and_masks(tmp_path):
    root = _make_s4(tmp_path / "s4", [("clip_a", "dog", "train"), ("clip_b", "car", "test"),
                                      ("clip_c", "dog", "test")])
    assert pick_frames(4) == [0, 1, 3, 4] and pick_frames(1) == [0]
    train = AVSBenchS4Dataset(root=root, split="train", features=FEATURES)
    test = AVSBenchS4Dataset(root=root, split="test", features=FEATURES)
    assert len(train) == 1 and len(test) == 2 and test.categories == ["car", "dog"]
    s = test[0]
    assert s["video"].shape == (4, 3, 64, 64) and s["audio"].shape == (1, 256, 64)
    assert s["mask"].shape == (4, 64, 64) and s["mask"].dtype == torch.bool
    assert s["mask_valid"].tolist() == [True] * 4
    # the mask covers the bright square of the frame it belongs to (frames 1, 2, 4, 5 of the clip)
    for j, i in enumerate(pick_frames(4)):
        _, m = _square_frame(4 + 8 * (i + 1), 16, 20)
        assert torch.equal(s["mask"][j], torch.from_numpy(m > 0))
        bright = s["video"][j].mean(0) > 0
        assert torch.equal(bright, s["mask"][j])
    t = train[0]
    assert t["mask_valid"].tolist() == [True, False, False, False]  # train: only the first frame annotated
    assert t["mask"][1:].sum() == 0


def test_avsbench_rejects_malformed_csv(tmp_path):
    root = _make_s4(tmp_path / "s4", [("clip_a", "dog", "train")])
    csv = root / "s4_meta_data.csv"
    csv.write_text("name,start,category,split\nclip_a,0,dog,train\nclip_b,0,dog,holdout\nclip_c,0,dog\n")
    with pytest.raises(ManifestError) as e:
        read_s4_csv(csv, root=root)
    msg = str(e.value)
    assert f"{csv}:3: split 'holdout'" in msg and f"{csv}:4: 3 field(s)" in msg
    csv.write_text("vid,start,label\nclip_a,0,dog\n")
    with pytest.raises(ManifestError, match=r"s4_meta_data\.csv:1: header lacks column\(s\) \['name', 'category', 'split'\]"):
        read_s4_csv(csv, root=root)
    csv.write_text("name,start,category,split\nclip_a,0,dog,train\nclip_a,0,dog,test\n")
    with pytest.raises(ManifestError, match=r"s4_meta_data\.csv:3: clip 'clip_a' repeats line 2"):
        read_s4_csv(csv, root=root)


def test_avsbench_missing_media(tmp_path):
    root = _make_s4(tmp_path / "s4", [("clip_a", "dog", "test"), ("clip_b", "dog", "test")])
    wav = root / "audio_wav" / "test" / "dog" / "clip_b.wav"
    wav.unlink()
    with pytest.raises(MissingMediaError, match="clip_b.wav"):
        AVSBenchS4Dataset(root=root, split="test", features=FEATURES)
    ds = AVSBenchS4Dataset(root=root, split="test", features=FEATURES, on_error="skip")
    assert len(ds) == 1 and ds.skipped["missing"] == 1
    bad = root / "visual_frames" / "test" / "dog" / "clip_a" / "clip_a_2.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(Exception, match="clip_a_2.png"):
        ds[0]
