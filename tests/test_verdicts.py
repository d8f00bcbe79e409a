"""verdicts.md / verdicts.csv: each claim of the STELLA paper decided by one rule on its paired bootstrap
interval (stella_avalanche.evaluation.comparison), and the README's ``verdicts`` block rendered from the CSV
(stella_avalanche.evaluation.published)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stella_avalanche.evaluation import bootstrap as BS
from stella_avalanche.evaluation import comparison
from stella_avalanche.evaluation.published import render_block, update_blocks, verdicts_table

TASKS, PER_TASK = 3, 40


def _results(strategy: str, seed: int, skill: int, forget: int, buffer_bytes: int = 0) -> dict:
    """A complete results.json of 3 tasks x 40 queries with per-query ranks: ``skill`` lowers every rank
    (higher 𝒜), ``forget`` raises a task's ranks by that much per task trained after it (higher ℱ)."""
    from stella_avalanche.evaluation.metrics import RecallMatrix
    from stella_avalanche.evaluation.report import build_results, recall_from_ranks

    rng = np.random.default_rng([seed, skill, forget, len(strategy)])
    tasks, index = np.repeat(np.arange(TASKS), PER_TASK), np.tile(np.arange(PER_TASK), TASKS)
    rm = RecallMatrix(num_tasks=TASKS)
    for row in range(TASKS):
        later = np.maximum(row - tasks, 0)                      # tasks trained since this query's task
        ranks = {d: np.maximum(1, rng.integers(1, 25, size=tasks.size) - skill + forget * later)
                 for d in ("a2v", "v2a")}
        rec = {d: recall_from_ranks([r.tolist()], tasks.tolist(), num_tasks=TASKS) for d, r in ranks.items()}
        rm.set_row(row, {d: {k: v[0] for k, v in rec[d].items()} for d in rec},
                   ranks={**{d: r.tolist() for d, r in ranks.items()}, "task": tasks.tolist(),
                          "index": index.tolist()})
    res = build_results(strategy=strategy, benchmark="synthetic", seed=seed, tasks=[f"t{i}" for i in range(TASKS)],
                        recall_matrix=rm, config={"strategy": {"name": strategy, "params": {}}},
                        cost={"buffer_bytes": buffer_bytes})
    res["complete"] = True
    res["downstream"] = _downstream(skill, seed * (skill % 3))
    return res


def _downstream(skill: int, wobble: float) -> dict:
    """A downstream block with per-item outcomes: 120 transfer clips, the first 1.2 x (20 + skill + wobble)
    retrieved at rank 1 and the rest at rank 10; 240 localisation frames, every one at the same IoU."""
    hits = int(1.2 * (20 + skill + wobble))
    ranks = [1] * hits + [10] * (120 - hits)
    pixel, patch = 30.0 + skill + wobble, 60.0 + skill - wobble
    return {"transfer": {**{d: {"R@5": 100.0 * hits / 120} for d in ("a2v", "v2a")}, "ranks": {"a2v": ranks, "v2a": ranks}},
            "localise": {"miou_pixel": pixel, "miou_patch": patch, "iou_pixel": [pixel] * 240, "iou_patch": [patch] * 240}}


#: run key -> (strategy, skill, forget, buffer bytes per item): STELLA clearly ahead of the baselines in 𝒜
#: and ℱ, STELLA+ clearly behind STELLA, LPIS only and random patches alike (and alike to STELLA);
#: RCA only and the equal-bytes STELLA+ run at the preset's memory are missing; a memory sweep at M = 100
#: whose equal-bytes STELLA+ run (100 x 1000 / 400 = 250 items) is clearly ahead of DER++ at 100
RUNS = {"finetune": ("finetune", 10, 10, 0), "derpp": ("derpp", 4, 6, 1000), "stella": ("stella", 12, 0, 0),
        "stella_plus": ("stella_plus", 0, 0, 400), "stella_random": ("stella_random", 12, 0, 0),
        "stella_lpis": ("stella_lpis", 12, 0, 0), "derpp-mem100": ("derpp", 4, 6, 1000),
        "stella-mem100": ("stella", 4, 6, 0), "stella_plus-mem250": ("stella_plus", 12, 0, 400)}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    for key, (strategy, skill, forget, by) in RUNS.items():
        for seed in (0, 1):
            d = out / "runs" / key / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(_results(strategy, seed, skill, forget, by)))
    runs = comparison.load_runs(out)
    comparison.write_statistics(out, runs, comparison.main_table_keys(runs), n_boot=400, default_mem=200)
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "verdicts.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _verdicts(rows: list[dict[str, str]], a: str, b: str, metric: str = "A") -> dict[str, str]:
    """direction -> verdict of the comparison a − b ("" for the row of a comparison with missing runs)."""
    return {r["direction"]: r["verdict"] for r in rows if (r["a"], r["b"], r["metric"]) == (a, b, metric)}


def test_clearly_better_worse_and_equal_give_the_three_verdicts(written):
    rows = _rows(written)
    both = {"a2v", "v2a"}
    assert _verdicts(rows, "stella", "derpp") == dict.fromkeys(both, BS.SUPPORTED)          # claim 1
    assert _verdicts(rows, "stella", "finetune") == dict.fromkeys(both, BS.SUPPORTED)
    assert _verdicts(rows, "stella", "finetune", "F") == dict.fromkeys(both, BS.SUPPORTED)  # claim 2: ℱ lower
    assert _verdicts(rows, "stella_plus", "stella") == dict.fromkeys(both, BS.CONTRADICTED)  # claim 3
    assert _verdicts(rows, "stella_lpis", "stella_random") == dict.fromkeys(both, BS.NOT_DISTINGUISHABLE)
    assert _verdicts(rows, "stella", "stella_lpis") == dict.fromkeys(both, BS.NOT_DISTINGUISHABLE)
    # claim 5 at the swept size (its own keys) and at the preset's memory (the plain keys)
    assert _verdicts(rows, "stella-mem100", "derpp-mem100") == dict.fromkeys(both, BS.NOT_DISTINGUISHABLE)
    assert [r["claim"] for r in rows if (r["a"], r["b"]) == ("stella", "derpp")] == ["1", "1", "2", "2", "5", "5", *["7"] * 4]
    # the verdict follows the interval and the claimed side, as the rule states
    for r in (r for r in rows if r["diff"]):
        side = 1 if r["claimed"] == "> 0" else -1
        assert r["verdict"] == BS.decide((float(r["ci_lo"]), float(r["ci_hi"])), side)
    # claim 7: STELLA retrieves 10 / 8 more of 120 transfer clips than DER++ (seeds 0 / 1) and localises
    # 8 / 7 points better on every frame: supported; it retrieves 2 / 1 more clips than finetune, which a
    # draw of the clips can leave out (not distinguishable), and localises 2 / 3 points better (supported)
    assert _verdicts(rows, "stella", "derpp", "D") == dict.fromkeys(comparison.CLAIM7_COLUMNS, BS.SUPPORTED)
    assert _verdicts(rows, "stella", "finetune", "D") == {
        "transfer_a2v_R@5": BS.NOT_DISTINGUISHABLE, "transfer_v2a_R@5": BS.NOT_DISTINGUISHABLE,
        "miou_pixel": BS.SUPPORTED, "miou_patch": BS.SUPPORTED}
    # baselines of claims 1-2: every main-table key but STELLA, STELLA+ and multitask, DER++ first
    assert [r["b"] for r in rows if r["claim"] == "1"] == ["derpp", "derpp", "finetune", "finetune"]


def test_a_claim_without_its_runs_names_them(written):
    rows = _rows(written)
    rca = [r for r in rows if "stella_rca" in (r["a"], r["b"])]
    assert len(rca) == 2 and all(r["verdict"] == BS.MISSING_RUNS and r["missing"] == "stella_rca"
                                 and r["direction"] == "" and r["diff"] == "" for r in rca)
    # claim 6: the equal-bytes key follows from the item sizes (200 x 1000 / 400 = 500), its runs are missing
    # at the swept M = 100 it compares that size's own runs (250 items against DER++ with 100) and decides
    eq100, eq = [r for r in rows if r["claim"] == "6" and r["direction"] != "v2a"]
    assert (eq["a"], eq["b"], eq["verdict"], eq["missing"]) == ("stella_plus-mem500", "derpp", BS.MISSING_RUNS,
                                                                "stella_plus-mem500")
    assert (eq100["a"], eq100["b"]) == ("stella_plus-mem250", "derpp-mem100")
    assert _verdicts(rows, "stella_plus-mem250", "derpp-mem100") == dict.fromkeys(("a2v", "v2a"), BS.SUPPORTED)
    md = (written / "verdicts.md").read_text(encoding="utf-8")
    assert "missing runs: stella_rca" in md and "missing runs: stella_plus-mem500" in md


def test_verdicts_md_states_the_rule_and_counts_the_verdicts(written):
    rows = _rows(written)
    lines = (written / "verdicts.md").read_text(encoding="utf-8").splitlines()
    counts = {v: sum(r["verdict"] == v for r in rows) for v in (*BS.VERDICTS, BS.MISSING_RUNS)}
    assert lines[2] == (f"{counts[BS.SUPPORTED]} supported, {counts[BS.CONTRADICTED]} contradicted, "
                        f"{counts[BS.NOT_DISTINGUISHABLE]} not distinguishable; not decided: "
                        f"{counts[BS.MISSING_RUNS]} (missing runs).")
    assert counts[BS.SUPPORTED] and counts[BS.CONTRADICTED] and counts[BS.NOT_DISTINGUISHABLE]
    assert lines[4] == comparison.VERDICT_RULE
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| claim |")]
    assert len(table) == len(rows)
    line = next(x for x in table if "𝒜 STELLA+ − STELLA | A→V | > 0 |" in x)
    assert line.endswith(f"| {BS.CONTRADICTED} |")


def test_verdicts_use_the_replicates_of_intervals(written):
    """The same bootstrap replicates as intervals.csv's paired differences: identical numbers."""
    with open(written / "intervals.csv", newline="", encoding="utf-8") as fh:
        iv = {(r["key"], r["direction"], r["metric"]): r for r in csv.DictReader(fh)}
    for r in (r for r in _rows(written) if r["b"] == "derpp" and r["a"] == "stella" and r["metric"] != "D"):
        ref = iv[("stella", r["direction"], r["metric"])]
        assert (r["diff"], r["ci_lo"], r["ci_hi"]) == (ref["diff_derpp"], ref["diff_derpp_lo"], ref["diff_derpp_hi"])


def test_claims_whose_comparisons_cannot_be_named_are_left_out():
    comps, left_out = comparison.claim_comparisons(["finetune", "er", "stella", "multitask"], default_mem=200,
                                                   mems=[], sizes={"derpp": 1000})
    assert set(left_out) == {5, 6} and "stella_plus" in left_out[6] and "derpp" not in left_out[6]
    assert "--mem-sizes" in left_out[5] and "<" not in left_out[5]       # no HTML-like tags in markdown
    assert [c.b for c in comps if c.claim == 1] == ["derpp", "finetune", "er"]
    rows = comparison.verdict_rows({}, [c for c in comps if c.claim == 3], left_out, {"stella"})
    assert [(r["claim"], r["verdict"], r["missing"]) for r in rows] == [
        (3, BS.MISSING_RUNS, "stella_plus"), (5, BS.MISSING_RUNS, left_out[5]), (6, BS.MISSING_RUNS, left_out[6])]


def test_a_statistic_the_runs_lack_is_no_verdict():
    """Runs present but without the statistic (e.g. ℱ of a single-row run): "no value", not a decision."""
    a = np.array([1.0, 2.0])
    boot = {d: BS.BootstrapResult(point={"stella": {"A": 1.5, "F": None}, "er": {"A": 0.5, "F": 2.0}},
                                  samples={"stella": {"A": a, "F": None}, "er": {"A": a - 1, "F": a}},
                                  std={}, seeds={"stella": 1, "er": 1}, without_ranks=[], n_boot=2)
            for d, _ in comparison.DIRS}
    comps = [comparison.Comparison(2, "stella", "er", "F", -1, "STELLA − ER"),
             comparison.Comparison(1, "stella", "er", "A", 1, "STELLA − ER")]
    rows = comparison.verdict_rows(boot, comps, {}, {"stella", "er"})
    assert [(r["claim"], r["verdict"]) for r in rows] == [(1, BS.SUPPORTED)] * 2 + [(2, comparison.NO_VALUE)] * 2


def test_the_decision_rule():
    assert BS.decide((0.5, 2.0), 1) == BS.SUPPORTED and BS.decide((0.5, 2.0), -1) == BS.CONTRADICTED
    assert BS.decide((-3.0, -0.1), -1) == BS.SUPPORTED and BS.decide((-3.0, -0.1), 1) == BS.CONTRADICTED
    assert BS.decide((-1.0, 1.0), 1) == BS.NOT_DISTINGUISHABLE == BS.decide((0.0, 1.0), 1)   # 0 on a bound
    with pytest.raises(ValueError):
        BS.decide((1.0, 2.0), 0)
    assert BS.verdict_summary([BS.SUPPORTED, BS.SUPPORTED, BS.NOT_DISTINGUISHABLE]) == \
        "2 supported, 0 contradicted, 1 not distinguishable"


def test_the_verdicts_block_renders_from_a_csv(tmp_path):
    head = "claim,claim_text,comparison,a,b,metric,claimed,direction,diff,ci_lo,ci_hi,verdict,missing\n"
    body = ("1,STELLA's 𝒜 above each baseline,STELLA − DER++,stella,derpp,A,> 0,a2v,2.5,0.5,4.25,supported,\n"
            "2,STELLA forgets least,STELLA − DER++,stella,derpp,F,< 0,v2a,-1.0,-3.0,0.5,not distinguishable,\n"
            "3,STELLA+ above STELLA,STELLA+ − STELLA,stella_plus,stella,A,> 0,,,,,missing runs,stella_plus\n"
            '5,STELLA ahead of DER++ at every memory size,,,,,,,,,,missing runs,"memory-sweep runs (a, b)"\n')
    path = tmp_path / "verdicts.csv"
    path.write_text(head + body, encoding="utf-8")
    assert verdicts_table(path).splitlines() == [
        "1 supported, 0 contradicted, 1 not distinguishable; not decided: 2 (missing runs).", "",
        "| claim | direction | Δ [95 % interval] | verdict |", "|---|---|---|---|",
        "| 1. 𝒜 STELLA − DER++ > 0 | A→V | +2.50 [+0.50, +4.25] | supported |",
        "| 2. ℱ STELLA − DER++ < 0 | V→A | −1.00 [−3.00, +0.50] | not distinguishable |",
        "| 3. 𝒜 STELLA+ − STELLA > 0 | – | – | missing runs: stella_plus |",
        "| 5. STELLA ahead of DER++ at every memory size | – | – | missing runs: memory-sweep runs (a, b) |"]
    doc = "x\n<!-- generated:verdicts from verdicts.csv -->\nold\n<!-- /generated:verdicts -->\n"
    assert update_blocks(doc, root=tmp_path) == doc.replace("old\n", render_block("verdicts", path))
    short = "x\n<!-- generated:verdicts-summary from verdicts.csv -->\nold\n<!-- /generated:verdicts-summary -->\n"
    assert update_blocks(short, root=tmp_path) == short.replace(
        "old\n", "1 supported, 0 contradicted, 1 not distinguishable; not decided: 2 (missing runs).\n")


def test_the_generated_csv_renders(written):
    table = verdicts_table(written / "verdicts.csv").splitlines()
    assert len(table) == 4 + len(_rows(written))
    assert "| 3. 𝒜 STELLA+ − STELLA > 0 | A→V | " in "\n".join(table)


def _items_run(strategy: str, seed: int, transfer_hits: np.ndarray | None, iou: np.ndarray | None) -> dict:
    """A run whose downstream block holds per-item outcomes: ``transfer_hits`` (bool per clip, rank 1 or
    10) and per-frame IoUs ``iou`` (None: that part absent, as in runs from before items were recorded)."""
    ds: dict = {"transfer": {"a2v": {"R@5": 0.0}, "v2a": {"R@5": 0.0}}, "localise": {"miou_pixel": 0.0, "miou_patch": 0.0}}
    if transfer_hits is not None:
        ranks = np.where(transfer_hits, 1, 10).tolist()
        ds["transfer"]["ranks"] = {"a2v": ranks, "v2a": ranks}
    if iou is not None:
        ds["localise"].update(iou_pixel=iou.tolist(), iou_patch=iou.tolist())
    return {"strategy": strategy, "seed": seed, "downstream": ds}


def test_the_downstream_claim_resamples_seeds_and_items():
    """Claim 7's bootstrap is paired over the shared seeds and the test items."""
    hits = np.zeros(120, bool)
    one = hits.copy()
    one[-1] = True                                     # STELLA retrieves one more clip than DER++ on every seed
    many = hits.copy()
    many[:30] = True                                   # ... 30 more than ER
    iou = np.full(240, 50.0)
    runs = {"stella": [_items_run("stella", s, one | many, iou + (28.0 if s == 0 else 0.0)) for s in (0, 1, 2)],
            "derpp": [_items_run("derpp", s, many, iou) for s in (0, 1, 2)],
            "er": [_items_run("er", s, hits, iou) for s in (0, 1)],
            "lump": [_items_run("lump", 0, hits, iou)],
            "mir": [_items_run("mir", s, hits, None) for s in (0, 1)]}
    diff = lambda a, b, col: comparison.downstream_paired_diff(runs, a, b, col)   # noqa: E731
    # one clip of 120: the point is +0.83 on every seed, but a draw of the clips leaves it out one time
    # in e (an interval over seeds alone would have zero width and call it supported)
    point, (lo, hi) = diff("stella", "derpp", "transfer_a2v_R@5")
    assert point == pytest.approx(100 / 120) and lo == 0.0 and hi > point
    point, (lo, hi) = diff("stella", "er", "transfer_v2a_R@5")     # 31 clips on seeds 0 and 1 (seed 2 unpaired)
    assert point == pytest.approx(3100 / 120) and 15 < lo < point < hi < 35
    # localisation: +28 on seed 0 only, the same on every frame: the seeds make the whole spread
    point, (lo, hi) = diff("stella", "derpp", "miou_pixel")
    assert point == pytest.approx(28 / 3) and lo == pytest.approx(0.0) and hi == pytest.approx(28.0)
    assert diff("stella", "lump", "miou_patch") is None            # one shared seed
    assert diff("stella", "mir", "miou_patch") is None              # MIR recorded no per-frame IoUs
    comps = [c for c in comparison.claim_comparisons(["finetune", "derpp", "er", "mir", "stella"], default_mem=200,
                                                     mems=[100], sizes={})[0] if c.claim == 7]
    assert [c.b for c in comps] == ["derpp", "finetune", "er", "mir"] and {c.metric for c in comps} == {"D"}
    rows = comparison.verdict_rows({}, comps, {}, set(runs), runs)
    got = {(r["comparison"].b, r["direction"]): r["verdict"] for r in rows}
    assert got[("derpp", "transfer_a2v_R@5")] == BS.NOT_DISTINGUISHABLE
    assert got[("er", "transfer_a2v_R@5")] == BS.SUPPORTED
    assert got[("mir", "miou_pixel")] == comparison.NO_VALUE and got[("mir", "transfer_a2v_R@5")] == BS.SUPPORTED
    assert got[("finetune", None)] == BS.MISSING_RUNS
    assert [r["direction"] for r in rows if r["comparison"].b == "derpp"] == list(comparison.CLAIM7_COLUMNS)


def test_every_downstream_column_of_claim_7_renders_in_the_readme_block(tmp_path):
    from stella_avalanche.evaluation.published import _DIRECTIONS

    for key in comparison.CLAIM7_COLUMNS:
        assert _DIRECTIONS[key] == comparison.DOWNSTREAM_COLUMNS[key][0]
    head = "claim,claim_text,comparison,a,b,metric,claimed,direction,diff,ci_lo,ci_hi,verdict,missing\n"
    body = "7,x,STELLA − DER++,stella,derpp,D,> 0,miou_patch,1.5,-0.5,3.5,not distinguishable,\n"
    (tmp_path / "v.csv").write_text(head + body, encoding="utf-8")
    assert verdicts_table(tmp_path / "v.csv").splitlines()[-1] == \
        "| 7. downstream STELLA − DER++ > 0 | mIoU patch | +1.50 [−0.50, +3.50] | not distinguishable |"
