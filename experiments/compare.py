#!/usr/bin/env python
"""Compare strategies x seeds on one benchmark: run what is missing, then write the tables and plots.

    python experiments/compare.py --out docs/results/synthetic --jobs 2         # all 11 strategies, seeds 0 1 2
    python experiments/compare.py --strategies finetune stella --seeds 0 1 --out runs/cmp
    python experiments/compare.py --out docs/results/synthetic --aggregate-only  # re-aggregate, no training

Runs go to ``<out>/runs/<strategy>/seed<seed>/`` (one ``run_stella.py`` process each; ``--jobs N`` runs
N of them side by side, splitting the CPU threads between them).
A run whose results.json is complete is skipped; an interrupted one is resumed from its checkpoint,
so an interrupted comparison continues where it stopped. Outputs in ``<out>``: ``comparison.md``,
``comparison.csv`` (mean ± std over seeds, population std as in the official scripts), ``cost.md``,
``bars_<dir>.png`` (𝒜 / ℱ per strategy) and ``task_recall_<dir>.png`` (final per-task recall).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stella_avalanche.training.strategies import STRATEGY_NAMES  # noqa: E402
from stella_avalanche.utils import atomic_write  # noqa: E402

DIRS = (("a2v", "A→V"), ("v2a", "V→A"))
COLS = ("R@1", "R@5", "R@10", "Avg")
PAPER_ORDER = ("finetune", "er", "mir", "derpp", "gmed", "clser", "lump", "esmer", "stella", "stella_plus",
               "multitask")
PRETTY = {"finetune": "Finetune", "er": "ER", "mir": "MIR", "derpp": "DER++", "gmed": "GMED",
          "clser": "CLS-ER", "lump": "LUMP", "esmer": "ESMER", "stella": "STELLA", "stella_plus": "STELLA+",
          "multitask": "Multitask"}


def _complete(res: Path) -> bool:
    try:
        return bool(json.loads(res.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def pending_runs(args: argparse.Namespace) -> list[tuple[str, int, list[str]]]:
    """``(strategy, seed, command)`` for every run whose results.json is missing or incomplete.

    With ``--jobs N > 1`` and no explicit ``train.threads`` override each run gets
    ``cpu_count // N`` threads, so N runs side by side do not oversubscribe the cores.
    """
    overrides = list(args.overrides)
    jobs = max(1, args.jobs)
    if jobs > 1 and not any(o.startswith("train.threads=") for o in overrides):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}")
    todo = []
    for strategy in args.strategies:
        for seed in args.seeds:
            out = args.out / "runs" / strategy / f"seed{seed}"
            if _complete(out / "results.json"):
                print(f"[skip] {strategy} seed {seed}: complete", flush=True)
                continue
            cmd = [sys.executable, str(ROOT / "experiments" / "run_stella.py"), "--strategy", strategy,
                   "--benchmark", args.benchmark, "--seed", str(seed), "--out", str(out), "--device", args.device,
                   "--resume", "--quiet"]
            if args.config:
                cmd += ["--config", args.config]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            todo.append((strategy, seed, cmd + overrides))
    return todo


def _launch(cmd: list[str], tag: str, prefix: bool) -> int:
    """Run one ``run_stella.py`` process; with ``prefix`` its output lines are tagged (parallel jobs)."""
    if not prefix:
        return subprocess.run(cmd).returncode
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{tag}] {line}", end="", flush=True)
    return proc.returncode


def run_missing(args: argparse.Namespace, launch: Callable[[list[str], str, bool], int] = _launch) -> list[str]:
    """Run the pending runs, ``args.jobs`` at a time; returns the tags of the runs that failed.

    Runs sharing a data set or initialisation that is not cached yet wait for one builder (an
    inter-process lock in the library), so starting several at once on a fresh machine is safe.
    """
    todo = pending_runs(args)
    jobs = max(1, args.jobs)

    def one(item: tuple[str, int, list[str]]) -> str | None:
        strategy, seed, cmd = item
        tag = f"{strategy} s{seed}"
        print(f"[run] {strategy} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        rc = launch(cmd, tag, jobs > 1)
        if rc != 0:
            print(f"[fail] {strategy} seed {seed} exited {rc}; continuing", flush=True)
            return tag
        return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [t for t in pool.map(one, todo) if t is not None]
    return failed


def load_runs(out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for res in sorted(out.glob("runs/*/seed*/results.json")):
        r = json.loads(res.read_text())
        if r.get("complete"):
            runs.setdefault(r["strategy"], []).append(r)
    return runs


def _stat(values: list) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())  # population std, as the official aggregation


def aggregate(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for s in [s for s in PAPER_ORDER if s in runs] + sorted(set(runs) - set(PAPER_ORDER)):
        row = {"strategy": s, "seeds": len(runs[s])}
        for d, _ in DIRS:
            for c in COLS:
                for m in ("A", "F"):
                    row[f"{d}/{c}/{m}"] = _stat([r["summary"][d][c][m] for r in runs[s]])
        for key in ("samples_per_second", "peak_memory_bytes", "buffer_bytes", "train_seconds"):
            row[f"cost/{key}"] = _stat([r.get("cost", {}).get(key) for r in runs[s]])
        rows.append(row)
    return rows


def _fmt(ms: tuple[float, float], bold: bool = False) -> str:
    m, s = ms
    if np.isnan(m):
        return "–"
    txt = f"{m:.2f} ± {s:.2f}"
    return f"**{txt}**" if bold else txt


def write_tables(rows: list[dict], out: Path, benchmark: str) -> str:
    # best per column: highest A (continual methods and multitask alike), lowest F
    best = {}
    for d, _ in DIRS:
        for c in COLS:
            a = [(r[f"{d}/{c}/A"][0], r["strategy"]) for r in rows if not np.isnan(r[f"{d}/{c}/A"][0])]
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
    md = "\n".join(lines) + "\n"
    with atomic_write(out / "comparison.md") as fh:
        fh.write(md)
    with atomic_write(out / "comparison.csv") as fh:
        keys = [k for k in rows[0] if "/" in k] if rows else []
        fh.write("strategy,seeds," + ",".join(f"{k}/mean,{k}/std" for k in keys) + "\n")
        for r in rows:
            fh.write(f"{r['strategy']},{r['seeds']}," + ",".join(f"{r[k][0]:.4f},{r[k][1]:.4f}" for k in keys) + "\n")
    cost = ["# Training cost", "", "| method | samples/s | peak memory (MB) | buffer bytes / item | train time (s) |",
            "|---|---|---|---|---|"]
    for r in rows:
        sps, mem, buf, sec = (r[f"cost/{k}"] for k in ("samples_per_second", "peak_memory_bytes", "buffer_bytes",
                                                       "train_seconds"))
        cost.append(f"| {PRETTY.get(r['strategy'], r['strategy'])} | {sps[0]:.1f} | {mem[0] / 2**20:.0f} | "
                    f"{buf[0]:,.0f} | {sec[0]:.0f} |")
    with atomic_write(out / "cost.md") as fh:
        fh.write("\n".join(cost) + "\n")
    return md


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
                   color=["C3" if rows[i]["strategy"].startswith("stella") else "C0" for i in ok])
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="*", default=list(STRATEGY_NAMES), choices=STRATEGY_NAMES)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--benchmark", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--jobs", type=int, default=1,
                   help="runs side by side (each gets cpu_count // jobs threads unless train.threads= is given)")
    p.add_argument("--aggregate-only", action="store_true", help="only re-aggregate existing results.json files")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = [] if args.aggregate_only else run_missing(args)
    runs = load_runs(args.out)
    if not runs:
        print(f"no complete results under {args.out}/runs", file=sys.stderr)
        return 1
    rows = aggregate(runs)
    print(write_tables(rows, args.out, args.benchmark))
    plot(rows, runs, args.out)
    print(f"wrote {args.out}/comparison.md, comparison.csv, cost.md and plots")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun the same command to resume them)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
