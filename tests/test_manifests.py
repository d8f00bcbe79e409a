"""Manifest reading and validation (manifests.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stella_avalanche.data.manifests import (ClipRecord, ManifestError, check_disjoint_keys, clip_key,
                                              normalise_display_name, read_cavmae_json, read_label_csv,
                                              read_split_csv, split_vggsound_video_id, write_split_csv)

TASKS = ["sports", "music"]
ROWS5 = [
    "abc_1,vggsound/data/frames/abc_1_1000_11000,vggsound/data/audio/abc_1_1000_11000.mp3,/m/a,sports",
    "x-y,vggsound/data/frames/x-y_0_10000,vggsound/data/audio/x-y_0_10000.mp3,/m/b,music",
]
LABELS = "index,mid,display_name,category\n3,/m/a,\"bee, wasp, etc. buzzing\",sports\n7,/m/b,guitar,music\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture()
def labels(tmp_path):
    return read_label_csv(_write(tmp_path, "labels.csv", LABELS))


@pytest.mark.parametrize("layout", ["five", "six", "header5", "header6"])
def test_split_csv_layouts(tmp_path, labels, layout):
    rows = ROWS5
    if layout in ("six", "header6"):
        rows = [f"{i * 0},{r}" for i, r in enumerate(rows)]
    head = {"header5": ["vid,frames_path,wav,label,category"],
            "header6": [",vid,frames_path,wav,label,category"]}.get(layout, [])
    p = _write(tmp_path, "split.csv", "\n".join(head + rows) + "\n")
    recs = read_split_csv(p, data_root=tmp_path / "root", task_names=TASKS, label_table=labels)
    assert [r.key for r in recs] == ["abc_1_1000_11000", "x-y_0_10000"]
    assert recs[0].vid == "abc_1" and recs[0].labels == ("/m/a",) and recs[1].category == "music"
    assert recs[0].video == str((tmp_path / "root/vggsound/data/frames/abc_1_1000_11000").resolve())
    assert recs[1].audio.endswith("vggsound/data/audio/x-y_0_10000.mp3") and os.path.isabs(recs[1].audio)
    assert recs[1].row == len(head) + 2 and recs[0].source == str(p)


def test_audioset_multi_label_quoted(tmp_path):
    lab = read_label_csv(_write(tmp_path, "l.csv", ",index,mid,display_name,category\n"
                                "0,0,/m/h,Speech,human\n1,5,/m/k,Laughter,human\n2,9,/m/c,Car,vehicle\n"))
    assert lab.class_id("/m/k") == 1 and lab.original_index == (0, 5, 9)   # id = row position
    p = _write(tmp_path, "as.csv", '0,v1,f/v1_0_10000,a/v1_0_10000.mp3,"/m/h,/m/k,/m/zz",human\n')
    (rec,) = read_split_csv(p, data_root=tmp_path, task_names=["human", "vehicle"], label_table=lab,
                            multi_label=True)
    assert rec.labels == ("/m/h", "/m/k")          # out-of-table mid dropped
    bad = _write(tmp_path, "as_bad.csv", '0,v1,f/v1_0_10000,a/v1.mp3,"/m/h,/m/c",human\n'
                                         '0,v2,f/v2_0_10000,a/v2.mp3,/m/zz,human\n')
    with pytest.raises(ManifestError) as info:
        read_split_csv(bad, data_root=tmp_path, task_names=["human", "vehicle"], label_table=lab,
                       multi_label=True)
    assert len(info.value.problems) == 2
    assert "as_bad.csv:1" in info.value.problems[0] and "span 2 tasks" in info.value.problems[0]
    assert "as_bad.csv:2" in info.value.problems[1] and "none of the mids" in info.value.problems[1]


def test_split_csv_collects_every_problem(tmp_path, labels):
    text = "\n".join([
        ROWS5[0],
        ROWS5[0].replace("abc_1,", "abc_2,"),                        # 2: duplicate clip key
        ROWS5[1].replace(",music", ",cooking"),                      # 3: unknown category
        ROWS5[1].replace("x-y_0", "q_0").replace("/m/b", "/m/nope"),  # 4: label not in table
        ROWS5[1].replace("x-y_0", "r_0").replace("/m/b", '"/m/a,/m/b"'),  # 5: 2 mids, single-label
        "only,four,fields,here",                                     # 6: field count
        "s,f/s_0_1,,/m/a,sports",                                    # 7: empty wav
    ]) + "\n"
    p = _write(tmp_path, "bad.csv", text)
    with pytest.raises(ManifestError) as info:
        read_split_csv(p, data_root=tmp_path, task_names=TASKS, label_table=labels)
    probs = info.value.problems
    assert len(probs) == 6
    expected = [(2, "duplicate clip key 'abc_1_1000_11000' (first at line 1)"), (3, "'cooking'"),
                (4, "not in label table"), (5, "exactly 1 mid"), (6, "expected 5 fields, found 4"),
                (7, "empty field(s) ['wav']")]
    for prob, (line, text) in zip(probs, expected):
        assert prob.startswith(f"{p}:{line}:") and text in prob, prob
    assert str(p) in str(info.value) and "6 problem(s)" in str(info.value)


def test_split_csv_header_and_empty_errors(tmp_path):
    p = _write(tmp_path, "h.csv", "vid,frames,wav,label,category\n" + ROWS5[0] + "\n")
    with pytest.raises(ManifestError, match=r"h.csv:1: .*missing column\(s\) \['frames_path'\].*unexpected column\(s\) \['frames'\]"):
        read_split_csv(p, data_root=tmp_path)
    p = _write(tmp_path, "m.csv", "vid,wav,label,category\n" + ROWS5[0] + "\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['frames_path'\]"):
        read_split_csv(p, data_root=tmp_path)
    with pytest.raises(ManifestError, match="empty file"):
        read_split_csv(_write(tmp_path, "e.csv", "\n"), data_root=tmp_path)
    with pytest.raises(ManifestError, match="found 7"):
        read_split_csv(_write(tmp_path, "s.csv", "1,2,3,4,5,6,7\n"), data_root=tmp_path)
    with pytest.raises(ManifestError, match="header but no rows"):
        read_split_csv(_write(tmp_path, "o.csv", "vid,frames_path,wav,label,category\n"), data_root=tmp_path)
    with pytest.raises(ManifestError, match="not an integer"):
        read_split_csv(_write(tmp_path, "i.csv", "zz," + ROWS5[0] + "\n"), data_root=tmp_path)


def test_pandas_series_category_hint(tmp_path):
    row = ROWS5[0].replace(",sports", ',"0    human\nName: category, dtype: object"')
    with pytest.raises(ManifestError, match="printed pandas Series") as info:
        read_split_csv(_write(tmp_path, "r.csv", row + "\n"), data_root=tmp_path, task_names=TASKS)
    assert info.value.problems[0].startswith(f"{tmp_path / 'r.csv'}:1:")


def test_write_split_csv_round_trip(tmp_path, labels):
    src = _write(tmp_path, "a.csv", "\n".join(ROWS5) + "\n")
    recs = read_split_csv(src, data_root=tmp_path, task_names=TASKS, label_table=labels)
    out = tmp_path / "out" / "b.csv"
    write_split_csv(out, recs, data_root=tmp_path)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("0,abc_1,vggsound/data/frames/") and lines[1].startswith("1,")
    assert read_split_csv(out, data_root=tmp_path, task_names=TASKS, label_table=labels) == [
        ClipRecord(**{**r.__dict__, "source": str(out)}) for r in recs]
    write_split_csv(out, [{"vid": "v", "frames_path": "f/v_0_1", "wav": "a/v.mp3",
                           "labels": ("/m/a", "/m/b"), "category": "music"}])
    assert out.read_text() == '0,v,f/v_0_1,a/v.mp3,"/m/a,/m/b",music\n'
    assert sorted(os.listdir(out.parent)) == ["b.csv"]          # no temp file left behind


def test_label_csv_variants(tmp_path):
    t = read_label_csv(_write(tmp_path, "v.csv", "index,mid,display_name\n0,/m/x,bee_ wasp_ etc. buzzing\n"
                              "1,/m/y,\"dog, barking\"\n"),
                       category_lookup={"bee, wasp, etc. buzzing": "animals"})
    assert t.categories == ("animals", None) and len(t) == 2
    assert t.id_of_name("bee, wasp, etc. buzzing") == 0 and t.id_of_name("dog_ barking") == 1
    assert normalise_display_name("A_ b") == "a, b"
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['mid'\]"):
        read_label_csv(_write(tmp_path, "b.csv", "index,name,display_name\n0,/m/x,a\n"))
    with pytest.raises(ManifestError) as info:
        read_label_csv(_write(tmp_path, "d.csv", "index,mid,display_name\n0,/m/x,a\nq,/m/y,b\n2,/m/x,c\n"))
    assert [p.split(": ", 1)[0] for p in info.value.problems] == [f"{tmp_path}/d.csv:3", f"{tmp_path}/d.csv:4"]
    with pytest.raises(KeyError, match="not in label table"):
        t.class_id("/m/none")


def test_cavmae_json(tmp_path):
    good = {"data": [{"video_id": "a_b-c_000012", "wav": "/x/a.flac", "video_path": "/x/frames",
                      "labels": "/m/1"},
                     {"video_id": "zz", "wav": "/x/z.flac", "video_path": "/y", "labels": "/m/1,/m/2"}]}
    p = _write(tmp_path, "g.json", json.dumps(good))
    entries = read_cavmae_json(p)
    assert [e["labels"] for e in entries] == [("/m/1",), ("/m/1", "/m/2")] and entries[1]["entry"] == 1
    assert split_vggsound_video_id(entries[0]["video_id"]) == ("a_b-c", 12)
    bad = {"data": [{"video_id": "a", "wav": "w", "video_path": "v"}, {"video_id": "b", "wav": "w",
                                                                         "video_path": "v", "labels": ""}]}
    with pytest.raises(ManifestError) as info:
        read_cavmae_json(_write(tmp_path, "b.json", json.dumps(bad)))
    assert "entry 0: missing key(s) ['labels']" in info.value.problems[0]
    assert "entry 1" in info.value.problems[1] and "no label" in info.value.problems[1]
    with pytest.raises(ManifestError, match="invalid JSON"):
        read_cavmae_json(_write(tmp_path, "c.json", "{"))
    with pytest.raises(ValueError):
        split_vggsound_video_id("noseparator")


def test_clip_key_and_disjoint():
    assert clip_key("a/b/abc_0_10000/") == "abc_0_10000" and clip_key("v/abc_0_10000.mp4") == "abc_0_10000"
    r = ClipRecord("k", "v", "/f", "/a", ("/m/a",), "sports", "train.csv", 3)
    check_disjoint_keys({"train": [r], "test": [ClipRecord(**{**r.__dict__, "key": "j"})]})
    with pytest.raises(ManifestError, match="train.csv:3: clip key 'k' of split 'test'"):
        check_disjoint_keys({"train": [r], "test": [r]})
