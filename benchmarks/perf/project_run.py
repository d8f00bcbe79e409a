#!/usr/bin/env python
"""The whole Continual-VS and Continual-AS runs on one GPU, projected from measured rates.

Reads one or more ``e2e_media.py`` JSONs (end-to-end and device-resident samples/s per strategy and
batch, loader start-up, evaluation time, checkpoint time, scenario build time) and the paper's run
settings from the package (the configs ``vggsound_paper`` / ``audioset_paper``, the split rules and
tables), and writes, per benchmark and strategy::

    steps_t  = floor(n_t / B) if n_t > B else 1               (the training loader drops a ragged tail)
    train    = sum_t E * (steps_t * B / r_e2e + s_start)       (one loader start per epoch: workers are not kept)
    eval     = (T + 1) * (R * e_clip + e_recall * (R / R_m)^2) (zero-shot row + one per task; recall is O(R^2))
    ckpt     = (floor(sum_t E * steps_t / every) + T) * s_ckpt (every ``every`` iterations + after each task)
    setup    = (N_train + N_test + N_retrieval) * s_build       (split CSVs, media checks, cache build if any)
    total    = setup + train + eval + ckpt

with n_t the training clips of task t, T tasks, E epochs, B the batch, r_e2e the measured
end-to-end samples/s of the strategy at B (the nearest measured batch otherwise, flagged), s_start
the measured time from ``train()`` to the first batch, R the retrieval clips, e_clip the measured
evaluation seconds per retrieval clip (embedding, loader) and e_recall the measured pooled-recall
seconds at R_m clips, s_ckpt one checkpoint's seconds, s_build the scenario build seconds per clip.
Beside it, ``train_device`` is the same training term at the device-resident rate (the step fed
from memory: the floor the data path can reach), and with ``--suite`` a gpu_suite JSON's step-only
rate interpolated at B. STELLA's overhead over DER++ is the difference of their totals (its
pre-pass, AVM step and selection are inside its measured rate).

Every input is written out with the place it comes from. Continual-AS's training clip counts are
not in the package (they depend on which AudioSet clips a user has): give ``--as-report`` (the
prepare step's ``audioset_prepare_report.json``) or ``--as-train-clips``; without them the AS rows
assume 1000 training clips per task (flagged as a placeholder). Works on a ``--smoke`` JSON too (the
numbers are then meaningless; the code path is the same).

    python benchmarks/perf/project_run.py e2e.json --out projection.json
    python benchmarks/perf/project_run.py e2e.json --suite docs/results/gpu/2026-11-30_suite_full.json \\
        --vs-report /data/vgg_prepare_report.json --as-train-clips 20000
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FORMULA = [
    "steps_t = floor(n_t / B) if n_t > B else 1",
    "train = sum_t E * (steps_t * B / r_e2e + s_start)",
    "eval = (T + 1) * (R * e_clip + e_recall * (R / R_m)^2)",
    "ckpt = (floor(sum_t E * steps_t / every) + T) * s_ckpt",
    "setup = (N_train + N_test + N_retrieval) * s_build",
    "total = setup + train + eval + ckpt",
]
#: training clips per task assumed where the package has no count (Continual-AS without a report)
PLACEHOLDER_CLIPS = 1000
#: the issue's target for the whole Continual-VS run on one H200 (hours)
VS_TARGET_HOURS = 2.0


@dataclass
class Setting:
    """The paper's run of one benchmark, each number with where it comes from.

    :param name: ``continual_vs`` / ``continual_as``.
    :param tasks: task names in stream order.
    :param epochs: epochs per task (E).
    :param batch: current batch on one device (B).
    :param train_clips: training clips per task (n_t), or None when unknown.
    :param test_clips: eval clips per task (read at build time only; the runner never evaluates them).
    :param retrieval_clips: retrieval clips per task (their sum is R).
    :param every: checkpoint interval in iterations.
    :param sources: field -> where its value comes from.
    """

    name: str
    tasks: list[str]
    epochs: int
    batch: int
    train_clips: list[int] | None
    test_clips: list[int] | None
    retrieval_clips: list[int]
    every: int
    sources: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the paper's settings
def _config(preset: str) -> dict:
    from stella_avalanche.config import load_config

    return load_config(preset)


def _report_counts(path: str | None, tasks: Sequence[str]) -> dict[str, list[int]] | None:
    """Per-task ``train`` / ``eval`` / ``retrieval`` counts of a prepare report, in task order."""
    if not path:
        return None
    counts = json.loads(Path(path).read_text())["counts"]
    return {k: [int(counts[t].get(k, 0)) for t in tasks] for k in ("train", "eval", "retrieval")}


def vggsound_setting(report: str | None = None) -> Setting:
    """Continual-VS: 8 tasks; without a prepare report, the split rule's upper bound of training clips
    (20 trained classes x 400 clips per task) and 5 retrieval clips for every class of a task."""
    import csv
    import inspect

    from stella_avalanche.benchmarks.splits import VGGSOUND_TASKS, prepare_vggsound_splits
    from stella_avalanche.resources import as_path, split_table

    cfg = _config("vggsound_paper")
    tasks = list(VGGSOUND_TASKS)
    src = {"tasks": "VGGSOUND_TASKS, stella_avalanche/benchmarks/splits.py (docs/benchmarks.md §3.1)",
           "epochs": "train.epochs, stella_avalanche/configs/vggsound_paper.yaml (docs/method.md §7)",
           "batch": "train.batch_size, stella_avalanche/configs/vggsound_paper.yaml (one device: 4 x 12)",
           "every": "checkpoint.every_n_iterations, stella_avalanche/configs/vggsound_paper.yaml",
           "evaluations": "T + 1: the zero-shot row, then one after every task (stella_avalanche/experiment.py, "
                          "_train_and_evaluate), each over the whole retrieval stream"}
    counts = _report_counts(report, tasks)
    if counts is not None:
        train, test, retr = counts["train"], counts["eval"], counts["retrieval"]
        src["train_clips"] = src["retrieval_clips"] = src["test_clips"] = f"prepare report {Path(report).name}"
    else:
        defaults = inspect.signature(prepare_vggsound_splits).parameters
        cpt, mpc = defaults["classes_per_task"].default, defaults["max_per_class"].default
        with as_path(split_table("vggsound_categories.csv")) as p, open(p, newline="", encoding="utf-8") as fh:
            per_task = [r["task"] for r in csv.DictReader(fh)]
        classes = [per_task.count(t) for t in tasks]
        train = [cpt * mpc] * len(tasks)
        retr = [5 * c for c in classes]
        test = None
        src["train_clips"] = (f"upper bound {cpt} trained classes x {mpc} clips per task: prepare_vggsound_splits "
                              "defaults classes_per_task / max_per_class (docs/benchmarks.md §3.1); fewer where a "
                              "class has fewer clips: pass --vs-report for a real split")
        src["retrieval_clips"] = ("5 per class x every class of the task (vggsound_categories.csv: "
                                  + ", ".join(f"{t} {c}" for t, c in zip(tasks, classes))
                                  + "; docs/benchmarks.md §3.1)")
        src["test_clips"] = "not counted (read at build time only; the runner never evaluates them)"
    return Setting("continual_vs", tasks, int(cfg["train"]["epochs"]), int(cfg["train"]["batch_size"]), train, test,
                   retr, int(cfg["checkpoint"]["every_n_iterations"]), src)


def audioset_setting(report: str | None = None, train_clips: Sequence[int] | None = None) -> Setting:
    """Continual-AS: 7 tasks; training clips from a prepare report or ``train_clips`` (one number per
    task, or one for all), else unknown; retrieval at most 5 per leaf class of ``audioset_tasks.csv``."""
    import csv

    from stella_avalanche.benchmarks.splits import AUDIOSET_TASKS
    from stella_avalanche.resources import as_path, split_table

    cfg = _config("audioset_paper")
    tasks = list(AUDIOSET_TASKS)
    src = {"tasks": "AUDIOSET_TASKS, stella_avalanche/benchmarks/splits.py (docs/benchmarks.md §3.2)",
           "epochs": "train.epochs, stella_avalanche/configs/audioset_paper.yaml (docs/method.md §7)",
           "batch": "train.batch_size, stella_avalanche/configs/audioset_paper.yaml (one device: 4 x 9)",
           "every": "checkpoint.every_n_iterations, stella_avalanche/configs/audioset_paper.yaml",
           "evaluations": "T + 1 (stella_avalanche/experiment.py, _train_and_evaluate)"}
    counts = _report_counts(report, tasks)
    test = None
    if counts is not None:
        train, test, retr = counts["train"], counts["eval"], counts["retrieval"]
        src["train_clips"] = src["retrieval_clips"] = src["test_clips"] = f"prepare report {Path(report).name}"
    else:
        with as_path(split_table("audioset_tasks.csv")) as p, open(p, newline="", encoding="utf-8") as fh:
            leaves = [r["task"] for r in csv.DictReader(fh) if r.get("role", "leaf") == "leaf"]
        retr = [5 * leaves.count(t) for t in tasks]
        src["retrieval_clips"] = ("upper bound 5 per leaf class (audioset_tasks.csv, 161 leaves; the filtered "
                                  "5-per-class list keeps fewer: docs/benchmarks.md §3.2)")
        src["test_clips"] = "not counted"
        if train_clips:
            vals = [int(x) for x in train_clips]
            train = vals * len(tasks) if len(vals) == 1 else vals
            if len(train) != len(tasks):
                raise SystemExit(f"--as-train-clips: give 1 or {len(tasks)} numbers, got {len(vals)}")
            src["train_clips"] = "--as-train-clips (given)"
        else:
            train = None
            src["train_clips"] = ("not in the package (depends on the AudioSet clips a user has): pass --as-report "
                                  "(audioset_prepare_report.json) or --as-train-clips; rows assume 1000 "
                                  "training clips per task")
    return Setting("continual_as", tasks, int(cfg["train"]["epochs"]), int(cfg["train"]["batch_size"]), train, test,
                   retr, int(cfg["checkpoint"]["every_n_iterations"]), src)


# ------------------------------------------------------------------------------------ measured rates
def load_measurements(paths: Sequence[str]) -> dict[str, Any]:
    """Runs, evaluations and scenario builds of the e2e JSONs (a later file's (strategy, batch) wins; its
    checkpoint time, if it measured none, is the earlier file's)."""
    runs: dict[tuple[str, int], dict] = {}
    evals: list[dict] = []
    scen: list[dict] = []
    metas = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        meta = {k: d["meta"].get(k) for k in ("device_name", "torch", "commit", "smoke")}
        metas.append({"file": Path(p).name, **meta,
                      "model": d["inputs"].get("model"), "workers": d["inputs"].get("workers"),
                      "cache": d["inputs"].get("cache")})
        for r in d["runs"]:
            key = (r["strategy"], int(r["batch"]))
            if key in runs and "checkpoint" in runs[key] and "checkpoint" not in r:
                r = {**r, "checkpoint": runs[key]["checkpoint"]}  # a rerun without (e) keeps the earlier one
            runs[key] = r
        evals += d.get("eval", [])
        if d.get("scenario"):
            scen.append(d["scenario"])
    return {"runs": runs, "eval": evals, "scenario": scen, "meta": metas}


def pick_run(runs: dict[tuple[str, int], dict], strategy: str, batch: int) -> tuple[dict | None, int | None]:
    """The run of ``strategy`` at ``batch``, else at the nearest measured batch (its batch returned)."""
    have = sorted(b for s, b in runs if s == strategy)
    if not have:
        return None, None
    b = batch if batch in have else min(have, key=lambda x: (abs(x - batch), -x))
    return runs[(strategy, b)], b


def suite_rate(suite: dict | None, strategy: str, batch: int) -> tuple[float | None, str | None]:
    """A gpu_suite JSON's step-only samples/s of ``strategy`` at ``batch``: batch / in-step seconds where
    recorded (else the run's samples/s), buffer on the GPU, linearly interpolated between measured
    batches (None outside their range)."""
    if suite is None:
        return None, None
    pts: dict[int, float] = {}
    for r in suite.get("runs", []):
        if r.get("strategy") != strategy or "oom" in r or "variants" in r.get("setting", "") \
                or "pinned_host" in r.get("setting", ""):
            continue
        rate = (r["batch"] / r["in_step_seconds"]["mean"] if r.get("in_step_seconds")
                else r["samples_per_second"]["mean"])
        pts[int(r["batch"])] = rate
    if batch in pts:
        return pts[batch], f"batch {batch}"
    lo = max((b for b in pts if b < batch), default=None)
    hi = min((b for b in pts if b > batch), default=None)
    if lo is None or hi is None:
        return None, None
    w = (batch - lo) / (hi - lo)
    return pts[lo] + w * (pts[hi] - pts[lo]), f"interpolated between batches {lo} and {hi}"


# ------------------------------------------------------------------------------------ the projection
def steps_per_epoch(n: int, batch: int) -> int:
    """Training iterations of one epoch over ``n`` clips (the template's loader drops a ragged tail
    when there is more than one full batch)."""
    return n // batch if n > batch else 1


def project(setting: Setting, meas: dict[str, Any], strategy: str, *, eval_workers: int = 0,
            suite: dict | None = None) -> dict[str, Any]:
    """One benchmark x strategy: the terms of :data:`FORMULA` and their inputs."""
    run, rb = pick_run(meas["runs"], strategy, setting.batch)
    if run is None:
        return {"benchmark": setting.name, "strategy": strategy, "missing": "no measurement of this strategy"}
    B, E, T = setting.batch, setting.epochs, len(setting.tasks)
    placeholder = setting.train_clips is None
    n_t = setting.train_clips if not placeholder else [PLACEHOLDER_CLIPS] * T
    steps = [steps_per_epoch(n, B) for n in n_t]
    e2e, dev = run["end_to_end"], run["device_resident"]
    r_e2e, r_dev, s_start = e2e["samples_per_second"], dev["samples_per_second"], e2e["startup_seconds"]
    train = sum(E * (s * B / r_e2e + s_start) for s in steps)
    train_dev = sum(E * s * B / r_dev for s in steps)
    ev = [e for e in meas["eval"] if e["workers"] == eval_workers] or meas["eval"]
    R = sum(setting.retrieval_clips)
    out: dict[str, Any] = {"benchmark": setting.name, "strategy": strategy, "batch": B, "rate_batch": rb,
                           "rate_batch_differs": rb != B, "r_e2e": r_e2e, "r_device": r_dev, "s_start": s_start,
                           "steps_per_epoch": steps, "iterations": E * sum(steps),
                           "train_clips_per_task": n_t, "placeholder_train_clips": placeholder,
                           "train_seconds": train, "train_device_seconds": train_dev}
    if ev:
        e = ev[0]
        e_clip, e_recall, R_m = e["embed_seconds"] / e["clips"], e["recall_seconds"], e["clips"]
        per_eval = R * e_clip + e_recall * (R / R_m) ** 2
        out.update({"eval_workers": e["workers"], "e_clip": e_clip, "e_recall": e_recall, "R_m": R_m, "R": R,
                    "evaluations": T + 1, "eval_seconds": (T + 1) * per_eval})
    else:
        out.update({"eval_seconds": 0.0, "eval_missing": True})
    ck = run.get("checkpoint")
    n_ck = out["iterations"] // setting.every + T if setting.every > 0 else T
    out.update({"checkpoints": n_ck, "s_ckpt": ck["seconds"] if ck else None,
                "ckpt_seconds": n_ck * ck["seconds"] if ck else 0.0})
    sc = meas["scenario"][0] if meas["scenario"] else None
    if sc:
        s_build = sc["build_seconds"] / max(1, sc["train_clips"] + sc["test_clips"] + sc["retrieval_clips"])
        n_all = sum(n_t) + sum(setting.test_clips or []) + R
        out.update({"s_build": s_build, "setup_seconds": n_all * s_build})
    else:
        out["setup_seconds"] = 0.0
    out["total_seconds"] = out["setup_seconds"] + train + out["eval_seconds"] + out["ckpt_seconds"]
    out["total_hours"] = out["total_seconds"] / 3600
    rs, how = suite_rate(suite, strategy, B)
    if rs is not None:
        out.update({"r_suite": rs, "r_suite_from": how, "train_suite_seconds": sum(E * s * B / rs for s in steps)})
    return out


def overheads(rows: list[dict]) -> list[dict]:
    """STELLA's (and DER++'s) extra wall time over the cheaper strategies of the same benchmark."""
    out = []
    by = {(r["benchmark"], r["strategy"]): r for r in rows if "total_seconds" in r}
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        for a, b in (("stella", "derpp"), ("stella", "finetune"), ("derpp", "finetune")):
            if (bench, a) in by and (bench, b) in by:
                ta, tb = by[(bench, a)]["total_seconds"], by[(bench, b)]["total_seconds"]
                out.append({"benchmark": bench, "strategy": a, "over": b, "seconds": ta - tb, "ratio": ta / tb})
    return out


def _hms(s: float) -> str:
    """Seconds as ``H h MM min`` (nearest minute) from an hour, else minutes with one decimal."""
    if s < 3600:
        return f"{s / 60:.1f} min"
    m = round(s / 60)
    return f"{m // 60} h {m % 60:02d} min"


def markdown(result: dict) -> str:
    """Formula, inputs with sources, and the projection table."""
    lines = ["Formula:", "", *[f"    {f}" for f in FORMULA], "",
             "| benchmark | strategy | B (rate at) | iterations | r_e2e / r_device (samples/s) | train | "
             "train at r_device | train at the suite's step rate | eval | checkpoints | setup | total |",
             "|---" * 12 + "|"]
    for r in result["projections"]:
        if "missing" in r:
            lines.append(f"| {r['benchmark']} | {r['strategy']} | {r['missing']} |" + " |" * 9)
            continue
        unit = " (n_t = 1000 placeholder)" if r["placeholder_train_clips"] else ""
        suite = _hms(r["train_suite_seconds"]) if "train_suite_seconds" in r else "-"
        lines.append(f"| {r['benchmark']} | {r['strategy']} | {r['batch']} ({r['rate_batch']}) | {r['iterations']} | "
                     f"{r['r_e2e']:.1f} / {r['r_device']:.1f} | {_hms(r['train_seconds'])} | "
                     f"{_hms(r['train_device_seconds'])} | {suite} | {_hms(r['eval_seconds'])} | "
                     f"{_hms(r['ckpt_seconds'])} | {_hms(r['setup_seconds'])} | **{_hms(r['total_seconds'])}**{unit} |")
    lines.append("")
    lines += [f"- {o['benchmark']}: {o['strategy']} - {o['over']} = {_hms(o['seconds'])} ({o['ratio']:.2f}x)"
              for o in result["overheads"]]
    lines.append("\nInputs:")
    for s in result["settings"]:
        lines.append(f"- {s['name']}: T={len(s['tasks'])}, E={s['epochs']}, B={s['batch']}, every={s['every']}, "
                     f"n_t={s['train_clips']}, R={sum(s['retrieval_clips'])}")
        lines += [f"  - {k}: {v}" for k, v in s["sources"].items()]
    for m in result["measurements"]:
        lines.append(f"- measured: {m['file']} ({m['device_name']}, torch {m['torch']}, commit {m['commit']}, "
                     f"model {m['model']}, {m['workers']} workers, cache {m['cache']}, smoke {m['smoke']})")
    lines += [f"- note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("e2e", nargs="+", help="e2e_media.py JSON file(s)")
    p.add_argument("--out", default=None, help="JSON file to write (atomically)")
    p.add_argument("--suite", default=None, help="a gpu_suite.py JSON: step-only rates beside the projection")
    p.add_argument("--strategies", nargs="*", default=["finetune", "derpp", "stella"])
    p.add_argument("--eval-workers", type=int, default=0,
                   help="which measured evaluation to project with (default 0: the runner's eval loader)")
    p.add_argument("--vs-report", default=None, help="vgg_prepare_report.json: real per-task counts")
    p.add_argument("--as-report", default=None, help="audioset_prepare_report.json: real per-task counts")
    p.add_argument("--as-train-clips", type=int, nargs="*", default=None,
                   help="Continual-AS training clips: one number per task (7) or one for every task")
    p.add_argument("--site", default=None, help="a folder of carried packages to put first on sys.path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.site:
        sys.path.insert(0, str(Path(args.site).resolve()))
    from stella_avalanche.utils import atomic_write_json

    meas = load_measurements(args.e2e)
    suite = json.loads(Path(args.suite).read_text()) if args.suite else None
    settings = [vggsound_setting(args.vs_report), audioset_setting(args.as_report, args.as_train_clips)]
    rows = [project(s, meas, name, eval_workers=args.eval_workers, suite=suite)
            for s in settings for name in args.strategies]
    notes = []
    if any(m["smoke"] for m in meas["meta"]):
        notes.append("a --smoke measurement (tiny model, CPU): the hours below are meaningless")
    if any(r.get("rate_batch_differs") for r in rows):
        notes.append("some rates were measured at another batch than the benchmark's (column 'rate at')")
    vs = next((r for r in rows if r["benchmark"] == "continual_vs" and r["strategy"] == "stella"
               and "total_hours" in r), None)
    target = None
    if vs is not None:
        target = {"benchmark": "continual_vs", "strategy": "stella", "hours": vs["total_hours"],
                  "target_hours": VS_TARGET_HOURS, "met": vs["total_hours"] <= VS_TARGET_HOURS}
    result = {"script": "benchmarks/perf/project_run.py", "formula": FORMULA, "measurements": meas["meta"],
              "suite": Path(args.suite).name if args.suite else None,
              "settings": [asdict(s) for s in settings], "projections": rows, "overheads": overheads(rows),
              "target": target, "notes": notes}
    if args.out:
        atomic_write_json(args.out, result)
    print(markdown(result))
    if target is not None:
        smoke = " (smoke: meaningless)" if notes and "smoke" in notes[0] else ""
        print(f"\nContinual-VS with STELLA: {target['hours']:.2f} h (target <= {VS_TARGET_HOURS} h: "
              f"{'met' if target['met'] else 'missed'}){smoke}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
