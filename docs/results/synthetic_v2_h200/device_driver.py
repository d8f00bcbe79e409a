#!/usr/bin/env python3
"""How the runs of this directory were trained: the memory sweep on one lent H200, in one call.

This is a record, not package code. ``experiments/compare.py`` plans and runs the same runs on any
machine (see README.md beside this file); this driver only differs in what a time-limited device
call needs: a fixed launch order (every configuration at seed 0, then seed 1, then seed 2), a hard
deadline after which running jobs are stopped, and packing of the complete runs (everything except
their checkpoints) into tarballs small enough to come back.

    PYTHONPATH=.:.gpu_site:.devjob/site XDG_CACHE_HOME=$PWD/.devjob/cache \
        python3 docs/results/synthetic_v2_memsweep_h200/device_driver.py --work sweep --pack $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MEM = 200
#: (strategy, memory items): DER++, STELLA and STELLA+ at 100 / 200 / 400 items, and STELLA+ at the
#: byte budget of 100 / 200 / 400 DER++ items (83,480 B vs 35,214 B per item: 237 / 474 / 948 items)
#: launch order: the points off the preset's memory first, then the equal-byte STELLA+ runs, then
#: the preset's memory (those also exist as CPU runs in ../synthetic_v2)
GROUPS = [[(s, m) for s in ("derpp", "stella", "stella_plus") for m in (100, 400)],
          [("stella_plus", m) for m in (237, 474, 948)],
          [(s, DEFAULT_MEM) for s in ("derpp", "stella", "stella_plus")]]


def key(strategy: str, mem: int) -> str:
    return strategy if mem == DEFAULT_MEM else f"{strategy}-mem{mem}"


def complete(run: Path) -> bool:
    try:
        return bool(json.loads((run / "results.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--pack", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=18)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--deadline", type=float, default=520.0, help="seconds after start: stop and pack")
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip", nargs="*", default=[], help="runs already done, as KEY/seedN")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    t0 = time.time()
    plan = [(s, m, seed) for group in GROUPS for seed in a.seeds for s, m in group
            if f"{key(s, m)}/seed{seed}" not in a.skip]
    over = ["train.threads=1", "downstream.enabled=false"] + a.overrides
    logs = a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[tuple, tuple] = {}
    done: dict[str, dict] = {}
    durations: list[float] = []
    while plan or running:
        now = time.time() - t0
        for item, (proc, start, fh) in list(running.items()):
            rc = proc.poll()
            if rc is None and now < a.deadline:
                continue
            if rc is None:
                proc.terminate()
                proc.wait(timeout=30)
                rc = "stopped at deadline"
            fh.close()
            del running[item]
            s, m, seed = item
            took = time.time() - start
            done[f"{key(s, m)}/seed{seed}"] = {"rc": rc, "seconds": round(took, 1)}
            if rc == 0:
                durations.append(took)
            print(f"[{now:6.0f}s] {key(s, m)} seed {seed}: rc={rc} in {took:.0f}s", flush=True)
        failed = [k for k, v in done.items() if v["rc"] not in (0, "stopped at deadline")]
        if len(failed) >= 3 and not durations and not running:
            print("three runs failed and none finished: aborting", flush=True)
            plan.clear()
        # a strategy that failed twice is not launched again (its error will repeat)
        bad = {k.split("/")[0].split("-mem")[0] for k in failed
               if sum(f.split("/")[0].split("-mem")[0] == k.split("/")[0].split("-mem")[0] for f in failed) >= 2}
        plan[:] = [(s, m, seed) for s, m, seed in plan if s not in bad]
        est = max(durations) if durations else 0.0
        while plan and len(running) < a.jobs and now + est < a.deadline:
            s, m, seed = plan.pop(0)
            out = a.work / "runs" / key(s, m) / f"seed{seed}"
            cmd = [sys.executable, str(ROOT / "experiments" / "run_stella.py"), "--strategy", s,
                   "--benchmark", "synthetic", "--seed", str(seed), "--out", str(out), "--device", a.device,
                   "--resume", "--quiet"] + over + ([] if m == DEFAULT_MEM else [f"strategy.params.mem_size={m}"])
            fh = open(logs / f"{key(s, m)}-seed{seed}.log", "w")
            running[(s, m, seed)] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT), time.time(), fh)
        if plan and not running and now + est >= a.deadline:
            break
        time.sleep(2)
    # pack: one tarball per seed of the complete runs (no checkpoints), one of all logs
    a.pack.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        with tarfile.open(a.pack / f"runs_seed{seed}.tar.gz", "w:gz") as tar:
            for run in sorted(a.work.glob(f"runs/*/seed{seed}")):
                if complete(run):
                    for f in sorted(run.rglob("*")):
                        if f.is_file() and "checkpoints" not in f.parts:
                            tar.add(f, arcname=str(f.relative_to(a.work)))
    with tarfile.open(a.pack / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    import torch
    status = {"runs": done, "not_started": [f"{key(s, m)}/seed{seed}" for s, m, seed in plan],
              "wall_seconds": round(time.time() - t0, 1), "jobs": a.jobs, "overrides": over,
              "torch": torch.__version__, "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpus": os.cpu_count()}
    (a.pack / "status.json").write_text(json.dumps(status, indent=1))
    print(json.dumps(status, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
