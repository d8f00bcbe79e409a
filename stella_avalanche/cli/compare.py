"""Compare strategies x seeds on one benchmark: run what is missing, then write the tables and plots.

The command line and run scheduler of :mod:`stella_avalanche.evaluation.comparison`.

    python experiments/compare.py --out docs/results/synthetic --jobs 2         # all 11 strategies, seeds 0 1 2
    python experiments/compare.py --strategies finetune stella --seeds 0 1 --out runs/cmp
    python experiments/compare.py --out docs/results/synthetic --aggregate-only  # re-aggregate, no training
    python experiments/compare.py --out runs/cmp --ablation --mem-sizes 100 200 400   # + ablation, memory sweep
    python experiments/compare.py --out runs/cmp --seeds-for finetune,derpp=0,1,2,3,4 # more seeds for some

On the synthetic benchmark seed s of every strategy starts from the initialisation trained with seed s
(``--init per-seed``, the default; each build is cached once and shared by the strategies of that
seed); ``--init shared`` starts every seed from one build, as the comparisons before issue 24 did.

Runs go to ``<out>/runs/<key>/seed<seed>/`` (one ``run_stella.py`` process each; ``--jobs N`` runs
N of them side by side, splitting the CPU threads between them). The key is the strategy name, or
``<strategy>-mem<M>`` for a memory-sweep run whose memory differs from the preset's.
A run whose results.json is complete is skipped; an interrupted one is resumed from its checkpoint,
so an interrupted comparison continues where it stopped. Outputs in ``<out>``: ``comparison.md``,
``comparison.csv`` (mean ± std over seeds, population std as in the official scripts), ``cost.md``,
``bars_<dir>.png`` (𝒜 / ℱ per strategy) and ``task_recall_<dir>.png`` (final per-task recall);
``intervals.md`` / ``intervals.csv`` (95 % bootstrap intervals of Avg 𝒜 and ℱ, paired differences to
DER++ and to finetune, see ``stella_avalanche/evaluation/bootstrap.py``); ``power.md`` (interval widths
against the target of a quarter of the multitask − finetune gap); ``verdicts.md`` / ``verdicts.csv`` (each
claim of the paper decided by its paired interval: supported, contradicted or not distinguishable, or the
runs it misses); with ``--ablation`` ``ablation.md``;
with ``--mem-sizes`` ``mem_sweep.md`` and ``mem_sweep.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from stella_avalanche.evaluation.comparison import (ABLATION_TABLE, SWEEP_STRATEGIES, aggregate, equal_bytes_items,
                                                     item_bytes, load_runs, main_table_keys, mem_key, plot,
                                                     write_statistics, write_tables)
from stella_avalanche.training.strategies import MAIN_STRATEGIES, REGISTRY, STRATEGY_NAMES

__all__ = ["main", "build_parser", "parse_seeds_for", "default_mem_size", "planned_runs", "pending_runs",
           "run_missing", "per_seed_initialisation", "TRAIN_SEED_KEY"]

#: the run script each scheduled run executes (this package lives in the repository beside experiments/)
RUN_SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "run_stella.py"


def _complete(res: Path) -> bool:
    try:
        return bool(json.loads(res.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def parse_seeds_for(specs: list[str]) -> dict[str, list[int]]:
    """``["finetune,derpp=0,1,2,3,4", ...]`` -> ``{"finetune": [0..4], "derpp": [0..4]}``."""
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        names, sep, seeds = spec.partition("=")
        try:
            values = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            values = []
        if not sep or not values:
            raise SystemExit(f"--seeds-for {spec!r}: expected NAME[,NAME...]=SEED[,SEED...]")
        for n in names.split(","):
            if n not in REGISTRY:
                raise SystemExit(f"--seeds-for {spec!r}: unknown strategy {n!r}")
            out[n] = values
    return out

def default_mem_size(args: argparse.Namespace) -> int:
    """The preset's ``strategy.params.mem_size`` after the ``key=value`` overrides."""
    from stella_avalanche.experiment import load_config

    cfg = load_config(args.config, benchmark=args.benchmark, overrides=list(args.overrides))
    return int((cfg.get("strategy", {}).get("params") or {}).get("mem_size", 0))

def planned_runs(args: argparse.Namespace) -> list[tuple[str, str, int, list[str]]]:
    """``(key, strategy, seed, extra overrides)`` of every run of the comparison, in launch order.

    The strategies x seeds of ``--strategies`` (``--seeds-for`` replaces the seeds of some), with
    ``--ablation`` the ablation variants, with ``--mem-sizes`` DER++, STELLA and STELLA+ at every memory
    size and STELLA+ at DER++'s byte budget (once both item sizes are known from complete runs).
    """
    seeds_for = parse_seeds_for(getattr(args, "seeds_for", None) or [])
    sweep_seeds = getattr(args, "sweep_seeds", None) or args.seeds
    names = list(args.strategies)
    if getattr(args, "ablation", False):
        names += [n for n in ABLATION_TABLE if n not in names]
    plan: list[tuple[str, str, int, list[str]]] = []
    seen: set[tuple[str, int]] = set()

    def add(key: str, strategy: str, seeds: list[int], extra: list[str]) -> None:
        for seed in seeds:
            if (key, seed) not in seen:
                seen.add((key, seed))
                plan.append((key, strategy, seed, extra))

    for n in names:
        add(n, n, seeds_for.get(n, list(args.seeds)), [])
    mems = getattr(args, "mem_sizes", None) or []
    if mems:
        default_mem = default_mem_size(args)
        for mem in mems:
            for n in SWEEP_STRATEGIES:
                add(mem_key(n, mem, default_mem), n, sweep_seeds,
                    [] if mem == default_mem else [f"strategy.params.mem_size={mem}"])
        sizes = item_bytes(args.out)
        for mem in mems:
            eq = equal_bytes_items(mem, sizes)
            if eq is not None:
                add(mem_key("stella_plus", eq, default_mem), "stella_plus", sweep_seeds,
                    [] if eq == default_mem else [f"strategy.params.mem_size={eq}"])
    return plan

#: the override that picks the synthetic initialisation's training seed (stage 1 and stage 2)
TRAIN_SEED_KEY = "init.schedule.train_seed"


def per_seed_initialisation(args: argparse.Namespace) -> bool:
    """Whether seed s of every strategy starts from the initialisation trained with seed s.

    On the synthetic benchmark with ``--init per-seed`` (the default) a comparison's seeds also cover
    the initialisation: the same configuration built on another machine moves a run by more than the
    seed spread of runs sharing one build. Each build is cached once and shared by all strategies of
    that seed, so differences between strategies stay paired. Left off with ``--init shared``, on real
    data (the initialisation is a given checkpoint) and when an override already sets the training seed.
    """
    if getattr(args, "init", "per-seed") != "per-seed" or args.benchmark != "synthetic":
        return False
    return not any(o.startswith(f"{TRAIN_SEED_KEY}=") for o in args.overrides)


def pending_runs(args: argparse.Namespace) -> list[tuple[str, int, list[str]]]:
    """``(key, seed, command)`` for every planned run whose results.json is missing or incomplete.

    With ``--jobs N > 1`` and no explicit ``train.threads`` override each run gets
    ``cpu_count // N`` threads, so N runs side by side do not oversubscribe the cores.
    """
    overrides = list(args.overrides)
    jobs = max(1, args.jobs)
    if jobs > 1 and not any(o.startswith("train.threads=") for o in overrides):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}")
    per_seed_init = per_seed_initialisation(args)
    todo = []
    for key, strategy, seed, extra in planned_runs(args):
        if per_seed_init:
            extra = [*extra, f"{TRAIN_SEED_KEY}={seed}"]
        out = args.out / "runs" / key / f"seed{seed}"
        if _complete(out / "results.json"):
            print(f"[skip] {key} seed {seed}: complete", flush=True)
            continue
        cmd = [sys.executable, str(RUN_SCRIPT), "--strategy", strategy,
               "--benchmark", args.benchmark, "--seed", str(seed), "--out", str(out), "--device", args.device,
               "--resume", "--quiet"]
        if args.config:
            cmd += ["--config", args.config]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        todo.append((key, seed, cmd + overrides + extra))
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
    if todo and not failed and getattr(args, "mem_sizes", None):
        # the equal-byte STELLA+ runs are planned once both item sizes are known from complete runs
        more = [t for t in pending_runs(args) if (t[0], t[1]) not in {(k, s) for k, s, _ in todo}]
        if more:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                failed = [t for t in pool.map(one, more) if t is not None]
    return failed


def build_parser() -> argparse.ArgumentParser:
    """The comparison's argument parser."""
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="*", default=list(MAIN_STRATEGIES), choices=STRATEGY_NAMES,
                   help="default: the 11 strategies of the main table")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--seeds-for", nargs="*", default=[], metavar="NAMES=SEEDS",
                   help="other seeds for some strategies, e.g. finetune,derpp,stella=0,1,2,3,4")
    p.add_argument("--ablation", action="store_true",
                   help="also run the STELLA component ablation (stella_random, stella_lpis, stella_rca)")
    p.add_argument("--mem-sizes", nargs="*", type=int, default=[], metavar="M",
                   help="memory sweep of DER++, STELLA and STELLA+ (and STELLA+ at DER++'s byte budget)")
    p.add_argument("--sweep-seeds", nargs="*", type=int, default=None, help="seeds of the memory sweep "
                   "(default: --seeds)")
    p.add_argument("--init", choices=("per-seed", "shared"), default="per-seed",
                   help="synthetic benchmark: seed s starts from the initialisation trained with seed s "
                        "(per-seed, default: the intervals then cover the initialisation's variance), or every "
                        "seed from the data seed's build (shared)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of the intervals")
    p.add_argument("--queries-per-task", type=int, default=None,
                   help="retrieval queries per task of runs without ranks (power.md estimate; default: from the "
                        "synthetic preset in their config)")
    p.add_argument("--benchmark", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--jobs", type=int, default=1,
                   help="runs side by side (each gets cpu_count // jobs threads unless train.threads= is given)")
    p.add_argument("--aggregate-only", action="store_true", help="only re-aggregate existing results.json files")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run what is missing (unless ``--aggregate-only``), then write the tables and plots.

    :param argv: command-line arguments (default: ``sys.argv[1:]``).
    :returns: the exit status: 1 when no run is complete or a run failed.
    """
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = [] if args.aggregate_only else run_missing(args)
    runs = load_runs(args.out)
    if not runs:
        print(f"no complete results under {args.out}/runs", file=sys.stderr)
        return 1
    keys = main_table_keys(runs)
    rows = aggregate(runs, keys)
    print(write_tables(rows, args.out, args.benchmark))
    plot(rows, runs, args.out)
    write_statistics(args.out, runs, keys, n_boot=args.n_boot, default_mem=default_mem_size(args),
                     mem_sizes=args.mem_sizes, queries_per_task=args.queries_per_task)
    print(f"wrote {args.out}/comparison.md, comparison.csv, cost.md, intervals.md, power.md and plots")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun the same command to resume them)",
              file=sys.stderr)
        return 1
    return 0
