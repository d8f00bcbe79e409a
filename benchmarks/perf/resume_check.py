#!/usr/bin/env python
"""Kill a run at several points, resume it, and compare its final recall matrices with an
uninterrupted run (CPU, fixed seed: they must be identical).

    python benchmarks/perf/resume_check.py                       # STELLA, tiny synthetic preset, 3 kill points
    python benchmarks/perf/resume_check.py --strategy derpp --kill-at 5 17 30

Each killed run gets SIGKILL (no clean-up) as soon as a checkpoint at or past the kill iteration
exists, then ``run_stella.py --resume`` finishes it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = str(ROOT / "experiments" / "run_stella.py")
_CKPT = re.compile(r"ckpt-(\d{9})\.pt$")


def base_args(strategy: str, out: Path, every: int) -> list[str]:
    return [sys.executable, RUN, "--strategy", strategy, "--out", str(out), "--quiet", "benchmark.preset=tiny",
            "init.checkpoint=none", "init.avm_checkpoint=none", "train.epochs=2", "train.batch_size=4",
            "strategy.params.mem_size=16", f"checkpoint.every_n_iterations={every}", "checkpoint.keep_last=2"]


def _latest_iteration(out: Path) -> int:
    its = [int(m.group(1)) for p in (out / "checkpoints").glob("ckpt-*.pt") if (m := _CKPT.search(p.name))]
    return max(its, default=-1)


def run_killed(strategy: str, out: Path, kill_at: int, env: dict, every: int = 2) -> None:
    """Start a run, SIGKILL it once a checkpoint at iteration >= kill_at exists, then resume it."""
    proc = subprocess.Popen(base_args(strategy, out, every), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and _latest_iteration(out) < kill_at:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = True
    else:
        killed = False
    r = subprocess.run(base_args(strategy, out, every) + ["--resume"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"resume failed:\n{r.stderr[-3000:]}")
    if not killed:
        print(f"  (the run finished before iteration {kill_at}; resume was a no-op)", file=sys.stderr)


def recall(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert res["complete"], out
    return res["recall"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="stella")
    p.add_argument("--kill-at", nargs="*", type=int, default=[5, 21, 38])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, STELLA_CACHE=os.environ.get("STELLA_CACHE", str(tmp / "cache")), OMP_NUM_THREADS="1")
        t0 = time.time()
        r = subprocess.run(base_args(args.strategy, tmp / "full", 2), env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        ref = recall(tmp / "full")
        print(f"uninterrupted run: {time.time() - t0:.0f} s")
        ok = True
        for k in args.kill_at:
            out = tmp / f"kill{k}"
            run_killed(args.strategy, out, k, env)
            same = recall(out) == ref
            ok &= same
            print(f"killed at iteration >= {k}, resumed: recall matrices identical = {same}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
