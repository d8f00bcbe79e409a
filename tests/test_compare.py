"""experiments/compare.py: pending-run detection, parallel jobs, aggregation and tables."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "results" / "synthetic" / "runs"


def _load_compare():
    spec = importlib.util.spec_from_file_location("compare_cli", ROOT / "experiments" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare = _load_compare()


def _args(out: Path, **kw) -> argparse.Namespace:
    base = dict(strategies=["finetune", "stella"], seeds=[0, 1], benchmark="synthetic", data_root=None,
                config=None, device="cpu", out=out, overrides=[], jobs=1)
    base.update(kw)
    return argparse.Namespace(**base)


def _put(out: Path, strategy: str, seed: int, complete: bool = True, src: Path | None = None) -> None:
    d = out / "runs" / strategy / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    if src is not None:
        shutil.copy(src, d / "results.json")
    else:
        (d / "results.json").write_text(json.dumps({"strategy": strategy, "complete": complete}))


def test_pending_runs_skip_complete_and_split_threads(tmp_path):
    _put(tmp_path, "finetune", 0, complete=True)
    _put(tmp_path, "stella", 1, complete=False)             # interrupted: resumed, not skipped
    todo = compare.pending_runs(_args(tmp_path))
    assert [(s, k) for s, k, _ in todo] == [("finetune", 1), ("stella", 0), ("stella", 1)]
    cmd = todo[0][2]
    assert "--resume" in cmd and cmd[cmd.index("--seed") + 1] == "1"
    assert not any(c.startswith("train.threads=") for c in cmd)

    par = compare.pending_runs(_args(tmp_path, jobs=2))
    assert all(sum(c.startswith("train.threads=") for c in cmd) == 1 for _, _, cmd in par)
    mine = compare.pending_runs(_args(tmp_path, jobs=2, overrides=["train.threads=3"]))
    assert all([c for c in cmd if c.startswith("train.threads=")] == ["train.threads=3"] for _, _, cmd in mine)


def test_run_missing_runs_jobs_side_by_side_and_reports_failures(tmp_path):
    barrier = threading.Barrier(2, timeout=20)   # passes only if two launches are in flight together
    seen = []

    def fake_launch(cmd, tag, prefix):
        assert prefix                                # parallel output is tagged per run
        barrier.wait()
        seen.append(tag)
        return 3 if tag == "stella s1" else 0

    failed = compare.run_missing(_args(tmp_path, jobs=2), launch=fake_launch)
    assert sorted(seen) == ["finetune s0", "finetune s1", "stella s0", "stella s1"]
    assert failed == ["stella s1"]

    calls = []
    compare.run_missing(_args(tmp_path, jobs=1, strategies=["finetune"]),
                        launch=lambda cmd, tag, prefix: calls.append((tag, prefix)) or 0)
    assert calls == [("finetune s0", False), ("finetune s1", False)]


@pytest.mark.skipif(not (PUBLISHED / "finetune" / "seed1" / "results.json").exists(),
                    reason="published results.json files not present")
def test_aggregate_only_tables_match_the_results(tmp_path, monkeypatch):
    srcs = {("finetune", 0), ("finetune", 1), ("multitask", 0)}
    for s, k in srcs:
        _put(tmp_path, s, k, src=PUBLISHED / s / f"seed{k}" / "results.json")
    _put(tmp_path, "stella", 0, complete=False)             # incomplete runs are not aggregated
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--aggregate-only"])
    assert compare.main() == 0

    res = {(s, k): json.loads((PUBLISHED / s / f"seed{k}" / "results.json").read_text()) for s, k in srcs}
    rows = {line.split(",")[0]: line.split(",") for line in (tmp_path / "comparison.csv").read_text().splitlines()}
    header = rows.pop("strategy")
    assert set(rows) == {"finetune", "multitask"} and rows["finetune"][1] == "2"
    col = header.index("a2v/Avg/A/mean")
    ft = [res[("finetune", k)]["summary"]["a2v"]["Avg"]["A"] for k in (0, 1)]
    assert float(rows["finetune"][col]) == pytest.approx(np.mean(ft), abs=1e-4)
    assert float(rows["finetune"][col + 1]) == pytest.approx(np.std(ft), abs=1e-4)

    md = (tmp_path / "comparison.md").read_text()
    best = max(("finetune", "multitask"), key=lambda s: float(rows[s][col]))
    best_line = next(line for line in md.splitlines() if line.startswith(f"| {compare.PRETTY[best]} |"))
    cells = best_line.split(" | ")
    assert cells[header.index("a2v/Avg/A/mean") // 2 + 1].startswith("**")   # best 𝒜 per column is bold
    for f in ("cost.md", "bars_a2v.png", "bars_v2a.png", "task_recall_a2v.png"):
        assert (tmp_path / f).is_file()


@pytest.mark.skipif(not (PUBLISHED / "finetune" / "seed0" / "results.json").exists(),
                    reason="published results.json files not present")
def test_main_exits_nonzero_when_a_run_failed_but_still_writes_tables(tmp_path, monkeypatch):
    _put(tmp_path, "finetune", 0, src=PUBLISHED / "finetune" / "seed0" / "results.json")
    monkeypatch.setattr(compare, "run_missing", lambda args: ["stella s0"])
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--strategies", "finetune", "stella"])
    assert compare.main() == 1
    assert (tmp_path / "comparison.md").is_file()
