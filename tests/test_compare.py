"""The comparison (stella_avalanche.cli.compare, evaluation.comparison): pending-run detection, parallel jobs,
aggregation and tables."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from stella_avalanche.cli import compare
from stella_avalanche.evaluation import comparison

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "results" / "synthetic" / "runs"




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


def test_per_seed_initialisation_adds_the_train_seed_of_each_seed(tmp_path):
    key = compare.TRAIN_SEED_KEY
    todo = compare.pending_runs(_args(tmp_path, init="per-seed"))
    # seed s of every strategy asks for the initialisation trained with seed s (one build per seed)
    assert {(k, s): [c for c in cmd if c.startswith(key)] for k, s, cmd in todo} == {
        ("finetune", 0): [f"{key}=0"], ("finetune", 1): [f"{key}=1"],
        ("stella", 0): [f"{key}=0"], ("stella", 1): [f"{key}=1"]}
    shared = compare.pending_runs(_args(tmp_path, init="shared"))
    assert not any(c.startswith(key) for _, _, cmd in shared for c in cmd)
    real = compare.pending_runs(_args(tmp_path, init="per-seed", benchmark="vggsound"))
    assert not any(c.startswith(key) for _, _, cmd in real for c in cmd)     # a given checkpoint: no build
    mine = compare.pending_runs(_args(tmp_path, init="per-seed", overrides=[f"{key}=7"]))
    assert all([c for c in cmd if c.startswith(key)] == [f"{key}=7"] for _, _, cmd in mine)
    assert compare.build_parser().parse_args([]).init == "per-seed"


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
    best_line = next(line for line in md.splitlines() if line.startswith(f"| {comparison.PRETTY[best]} |"))
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


# ------------------------------------------------------------------ intervals, ablation, memory sweep
def _results_with_ranks(strategy: str, seed: int, shift: int, mem: int = 200, buffer_bytes: int = 0) -> dict:
    """A complete results.json of 3 tasks x 20 queries whose ranks improve with ``shift``."""
    from stella_avalanche.evaluation.metrics import RecallMatrix
    from stella_avalanche.evaluation.report import build_results, recall_from_ranks

    rng = np.random.default_rng(1000 * seed + shift)
    tasks, index = np.repeat(np.arange(3), 20), np.tile(np.arange(20), 3)
    rows = 1 if strategy == "multitask" else 3
    rm = RecallMatrix(num_tasks=3)
    for l in range(rows):
        ranks = {d: np.maximum(1, rng.integers(1, 30, size=60) - shift) for d in ("a2v", "v2a")}
        ranks.update({f"{d}_task_gallery": np.minimum(r, 20) for d, r in ranks.items()})
        rec = {d: recall_from_ranks([ranks[d].tolist()], tasks.tolist(), num_tasks=3) for d in ("a2v", "v2a")}
        rm.set_row(l, {d: {k: v[0] for k, v in rec[d].items()} for d in rec},
                   ranks={**{d: r.tolist() for d, r in ranks.items()}, "task": tasks.tolist(), "index": index.tolist()})
    res = build_results(strategy=strategy, benchmark="synthetic", seed=seed, tasks=["t0", "t1", "t2"],
                        recall_matrix=rm, config={"strategy": {"name": strategy, "params": {"mem_size": mem}}},
                        cost={"buffer_bytes": buffer_bytes})
    res["complete"] = True
    return res


def _put_res(out: Path, key: str, seed: int, res: dict) -> None:
    d = out / "runs" / key / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res))


def test_memory_sweep_plan_and_equal_byte_budget(tmp_path):
    args = _args(tmp_path, strategies=["finetune"], seeds=[0], mem_sizes=[100, 200], sweep_seeds=[0, 1],
                 ablation=True, seeds_for=["finetune=0,1,2"])
    plan = [(k, s, seed, extra) for k, s, seed, extra in compare.planned_runs(args)]
    keys = {(k, seed) for k, _, seed, _ in plan}
    assert {("finetune", 0), ("finetune", 1), ("finetune", 2)} <= keys            # --seeds-for
    assert {("stella_random", 0), ("stella_lpis", 0), ("stella_rca", 0)} <= keys   # --ablation
    # the preset's memory (200) shares the plain runs; other sizes get their own key and override
    assert ("derpp-mem100", 1) in keys and ("stella_plus", 1) in keys and ("stella-mem200", 0) not in keys
    assert next(e for k, _, _, e in plan if k == "stella-mem100") == ["strategy.params.mem_size=100"]
    assert not any(k.startswith("stella_plus-mem") and k != "stella_plus-mem100" for k, _ in keys)  # sizes unknown
    _put_res(tmp_path, "derpp", 0, _results_with_ranks("derpp", 0, 3, buffer_bytes=83480))
    _put_res(tmp_path, "stella_plus", 0, _results_with_ranks("stella_plus", 0, 3, buffer_bytes=35214))
    assert comparison.equal_bytes_items(100, comparison.item_bytes(tmp_path)) == 100 * 83480 // 35214 == 237
    plan = compare.planned_runs(args)
    eq = [(k, extra) for k, s, seed, extra in plan if k in ("stella_plus-mem237", "stella_plus-mem474")]
    assert ("stella_plus-mem237", ["strategy.params.mem_size=237"]) in eq and len(eq) == 4
    cmds = {(k, s): c for k, s, c in compare.pending_runs(args)}
    assert ("derpp", 0) not in cmds and "strategy.params.mem_size=474" in cmds[("stella_plus-mem474", 1)]
    with pytest.raises(SystemExit, match="unknown strategy"):
        compare.parse_seeds_for(["nope=1"])


def test_aggregate_writes_intervals_power_ablation_and_sweep(tmp_path, monkeypatch):
    shifts = {"finetune": 0, "derpp": 6, "stella": 6, "stella_plus": 4, "multitask": 12, "stella_random": 5,
              "stella_lpis": 6, "stella_rca": 5, "er": 8, "stella_keepall": 14}
    for s, shift in shifts.items():
        for seed in (0, 1):
            by = {"derpp": 83480, "stella_plus": 35214}.get(s, 0)
            _put_res(tmp_path, s, seed, _results_with_ranks(s, seed, shift, buffer_bytes=by))
            if s in comparison.SWEEP_STRATEGIES:
                res = _results_with_ranks(s, seed, shift - 2, 100, by)
                if s == "derpp":   # DER++ at M = 100 trained on a GPU: its sweep cell is marked
                    res["environment"] = {"device": "cuda:0"}
                _put_res(tmp_path, f"{s}-mem100", seed, res)
    for seed in (0, 1):
        _put_res(tmp_path, "stella_plus-mem237", seed, _results_with_ranks("stella_plus", seed, 5, 237, 35214))
    # no --mem-sizes: re-aggregation finds the sweep (100 and the preset's 200) from the run keys
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--aggregate-only", "--n-boot", "300"])
    assert compare.main() == 0
    md = (tmp_path / "comparison.md").read_text()
    assert "| DER++ |" in md and "random patches" not in md and "mem100" not in md   # main table only
    assert "all tokens" not in md                                                  # nor the probe
    iv = (tmp_path / "intervals.md").read_text()
    assert "| Finetune | 2 |" in iv and "**≈0**" in iv and "no per-query ranks" not in iv
    assert "## Per-task gallery" in iv and "| DER++ | 2 |" in iv.split("## Per-task gallery")[1]
    ft_vs_mt = next(line for line in iv.splitlines() if line.startswith("| Multitask |"))
    assert "≈0" not in ft_vs_mt.split(" | ")[-2]               # multitask beats finetune clearly
    csv = (tmp_path / "intervals.csv").read_text().splitlines()
    assert csv[0].startswith("key,direction,metric") and any(line.startswith("stella,a2v,A,2,") for line in csv)
    power = (tmp_path / "power.md").read_text()
    assert "target width" in power and power.count("Parts of the width") == 2   # seed and query parts
    ab = (tmp_path / "ablation.md").read_text()
    assert all(comparison.PRETTY[k] in ab for k in comparison.ABLATION_TABLE)
    vs_random = ab.split("## Against random patches")[1].splitlines()
    lpis = next(line for line in vs_random if line.startswith(f"| {comparison.PRETTY['stella_lpis']} |"))
    assert len(lpis.split(" | ")) == 5 and "| STELLA |" in "\n".join(vs_random)
    assert not any(line.startswith(f"| {comparison.PRETTY['stella_random']} |") for line in vs_random)
    # STELLA − ER and STELLA − DER++ split at random patches: the two parts add up to the total
    dec = ab.split("## Where STELLA's difference to full-clip replay comes from")[1]
    rnd = comparison.PRETTY["stella_random"]
    for base in ("ER", "DER++"):
        total, guide, rest = (next(line for line in dec.splitlines() if line.startswith(f"| {a} − {b} |"))
                              for a, b in (("STELLA", base), ("STELLA", rnd), (rnd, base)))
        point = [[float(c.split()[0]) for c in line.split(" | ")[1:]] for line in (total, guide, rest)]
        assert all(abs(point[0][i] - point[1][i] - point[2][i]) <= 0.011 for i in (0, 1)), point
    assert float(next(line for line in dec.splitlines() if line.startswith("| STELLA − ER |")).split(" | ")[1]
                 .split()[0]) < 0   # ER's rows were shifted above STELLA's
    # the keep-all probe splits random patches − baseline once more; its rows were shifted above random's
    probe = dec.split("### Test: the same plugin keeping every token")[1]
    keep = comparison.PRETTY[comparison.KEEP_ALL]
    rows = {b: next(line for line in probe.splitlines() if line.startswith(f"| {keep} − {b} |"))
            for b in (rnd, "ER", "DER++")}
    assert float(rows[rnd].split(" | ")[1].split()[0]) > 0 and "**≈0**" not in rows[rnd]
    assert keep not in ab.split("## Where STELLA's")[0]   # not a row of the paper's ablation table
    sw = (tmp_path / "mem_sweep.md").read_text()
    assert "(237 items)" in sw and "(474 items)" in sw and "| STELLA+ at DER++ bytes |" in sw
    # what DER++'s bytes of 100 clips buy STELLA+ (237 items) over 100 items: the paired row is the cells' gap
    a2v = sw.split("## A→V")[1].split("## V→A")[0]
    cell = {c: float(next(line for line in a2v.splitlines() if line.startswith(f"| {c} |")).split(" | ")[1].split()[0])
            for c in ("STELLA+", "STELLA+ at DER++ bytes")}
    more = next(line for line in sw.split("## Paired differences")[1].splitlines()
                if line.startswith("| STELLA+ at DER++ bytes − STELLA+ (M = 100) |")).split(" | ")
    assert float(more[1].split()[0]) == pytest.approx(cell["STELLA+ at DER++ bytes"] - cell["STELLA+"], abs=0.011)
    assert float(more[1].split()[0]) > 0
    marked = [line for line in sw.splitlines() if line.startswith("| ") and "†" in line]
    assert marked and all(line.startswith("| DER++ |") for line in marked) and "† trained on a GPU" in sw
    assert all(line.count("†") == 1 for line in marked)   # M = 100 only, not the CPU runs at 200
    assert (tmp_path / "mem_sweep.png").is_file()


def test_the_sweep_compares_one_seed_set_across_memory_sizes(tmp_path, monkeypatch):
    """Main-table keys at the preset's memory ran seeds 0-2, the sweep's other sizes 0-1: every sweep cell
    and paired difference is taken over seeds 0-1, so a curve does not mix seed sets."""
    from stella_avalanche.evaluation import bootstrap as BS
    from stella_avalanche.evaluation.comparison import load_runs

    for s, shift in {"finetune": 0, "derpp": 6, "stella": 3, "stella_plus": 3, "multitask": 12}.items():
        for seed in (0, 1, 2):
            # seed 2 lies far above the others, so a cell over all three seeds would show it
            _put_res(tmp_path, s, seed, _results_with_ranks(s, seed, shift + (15 if seed == 2 else 0)))
            if s in comparison.SWEEP_STRATEGIES and seed < 2:
                _put_res(tmp_path, f"{s}-mem100", seed, _results_with_ranks(s, seed, shift - 2, 100))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--aggregate-only", "--n-boot", "200"])
    assert compare.main() == 0
    sw = (tmp_path / "mem_sweep.md").read_text()
    assert "over the seeds all the sweep's runs share (0, 1)" in sw
    a2v = sw.split("## A→V")[1].split("## V→A")[0]
    derpp = next(line for line in a2v.splitlines() if line.startswith("| DER++ |")).split(" | ")
    own = [BS.run_replicates(BS.run_from_results(r, "a2v"), None)[0][0] for r in load_runs(tmp_path)["derpp"]]
    by_seed = dict(zip([r["seed"] for r in load_runs(tmp_path)["derpp"]], own))
    assert float(derpp[2].split()[0]) == pytest.approx((by_seed[0] + by_seed[1]) / 2, abs=0.006)   # M = 200
    assert float(derpp[2].split()[0]) != pytest.approx(np.mean(own), abs=0.5)
    diffs = sw.split("## Paired differences")[1]
    assert "| STELLA − DER++ (M = 100) |" in diffs and "| STELLA − DER++ (M = 200) |" in diffs
    grow = next(line for line in diffs.splitlines() if line.startswith("| DER++ M = 200 − M = 100 |")).split(" | ")
    cell100 = float(next(line for line in a2v.splitlines() if line.startswith("| DER++ |")).split(" | ")[1].split()[0])
    assert float(grow[1].split()[0]) == pytest.approx(float(derpp[2].split()[0]) - cell100, abs=0.011)
    csv = (tmp_path / "intervals.csv").read_text().splitlines()
    assert any(line.startswith("derpp,a2v,A,3,") for line in csv)          # the main table keeps all seeds


def test_one_missing_value_rule_for_the_comparison_and_the_report():
    """A seed without a value is left out of that statistic (comparison and per-run report alike); none
    left: missing; one left: the mean without a std."""
    from stella_avalanche.evaluation.report import mean_std_over_seeds

    assert mean_std_over_seeds([1.0, None, 3.0]) == (2.0, 1.0)
    assert mean_std_over_seeds([None, None]) == (None, None)
    assert mean_std_over_seeds([4.0, None]) == (4.0, None)
    m = {d: {f"R@{k}": [[10.0, 20.0], [15.0, 25.0]] for k in (1, 5, 10)} for d in ("a2v", "v2a")}
    from stella_avalanche.evaluation.report import build_results

    runs = {"finetune": [build_results(strategy="finetune", benchmark="synthetic", seed=s, tasks=["t0", "t1"],
                                       recall_matrix=m) for s in (0, 1)]}
    runs["finetune"][0]["cost"] = {"samples_per_second": 10.0}
    runs["finetune"][1]["cost"] = {"samples_per_second": 30.0, "buffer_bytes": 100}
    row = comparison.aggregate(runs, keys=["finetune"])[0]
    assert row["cost/samples_per_second"] == (20.0, 10.0)
    assert row["cost/buffer_bytes"][0] == 100.0 and np.isnan(row["cost/buffer_bytes"][1])
    assert all(np.isnan(v) for v in row["cost/train_seconds"])
    assert comparison._fmt(row["cost/buffer_bytes"]) == "100.00" and comparison._fmt(row["cost/train_seconds"]) == "–"


def test_the_initialisation_row_comes_first_from_the_runs_zero_shot_recall(tmp_path, monkeypatch):
    """Runs that recorded ``recall_initial`` give an "Initialisation (no training)" row: mean over tasks
    and K of the zero-shot recall, no forgetting, never the bold best."""
    init = {"a2v": {"R@1": [2.0, 4.0, 6.0], "R@5": [10.0, 10.0, 10.0], "R@10": [20.0, 20.0, 20.0]},
            "v2a": {"R@1": [1.0, 1.0, 1.0], "R@5": [5.0, 5.0, 5.0], "R@10": [9.0, 9.0, 9.0]}}
    for s, shift in (("finetune", 0), ("multitask", 5)):
        for k in (0, 1):
            res = _results_with_ranks(s, k, shift)
            res["recall_initial"] = init
            _put_res(tmp_path, s, k, res)
    runs = comparison.load_runs(tmp_path)
    rows = comparison.aggregate(runs, comparison.main_table_keys(runs))
    assert [r["strategy"] for r in rows] == [comparison.INITIAL, "finetune", "multitask"]
    first = rows[0]
    assert first["seeds"] == 4
    assert first["a2v/R@1/A"][0] == pytest.approx(4.0)
    assert first["a2v/Avg/A"][0] == pytest.approx((4.0 + 10.0 + 20.0) / 3)
    assert first["v2a/Avg/A"][0] == pytest.approx(5.0) and np.isnan(first["v2a/Avg/F"][0])
    md = comparison.write_tables(rows, tmp_path, "synthetic")
    line = next(x for x in md.splitlines() if x.startswith("| Initialisation (no training) |"))
    assert "**" not in line and "11.33" in line
    comparison.plot(rows, runs, tmp_path)
    assert (tmp_path / "task_recall_a2v.png").is_file()
    # runs without the zero-shot block: no such row (published comparisons re-aggregate unchanged)
    for s in ("finetune", "multitask"):
        for k in (0, 1):
            _put_res(tmp_path, s, k, _results_with_ranks(s, k, 0))
    runs = comparison.load_runs(tmp_path)
    assert comparison.INITIAL not in [r["strategy"] for r in comparison.aggregate(runs)]


def test_gain_over_the_initialisation_is_each_runs_own_difference(tmp_path):
    """intervals.md's "Over the initialisation": final Avg 𝒜 minus the same run's zero-shot Avg."""
    for s, shift in (("finetune", 0), ("multitask", 5)):
        for k in (0, 1):
            res = _results_with_ranks(s, k, shift)
            res["recall_initial"] = {d: {c: [float(k)] * len(res["tasks"]) for c in ("R@1", "R@5", "R@10")}
                                     for d in ("a2v", "v2a")}
            _put_res(tmp_path, s, k, res)
    runs = comparison.load_runs(tmp_path)
    md = comparison.initial_gain_markdown(runs, ["finetune", "multitask"])
    for s in ("finetune", "multitask"):
        gains = [r["summary"]["a2v"]["Avg"]["A"] - k for k, r in enumerate(runs[s])]
        line = next(x for x in md.splitlines() if x.startswith(f"| {comparison.PRETTY[s]} | 2 |"))
        assert f"{np.mean(gains):.2f} ± {np.std(gains):.2f} (min {min(gains):.2f})" in line
    assert comparison.initial_gain_markdown({"finetune": [_results_with_ranks("finetune", 0, 0)]}, ["finetune"]) == ""


def test_guide_diagnostics_count_the_entries_that_meet_each_target():
    entries = [{"after": "init", "avm_accuracy": 0.9, "video_object_lift": 1.0, "rca_twin_auc": 0.5},
               {"after": "task0", "avm_accuracy": 0.7, "video_object_lift": 2.0, "rca_twin_auc": 0.9},
               {"after": "task1", "avm_accuracy": 0.85, "video_object_lift": 1.6, "rca_twin_auc": 0.8}]
    md = comparison.guide_diagnostics_markdown({"stella": [{"seed": 3, "diagnostics": entries}],
                                                "derpp": [{"seed": 0}]})
    assert "## STELLA" in md and "DER++" not in md
    assert "| 3 | task1 | 0.85 | 1.60 |" in md
    assert "AVM acc ≥ 0.8: 2 of 3" in md and "video lift ≥ 1.5: 2 of 3" in md
    assert "RCA twin AUC ≥ 0.7: 1 of 1 (from task1 on)" in md  # init and task0 do not count
    assert comparison.guide_diagnostics_markdown({"derpp": [{"seed": 0}]}) == ""


def _fake_boot(width: float) -> "comparison.BS.BootstrapResult":
    """finetune and DER++ fixed at 0; STELLA's replicates spread evenly over ``width`` (so every Δ to
    either reference has an interval of 0.95 × width)."""
    samples = {"finetune": np.zeros(2001), "derpp": np.zeros(2001), "stella": np.linspace(0.0, width, 2001)}
    return comparison.BS.BootstrapResult(point={k: {"A": float(v.mean())} for k, v in samples.items()},
                                         samples={k: {"A": v} for k, v in samples.items()}, std={},
                                         seeds={k: 3 for k in samples}, without_ranks=[], n_boot=2001)


def test_power_splits_the_width_into_seed_and_query_parts():
    keys = ["stella"]            # its Δ to DER++ and to finetune
    lines = comparison._width_parts({"seeds": {"a2v": _fake_boot(2.0)}, "queries": {"a2v": _fake_boot(1.0)}},
                                    "a2v", keys, target=2.0, seeds=3)
    assert "seeds only, median 1.90; queries only, median 0.95" in lines[0]
    # seed part 1.9 at 3 seeds must shrink to sqrt(2² − 0.95²) = 1.76: 3 × 1.9² / (4 − 0.95²) = 3.49 -> 4 seeds
    assert "about 4 seeds per strategy" in lines[1]
    lines = comparison._width_parts({"seeds": {"a2v": _fake_boot(1.0)}, "queries": {"a2v": _fake_boot(3.0)}},
                                    "a2v", keys, target=2.0, seeds=3)
    assert "more seeds cannot reach it" in lines[1]


def test_seed_effect_finds_what_a_seed_does_to_every_strategy():
    rng = np.random.default_rng(0)
    strat = np.array([10.0, 20.0, 30.0, 40.0])[:, None]
    shared = np.array([-3.0, 0.0, 3.0, 1.0, -1.0])[None, :]          # seed s moves all strategies alike
    noise = rng.normal(0.0, 0.3, size=(4, 5))
    e = comparison.seed_effect(strat + shared + noise)
    assert e["sd_shared"] == pytest.approx(float(shared.std(ddof=1)), rel=0.15) and e["p"] < 0.001
    assert e["sd_run"] == pytest.approx(0.3, rel=0.5)
    e0 = comparison.seed_effect(strat + rng.normal(0.0, 1.0, size=(4, 5)))   # no shared part
    assert e0["sd_shared"] < 0.6 and e0["p"] > 0.01


def test_the_published_comparison_regenerates_byte_for_byte(tmp_path):
    """docs/results/synthetic_v5's tables are what --aggregate-only writes from its runs today."""
    src = ROOT / "docs" / "results" / "synthetic_v5"
    shutil.copytree(src / "runs", tmp_path / "runs")
    assert compare.main(["--out", str(tmp_path), "--aggregate-only", "--n-boot", "2000"]) == 0
    # README.md is edited by hand and the docs CLI; init_builds.md is written by experiments/init_builds.py
    written = sorted(p.name for p in src.iterdir()
                     if p.suffix in (".md", ".csv") and p.name not in ("README.md", "init_builds.md"))
    assert {"comparison.md", "intervals.csv", "power.md", "verdicts.csv"} <= set(written)
    for name in written:
        assert (tmp_path / name).read_text(encoding="utf-8") == (src / name).read_text(encoding="utf-8"), name


def test_published_runs_of_one_seed_start_from_one_initialisation():
    """Pairing strategies over seeds assumes seed s of every strategy starts from the same build; runs
    made on another machine (the ablation) must reproduce it: every run of a seed has the same
    before-training recall (recall_initial), bit for bit."""
    initial: dict[str, set[str]] = {}
    for f in (ROOT / "docs" / "results" / "synthetic_v5" / "runs").glob("*/seed*/results.json"):
        res = json.loads(f.read_text())
        initial.setdefault(f.parent.name, set()).add(json.dumps(res["recall_initial"], sort_keys=True))
    assert initial and all(len(v) == 1 for v in initial.values()), {k: len(v) for k, v in initial.items()}


def test_the_published_comparisons_command_plans_exactly_its_published_runs():
    """synthetic_v5/README.md shows the command that made the comparison; it must plan every published
    run and nothing else (it went stale once when seeds were added and the command was not)."""
    page = (ROOT / "docs" / "results" / "synthetic_v5" / "README.md").read_text(encoding="utf-8")
    block = page.split("```bash\n", 1)[1].split("```", 1)[0]
    command = re.sub(r"\\\n\s*", " ", block).splitlines()[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "experiments/compare.py"], command
    args = compare.build_parser().parse_args(argv[2:])
    args.out = ROOT / args.out
    planned = {(key, seed) for key, _, seed, _ in compare.planned_runs(args)}
    published = {(f.parent.parent.name, int(f.parent.name.removeprefix("seed")))
                 for f in (ROOT / "docs" / "results" / "synthetic_v5" / "runs").glob("*/seed*/results.json")}
    assert planned == published, (sorted(planned - published), sorted(published - planned))


def test_keys_with_more_seeds_are_compared_on_the_seeds_both_ran(tmp_path, monkeypatch):
    """The issue's design: 5 seeds for some strategies, 3 for the rest (here 3 against 2). A difference
    between the two groups is over the shared seeds (its point is the shared-seed mean difference, not
    the difference of the rows), and the keep-all probe's text says which seeds it shares."""
    shifts = {"finetune": 0, "derpp": 6, "stella": 6, "stella_random": 5, "er": 8, "stella_keepall": 14}
    for s, shift in shifts.items():
        for seed in ((0, 1, 2) if s in ("finetune", "derpp", "stella", "stella_random") else (0, 1)):
            _put_res(tmp_path, s, seed, _results_with_ranks(s, seed, shift))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--aggregate-only", "--n-boot", "200"])
    assert compare.main() == 0
    runs = comparison.load_runs(tmp_path)
    avg = {k: {int(r["seed"]): r["summary"]["a2v"]["Avg"]["A"] for r in runs[k]} for k in runs}
    iv = (tmp_path / "intervals.md").read_text().split("### V→A")[0]
    er = next(line for line in iv.splitlines() if line.startswith("| ER |"))
    shared = np.mean([avg["er"][s] - avg["derpp"][s] for s in (0, 1)])
    rows = np.mean(list(avg["er"].values())) - np.mean(list(avg["derpp"].values()))
    assert abs(shared - rows) > 0.02                                   # the two definitions differ here
    assert float(er.split(" | ")[4].split()[0]) == pytest.approx(shared, abs=0.006)
    ab = (tmp_path / "ablation.md").read_text()
    assert "its differences are taken over the seeds both ran (0, 1)" in ab
    # STELLA's decomposition: ER ran seeds 0-1 only, so every row is over seeds 0-1 and the parts add up
    dec = ab.split("## Where STELLA's difference to full-clip replay comes from")[1].split("### Test")[0]
    assert "every row is taken over the seeds all of them ran (0, 1)" in dec
    rnd = comparison.PRETTY["stella_random"]
    for base in ("ER", "DER++"):
        total, guide, rest = ([float(c.split()[0]) for c in line.split(" | ")[1:]] for line in (
            next(line for line in dec.splitlines() if line.startswith(f"| {a} − {b} |"))
            for a, b in (("STELLA", base), ("STELLA", rnd), (rnd, base))))
        assert all(abs(total[i] - guide[i] - rest[i]) <= 0.011 for i in (0, 1)), (base, total, guide, rest)
    stella_derpp = np.mean([avg["stella"][s] - avg["derpp"][s] for s in (0, 1)])
    row = next(line for line in dec.splitlines() if line.startswith("| STELLA − DER++ |"))
    assert float(row.split(" | ")[1].split()[0]) == pytest.approx(stella_derpp, abs=0.006)
