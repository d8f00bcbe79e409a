"""results.json layout and atomic round trip, the markdown table and the plots."""
from __future__ import annotations

import json
import math

import pytest
import torch

from stella_avalanche.evaluation.metrics import RecallMatrix
from stella_avalanche.evaluation.report import (build_results, load_results, plot_recall_matrix, plot_task_curves,
                                                summary_table_markdown, write_report, write_results_json)

M = [[50.0, 10.0, 5.0],
     [40.0, 60.0, 20.0],
     [30.0, 45.0, 70.0]]
TASKS = ["sports", "music", "vehicle"]
COST = {"train_seconds": 12.5, "samples_per_second": 3.0, "peak_memory_bytes": 1024, "buffer_bytes": 64}


def _matrix(rows: list[list[float]] = M) -> RecallMatrix:
    rm = RecallMatrix(num_tasks=len(rows[0]))
    for l, r in enumerate(rows):
        rm.set_row(l, {"a2v": {f"R@{k}": [x + off for x in r] for k, off in ((1, 0), (5, 10), (10, 20))},
                       "v2a": {f"R@{k}": [0.5 * x for x in r] for k in (1, 5, 10)}})
    return rm


def _results(**kw) -> dict:
    args = dict(strategy="stella", benchmark="synthetic", seed=0, tasks=TASKS, recall_matrix=_matrix(),
                config={"lr": 1e-4, "path": __import__("pathlib").Path("/x")}, cost=COST)
    args.update(kw)
    return build_results(**args)


def test_results_layout_and_values() -> None:
    r = _results()
    documented = ["strategy", "benchmark", "seed", "tasks", "recall", "summary", "forgetting_definition", "config",
                  "cost"]
    assert list(r)[:len(documented)] == documented
    assert r["strategy"] == "stella" and r["seed"] == 0 and r["tasks"] == TASKS
    assert r["recall"]["a2v"]["R@1"] == M
    assert r["recall"]["a2v"]["R@10"][2] == [50.0, 65.0, 90.0]
    assert set(r["recall"]) == {"a2v", "v2a"} and set(r["recall"]["v2a"]) == {"R@1", "R@5", "R@10"}
    s = r["summary"]["a2v"]
    assert set(s) == {"R@1", "R@5", "R@10", "Avg"}
    a1 = (30 + 45 + 70) / 3
    assert s["R@1"]["A"] == pytest.approx(a1)
    assert s["R@5"]["A"] == pytest.approx(a1 + 10)
    assert s["R@1"]["F"] == pytest.approx(17.5)            # standard, by hand in test_metrics
    assert s["R@1"]["F_official"] == pytest.approx(-7.5)
    assert s["Avg"]["A"] == pytest.approx(a1 + 10)         # mean over R@1/5/10
    assert s["Avg"]["F"] == pytest.approx(17.5)
    assert r["summary"]["v2a"]["Avg"]["F"] == pytest.approx(8.75)
    assert r["forgetting_definition"] == "standard"
    assert r["forgetting_official"]["v2a"]["Avg"] == pytest.approx(-3.75)
    assert r["cost"] == COST and r["config"]["path"] == "/x"
    off = _results(forgetting_definition="official")
    assert off["summary"]["a2v"]["R@1"]["F"] == pytest.approx(-7.5)
    assert off["summary"]["a2v"]["R@1"]["F_standard"] == pytest.approx(17.5)


def test_single_row_has_null_forgetting(tmp_path) -> None:
    r = _results(strategy="multitask", recall_matrix=_matrix([M[2]]))
    assert r["summary"]["a2v"]["R@5"]["F"] is None and r["summary"]["a2v"]["Avg"]["F"] is None
    assert r["summary"]["a2v"]["Avg"]["A"] == pytest.approx((30 + 45 + 70) / 3 + 10)
    path = write_results_json(tmp_path / "results.json", r)
    assert json.loads(path.read_text())["summary"]["v2a"]["R@1"]["F"] is None
    row = [c.strip() for c in summary_table_markdown(r).strip().splitlines()[-1].strip("|").split("|")]
    assert row[0] == "multitask" and row[1] == "48.33 / –"


def test_write_round_trip_and_atomicity(tmp_path, monkeypatch) -> None:
    r = _results()
    path = write_results_json(tmp_path / "out" / "results.json", r)
    assert load_results(path) == r
    # a failing write (NaN is not JSON) leaves the previous complete file and no temporary file
    bad = json.loads(json.dumps(r))
    bad["summary"]["a2v"]["R@1"]["A"] = math.nan
    with pytest.raises(ValueError, match="not valid JSON"):
        write_results_json(path, bad)
    assert load_results(path) == r
    # a crash in the middle of writing (temporary file open) leaves the old file and no temp file
    import stella_avalanche.evaluation.report as report

    def crash(data):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(report, "dumps_compact", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        write_results_json(path, _results(seed=7))
    monkeypatch.undo()
    assert load_results(path) == r
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    broken = dict(r)
    del broken["cost"]
    with pytest.raises(ValueError, match="cost"):
        write_results_json(tmp_path / "x.json", broken)
    with pytest.raises(ValueError, match="one per task"):
        _results(tasks=TASKS[:2])


def _same_recall(a: dict, b: dict) -> None:
    """Two ``{"R@K": L x T}`` recall blocks agree (up to float rounding)."""
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k]) if not isinstance(a[k][0], list) else \
            all(ra == pytest.approx(rb) for ra, rb in zip(a[k], b[k], strict=True)), k


def test_per_query_ranks_round_trip_and_reproduce_the_recall(tmp_path) -> None:
    from stella_avalanche.evaluation.report import recall_from_ranks

    g = torch.Generator().manual_seed(0)
    tasks = torch.arange(3).repeat_interleave(20)                    # 3 tasks x 20 queries
    index = torch.arange(20).repeat(3)
    rm = RecallMatrix(num_tasks=3)
    all_ranks = []
    for l in range(3):
        r = {d: torch.randint(1, 40, (60,), generator=g) for d in ("a2v", "v2a", "a2v_task_gallery", "v2a_task_gallery")}
        r["a2v_task_gallery"] = torch.minimum(r["a2v_task_gallery"], r["a2v"])
        all_ranks.append(r)
        row = {d: recall_from_ranks([r[d].tolist()], tasks.tolist(), num_tasks=3) for d in ("a2v", "v2a")}
        rm.set_row(l, {d: {k: v[0] for k, v in row[d].items()} for d in row},
                   ranks={**r, "task": tasks, "index": index})
    res = _results(recall_matrix=rm)
    path = write_results_json(tmp_path / "results.json", res)
    back = load_results(path)
    assert back == res
    assert back["ranks"]["a2v"] == [r["a2v"].tolist() for r in all_ranks]
    assert back["ranks"]["task"] == tasks.tolist() and back["ranks"]["index"] == index.tolist()
    for d in ("a2v", "v2a"):
        _same_recall(recall_from_ranks(back["ranks"][d], back["ranks"]["task"], num_tasks=3), back["recall"][d])
    # the per-task gallery beside the pooled one, derived from its ranks
    tg = recall_from_ranks(back["ranks"]["a2v_task_gallery"], back["ranks"]["task"], num_tasks=3)
    _same_recall(back["recall_task_gallery"]["a2v"], tg)
    assert back["summary_task_gallery"]["a2v"]["R@1"]["A"] == pytest.approx(sum(tg["R@1"][-1]) / 3)
    # compact: every rank list on one line
    text = path.read_text()
    lines = {line.strip().rstrip(",") for line in text.splitlines()}
    assert all("[" + ", ".join(map(str, r["v2a"].tolist())) + "]" in lines for r in all_ranks)
    # malformed ranks are refused, naming the field
    bad = json.loads(json.dumps(res))
    bad["ranks"]["v2a"][1] = bad["ranks"]["v2a"][1][:-1]
    with pytest.raises(ValueError, match="ranks.v2a"):
        write_results_json(tmp_path / "bad.json", bad)
    with pytest.raises(ValueError, match="other queries"):
        rm.set_row(0, rm.rows[0], ranks={**all_ranks[0], "task": tasks, "index": index.flip(0)})


def test_summary_table_layout() -> None:
    r0, r1 = _results(), _results(seed=1)
    r1["summary"]["a2v"]["R@1"]["A"] += 2.0
    single = summary_table_markdown(r0)
    lines = single.strip().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["method", "A→V R@1", "A→V R@5", "A→V R@10", "A→V Avg",
                      "V→A R@1", "V→A R@5", "V→A R@10", "V→A Avg"]
    row = [c.strip() for c in lines[4].strip("|").split("|")]
    assert row[0] == "stella" and row[1] == "48.33 / 17.50" and row[4] == "58.33 / 17.50"
    multi = summary_table_markdown([r0, r1]).strip().splitlines()[-1]
    assert multi.startswith("| stella (n=2)") and "49.33±1.00 / 17.50±0.00" in multi


def test_plots_and_report(tmp_path) -> None:
    r = _results()
    mats = plot_recall_matrix(r, tmp_path / "plots")
    curves = plot_task_curves(r, tmp_path / "plots", metric="R@5")
    for p in mats + curves:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert {p.name for p in mats} == {"recall_matrix_a2v.png", "recall_matrix_v2a.png"}
    with pytest.raises(ValueError, match="metric"):
        plot_recall_matrix(r, tmp_path, metric="R@3")
    paths = write_report(r, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["recall_matrix_a2v.png", "recall_matrix_v2a.png", "results.json", "summary.md",
                     "task_curves_a2v.png", "task_curves_v2a.png"]
    assert "stella" in paths["summary"].read_text()
