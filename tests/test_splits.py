"""Split rules and the prepare step of Continual-VS / Continual-AS on small fake upstream files.

Media files are empty placeholders: the prepare step only checks that they exist.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stella_avalanche.benchmarks import splits as S
from stella_avalanche.data.manifests import ManifestError, read_label_csv, read_split_csv

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def _write_json(path: Path, entries: list[tuple[str, str]]) -> Path:
    """CAV-MAE datafile with (video_id, labels) entries; wav / video_path are the authors' junk paths."""
    data = [{"video_id": vid, "wav": f"/authors/{vid}.flac", "video_path": "/authors/frames", "labels": lab}
            for vid, lab in entries]
    path.write_text(json.dumps({"data": data}))
    return path


def _media(root: Path, prefix: str, key: str, *, frames: bool = True, audio: bool = True,
           raw: str | None = None) -> None:
    if frames:
        (root / prefix / "frames" / key).mkdir(parents=True, exist_ok=True)
        (root / prefix / "frames" / key / "frame_0.jpg").touch()
    if audio:
        (root / prefix / "audio").mkdir(parents=True, exist_ok=True)
        (root / prefix / "audio" / f"{key}.mp3").touch()
    if raw is not None:
        (root / prefix / raw / "video").mkdir(parents=True, exist_ok=True)
        (root / prefix / raw / "video" / f"{key}.mp4").touch()


def _keys(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [Path(r[2]).name.removesuffix(".mp4") for r in csv.reader(fh)]


# VGGSound label table in a NON-alphabetical row order; ``_`` stands for ``,`` as in CAV-MAE's file.
VGG_LABELS = [
    ("/m/golf", "golf driving"),           # sports, row 0
    ("/m/bee", "bee_ wasp_ etc. buzzing"),  # animals, row 1
    ("/m/bask", "basketball bounce"),       # sports, row 2
    ("/m/bowl", "bowling impact"),          # sports, row 3 -> beyond classes_per_task=2
    ("/m/church", "church bell ringing"),   # music, row 4
]


def _vgg_label_csv(path: Path, rows=VGG_LABELS) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "mid", "display_name"])
        for i, (mid, name) in enumerate(rows):
            w.writerow([i + 10, mid, name])  # original ids differ from row positions on purpose
    return path


def _vid(i: int, tag: str) -> tuple[str, str]:
    """(video_id, key) with a YouTube id containing ``_`` and ``-`` and a zero-padded start."""
    ytid = f"y_{tag}-{i}"
    start = 10 + i
    return f"{ytid}_{start:06d}", f"{ytid}_{start * 1000}_{(start + 10) * 1000}"


@pytest.fixture()
def vgg(tmp_path: Path) -> dict:
    root = tmp_path / "data"
    P = "vggsound/data"
    train, test, retr = [], [], []
    keys: dict[str, list[str]] = {}

    def add(lst, split, tag, mid, n, **media):
        for i in range(n):
            vid, key = _vid(len(keys.setdefault(f"{split}:{tag}", [])) + (0 if split == "train" else 50), tag)
            keys[f"{split}:{tag}"].append(key)
            lst.append((vid, mid))
            _media(root, P, key, **media)

    add(train, "train", "golf", "/m/golf", 5)
    add(train, "train", "bask", "/m/bask", 2)
    add(train, "train", "bowl", "/m/bowl", 2)
    add(train, "train", "bee", "/m/bee", 1, audio=False)                  # audio missing -> dropped
    add(train, "train", "church", "/m/church", 1, frames=False, raw="train")  # raw video fallback
    add(train, "train", "church", "/m/church", 1)
    add(test, "test", "golf", "/m/golf", 2)
    add(test, "test", "bowl", "/m/bowl", 1)
    add(test, "test", "bee", "/m/bee", 1)
    add(test, "test", "church", "/m/church", 1)
    add(retr, "retr", "golf", "/m/golf", 1)
    add(retr, "retr", "bowl", "/m/bowl", 1)
    add(retr, "retr", "bee", "/m/bee", 1)
    add(retr, "retr", "church", "/m/church", 1)
    return {
        "root": root, "keys": keys,
        "train": _write_json(tmp_path / "vgg_train_cleaned.json", train),
        "test": _write_json(tmp_path / "vgg_test_cleaned.json", test),
        "retr": _write_json(tmp_path / "vgg_retr.json", retr),
        "labels": _vgg_label_csv(tmp_path / "class_labels_indices_vgg.csv"),
        "out": tmp_path / "splits",
    }


def _prepare_vgg(v: dict, **kw) -> S.SplitReport:
    kw = {"max_per_class": 3, "classes_per_task": 2, "verbose": False, **kw}
    return S.prepare_vggsound_splits(v["train"], v["test"], v["retr"], v["labels"], v["root"], v["out"], **kw)


def _read(v: dict, role: str, files=S.VGGSOUND_FILES, tasks=S.VGGSOUND_TASKS, multi=False, table=True):
    table = read_label_csv(v["out"] / files["labels"]) if table else None
    return read_split_csv(v["out"] / files[role], data_root=v["root"], task_names=tasks, label_table=table,
                          multi_label=multi)


# ------------------------------------------------------------------------------------------ pure rules
def test_vggsound_video_id_and_key() -> None:
    assert S.parse_vggsound_video_id("a_b-c_d_000012") == ("a_b-c_d", 12)
    assert S.vggsound_clip_key("a_b-c_d", 12) == "a_b-c_d_12000_22000"
    assert S.audioset_clip_key("--x_y", 12.5, 22.5) == "--x_y_12500_22500"
    with pytest.raises(ValueError, match="video_id"):
        S.parse_vggsound_video_id("nounderscore")


def test_cap_per_class_default_400_on_synthetic_rows() -> None:
    rng = np.random.default_rng(0)
    classes = rng.choice(["a", "b", "c"], size=1500, p=[0.6, 0.35, 0.05])
    keep = S.cap_per_class(classes, 400)
    for c in "abc":
        idx = np.flatnonzero(classes == c)
        # the FIRST min(n, 400) rows of each class in list order are kept, nothing else
        assert keep[idx].sum() == min(len(idx), 400)
        assert keep[idx[: min(len(idx), 400)]].all()
    assert (classes == "c").sum() < 400  # a class with fewer clips keeps all of them


def test_select_classes_follows_label_table_row_order() -> None:
    tasks = ["music", "sports", "sports", "music", "sports", "sports"]
    sel = S.select_vggsound_classes(tasks, classes_per_task=3)
    assert sel["sports"] == [1, 2, 4] and sel["music"] == [0, 3] and sel["vehicle"] == []


def test_assign_tasks_normalises_underscores_and_names_unknown_rows() -> None:
    cats = S.load_vggsound_categories()
    assert len(cats) == 309
    assert S.assign_vggsound_tasks(["bee_ wasp_ etc. buzzing", "Lathe spinning", "wind noise"], cats) == [
        "animals", "others_part1", "home_nature"]
    with pytest.raises(ManifestError, match="row 3.*no such class"):
        S.assign_vggsound_tasks(["golf driving", "no such class"], cats, source="t.csv")


def test_audioset_single_task_rule() -> None:
    m2t = {"/m/a": "human", "/m/b": "human", "/m/v": "vehicle"}
    assert S.audioset_clip_task(["/m/x", "/m/a", "/m/b"], m2t) == ("human", ("/m/a", "/m/b"), "ok")
    assert S.audioset_clip_task(["/m/a", "/m/v"], m2t)[2] == "multi_task"
    assert S.audioset_clip_task(["/m/x"], m2t)[2] == "no_in_table_label"


def test_audioset_tasks_table() -> None:
    t = S.load_audioset_tasks()
    assert len(t) == 171 and (t["role"] == "leaf").sum() == 161
    assert list(dict.fromkeys(t["category"])) == list(S.AUDIOSET_TASKS)
    assert t["index"].tolist() == list(range(171))


# ------------------------------------------------------------------------------------------ VGGSound
def test_prepare_vggsound_selection(vgg: dict) -> None:
    rep = _prepare_vgg(vgg)
    k = vgg["keys"]
    train = _read(vgg, "train")
    by_cls = {}
    for r in train:
        by_cls.setdefault(r.labels[0], []).append(r.key)
    # first 2 sports rows of the table (golf row 0, basketball row 2), not bowling (row 3)
    assert set(by_cls) == {"/m/golf", "/m/bask", "/m/church"}
    assert set(by_cls["/m/golf"]) == set(k["train:golf"][:3])      # first 3 in json order
    assert set(by_cls["/m/bask"]) == set(k["train:bask"])          # fewer than the cap: all kept
    assert {r.category for r in train if r.labels[0] == "/m/golf"} == {"sports"}
    # raw-video fallback: frames missing, the mp4 under vggsound/data/train/video is used
    raw = [r for r in train if r.key == k["train:church"][0]]
    assert raw and raw[0].video.endswith(f"vggsound/data/train/video/{raw[0].key}.mp4")
    assert raw[0].audio.endswith(f"vggsound/data/audio/{raw[0].key}.mp3")

    unused = {r.key for r in _read(vgg, "unused_train", table=False)}
    assert unused == set(k["train:golf"][3:]) | set(k["train:bowl"])
    ev = {r.key for r in _read(vgg, "test")}
    assert ev == set(k["test:golf"]) | set(k["test:bee"]) | set(k["test:church"])
    assert {r.key for r in _read(vgg, "unused_test", table=False)} == set(k["test:bowl"])
    # retrieval: every class of the task, trained or not (bowling), tagged with the task name
    retr = {r.key: r.category for r in _read(vgg, "retrieval", table=False)}
    assert retr[k["retr:bowl"][0]] == "sports" and len(retr) == 4

    # label table: trained classes only, original row order, original index kept, leading unnamed column
    lines = (vgg["out"] / S.VGGSOUND_FILES["labels"]).read_text().splitlines()
    assert lines[0] == ",index,mid,display_name,category"
    table = read_label_csv(vgg["out"] / S.VGGSOUND_FILES["labels"])
    assert table.mids == ("/m/golf", "/m/bee", "/m/bask", "/m/church")
    assert table.original_index == (10, 11, 12, 14)
    assert table.categories == ("sports", "animals", "sports", "music")

    assert rep.selected_classes["sports"] == ["golf driving", "basketball bounce"]
    assert rep.counts["sports"] == {"classes": 3, "trained": 2, "train": 5, "eval": 2, "retrieval": 2,
                                    "unused_train": 4, "unused_test": 1}
    assert rep.counts["animals"]["dropped_train"] == 1 and rep.dropped["train"] == {"missing_audio": 1}
    dropped = list(csv.DictReader(open(vgg["out"] / S.VGGSOUND_FILES["dropped"])))
    assert [(d["key"], d["reason"]) for d in dropped] == [(k["train:bee"][0], "missing_audio")]
    report = json.loads((vgg["out"] / S.VGGSOUND_FILES["report"]).read_text())
    assert report["counts"]["music"]["train"] == 2
    assert "sports" in rep.table() and "total" in rep.table()


def test_prepare_vggsound_default_cap_400(tmp_path: Path) -> None:
    root, P = tmp_path / "d", "vggsound/data"
    train = []
    for i in range(403):
        vid, key = _vid(i, "g")
        train.append((vid, "/m/golf"))
        _media(root, P, key)
    test_vid, test_key = _vid(900, "t")
    _media(root, P, test_key)
    v = {"train": _write_json(tmp_path / "tr.json", train), "test": _write_json(tmp_path / "te.json", [(test_vid, "/m/golf")]),
         "retr": _write_json(tmp_path / "re.json", [(test_vid, "/m/golf")]),
         "labels": _vgg_label_csv(tmp_path / "l.csv", VGG_LABELS[:1]), "root": root, "out": tmp_path / "o"}
    rep = S.prepare_vggsound_splits(v["train"], v["test"], v["retr"], v["labels"], root, v["out"], verbose=False)
    assert rep.counts["sports"]["train"] == 400 and rep.counts["sports"]["unused_train"] == 3
    keys = set(_keys(v["out"] / S.VGGSOUND_FILES["train"]))
    assert keys == {_vid(i, "g")[1] for i in range(400)}


def test_prepare_vggsound_seeded_shuffle_and_no_raw_video(vgg: dict) -> None:
    _prepare_vgg(vgg, seed=3)
    first = (vgg["out"] / S.VGGSOUND_FILES["train"]).read_text()
    _prepare_vgg(vgg, seed=3)
    assert (vgg["out"] / S.VGGSOUND_FILES["train"]).read_text() == first
    _prepare_vgg(vgg, seed=4)
    again = (vgg["out"] / S.VGGSOUND_FILES["train"]).read_text()
    assert again != first and sorted(again.splitlines()[i].split(",", 1)[1] for i in range(7)) == \
        sorted(line.split(",", 1)[1] for line in first.splitlines())
    assert [line.split(",")[0] for line in first.splitlines()] == [str(i) for i in range(7)]
    rep = _prepare_vgg(vgg, allow_raw_video=False)
    assert rep.dropped["train"] == {"missing_audio": 1, "missing_video": 1}
    assert rep.counts["music"]["train"] == 1


def test_prepare_vggsound_rejects_bad_inputs(vgg: dict, tmp_path: Path) -> None:
    bad = _write_json(tmp_path / "bad.json", [("y_x_000001", "/m/unknown"), ("nounderscore", "/m/golf"),
                                              ("y_z_000002", "/m/golf,/m/bask")])
    with pytest.raises(ManifestError) as ei:
        S.prepare_vggsound_splits(bad, vgg["test"], vgg["retr"], vgg["labels"], vgg["root"], vgg["out"],
                                  verbose=False)
    text = str(ei.value)
    assert "bad.json: entry 0" in text and "/m/unknown" in text
    assert "entry 1" in text and "entry 2" in text and "exactly one mid" in text
    # a clip in both train and test
    with pytest.raises(ManifestError, match="both the train and the test"):
        S.prepare_vggsound_splits(vgg["test"], vgg["test"], vgg["retr"], vgg["labels"], vgg["root"],
                                  vgg["out"], verbose=False)
    labels = _vgg_label_csv(tmp_path / "l2.csv", VGG_LABELS + [("/m/zz", "not a vggsound class")])
    with pytest.raises(ManifestError, match="not a vggsound class"):
        S.prepare_vggsound_splits(vgg["train"], vgg["test"], vgg["retr"], labels, vgg["root"], vgg["out"],
                                  verbose=False)


def _load_cli(name: str):
    """``stella-prepare <benchmark>`` (``stella_avalanche/cli/prepare.py``) with the subcommand fixed, as
    ``benchmarks/<name>.py`` runs it; the script itself is checked to be that thin wrapper."""
    from types import SimpleNamespace

    from stella_avalanche.cli import prepare

    sub = name.removeprefix("prepare_")
    script = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--help"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert script.returncode == 0 and f"stella-prepare {sub}" in script.stdout, script.stderr
    return SimpleNamespace(main=lambda argv: prepare.main([sub, *argv]),
                           build_parser=lambda: SimpleNamespace(
                               parse_args=lambda argv: prepare.build_parser().parse_args([sub, *argv])))


def test_prepare_vggsound_cli(vgg: dict, capsys: pytest.CaptureFixture) -> None:
    cli = _load_cli("prepare_vggsound")
    rc = cli.main(["--train-json", str(vgg["train"]), "--test-json", str(vgg["test"]), "--retrieval-json",
                   str(vgg["retr"]), "--labels", str(vgg["labels"]), "--data-root", str(vgg["root"]), "--out",
                   str(vgg["out"]), "--max-per-class", "3", "--classes-per-task", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "golf driving; basketball bounce" in out and "others_part2" in out
    assert all((vgg["out"] / f).exists() for f in S.VGGSOUND_FILES.values())
    assert cli.main(["--train-json", "/nonexistent.json", "--test-json", str(vgg["test"]), "--retrieval-json",
                     str(vgg["retr"]), "--labels", str(vgg["labels"]), "--data-root", str(vgg["root"]),
                     "--out", str(vgg["out"])]) == 2
    assert "nonexistent.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "--retrieval-json" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ AudioSet
WHOOP, CONVO, TOOT, CAR_ALARM, THUNDER, BARK = ("/m/07rwj3x", "/m/01h8n0", "/m/07qv_d5", "/m/02mfyn",
                                                "/m/0jb2l", "/m/05tny_")


@pytest.fixture()
def aset(tmp_path: Path) -> dict:
    root, P = tmp_path / "data", "AudioSet/data"
    seg = tmp_path / "segments.csv"
    rows = {  # ytid -> (start, end, labels, media kwargs or None)
        "h1": (30.0, 40.0, f"{WHOOP},/m/outside", {}),
        "hv": (0.0, 10.0, f"{WHOOP},{TOOT}", {}),            # spans human + vehicle -> excluded
        "none": (0.0, 10.0, "/m/outside", {}),              # no in-table label -> excluded
        "v1": (12.5, 22.5, f"{TOOT},{CAR_ALARM}", {}),
        "v2": (5.0, 15.0, CAR_ALARM, {"frames": False, "audio": False, "raw": "Thunderstorm_train"}),
        "miss": (0.0, 10.0, CONVO, None),                    # no media -> dropped
        "h2": (1.0, 11.0, CONVO, {}),
        "n1": (2.0, 12.0, THUNDER, {}),
        "a1": (3.0, 13.0, BARK, {}),
        "ah": (4.0, 14.0, f"{BARK},{WHOOP}", {}),            # spans animal + human -> excluded
    }
    with open(seg, "w") as fh:
        fh.write("# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=10\n"
                 "# YTID, start_seconds, end_seconds, positive_labels\n")
        for y, (s, e, lab, media) in rows.items():
            fh.write(f'{y}, {s:.3f}, {e:.3f}, "{lab}"\n')
            if media is not None:
                _media(root, P, S.audioset_clip_key(y, s, e), **media)
    mk = lambda ys: [(y, rows[y][2] if y in rows else WHOOP) for y in ys]  # "zz": no segment
    return {
        "root": root, "rows": rows, "seg": seg, "out": tmp_path / "splits",
        "train": _write_json(tmp_path / "as_train.json", mk(["h1", "hv", "none", "v1", "v2", "miss", "h1", "zz"])),
        "eval": _write_json(tmp_path / "as_eval.json", mk(["h2", "n1"])),
        "retr": _write_json(tmp_path / "as_retr.json", mk(["h2", "a1", "ah"])),
    }


def _key(a: dict, y: str) -> str:
    s, e = a["rows"][y][:2]
    return S.audioset_clip_key(y, s, e)


def test_prepare_audioset(aset: dict) -> None:
    a = aset
    rep = S.prepare_audioset_splits(a["train"], a["eval"], a["retr"], a["seg"], a["root"], a["out"],
                                    verbose=False)
    rd = lambda role: _read(a, role, S.AUDIOSET_FILES, S.AUDIOSET_TASKS, multi=True)
    train = {r.key: r for r in rd("train")}
    assert set(train) == {_key(a, "h1"), _key(a, "v1"), _key(a, "v2")}
    assert train[_key(a, "v1")].key == "v1_12500_22500"
    assert train[_key(a, "h1")].labels == (WHOOP,) and train[_key(a, "h1")].category == "human"
    assert train[_key(a, "v1")].labels == (TOOT, CAR_ALARM) and train[_key(a, "v1")].category == "vehicle"
    assert train[_key(a, "v2")].video.endswith(f"AudioSet/data/Thunderstorm_train/video/{_key(a, 'v2')}.mp4")
    assert rep.dropped["train"] == {"multi_task": 1, "no_in_table_label": 1, "missing_video_and_audio": 1,
                                    "duplicate_key": 1, "no_segment": 1,
                                    "download_class_task_mismatch(kept)": 1}
    assert {r.key: r.category for r in rd("test")} == {_key(a, "h2"): "human", _key(a, "n1"): "nature"}
    # retrieval filtered by the same single-task rule; eval overlap is allowed
    assert {r.key: r.category for r in rd("retrieval")} == {_key(a, "h2"): "human", _key(a, "a1"): "animal"}
    assert rep.dropped["retrieval"] == {"multi_task": 1}
    table = read_label_csv(a["out"] / S.AUDIOSET_FILES["labels"])
    assert len(table) == 171 and table.categories[0] == "human" and table.categories[-1] == "music"
    assert rep.counts["vehicle"]["train"] == 2 and rep.counts["human"]["dropped_train"] == 2


def test_prepare_audioset_cli_and_overlap(aset: dict) -> None:
    a = aset
    cli = _load_cli("prepare_audioset")
    args = ["--train-json", str(a["train"]), "--eval-json", str(a["eval"]), "--retrieval-json", str(a["retr"]),
            "--segments", str(a["seg"]), "--data-root", str(a["root"]), "--out", str(a["out"]), "--quiet"]
    assert cli.main(args) == 0
    assert (a["out"] / S.AUDIOSET_FILES["train"]).exists()
    with pytest.raises(ManifestError, match="both the train and the retrieval"):
        S.prepare_audioset_splits(a["retr"], a["eval"], a["retr"], a["seg"], a["root"], a["out"],
                                  verbose=False)


def test_read_segments_csv(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text('# c\n# YTID, start_seconds, end_seconds, positive_labels\n'
                 '-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw,/m/0k4j"\n-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw,/m/0k4j"\n')
    assert S.read_segments_csv(p) == {"-0RWZT-miFs": [(420.0, 430.0, ("/m/03v3yw", "/m/0k4j"))]}
    p.write_text("x, notanumber, 3\n")
    with pytest.raises(ManifestError, match="s.csv:1: bad segment bounds"):
        S.read_segments_csv(p)
