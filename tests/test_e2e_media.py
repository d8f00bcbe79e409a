"""The end-to-end-from-media measurement (issue 27 items 3-4) runs on the CPU before any GPU sees it.

- ``benchmarks/perf/make_media_stream.py`` writes a stream in the real formats (256-pixel JPEG frame
  directories, 16 kHz WAV, CAV-MAE lists turned into split CSVs by the project's prepare step) that the
  project's Continual-VS factory reads with the paper's preprocessing;
- ``benchmarks/perf/e2e_media.py --smoke`` measures every part on it (loader, device-resident and
  end-to-end steps, evaluation, checkpoint; feature cache and one loader worker) and writes one JSON
  with the requested step counts and no machine paths;
- ``benchmarks/perf/project_run.py`` reproduces a projection computed here by hand from a fake JSON.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from stella_avalanche.paths import find_machine_paths

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "benchmarks" / "perf"


def _load(name: str) -> Any:
    """A script of benchmarks/perf as a module (registered first: its dataclasses look themselves up)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke stream: 8 tasks x 1 class x (2 train + 1 eval + 1 retrieval) clips."""
    mk = _load("make_media_stream")
    root = tmp_path_factory.mktemp("media")
    mk.make_stream(root, mk.smoke_spec(), workers=1)
    return root


def test_stream_is_deterministic_and_in_the_paper_formats(media_root: Path) -> None:
    mk = _load("make_media_stream")
    spec = mk.smoke_spec()
    rows = mk.label_rows()
    assert len(rows) == 309 and {r["task"] for r in rows} == {
        "sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2"}
    jobs = mk.plan_clips(spec, rows)
    assert [j.key for j in jobs] == [j.key for j in mk.plan_clips(spec, rows)]  # same seed, same stream
    assert len({j.key for j in jobs}) == len(jobs) == 32
    a = mk.clip_frames(spec, 3, np.random.default_rng(5))
    assert a.shape == (72, 256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, mk.clip_frames(spec, 3, np.random.default_rng(5)))
    summary = json.loads((media_root / "stream.json").read_text())
    assert summary["clips_per_split"] == {"train": 16, "test": 8, "retrieval": 8}
    assert all(c["train"] == 2 and c["eval"] == 1 and c["retrieval"] == 1 for c in summary["prepared_counts"].values())
    assert not find_machine_paths(json.dumps(summary))
    key = jobs[0].key
    frames = sorted((media_root / "vggsound/data/frames" / key).iterdir())
    assert len(frames) == 72 and {f.suffix for f in frames} == {".jpg"}
    with wave.open(str(media_root / "vggsound/data/audio" / f"{key}.wav"), "rb") as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (1, 16000, 160000)


def test_vggsound_factory_reads_the_stream(media_root: Path) -> None:
    from stella_avalanche.benchmarks.vggsound import VGGSOUND_TASKS, vggsound_benchmark

    bm = vggsound_benchmark(media_root)  # the paper's FeatureConfig, no cache: what the runner builds
    assert bm.task_names == list(VGGSOUND_TASKS)
    assert [len(e.dataset) for e in bm.train_stream] == [2] * 8
    assert [len(e.dataset) for e in bm.retrieval_stream] == [1] * 8
    for t in (0, 7):
        s = bm.train_stream[t].dataset[1]
        assert s["video"].shape == (4, 3, 224, 224) and s["audio"].shape == (1, 1024, 128)
        assert int(s["category"]) == t and torch.isfinite(s["video"]).all() and torch.isfinite(s["audio"]).all()
    r = bm.retrieval_stream[3].dataset[0]
    assert int(r["category"]) == 3 and int(r["label"]) == -1


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_e2e_smoke_writes_one_complete_json(media_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "e2e.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(PERF / "e2e_media.py"), "--smoke", "--device", "cpu", "--data",
                        str(media_root), "--out", str(out), "--workers", "1", "--cache", str(tmp_path / "cache"),
                        "--scratch", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    res = json.loads(text)
    # no machine paths: relative to the JSON's folder, the repository, or a bare name
    assert not find_machine_paths(text) and not [s for s in _strings(res) if s.startswith("/")]
    assert res["inputs"]["data"] == media_root.name and res["inputs"]["cache"] == "cache"
    assert res["meta"]["smoke"] and res["meta"]["device"] == "cpu" and res["meta"]["commit"]
    assert res["inputs"]["model"] == "tiny" and res["inputs"]["batch"] == [2] and res["inputs"]["workers"] == 1
    assert res["inputs"]["threads"] == 1  # --smoke: one thread (the runner's rule is tested in test_utils)
    sc = res["scenario"]
    assert (sc["train_clips"], sc["test_clips"], sc["retrieval_clips"]) == (16, 8, 8) and sc["cache_bytes"] > 0
    (loader,) = res["loader"]
    assert loader["batches"] == res["inputs"]["loader_batches"] and loader["clips_per_second"] > 0
    assert [row["strategy"] for row in res["runs"]] == ["finetune", "derpp", "stella"]
    for row in res["runs"]:
        for part, steps in (("device_resident", res["inputs"]["device_steps"]), ("end_to_end", res["inputs"]["steps"])):
            m = row[part]
            assert m["steps"] == m["steps_measured"] == steps == len(m["in_step_seconds"]["values"]), part
            assert m["samples"] == 2 * steps and m["samples_per_second"] > 0 and m["wall_seconds"] > 0
            assert m["in_step_seconds"]["min"] > 0 and m["startup_seconds"] >= 0 and m["losses_finite"]
            # the window holds the steps: in-step time is part of the wall time (1 % clock slack)
            assert sum(m["in_step_seconds"]["values"]) <= 1.01 * m["wall_seconds"]
        assert row["end_to_end"]["skip"] == res["inputs"]["skip"]
        assert row["e2e_over_device"] == pytest.approx(row["end_to_end"]["samples_per_second"]
                                                       / row["device_resident"]["samples_per_second"])
        assert row["checkpoint"]["bytes"] > 0 and row["checkpoint"]["seconds"] > 0
    assert [row["buffer_device"] for row in res["runs"]] == ["none", "cpu", "cpu"]
    assert [e["workers"] for e in res["eval"]] == [0, 1]
    for e in res["eval"]:
        assert e["clips"] == 8 and e["experiences"] == 8 and e["seconds"] >= e["recall_seconds"] > 0
        assert set(e["recall"]) == {"a2v", "v2a"} and set(e["recall"]["a2v"]) == {"R@1", "R@5", "R@10"}
    assert not list(tmp_path.glob("e2e-ckpt-*"))  # the checkpoints of (e) are removed
    assert "| 2 | stella |" in r.stdout
    # the projection runs on the smoke JSON (meaningless hours, same code path)
    proj = tmp_path / "proj.json"
    pr = subprocess.run([sys.executable, str(PERF / "project_run.py"), str(out), "--out", str(proj)],
                        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert pr.returncode == 0, pr.stderr[-3000:]
    p = json.loads(proj.read_text())
    assert len(p["projections"]) == 6 and all(x["total_seconds"] > 0 for x in p["projections"])
    assert p["notes"] and "smoke" in p["notes"][0]


# ------------------------------------------------------------------------------------ the formula
def _fake_run(strategy: str, e2e: float, device: float, ckpt: float) -> dict:
    return {"strategy": strategy, "batch": 48, "end_to_end": {"samples_per_second": e2e, "startup_seconds": 2.0},
            "device_resident": {"samples_per_second": device}, "checkpoint": {"seconds": ckpt}}


def _fake_e2e(path: Path) -> Path:
    path.write_text(json.dumps({
        "meta": {"device_name": "fake", "torch": "x", "commit": "abc", "smoke": False},
        "inputs": {"model": "base", "workers": 8, "cache": None},
        "scenario": {"build_seconds": 0.1545, "train_clips": 1000, "test_clips": 0, "retrieval_clips": 545},
        "runs": [_fake_run("stella", 100.0, 120.0, 10.0), _fake_run("derpp", 120.0, 150.0, 12.0)],
        "eval": [{"workers": 0, "clips": 1545, "seconds": 31.4, "embed_seconds": 30.9, "recall_seconds": 0.5},
                 {"workers": 8, "clips": 1545, "seconds": 6.68, "embed_seconds": 6.18, "recall_seconds": 0.5}]}))
    return path


def test_wav_read_benchmark_times_both_paths_on_the_same_samples(media_root: Path, capsys) -> None:
    """benchmarks/perf/wav_read.py: the training sample is the same with the standard-library WAV read
    and with decord (exit 1 otherwise), and both rows are timed."""
    wr = _load("wav_read")
    assert wr.main(["--data", str(media_root), "--clips", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "same sample both ways: True" in out
    assert "| audio read |" in out and "| training sample |" in out


def test_projection_reproduces_the_hand_computation(tmp_path: Path) -> None:
    pr = _load("project_run")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"runs": [
        {"setting": "b24", "strategy": "stella", "batch": 24, "in_step_seconds": {"mean": 0.2}},   # 120 samples/s
        {"setting": "b48", "strategy": "stella", "batch": 48, "samples_per_second": {"mean": 180.0}},
        {"setting": "b48_buffer_pinned_host", "strategy": "stella", "batch": 48,          # left out
         "samples_per_second": {"mean": 1.0}}]}))
    out = tmp_path / "proj.json"
    assert pr.main([str(_fake_e2e(tmp_path / "e2e.json")), "--out", str(out), "--suite", str(suite),
                    "--strategies", "derpp", "stella", "--as-train-clips", "3600"]) == 0
    res = json.loads(out.read_text())
    rows = {(r["benchmark"], r["strategy"]): r for r in res["projections"]}
    # Continual-VS, STELLA: 8 tasks x 8000 clips (20 classes x 400), 10 epochs, batch 48, R = 5 x 309
    vs = rows[("continual_vs", "stella")]
    steps = 8000 // 48                                                  # 166 per epoch
    train = 8 * 10 * (steps * 48 / 100.0 + 2.0)                         # 6534.4 s
    per_eval = 1545 * (30.9 / 1545) + 0.5 * (1545 / 1545) ** 2          # 31.4 s
    ckpt = (8 * 10 * steps // 1000 + 8) * 10.0                          # 21 checkpoints
    setup = (8 * 8000 + 1545) * (0.1545 / 1545)                         # build seconds per clip
    assert vs["iterations"] == 13280 and vs["checkpoints"] == 21 and vs["R"] == 1545
    assert vs["train_seconds"] == pytest.approx(train) and train == pytest.approx(6534.4)
    assert vs["eval_seconds"] == pytest.approx(9 * per_eval)
    assert vs["ckpt_seconds"] == pytest.approx(ckpt) and vs["setup_seconds"] == pytest.approx(setup)
    assert vs["total_seconds"] == pytest.approx(setup + train + 9 * per_eval + ckpt)
    assert vs["train_device_seconds"] == pytest.approx(8 * 10 * steps * 48 / 120.0)
    assert vs["train_suite_seconds"] == pytest.approx(8 * 10 * steps * 48 / 180.0) and not vs["rate_batch_differs"]
    derpp = rows[("continual_vs", "derpp")]
    d_total = setup + 8 * 10 * (steps * 48 / 120.0 + 2.0) + 9 * per_eval + 21 * 12.0
    assert derpp["total_seconds"] == pytest.approx(d_total)
    (over,) = [o for o in res["overheads"] if o["benchmark"] == "continual_vs"]
    assert over["seconds"] == pytest.approx(vs["total_seconds"] - d_total)
    assert res["target"]["hours"] == pytest.approx(vs["total_seconds"] / 3600) and res["target"]["met"]
    # Continual-AS, STELLA: 7 tasks x 3600 given clips, 15 epochs, batch 36 (rate of batch 48: flagged),
    # R = 5 x 161 leaf classes; the suite's rate interpolated between batches 24 and 48
    a = rows[("continual_as", "stella")]
    assert a["rate_batch"] == 48 and a["rate_batch_differs"] and a["R"] == 805
    a_train = 7 * 15 * (100 * 36 / 100.0 + 2.0)
    a_eval = 8 * (805 * 0.02 + 0.5 * (805 / 1545) ** 2)
    a_ckpt = (7 * 15 * 100 // 1000 + 7) * 10.0
    a_setup = (7 * 3600 + 805) * 1e-4
    assert a["train_seconds"] == pytest.approx(a_train) and a["eval_seconds"] == pytest.approx(a_eval)
    assert a["total_seconds"] == pytest.approx(a_setup + a_train + a_eval + a_ckpt)
    assert a["r_suite"] == pytest.approx(150.0) and "24 and 48" in a["r_suite_from"]
    assert any("another batch" in n for n in res["notes"])
    # the eval loader's workers are a lever: 8 workers project a shorter evaluation
    assert pr.main([str(tmp_path / "e2e.json"), "--out", str(out), "--strategies", "stella",
                    "--eval-workers", "8"]) == 0
    vs8 = json.loads(out.read_text())["projections"][0]
    assert vs8["eval_seconds"] == pytest.approx(9 * (6.18 + 0.5)) and vs8["placeholder_train_clips"] is False
    assert json.loads(out.read_text())["projections"][1]["placeholder_train_clips"]  # AS without counts


def test_steps_per_epoch_drops_only_a_ragged_tail() -> None:
    pr = _load("project_run")
    assert [pr.steps_per_epoch(n, 48) for n in (8000, 96, 49, 48, 10)] == [166, 2, 1, 1, 1]
