"""Comparison of strategies x seeds: aggregation, bootstrap intervals, power, ablation and memory-sweep
tables, and their plots (the library behind ``experiments/compare.py``; the CLI and the run scheduler are
in :mod:`stella_avalanche.cli.compare`).

Inputs are the ``results.json`` files of complete runs under ``<out>/runs/<key>/seed<seed>/``; a run key
is a strategy name or ``<strategy>-mem<M>`` for a memory-sweep run. Outputs (written atomically into
``<out>``): ``comparison.md`` / ``.csv``, ``cost.md``, ``bars_<dir>.png``, ``task_recall_<dir>.png``,
``intervals.md`` / ``.csv``, ``power.md``, ``verdicts.md`` / ``.csv`` (the paper's claims decided by the
paired intervals) and, when their runs exist, ``ablation.md``, ``mem_sweep.md`` and
``mem_sweep.png`` (``docs/comparison-statistics.md``).

Missing values - one rule, :func:`~stella_avalanche.evaluation.report.mean_std_over_seeds`, shared with
the per-run report: a seed whose results lack a value (``None``, a cost field not recorded, a downstream
block without that entry) is left out of that statistic; mean and population std are taken over the
seeds that have the value; with no such seed both are missing, and one seed has no std. Here a missing
number is NaN: a table prints ``–`` for a missing mean and the mean alone for a missing std, the CSV
prints ``nan``.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from stella_avalanche.evaluation import bootstrap as BS
from stella_avalanche.evaluation.report import mean_std_over_seeds
from stella_avalanche.training.strategies import ABLATION_STRATEGIES, MAIN_STRATEGIES, REGISTRY, STRATEGY_NAMES
from stella_avalanche.utils import atomic_write

__all__ = ["DIRS", "COLS", "PRETTY", "PAPER_ORDER", "SWEEP_STRATEGIES", "ABLATION_TABLE", "DOWNSTREAM_COLUMNS",
           "INITIAL", "initial_row", "mem_key", "item_bytes", "equal_bytes_items", "load_runs", "load_runs_in", "main_table_keys", "aggregate",
           "downstream_table", "write_tables", "plot", "bootstrap_all", "interval_rows", "interval_markdown",
           "task_gallery_markdown", "initial_gain_markdown", "write_intervals", "queries_per_task", "power_report", "ablation_markdown",
           "sweep_sizes", "sweep_rows", "write_sweep", "plot_sweep", "GUIDE_TARGETS", "guide_diagnostics_markdown",
           "seed_effect", "seed_effect_markdown", "Comparison", "CLAIMS", "CLAIM7_COLUMNS", "CLAIM7_ITEMS", "NO_VALUE", "VERDICT_RULE",
           "paired_diff", "downstream_paired_diff", "claim_comparisons", "verdict_rows",
           "write_verdicts", "write_statistics"]

DIRS = (("a2v", "A→V"), ("v2a", "V→A"))
COLS = ("R@1", "R@5", "R@10", "Avg")
#: table order and names come from the strategy registry (stella_avalanche/training/strategies.py)
PAPER_ORDER = STRATEGY_NAMES
PRETTY = {n: s.display for n, s in REGISTRY.items()}
#: strategies of the memory sweep and of the component ablation (with its two end points)
SWEEP_STRATEGIES = ("derpp", "stella", "stella_plus")
ABLATION_TABLE = ("derpp", *ABLATION_STRATEGIES, "stella")


def mem_key(strategy: str, mem: int, default_mem: int) -> str:
    """Run key of ``strategy`` at memory ``mem``: the plain name at the preset's memory (shared run)."""
    return strategy if mem == default_mem else f"{strategy}-mem{mem}"

def item_bytes(out: Path) -> dict[str, int]:
    """Buffer bytes per item of each strategy, read from any complete run under ``out`` (the size of
    an item does not depend on the memory size)."""
    found: dict[str, int] = {}
    for res in sorted(out.glob("runs/*/seed*/results.json")):
        try:
            r = json.loads(res.read_text())
        except (OSError, ValueError):
            continue
        b = int((r.get("cost") or {}).get("buffer_bytes") or 0)
        if r.get("complete") and b > 0:
            found.setdefault(r["strategy"], b)
    return found

def equal_bytes_items(mem: int, bytes_per_item: dict[str, int], strategy: str = "stella_plus",
                      reference: str = "derpp") -> int | None:
    """How many ``strategy`` items fit the byte budget of ``mem`` ``reference`` items (None if unknown)."""
    if strategy not in bytes_per_item or reference not in bytes_per_item:
        return None
    return int(mem * bytes_per_item[reference] // bytes_per_item[strategy])

def load_runs(out: Path) -> dict[str, list[dict]]:
    """Complete results of every run under ``out/runs``, grouped by run key (the directory name)."""
    return load_runs_in(out / "runs")

def load_runs_in(runs_dir: Path) -> dict[str, list[dict]]:
    """Complete results of every ``<key>/seed<s>/results.json`` in ``runs_dir``, grouped by run key."""
    runs: dict[str, list[dict]] = {}
    for res in sorted(runs_dir.glob("*/seed*/results.json")):
        r = json.loads(res.read_text())
        if r.get("complete"):
            runs.setdefault(res.parent.parent.name, []).append(r)
    return runs

def main_table_keys(runs: dict[str, list[dict]]) -> list[str]:
    """Keys of the main comparison: registered main strategies (paper order), then unregistered keys
    that are neither ablation variants nor memory-sweep runs."""
    keys = [s for s in MAIN_STRATEGIES if s in runs]
    return keys + sorted(k for k in runs if k not in REGISTRY and "-mem" not in k)


def _stat(values: list) -> tuple[float, float]:
    """(mean, std) over seeds by the module's missing-value rule, NaN for a missing number."""
    mean, std = mean_std_over_seeds(values)
    return (math.nan if mean is None else mean), (math.nan if std is None else std)


#: row key of the initialisation's zero-shot recall (each run's ``recall_initial``)
INITIAL = "initial"
PRETTY[INITIAL] = "Initialisation (no training)"


def _initial_avg(res: dict, d: str, c: str) -> float | None:
    """Mean over tasks of a run's zero-shot R@K (``c`` = ``R@K``, or ``Avg`` over the K's); None without it."""
    init = (res.get("recall_initial") or {}).get(d)
    if not init:
        return None
    ks = [k for k in init if k.startswith("R@")]
    per_k = {k: float(np.mean([v for v in init[k] if v is not None])) for k in ks}
    return float(np.mean(list(per_k.values()))) if c == "Avg" else per_k.get(c)


def initial_row(runs: dict[str, list[dict]], keys: list[str] | None = None) -> dict | None:
    """The zero-shot row: the initialisation's recall before the first task, over every run of ``keys``
    that recorded it (the runs of one comparison start from one initialisation, so its spread is that of
    the evaluation alone); None when no run has it. It has no forgetting, cost or downstream values."""
    results = [r for k in (keys if keys is not None else list(runs)) for r in runs.get(k, [])
               if r.get("recall_initial")]
    if not results:
        return None
    row: dict = {"strategy": INITIAL, "seeds": len(results)}
    for d, _ in DIRS:
        for c in COLS:
            row[f"{d}/{c}/A"] = _stat([_initial_avg(r, d, c) for r in results])
            row[f"{d}/{c}/F"] = (math.nan, math.nan)
    for key in ("samples_per_second", "peak_memory_bytes", "buffer_bytes", "train_seconds"):
        row[f"cost/{key}"] = (math.nan, math.nan)
    for key in DOWNSTREAM_COLUMNS:
        row[f"downstream/{key}"] = (math.nan, math.nan)
    row["downstream_seeds"] = 0
    row["initial_by_task"] = {d: np.mean([[float(np.mean([r["recall_initial"][d][k][t] for k in COLS[:-1]]))
                                           for t in range(len(r["tasks"]))] for r in results], axis=0).tolist()
                              for d, _ in DIRS}
    return row


def aggregate(runs: dict[str, list[dict]], keys: list[str] | None = None) -> list[dict]:
    """One row per run key (mean, std over its seeds), preceded by the zero-shot initialisation row
    (:func:`initial_row`) when the runs recorded it."""
    first = initial_row(runs, keys)
    rows = [] if first is None else [first]
    for s in (keys if keys is not None else main_table_keys(runs)):
        row = {"strategy": s, "seeds": len(runs[s])}
        for d, _ in DIRS:
            for c in COLS:
                for m in ("A", "F"):
                    row[f"{d}/{c}/{m}"] = _stat([r["summary"][d][c][m] for r in runs[s]])
        for key in ("samples_per_second", "peak_memory_bytes", "buffer_bytes", "train_seconds"):
            row[f"cost/{key}"] = _stat([r.get("cost", {}).get(key) for r in runs[s]])
        for key, (_, path) in DOWNSTREAM_COLUMNS.items():  # downstream suite (issue 12); NaN without a block
            row[f"downstream/{key}"] = _stat([_downstream_value(r, path) for r in runs[s]])
        row["downstream_seeds"] = sum(1 for r in runs[s] if isinstance(r.get("downstream"), dict))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ tables and plots
#: column key -> (header, path inside results["downstream"])
DOWNSTREAM_COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "probe_concat": ("probe A+V", ("probe", "concat", "score")),
    "probe_audio": ("probe A", ("probe", "audio", "score")),
    "probe_video": ("probe V", ("probe", "video", "score")),
    "transfer_a2v_R@5": ("transfer R@5 A→V", ("transfer", "a2v", "R@5")),
    "transfer_v2a_R@5": ("transfer R@5 V→A", ("transfer", "v2a", "R@5")),
    "miou_pixel": ("mIoU pixel", ("localise", "miou_pixel")),
    "miou_patch": ("mIoU patch", ("localise", "miou_patch")),
    "final_gap": ("final gap", ("gap", "final")),
}


def _downstream_entry(res: Mapping, path: tuple[str, ...]) -> Any:
    """The entry at ``path`` inside ``res["downstream"]`` (None when absent)."""
    x = res.get("downstream")
    for key in path:
        if not isinstance(x, Mapping) or key not in x:
            return None
        x = x[key]
    return x


def _downstream_value(res: dict, path: tuple[str, ...]) -> float | None:
    x = _downstream_entry(res, path)
    return None if x is None else float(x)

def downstream_table(rows: list[dict]) -> list[str]:
    """Markdown lines of the downstream table (empty when no run has a downstream block)."""
    keys = list(DOWNSTREAM_COLUMNS)
    if not any(not np.isnan(r[f"downstream/{k}"][0]) for r in rows for k in keys):
        return []
    gap_fmt = lambda ms: "–" if np.isnan(ms[0]) else f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    lines = ["", "## Downstream (frozen final backbone)", "",
             "Mean ± std over the seeds with a downstream block (docs/downstream.md): linear probe on the "
             "audio (A), video (V) and concatenated (A+V) embeddings, test-clip top-1 accuracy (%; mAP for "
             "multi-label AudioSet); zero-shot R@5 on data outside the stream (%); sounding-object "
             "localisation mIoU (%); final modality gap (mean over tasks after the last task).", "",
             "| method | seeds | " + " | ".join(h for h, _ in DOWNSTREAM_COLUMNS.values()) + " |",
             "|" + "---|" * (2 + len(keys))]
    for r in (r for r in rows if r["strategy"] != INITIAL):
        cells = [PRETTY.get(r["strategy"], r["strategy"]), str(r.get("downstream_seeds", 0))]
        cells += [gap_fmt(r[f"downstream/{k}"]) if k == "final_gap" else _fmt(r[f"downstream/{k}"]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(ms: tuple[float, float], bold: bool = False) -> str:
    m, s = ms
    if np.isnan(m):
        return "–"
    txt = f"{m:.2f}" if np.isnan(s) else f"{m:.2f} ± {s:.2f}"
    return f"**{txt}**" if bold else txt


def write_tables(rows: list[dict], out: Path, benchmark: str) -> str:
    # best per column: highest A (continual methods and multitask alike), lowest F
    best = {}
    for d, _ in DIRS:
        for c in COLS:
            a = [(r[f"{d}/{c}/A"][0], r["strategy"]) for r in rows
                 if not np.isnan(r[f"{d}/{c}/A"][0]) and r["strategy"] != INITIAL]
            f = [(r[f"{d}/{c}/F"][0], r["strategy"]) for r in rows if not np.isnan(r[f"{d}/{c}/F"][0])]
            best[(d, c, "A")] = max(a)[1] if a else None
            best[(d, c, "F")] = min(f)[1] if f else None
    head = "| method | seeds | " + " | ".join(f"{n} {c} 𝒜 | {n} {c} ℱ" for d, n in DIRS for c in COLS) + " |"
    lines = [f"# Comparison on the {benchmark} benchmark", "",
             "Mean ± std over seeds (population std). 𝒜 = average final recall over tasks (%), "
             "ℱ = forgetting (standard definition, %). Avg = mean over R@1/5/10. Best per column in bold "
             "(highest 𝒜, lowest ℱ).", "", head, "|" + "---|" * (2 + 2 * len(DIRS) * len(COLS))]
    for r in rows:
        cells = [PRETTY.get(r["strategy"], r["strategy"]), str(r["seeds"])]
        for d, _ in DIRS:
            for c in COLS:
                cells.append(_fmt(r[f"{d}/{c}/A"], best[(d, c, "A")] == r["strategy"]))
                cells.append(_fmt(r[f"{d}/{c}/F"], best[(d, c, "F")] == r["strategy"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += downstream_table(rows)  # downstream suite (issue 12)
    md = "\n".join(lines) + "\n"
    with atomic_write(out / "comparison.md") as fh:
        fh.write(md)
    with atomic_write(out / "comparison.csv") as fh:
        keys = [k for k in rows[-1] if "/" in k] if rows else []
        fh.write("strategy,seeds," + ",".join(f"{k}/mean,{k}/std" for k in keys) + "\n")
        for r in rows:
            fh.write(f"{r['strategy']},{r['seeds']}," + ",".join(f"{r[k][0]:.4f},{r[k][1]:.4f}" for k in keys) + "\n")
    cost = ["# Training cost", "", "| method | samples/s | peak memory (MB) | buffer bytes / item | train time (s) |",
            "|---|---|---|---|---|"]
    for r in (r for r in rows if r["strategy"] != INITIAL):
        sps, mem, buf, sec = (r[f"cost/{k}"] for k in ("samples_per_second", "peak_memory_bytes", "buffer_bytes",
                                                       "train_seconds"))
        cost.append(f"| {PRETTY.get(r['strategy'], r['strategy'])} | {sps[0]:.1f} | {mem[0] / 2**20:.0f} | "
                    f"{buf[0]:,.0f} | {sec[0]:.0f} |")
    with atomic_write(out / "cost.md") as fh:
        fh.write("\n".join(cost) + "\n")
    return md

def _has_avm(key: str) -> bool:
    """Whether a run key (``stella``, ``stella_plus-mem500``, ...) names a STELLA variant (the registry's
    ``needs_avm``): those bars are drawn in another colour."""
    spec = REGISTRY.get(key.split("-mem", 1)[0])
    return spec is not None and spec.needs_avm

def plot(rows: list[dict], runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [PRETTY.get(r["strategy"], r["strategy"]) for r in rows]
    for d, dn in DIRS:
        fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.1), 3.8))
        for ax, m, title in ((axes[0], "A", "A: avg final recall (Avg of R@1/5/10, %)"), (axes[1], "F", "F: forgetting (Avg, %)")):
            mean = [r[f"{d}/Avg/{m}"][0] for r in rows]
            std = [r[f"{d}/Avg/{m}"][1] for r in rows]
            ok = [i for i, v in enumerate(mean) if not np.isnan(v)]
            ax.bar(ok, [mean[i] for i in ok], yerr=[std[i] for i in ok], capsize=3,
                   color=["0.6" if rows[i]["strategy"] == INITIAL else "C3" if _has_avm(rows[i]["strategy"])
                          else "C0" for i in ok])
            for i in sorted(set(range(len(rows))) - set(ok)):  # e.g. multitask has no forgetting
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, color="0.4")
            ax.set_xlim(-0.6, len(rows) - 0.4)
            ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
            ax.set_title(f"{dn} {title}")
        fig.tight_layout()
        fig.savefig(out / f"bars_{d}.png", dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            if r["strategy"] == INITIAL:
                ax.plot(range(1, len(r["initial_by_task"][d]) + 1), r["initial_by_task"][d], ls="--", color="0.5",
                        label=PRETTY[INITIAL])
                continue
            mats = [np.mean([np.array(x["recall"][d][k]) for k in ("R@1", "R@5", "R@10")], axis=0) for x in runs[r["strategy"]]]
            final = np.mean([m[-1] for m in mats], axis=0)
            ax.plot(range(1, len(final) + 1), final, marker="o", label=PRETTY.get(r["strategy"], r["strategy"]))
        ax.set_xlabel("task (training order)")
        ax.set_ylabel("final recall, Avg of R@1/5/10 (%)")
        ax.set_title(f"{dn}: per-task recall after the last task")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"task_recall_{d}.png", dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------ bootstrap intervals and power
def bootstrap_all(runs: dict[str, list[dict]], *, n_boot: int, seed: int = 0, resample_queries: bool = True,
                  resample_seeds: bool = True) -> dict[str, BS.BootstrapResult]:
    """One joint bootstrap per direction over every run key: queries shared, and seeds shared by the keys
    that ran the same seeds (each run's ``seed``), so differences are paired over both. The two flags
    switch one source off (``power.md`` splits a width into its seed and query parts with them)."""
    labels = {k: [int(r["seed"]) for r in group] for k, group in runs.items()
              if all("seed" in r for r in group)}
    return {d: BS.bootstrap({k: [BS.run_from_results(r, d) for r in group] for k, group in runs.items()},
                            n_boot=n_boot, seed=seed, seed_labels=labels, resample_queries=resample_queries,
                            resample_seeds=resample_seeds) for d, _ in DIRS}

def _ci_text(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"

def paired_diff(boot: BS.BootstrapResult, a: str, b: str, m: str, level: float = 0.95,
                seeds: Sequence[int] | None = None) -> tuple[float, tuple[float, float]] | None:
    """Point difference a − b of statistic ``m`` ("A" or "F") between any two run keys of ``boot`` and
    its bootstrap interval at ``level``: the replicates share the query draws, and the seed draws of the
    seeds both keys ran, so the difference is paired over those; keys with different seed sets are
    compared on their shared seeds (:meth:`~stella_avalanche.evaluation.bootstrap.BootstrapResult.difference`;
    ``seeds`` names the seeds explicitly). None when a key or its statistic is missing (or ``a == b``)."""
    d = None if a == b else boot.difference(a, b, m, seeds)
    return None if d is None else (d[0], BS.interval(d[1], level))

def _diff_text(d: tuple[float, tuple[float, float]] | None) -> str:
    if d is None:
        return "–"
    txt = f"{d[0]:+.2f} {_ci_text(d[1])}"
    return f"{txt} ≈0" if BS.contains_zero(d[1]) else txt

def interval_rows(boot: dict[str, BS.BootstrapResult], keys: list[str]) -> list[dict]:
    """Per key and direction: mean, std, 95 % interval of Avg 𝒜 / ℱ and the paired differences."""
    rows = []
    for k in keys:
        row: dict = {"key": k}
        for d, _ in DIRS:
            b = boot[d]
            if k not in b.point:
                continue
            row[f"{d}/seeds"] = b.seeds[k]
            for m in ("A", "F"):
                p = b.point[k][m]
                row[f"{d}/{m}"] = None if p is None else (p, b.std[k][m], BS.interval(b.samples[k][m]))
                for ref in ("derpp", "finetune"):
                    row[f"{d}/{m}-{ref}"] = paired_diff(b, k, ref, m)
        rows.append(row)
    return rows

def _cell(v: tuple[float, float, tuple[float, float]] | None) -> str:
    return "–" if v is None else f"{v[0]:.2f} ± {v[1]:.2f} {_ci_text(v[2])}"

def interval_markdown(rows: list[dict], boot: dict[str, BS.BootstrapResult], title: str) -> str:
    """Tables (one per direction) of Avg 𝒜 / ℱ with intervals and the paired differences."""
    lines = [f"## {title}", "",
             "Avg of R@1/5/10 in %. Cells: mean ± std over seeds (population std) [95 % bootstrap interval, "
             "resampling queries (stratified by task) and seeds]. Δ: paired difference to DER++ / Finetune "
             "[95 % interval], over the seeds both methods ran; ≈0 marks a difference whose interval contains zero (not distinguishable "
             "from zero)."]
    missing = sorted({k for d, _ in DIRS for k in boot[d].without_ranks} & {r["key"] for r in rows})
    if missing:
        lines += ["", "Runs of " + ", ".join(PRETTY.get(k, k) for k in missing) + " have no per-query ranks in "
                  "their results.json: only their seeds are resampled (the query part of their interval is missing)."]
    for d, dn in DIRS:
        lines += ["", f"### {dn}", "", "| method | seeds | 𝒜 | ℱ | Δ𝒜 vs DER++ | Δℱ vs DER++ | Δ𝒜 vs Finetune | "
                  "Δℱ vs Finetune |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if f"{d}/seeds" not in r:
                continue
            cells = [PRETTY.get(r["key"], r["key"]), str(r[f"{d}/seeds"]), _cell(r[f"{d}/A"]), _cell(r[f"{d}/F"])]
            cells += [_diff_text(r[f"{d}/{m}-{ref}"]) for ref in ("derpp", "finetune") for m in ("A", "F")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("≈0", "**≈0**") + "\n"

def task_gallery_markdown(runs: dict[str, list[dict]], keys: list[str]) -> str:
    """Avg 𝒜 / ℱ with the per-task gallery (each query ranked among its own task's clips), from the runs
    whose results.json carry it (derived from their ranks); empty when none does."""
    lines = []
    for k in keys:
        group = [r["summary_task_gallery"] for r in runs.get(k, []) if "summary_task_gallery" in r]
        if not group:
            continue
        cells = [PRETTY.get(k, k), str(len(group))]
        for d, _ in DIRS:
            for m in ("A", "F"):
                cells.append(_fmt(_stat([g[d]["Avg"][m] for g in group])))
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["## Per-task gallery", "", "Beside the pooled gallery (the paper's protocol): each query ranked among its "
            "own task's retrieval clips only; higher numbers, not comparable with the paper. Mean ± std over seeds.",
            "", "| method | seeds | " + " | ".join(f"{n} {m}" for _, n in DIRS for m in ("𝒜", "ℱ")) + " |",
            "|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"

def initial_gain_markdown(runs: dict[str, list[dict]], keys: list[str]) -> str:
    """What the stream adds to the initialisation: per method, final Avg 𝒜 minus the same run's
    zero-shot Avg (``recall_initial``), mean ± std and the smallest value over seeds; empty when no
    run recorded the zero-shot evaluation."""
    lines = []
    for k in keys:
        group = [r for r in runs.get(k, []) if r.get("recall_initial")]
        if not group:
            continue
        cells = [PRETTY.get(k, k), str(len(group))]
        for d, _ in DIRS:
            gains = [r["summary"][d]["Avg"]["A"] - _initial_avg(r, d, "Avg") for r in group]
            cells.append(f"{_fmt(_stat(gains))} (min {min(gains):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["## Over the initialisation", "", "Final Avg 𝒜 minus the same run's zero-shot Avg (the initialisation "
            "evaluated before the first task, the \"Initialisation (no training)\" row): mean ± std over seeds, and "
            "the smallest over seeds.", "", "| method | seeds | " + " | ".join(f"{n} Δ𝒜" for _, n in DIRS) + " |",
            "|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"

def write_intervals(rows: list[dict], boot: dict[str, BS.BootstrapResult], out: Path,
                    runs: dict[str, list[dict]] | None = None) -> str:
    md = "# Bootstrap intervals\n\n" + interval_markdown(rows, boot, "Main comparison")
    for extra in (initial_gain_markdown(runs or {}, [r["key"] for r in rows]),
                  task_gallery_markdown(runs or {}, [r["key"] for r in rows])):
        if extra:
            md += "\n" + extra
    with atomic_write(out / "intervals.md") as fh:
        fh.write(md)
    with atomic_write(out / "intervals.csv") as fh:
        fh.write("key,direction,metric,seeds,mean,std,ci_lo,ci_hi,"
                 "diff_derpp,diff_derpp_lo,diff_derpp_hi,diff_finetune,diff_finetune_lo,diff_finetune_hi\n")
        for r in rows:
            for d, _ in DIRS:
                for m in ("A", "F"):
                    v = r.get(f"{d}/{m}")
                    if v is None:
                        continue
                    diffs = []
                    for ref in ("derpp", "finetune"):
                        x = r[f"{d}/{m}-{ref}"]
                        diffs += ["", "", ""] if x is None else [f"{x[0]:.4f}", f"{x[1][0]:.4f}", f"{x[1][1]:.4f}"]
                    fh.write(f"{r['key']},{d},{m},{r[f'{d}/seeds']},{v[0]:.4f},{v[1]:.4f},{v[2][0]:.4f},"
                             f"{v[2][1]:.4f}," + ",".join(diffs) + "\n")
    return md

def queries_per_task(results: dict) -> int | None:
    """Retrieval queries per task of a run: from its ranks, else (synthetic benchmark) from the
    generator preset named in its config (the current generator's sizes)."""
    rk = results.get("ranks")
    if rk and rk.get("task"):
        return int(np.bincount(rk["task"]).max())
    b = (results.get("config") or {}).get("benchmark") or {}
    if b.get("name") != "synthetic":
        return None
    try:
        from stella_avalanche.data.synthetic import get_preset

        p = get_preset(b.get("preset", "default"))
        return int(p.retrieval_per_class * p.classes_per_task)
    except (ImportError, ValueError, AttributeError):
        return None

def _delta_widths(b: BS.BootstrapResult, keys: list[str]) -> list[tuple[float, str, str]]:
    """(width, key, reference) of every paired Δ𝒜 interval to DER++ and to finetune (multitask left out)."""
    widths = []
    for k in keys:
        for ref in ("derpp", "finetune"):
            x = paired_diff(b, k, ref, "A")
            if x is not None and k != "multitask":
                widths.append((x[1][1] - x[1][0], k, ref))
    return widths


def _width_parts(parts: Mapping[str, Mapping[str, BS.BootstrapResult]], d: str, keys: list[str], target: float,
                 seeds: float) -> list[str]:
    """Lines of power.md that split the median width into its seed and query parts and say what reaching
    the target takes: the seed part shrinks as 1/sqrt(seeds), the query part only with more queries."""
    ws = float(np.median([w for w, _, _ in _delta_widths(parts["seeds"][d], keys)]))
    wq = float(np.median([w for w, _, _ in _delta_widths(parts["queries"][d], keys)]))
    lines = [f"Parts of the width (bootstrap with one source fixed): seeds only, median {ws:.2f}; queries only, "
             f"median {wq:.2f} (widths add roughly in quadrature: √(s² + q²) = {math.hypot(ws, wq):.2f})."]
    if wq >= target:
        lines.append(f"The query part alone is at or above the target ({target:.2f}): more seeds cannot reach it; "
                     f"the queries per task must grow more than {(wq / target) ** 2:.1f}× (the query part shrinks "
                     "as 1/sqrt(queries), and the seed part needs room too).")
    else:
        need = int(np.ceil(seeds * ws ** 2 / (target ** 2 - wq ** 2)))
        lines.append(f"With the query part as it is, the seed part fits the target at about {need} "
                     f"seed{'s' if need != 1 else ''} per strategy (now {seeds:g}"
                     + ("; with so few seeds the seed part is itself poorly measured)." if seeds < 3 else ")."))
    return lines


def seed_effect(values: np.ndarray) -> dict[str, float]:
    """Two-way split (strategy × seed, one run per cell) of a (K strategies, S seeds) table of Avg 𝒜.

    After removing each strategy's mean, a seed's mean residual over the K strategies is what that seed
    does to all of them alike (its initialisation, with ``--init per-seed``, and its data order); the
    rest is each run's own. Mean squares: ``MS_seed = K Σ_s ē_s² / (S − 1)``, ``MS_run`` the residual
    mean square with (K − 1)(S − 1) degrees of freedom; ``sd_shared = sqrt(max(0, (MS_seed − MS_run) / K))``,
    ``sd_run = sqrt(MS_run)``; ``p`` of F = MS_seed / MS_run (a shared seed effect against none).
    """
    from scipy.stats import f as f_dist

    k, n = values.shape
    res = values - values.mean(axis=1, keepdims=True)
    seed_mean = res.mean(axis=0)                                           # (S,)
    ms_seed = k * float((seed_mean ** 2).sum()) / (n - 1)
    ms_run = float(((res - seed_mean) ** 2).sum()) / ((k - 1) * (n - 1))
    stat = ms_seed / ms_run if ms_run > 0 else math.inf
    return {"sd_shared": math.sqrt(max(0.0, (ms_seed - ms_run) / k)), "sd_run": math.sqrt(ms_run),
            "F": stat, "p": float(f_dist.sf(stat, n - 1, (k - 1) * (n - 1))), "strategies": k, "seeds": n}


def seed_effect_markdown(runs: dict[str, list[dict]], keys: list[str]) -> list[str]:
    """power.md's section on where the seed spread comes from (:func:`seed_effect`), over the main-table
    strategies that ran the most common set of seeds (at least 2 strategies and 2 seeds)."""
    sets: dict[tuple[int, ...], list[str]] = {}
    for k in keys:
        if k in runs and all("seed" in r for r in runs[k]):
            sets.setdefault(tuple(sorted(int(r["seed"]) for r in runs[k])), []).append(k)
    seeds, members = max(sets.items(), key=lambda kv: (len(kv[1]) * (len(kv[0]) - 1), len(kv[0])),
                         default=((), []))
    if len(members) < 2 or len(seeds) < 2:
        return []
    inits = {str((r.get("init") or {}).get("backbone")) for k in members for r in runs[k]}
    lines = ["", "## Where the seed spread comes from", "",
             f"Strategies {', '.join(PRETTY.get(k, k) for k in members)}, seeds {', '.join(map(str, seeds))}; "
             f"{len(inits)} initialisation build(s) among their runs. Avg 𝒜 split into what a seed does to every "
             "strategy alike (its initialisation and data order: SD shared) and what is each run's own (SD run); "
             "p: F test of a shared seed effect against none. The paired differences cancel the shared part.", "",
             "| direction | SD shared | SD run | F | p |", "|---|---|---|---|---|"]
    for d, dn in DIRS:
        table = np.array([[next(r for r in runs[k] if int(r["seed"]) == s)["summary"][d]["Avg"]["A"]
                           for s in seeds] for k in members])
        e = seed_effect(table)
        lines.append(f"| {dn} | {e['sd_shared']:.2f} | {e['sd_run']:.2f} | {e['F']:.2f} | {e['p']:.3f} |")
    return lines


def power_report(boot: dict[str, BS.BootstrapResult], keys: list[str],
                 runs: dict[str, list[dict]] | None = None, n_queries: int | None = None,
                 parts: Mapping[str, Mapping[str, BS.BootstrapResult]] | None = None) -> str:
    """Widths of the paired Δ𝒜 intervals against the target: a quarter of the multitask − finetune gap.

    Uses the per-query ranks where the runs have them; says which strategies lacked them (then only
    their seeds are resampled and the width is an underestimate of the full one) and, for those, gives
    the binomial estimate of the query part (:func:`~stella_avalanche.evaluation.bootstrap.query_sd_from_recall`).
    With ``parts`` (``{"seeds": ..., "queries": ...}``: :func:`bootstrap_all` with one source fixed) it
    splits the median width into the two sources and says what reaching the target takes.
    """
    lines = ["# Statistical power of the comparison", "",
             "Target: the 95 % interval of a difference of two strategies' Avg 𝒜 is at most a quarter of the "
             "multitask − finetune gap. Width = upper − lower bound of the paired bootstrap interval."]
    for d, dn in DIRS:
        b = boot[d]
        lines += ["", f"## {dn}", ""]
        if "multitask" not in b.point or "finetune" not in b.point:
            lines.append("needs complete multitask and finetune runs")
            continue
        gap = b.point["multitask"]["A"] - b.point["finetune"]["A"]
        target = gap / 4
        widths = _delta_widths(b, keys)
        lines.append(f"multitask − finetune gap {gap:.2f}, target width ≤ {target:.2f}")
        if gap <= 0:
            lines[-1] = f"multitask − finetune gap {gap:.2f}: multitask does not exceed finetune, no target"
            continue
        if not widths:
            continue
        w = np.array([x[0] for x in widths])
        seeds = [b.seeds[k] for k in keys if k in b.seeds]
        lines += [f"Δ𝒜 interval widths over {len(w)} differences (to DER++ and to Finetune): median {np.median(w):.2f}, "
                  f"max {w.max():.2f} ({PRETTY.get(max(widths)[1], max(widths)[1])} vs "
                  f"{PRETTY.get(max(widths)[2], max(widths)[2])}); {int((w <= target).sum())} of {len(w)} within target.",
                  f"Seeds per strategy: {min(seeds)}-{max(seeds)}. " + (
                      "The median width is within the target." if np.median(w) <= target else
                      f"If the width shrinks as 1/sqrt(seeds), the median width reaches the target with about "
                      f"{int(np.ceil(np.median(seeds) * (np.median(w) / target) ** 2))} seeds per strategy (a rough "
                      "guide: more clips per task shrink the query part too).")]
        if b.without_ranks:
            lines.append("Without per-query ranks (seeds resampled only, widths underestimated): "
                         + ", ".join(PRETTY.get(k, k) for k in b.without_ranks) + ".")
            sds = []
            for k in b.without_ranks:
                for r in (runs or {}).get(k, []):
                    n = n_queries or queries_per_task(r)
                    if n:
                        last = {lab: m[-1] for lab, m in r["recall"][d].items()}
                        sds.append((BS.query_sd_from_recall(last, n), n))
            if sds:
                q = float(np.mean([x[0] for x in sds]))
                lines.append(f"Missing query part, estimated from their per-task recalls ({sds[0][1]} queries per task): "
                             f"one run's Avg 𝒜 has a query-sampling SD of {q:.2f}; it does not average out over seeds "
                             f"(all seeds share the queries) and adds 2·{q:.2f}²·(1 − ρ) to the variance of a "
                             "difference, ρ = the two strategies' per-query correlation, which only ranks can measure.")
        else:
            lines.append("All runs have per-query ranks: queries and seeds are resampled.")
            if parts is not None:
                lines += _width_parts(parts, d, keys, target, float(np.median(seeds)))
    lines += seed_effect_markdown(runs or {}, keys)
    md = "\n".join(lines) + "\n"
    return md


# ------------------------------------------------------------------ ablation and memory sweep
def ablation_markdown(boot: dict[str, BS.BootstrapResult]) -> str | None:
    keys = [k for k in ABLATION_TABLE if k in boot[DIRS[0][0]].point]
    if not any(k in ABLATION_STRATEGIES for k in keys):
        return None
    head = ("# STELLA component ablation\n\nDER++ = neither component (full clips); STELLA: random patches = "
            "uniform importance, no RCA; LPIS only = importance, no RCA; RCA only = RCA over uniform importance; "
            "STELLA = both (``STELLAPlugin(importance=..., rca=...)``).\n\n")
    return (head + interval_markdown(interval_rows(boot, keys), boot, "Ablation") + _against_random(boot, keys)
            + _decomposition(boot))

def _against_random(boot: dict[str, BS.BootstrapResult], keys: list[str]) -> str:
    """The ablation's own reference: each variant that uses a component against random patches (the
    same budget of kept tokens, chosen uniformly), paired over queries; empty without those runs."""
    ref = "stella_random"
    others = [k for k in keys if k not in (ref, "derpp")]
    if ref not in keys or not others:
        return ""
    lines = ["", "## Against random patches", "",
             f"Paired difference to {PRETTY.get(ref, ref)} [95 % interval]: what the importance map and RCA "
             "add over keeping the same number of tokens chosen at random.", "",
             "| method | Δ𝒜 A→V | Δℱ A→V | Δ𝒜 V→A | Δℱ V→A |", "|---|---|---|---|---|"]
    for k in others:
        cells = [_diff_text(paired_diff(boot[d], k, ref, m)) for d, _ in DIRS for m in ("A", "F")]
        lines.append(f"| {PRETTY.get(k, k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("≈0", "**≈0**") + "\n"

def _decomposition(boot: dict[str, BS.BootstrapResult]) -> str:
    """STELLA's 𝒜 difference to each full-clip replay baseline (ER, DER++) split at random patches:
    STELLA − base = (STELLA − random patches) + (random patches − base). The first part is what the
    importance map and RCA choose, at the same kept tokens; the second is everything else STELLA's
    plugin does differently (replaying kept-token subsets, its own replay terms). Each part paired over
    seeds and queries; empty without STELLA and random-patch runs."""
    have = boot[DIRS[0][0]].point
    ref = "stella_random"
    bases = [b for b in ("er", "derpp") if b in have]
    if "stella" not in have or ref not in have or not bases:
        return ""
    lines = ["", "## Where STELLA's difference to full-clip replay comes from", "",
             "Δ𝒜 [95 % interval], paired over seeds and queries. The two parts add up to the total: "
             f"*STELLA − {PRETTY.get(ref, ref)}* is what the importance map and RCA choose (same number of kept "
             f"tokens), *{PRETTY.get(ref, ref)} − baseline* everything else STELLA's plugin does differently from "
             "the baseline (replaying kept-token subsets of its items instead of whole clips, its own replay terms).",
             "", "| difference | Δ𝒜 A→V | Δ𝒜 V→A |", "|---|---|---|"]
    common = _common_seeds(boot[DIRS[0][0]], ["stella", ref, *bases])
    if common:
        lines[-4] += (" The methods ran different seed sets: every row is taken over the seeds all of them ran ("
                      + ", ".join(map(str, common)) + "), so the parts add up.")
    lines += _difference_rows(boot, [("stella", ref)] + [p for base in bases for p in (("stella", base), (ref, base))],
                              common)
    return "\n".join(lines).replace("≈0", "**≈0**") + "\n" + _keep_all_probe(boot, ref, bases)

def _difference_rows(boot: dict[str, BS.BootstrapResult], pairs: list[tuple[str, str]],
                     seeds: Sequence[int] | None = None) -> list[str]:
    """One table row per (a, b): a − b of Avg 𝒜 in both directions, paired, with its interval (over
    ``seeds`` when given, else over the seeds both ran)."""
    return [f"| {PRETTY.get(a, a)} − {PRETTY.get(b, b)} | "
            + " | ".join(_diff_text(paired_diff(boot[d], a, b, "A", seeds=seeds)) for d, _ in DIRS) + " |"
            for a, b in pairs]

def _common_seeds(boot: BS.BootstrapResult, keys: Sequence[str]) -> list[int] | None:
    """The seeds every key ran, when they ran different seed sets sharing at least 2 (else None: each
    difference then uses the seeds its two keys share)."""
    sets = [boot.labels.get(k) for k in keys]
    if any(s is None for s in sets) or all(s == sets[0] for s in sets):
        return None
    common = sorted(set.intersection(*(set(s) for s in sets)))
    return common if len(common) >= 2 else None

#: the probe that keeps every token (random order, no LPIS, no RCA): it differs from random patches
#: only in the kept fraction κ
KEEP_ALL = "stella_keepall"

def _keep_all_probe(boot: dict[str, BS.BootstrapResult], ref: str, bases: list[str]) -> str:
    """Splits *random patches − baseline* once more at the keep-all probe: (keep-all − random patches)
    is what keeping only a fraction κ of the tokens costs, (keep-all − baseline) what remains of STELLA's
    plugin with every token kept. Empty without the probe's runs."""
    if KEEP_ALL not in boot[DIRS[0][0]].point:
        return ""
    lines = ["", "### Test: the same plugin keeping every token", "",
             f"{PRETTY[KEEP_ALL]} runs STELLA's plugin with uniform importance and no RCA, as random patches "
             "does, but keeps every token (κ = 1 instead of 0.5). Both encode the same number of visible tokens "
             "and store whole clips; what differs is that the MAE reconstructs every masked patch instead of "
             "only the kept ones (with ρ = 0.8: 80 % of the tokens instead of 30 %). If the deficit of random "
             "patches to full-clip replay comes from the halved token budget, the first row is positive and "
             "the others are near zero."]
    b0 = boot[DIRS[0][0]]
    keep, other = set(b0.labels.get(KEEP_ALL) or []), set(b0.labels.get(ref) or [])
    if keep != other:
        shared = sorted(keep & other)
        lines[-1] += (f" The probe ran {len(keep)} seed(s) against {len(other)} of the others: its differences are "
                      f"taken over the seeds both ran ({', '.join(map(str, shared))})." if len(shared) >= 2 else
                      f" The probe shares fewer than 2 seeds with the others, so it is resampled over seeds apart "
                      "from them (paired over queries only) and its intervals are wider than a paired comparison's.")
    lines += ["", "| difference | Δ𝒜 A→V | Δ𝒜 V→A |", "|---|---|---|"]
    lines += _difference_rows(boot, [(KEEP_ALL, ref)] + [(KEEP_ALL, base) for base in bases])
    return "\n".join(lines).replace("≈0", "**≈0**") + "\n"

def _trained_on_gpu(result: dict) -> bool:
    """Whether a run's ``environment`` block (results.json) names a CUDA device."""
    return str((result.get("environment") or {}).get("device", "cpu")).startswith("cuda")

def sweep_sizes(runs: dict[str, list[dict]], default_mem: int) -> list[int]:
    """Memory sizes of the sweep runs present under ``runs`` (DER++ / STELLA keys ``<name>-mem<M>``, plus
    the preset's memory, whose runs are the main ones)."""
    sizes = {int(k.rsplit("-mem", 1)[1]) for k in runs for n in ("derpp", "stella") if k.startswith(f"{n}-mem")}
    return sorted(sizes | {default_mem}) if sizes else []

def sweep_rows(runs: dict[str, list[dict]], boot: dict[str, BS.BootstrapResult], mems: list[int],
               default_mem: int, sizes: dict[str, int]) -> list[dict]:
    """One row per (curve, memory): DER++, STELLA, STELLA+ at M items and STELLA+ at DER++'s bytes of M.

    Every cell is taken over the seeds all the sweep's present runs share (``row["seeds"]``, None when
    they all ran the same seeds), so a curve compares one seed set across memory sizes even where the
    preset's memory is a main-table key with more seeds.
    """
    rows = []
    for label, strategy in (("DER++", "derpp"), ("STELLA", "stella"), ("STELLA+", "stella_plus"),
                            ("STELLA+ at DER++ bytes", "stella_plus")):
        for mem in mems:
            items = mem if not label.endswith("bytes") else equal_bytes_items(mem, sizes)
            key = None if items is None else mem_key(strategy, items, default_mem)
            rows.append({"curve": label, "mem": mem, "items": items, "key": key})
    ref = boot[DIRS[0][0]]
    present = [k for k in dict.fromkeys(r["key"] for r in rows) if k is not None and k in ref.point]
    common = _common_seeds(ref, present) if present else None
    for row in rows:
        key = row["key"]
        row["seeds"] = common
        row["gpu_runs"] = sum(1 for r in runs.get(key or "", [])
                              if _trained_on_gpu(r) and (common is None or r.get("seed") in common))
        for d, _ in DIRS:
            b = boot[d]
            if key is None or key not in b.point or b.point[key]["A"] is None:
                continue
            if common is None:
                row[d] = (b.point[key]["A"], b.std[key]["A"], BS.interval(b.samples[key]["A"]), b.seeds[key])
            else:
                point, std, reps = b.over_seeds(key, "A", common)
                row[d] = (point, std, BS.interval(reps), len(common))
    return rows

def _sweep_seeds(rows: list[dict]) -> list[int] | None:
    """The seed set of :func:`sweep_rows`' cells (None: every run's own seeds)."""
    return rows[0]["seeds"] if rows else None

def _sweep_differences(boot: dict[str, BS.BootstrapResult], rows: list[dict], mems: list[int]) -> list[str]:
    """Paired Δ𝒜 rows of the sweep over its seeds: STELLA − DER++ and STELLA+ at DER++'s bytes − STELLA+
    at each M, and for each curve its largest memory minus its smallest (what more memory buys)."""
    key = {(r["curve"], r["mem"]): r["key"] for r in rows if r["key"] is not None and DIRS[0][0] in r}
    seeds = _sweep_seeds(rows)
    pairs = [(f"STELLA − DER++ (M = {m})", key.get(("STELLA", m)), key.get(("DER++", m))) for m in mems]
    # what STELLA+ gains by spending DER++'s bytes of M clips on more, smaller items instead of M items
    pairs += [(f"STELLA+ at DER++ bytes − STELLA+ (M = {m})", key.get(("STELLA+ at DER++ bytes", m)),
               key.get(("STELLA+", m))) for m in mems]
    if len(mems) > 1:
        lo, hi = min(mems), max(mems)
        pairs += [(f"{c} M = {hi} − M = {lo}", key.get((c, hi)), key.get((c, lo)))
                  for c in ("DER++", "STELLA", "STELLA+", "STELLA+ at DER++ bytes")]
    out = []
    for label, a, b in pairs:
        if a is None or b is None:
            continue
        out.append(f"| {label} | " + " | ".join(_diff_text(paired_diff(boot[d], a, b, "A", seeds=seeds))
                                                 for d, _ in DIRS) + " |")
    if not out:
        return []
    return ["", "## Paired differences", "",
            "Δ𝒜 [95 % interval], paired over the same seeds and queries as the cells above (≈0: the interval "
            "holds zero). Claim 5's verdicts (verdicts.md) take STELLA − DER++ over every seed both ran.", "",
            "| difference | Δ𝒜 A→V | Δ𝒜 V→A |", "|---|---|---|", *out]


def write_sweep(rows: list[dict], mems: list[int], sizes: dict[str, int], out: Path,
                boot: dict[str, BS.BootstrapResult] | None = None) -> str:
    """Write ``mem_sweep.md`` from :func:`sweep_rows` (with ``boot``, also the paired differences)."""
    seeds = _sweep_seeds(rows)
    lines = ["# Memory-size sweep", "",
             "Avg 𝒜 (mean of R@1/5/10, %) against the replay memory M (items per rank): mean ± std over seeds "
             "[95 % bootstrap interval]. The last row gives STELLA+ as many items as fit the bytes of M DER++ "
             "items (items in parentheses)."]
    if seeds is not None:
        lines[-1] += (" Every cell is taken over the seeds all the sweep's runs share (" + ", ".join(map(str, seeds))
                      + "), so a curve compares one seed set across memory sizes; the main table's rows of "
                        "the preset's memory use all their seeds.")
    if sizes:
        lines.append("Buffer bytes per item: " + ", ".join(f"{PRETTY.get(k, k)} {v:,}" for k, v in sorted(sizes.items())
                                                          if k in SWEEP_STRATEGIES) + ".")
    for d, dn in DIRS:
        lines += ["", f"## {dn}", "", "| curve | " + " | ".join(f"M = {m}" for m in mems) + " |",
                  "|---|" + "---|" * len(mems)]
        for label in dict.fromkeys(r["curve"] for r in rows):
            cells = []
            for r in (x for x in rows if x["curve"] == label):
                v = r.get(d)
                txt = "–" if v is None else f"{v[0]:.2f} ± {v[1]:.2f} {_ci_text(v[2])}"
                if label.endswith("bytes") and r["items"] is not None:
                    txt += f" ({r['items']} items)"
                if v is not None and r.get("gpu_runs"):
                    txt += " †"
                cells.append(txt)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(r.get("gpu_runs") for r in rows):
        lines += ["", "† trained on a GPU (results.json `environment`); the other cells' runs on the CPU. "
                  "The same seed does not reproduce across platforms, so a † cell is another draw of its seeds."]
    if boot is not None:
        lines += _sweep_differences(boot, rows, mems)
    md = "\n".join(lines).replace("≈0", "**≈0**") + "\n"
    with atomic_write(out / "mem_sweep.md") as fh:
        fh.write(md)
    return md

def plot_sweep(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (d, dn) in zip(axes, DIRS):
        for i, label in enumerate(dict.fromkeys(r["curve"] for r in rows)):
            pts = [(r["mem"], r[d]) for r in rows if r["curve"] == label and d in r]
            if not pts:
                continue
            x = np.array([p[0] for p in pts], dtype=float) * (1 + 0.03 * (i - 1.5))  # curves side by side
            y = np.array([p[1][0] for p in pts])
            err = np.array([[y_ - p[1][2][0], p[1][2][1] - y_] for y_, p in zip(y, pts)]).T
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label,
                        linestyle="--" if label.endswith("bytes") else "-", color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["mem"] for r in rows}), [str(m) for m in sorted({r["mem"] for r in rows})])
        ax.set_xlabel("memory M (items; dashed: bytes of M DER++ items)")
        ax.set_ylabel("Avg A: final recall (%)")
        seeds = _sweep_seeds(rows)
        over = "" if seeds is None else f"seeds {', '.join(map(str, seeds))}; "
        ax.set_title(f"{dn}: A against memory ({over}95 % intervals)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mem_sweep.png", dpi=120)
    plt.close(fig)


#: per-task targets of STELLA's guide in a run (docs/diagnostics.md): key, display name, threshold,
#: whether it applies from the start (False: from the entry after task 1 on, since the class relations
#: need stream classes in the buffer and the AVM first)
GUIDE_TARGETS = (("avm_accuracy", "AVM acc", 0.8, True), ("video_object_lift", "video lift", 1.5, True),
                 ("video_object_recall_selected_no_twin", "video sel. recall, no twin", 0.6, True),
                 ("audio_sounding_lift", "audio lift", 1.5, True),
                 ("audio_sounding_recall_kept_no_twin", "audio kept recall, no twin", 0.7, True),
                 ("rca_twin_auc", "RCA twin AUC", 0.7, False), ("avm_class_auc", "AVM class AUC", 0.7, False))


def guide_diagnostics_markdown(runs: dict[str, list[dict]]) -> str:
    """The selection diagnostics of every run that recorded them (STELLA's family on the synthetic
    benchmark): one row per seed and evaluation point, and per run key how many entries meet each of
    :data:`GUIDE_TARGETS`; empty when no run has them."""
    cols = [k for k, *_ in GUIDE_TARGETS] + ["video_object_recall_candidates"]
    names = [n for _, n, *_ in GUIDE_TARGETS] + ["video cand. recall"]
    out: list[str] = []
    for key in sorted(runs):
        group = [r for r in runs[key] if r.get("diagnostics")]
        if not group:
            continue
        out += ["", f"## {PRETTY.get(key, key)}", "", "| seed | after | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        met = {k: [0, 0] for k, *_ in GUIDE_TARGETS}
        for r in group:
            for e in r["diagnostics"]:
                cells = ["–" if e.get(c) is None else f"{float(e[c]):.2f}" for c in cols]
                out.append(f"| {r.get('seed', '?')} | {e.get('after', '?')} | " + " | ".join(cells) + " |")
                for k, _, thr, at_init in GUIDE_TARGETS:
                    if e.get(k) is not None and (at_init or e.get("after") not in ("init", "task0")):
                        met[k][0] += float(e[k]) >= thr
                        met[k][1] += 1
        out += ["", "Entries meeting each target: " + "; ".join(
            f"{n} ≥ {thr:g}: {met[k][0]} of {met[k][1]}" + ("" if at_init else " (from task1 on)")
            for k, n, thr, at_init in GUIDE_TARGETS if met[k][1]) + "."]
    if not out:
        return ""
    return ("# STELLA's guide, per evaluation point\n\nSelection diagnostics measured by each run on the "
            "stream's retrieval clips (generator ground truth; docs/diagnostics.md) before the stream "
            "(`init`) and after every task.\n" + "\n".join(out) + "\n")


# ------------------------------------------------------------------ verdicts on the paper's claims
class Comparison(NamedTuple):
    """One paired difference a claim is decided by: ``a − b`` of Avg ``metric`` ("A" or "F"; "D": the
    downstream columns of :data:`CLAIM7_COLUMNS`) between two run keys, claimed ``> 0`` (``side`` +1) or
    ``< 0`` (``side`` −1); ``label`` names it in the tables."""

    claim: int
    a: str
    b: str
    metric: str
    side: int
    label: str


#: the STELLA paper's claims that the comparison decides, by number (their comparisons: :func:`claim_comparisons`)
CLAIMS: dict[int, str] = {
    1: "STELLA's 𝒜 above each baseline", 2: "STELLA forgets least (ℱ below each baseline)",
    3: "STELLA+ above STELLA", 4: "LPIS and RCA each add over random patches, both together most",
    5: "STELLA ahead of DER++ at every memory size", 6: "STELLA+'s smaller items pay off at equal bytes",
    7: "STELLA's transfer and localisation above each baseline (downstream)"}

#: main-table keys that are no baseline of claims 1 and 2: STELLA, its variant, the upper bound, zero-shot
_NOT_BASELINES = ("stella", "stella_plus", "multitask", INITIAL)
#: short names of the ablation variants (their PRETTY names are too long for a difference's label)
_SHORT = {"stella_random": "random patches", "stella_lpis": "LPIS only", "stella_rca": "RCA only"}
_SYMBOL = {"A": "𝒜", "F": "ℱ", "D": "downstream"}
#: the verdict of a comparison whose runs exist but lack the statistic (e.g. ℱ of a single-row run)
NO_VALUE = "no value"
VERDICT_RULE = ("Rule, the same for every row: the claim's paired difference (Avg of R@1/5/10, percentage "
                "points) and its 95 % bootstrap interval, from the replicates of intervals.md (queries "
                "resampled within each task and shared by all methods; the seeds both methods ran drawn alike "
                "for both, a method with more seeds compared on the shared ones; so differences are paired over "
                "queries and seeds). Interval entirely on the claimed side of 0 → "
                "**supported**; entirely on the other side → **contradicted**; contains 0 → **not "
                "distinguishable**. A comparison without its runs is not decided (missing runs named). "
                "Claim 7 (downstream) uses its own bootstrap over the seeds both methods ran (at least 2) "
                "and the downstream test items, transfer clips or localisation frames, drawn alike for "
                "both methods, so its differences are paired over items and seeds too.")


def _short(key: str) -> str:
    return _SHORT.get(key, PRETTY.get(key, key))


#: claim 7's per-item outcomes in a run's downstream block: column -> (path to the per-item list, K for
#: ranks turned into hits, None for values already in percent)
CLAIM7_ITEMS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "transfer_a2v_R@5": (("transfer", "ranks", "a2v"), 5), "transfer_v2a_R@5": (("transfer", "ranks", "v2a"), 5),
    "miou_pixel": (("localise", "iou_pixel"), None), "miou_patch": (("localise", "iou_patch"), None)}
#: the downstream columns (:data:`DOWNSTREAM_COLUMNS`) claim 7 is decided on: zero-shot retrieval on data
#: outside the stream and sounding-object localisation
CLAIM7_COLUMNS = tuple(CLAIM7_ITEMS)


def _downstream_items(res: Mapping, column: str) -> np.ndarray | None:
    """Per-item scores (percent) of a claim-7 column in one run, whose mean is the column's value."""
    path, k = CLAIM7_ITEMS[column]
    x = _downstream_entry(res, path)
    if x is None:
        return None
    a = np.asarray(x, dtype=np.float64)
    return 100.0 * (a <= k) if k is not None else a


def downstream_paired_diff(runs: Mapping[str, list[dict]], a: str, b: str, column: str, *, level: float = 0.95,
                           n_boot: int = 2000, seed: int = 0) -> tuple[float, tuple[float, float]] | None:
    """Mean a − b of downstream ``column`` (:data:`CLAIM7_ITEMS`) over the seeds both run keys ran, and its
    bootstrap interval at ``level``, paired over seeds and items: each replicate draws the shared seeds
    and the test items (clips or frames; the same draw for both methods and every seed, as every run is
    tested on the same items) with replacement.

    None when a key is missing, when fewer than 2 seeds are shared, or when a shared run lacks the
    per-item outcomes (runs from before they were recorded: ``experiments/downstream_items.py`` adds them).
    """
    ia, ib = ({r.get("seed"): _downstream_items(r, column) for r in runs.get(k, [])} for k in (a, b))
    shared = sorted((s for s in ia if s in ib), key=str)
    if a == b or len(shared) < 2 or any(ia[s] is None or ib[s] is None for s in shared):
        return None
    sizes = {ia[s].size for s in shared} | {ib[s].size for s in shared}
    if len(sizes) != 1:
        raise ValueError(f"claim 7, {column}: runs of {a} and {b} hold different numbers of test items {sorted(sizes)}")
    diff = np.stack([ia[s] - ib[s] for s in shared])                 # (seeds, items)
    rng = np.random.default_rng(seed)
    n_seeds, n_items = diff.shape
    samples = np.empty(n_boot)
    for i0 in range(0, n_boot, 250):                                   # 250 replicates at a time: bounded memory
        m = min(250, n_boot - i0)
        items = rng.integers(0, n_items, size=(m, n_items))
        seeds = rng.integers(0, n_seeds, size=(m, n_seeds))
        per_seed = diff[:, items].mean(axis=2)                          # (seeds, m): each seed on the drawn items
        samples[i0:i0 + m] = np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)
    return float(diff.mean()), BS.interval(samples, level)


def claim_comparisons(keys: list[str], *, default_mem: int, mems: list[int], sizes: dict[str, int]
                      ) -> tuple[list[Comparison], dict[int, str]]:
    """The comparisons of :data:`CLAIMS`, and per claim whose comparisons cannot be named what it needs.

    :param keys: main-table keys (:func:`main_table_keys`): the baselines of claims 1-2 are those other
        than :data:`_NOT_BASELINES`, DER++ always first (the paper's reference, listed even when missing).
    :param default_mem: the preset's memory. :param mems: the sweep's sizes (claim 5; none: left out).
    :param sizes: buffer bytes per item (:func:`item_bytes`; claim 6 needs DER++'s and STELLA+'s; it is
        decided at the preset's memory and at each swept size).
    """
    base = ["derpp", *(k for k in keys if k not in (*_NOT_BASELINES, "derpp"))]
    comps = [Comparison(n, "stella", x, m, side, f"STELLA − {_short(x)}")
             for n, m, side in ((1, "A", 1), (2, "F", -1)) for x in base]
    comps.append(Comparison(3, "stella_plus", "stella", "A", 1, "STELLA+ − STELLA"))
    comps += [Comparison(4, a, b, "A", 1, f"{_short(a)} − {_short(b)}") for a, b in
              (("stella_lpis", "stella_random"), ("stella_rca", "stella_random"), ("stella", "stella_lpis"),
               ("stella", "stella_rca"))]
    comps += [Comparison(7, "stella", x, "D", 1, f"STELLA − {_short(x)}") for x in base]
    comps += [Comparison(5, mem_key("stella", m, default_mem), mem_key("derpp", m, default_mem), "A", 1,
                         f"STELLA − DER++ (M = {m})") for m in mems]
    # claim 6 at the preset's memory and at every swept size: STELLA+ with the items that fit the bytes of
    # M DER++ items against DER++ with M items (the swept DER++ runs are that size's own keys); the
    # equal-bytes run key needs both item sizes, read from complete runs
    need = [k for k in ("derpp", "stella_plus") if k not in sizes]
    for m in sorted({default_mem, *mems}) if not need else ():
        eq_m = equal_bytes_items(m, sizes)
        comps.append(Comparison(6, mem_key("stella_plus", eq_m, default_mem), mem_key("derpp", m, default_mem),
                                "A", 1, f"STELLA+ at DER++ bytes ({eq_m} items) − DER++ (M = {m})"))
    # no angle brackets in these texts: markdown would take "<M>" for an HTML tag
    left_out = {} if mems else {5: "memory-sweep runs (keys such as derpp-mem100, stella-mem100; compare.py "
                                   "--mem-sizes)"}
    if need:
        left_out[6] = (f"{' and '.join(need)} runs (their bytes per item give the equal-bytes run key, whose runs "
                       "compare.py --mem-sizes then plans)")
    return comps, left_out


def verdict_rows(boot: dict[str, BS.BootstrapResult], comps: list[Comparison], left_out: dict[int, str],
                 present: set[str], runs: Mapping[str, list[dict]] | None = None) -> list[dict]:
    """Rows of verdicts.md / .csv in claim order: one per comparison and direction (for a downstream
    comparison, per column of :data:`CLAIM7_COLUMNS`, decided from ``runs`` by
    :func:`downstream_paired_diff`); one per comparison whose runs (keys not in ``present``) are missing,
    and one per claim left out (``comparison`` None).

    Each row: ``claim``, ``comparison`` (or None), ``direction`` (a DIRS key or a downstream column key;
    or None), ``diff`` (point, interval) or None, ``verdict`` and ``missing`` (what is missing, "" when
    decided).
    """
    rows = [{"claim": n, "comparison": None, "direction": None, "diff": None, "verdict": BS.MISSING_RUNS,
             "missing": why} for n, why in left_out.items()]
    for c in comps:
        missing = [k for k in dict.fromkeys((c.a, c.b)) if k not in present]
        if missing:
            rows.append({"claim": c.claim, "comparison": c, "direction": None, "diff": None,
                         "verdict": BS.MISSING_RUNS, "missing": " ".join(missing)})
            continue
        for d in (CLAIM7_COLUMNS if c.metric == "D" else dict(DIRS)):
            x = (downstream_paired_diff(runs or {}, c.a, c.b, d) if c.metric == "D"
                 else paired_diff(boot[d], c.a, c.b, c.metric))
            rows.append({"claim": c.claim, "comparison": c, "direction": d, "diff": x,
                         "verdict": NO_VALUE if x is None else BS.decide(x[1], c.side), "missing": ""})
    return sorted(rows, key=lambda r: r["claim"])   # stable: comparisons keep their order within a claim


def _direction_text(d: str) -> str:
    """A2V / V2A's arrows, or a downstream column's header."""
    return dict(DIRS).get(d) or DOWNSTREAM_COLUMNS[d][0]


def _verdict_cells(r: dict) -> list[str]:
    """claim, difference, direction, claimed, Δ [interval], verdict of a row, as verdicts.md prints them."""
    c: Comparison | None = r["comparison"]
    x = r["diff"]
    verdict = r["verdict"] + (f": {r['missing']}" if r["missing"] else "")
    return [f"{r['claim']}. {CLAIMS[r['claim']]}", "–" if c is None else f"{_SYMBOL[c.metric]} {c.label}",
            "–" if r["direction"] is None else _direction_text(r["direction"]),
            "–" if c is None else ("> 0" if c.side > 0 else "< 0"),
            "–" if x is None else f"{x[0]:+.2f} {_ci_text(x[1])}", verdict]


def write_verdicts(rows: list[dict], out: Path) -> str:
    """verdicts.md (summary count, the rule, one table) and verdicts.csv (the same rows) in ``out``."""
    lines = ["# Verdicts on the paper's claims", "", BS.verdict_summary([r["verdict"] for r in rows]) + ".", "",
             VERDICT_RULE, "", "| claim | difference | direction | claimed | Δ [95 % interval] | verdict |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_verdict_cells(r)) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    with atomic_write(out / "verdicts.md") as fh:
        fh.write(md)
    with atomic_write(out / "verdicts.csv") as fh:
        w = csv.writer(fh, lineterminator="\n")   # claim texts hold commas and quotes
        w.writerow(["claim", "claim_text", "comparison", "a", "b", "metric", "claimed", "direction", "diff",
                    "ci_lo", "ci_hi", "verdict", "missing"])
        for r in rows:
            c, x = r["comparison"], r["diff"]
            w.writerow([r["claim"], CLAIMS[r["claim"]], *(("",) * 5 if c is None else
                        (c.label, c.a, c.b, c.metric, "> 0" if c.side > 0 else "< 0")), r["direction"] or "",
                        *(("",) * 3 if x is None else (f"{x[0]:.4f}", f"{x[1][0]:.4f}", f"{x[1][1]:.4f}")),
                        r["verdict"], r["missing"]])
    return md


def write_statistics(out: Path, runs: dict[str, list[dict]], keys: list[str], *, n_boot: int, default_mem: int,
                     mem_sizes: list[int] | None = None, queries_per_task: int | None = None) -> None:
    """intervals.md/.csv, power.md, verdicts.md/.csv and, when their runs exist, ablation.md and the memory
    sweep.

    :param out: the comparison directory.
    :param runs: complete results per run key (:func:`load_runs`).
    :param keys: run keys of the main comparison (:func:`main_table_keys`).
    :param n_boot: bootstrap replicates.
    :param default_mem: the preset's replay memory (its runs are the sweep's runs at that size).
    :param mem_sizes: memory sizes of the sweep (default: those found under ``runs``).
    :param queries_per_task: queries per task of runs without ranks (power estimate; default from their config).
    """
    boot = bootstrap_all(runs, n_boot=n_boot)
    print(write_intervals(interval_rows(boot, keys), boot, out, runs))
    parts = {"seeds": bootstrap_all(runs, n_boot=n_boot, resample_queries=False),
             "queries": bootstrap_all(runs, n_boot=n_boot, resample_seeds=False)}
    power = power_report(boot, keys, runs, queries_per_task, parts=parts)
    with atomic_write(out / "power.md") as fh:
        fh.write(power)
    print(power)
    guide = guide_diagnostics_markdown(runs)
    if guide:
        with atomic_write(out / "guide_diagnostics.md") as fh:
            fh.write(guide)
    ablation = ablation_markdown(boot)
    if ablation is not None:
        with atomic_write(out / "ablation.md") as fh:
            fh.write(ablation)
        print(ablation)
    mems = list(mem_sizes or []) or sweep_sizes(runs, default_mem)   # re-aggregation finds the sweep itself
    sizes = item_bytes(out)
    if mems:
        srows = sweep_rows(runs, boot, mems, default_mem, sizes)
        print(write_sweep(srows, mems, sizes, out, boot))
        plot_sweep(srows, out)
    comps, left_out = claim_comparisons(keys, default_mem=default_mem, mems=mems, sizes=sizes)
    print(write_verdicts(verdict_rows(boot, comps, left_out, set(runs), runs), out))
