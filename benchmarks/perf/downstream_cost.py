"""Wall time of the downstream suite (probe, transfer, localisation, gap) on one tiny-model run.

Builds (or reuses) the synthetic benchmark, takes the tiny backbone (a finished run's final checkpoint
with ``--run``, else a randomly initialised one: the cost does not depend on the weights) and times
:func:`stella_avalanche.evaluation.downstream.run_downstream` task by task, after the data set and
its feature cache exist (their one-time build is not part of the suite). Target on 2 CPU cores: the
whole suite in <= 120 s on the default synthetic preset.

Usage::

    python benchmarks/perf/downstream_cost.py [--preset default] [--threads 2] [--run runs/ft] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TARGET_SECONDS = 120.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="synthetic preset (default, tiny, ...)")
    p.add_argument("--root", default=None, help="data root (default: the cache directory)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--run", type=Path, default=None, help="a finished tiny run: its checkpoint and modality gap")
    p.add_argument("--out", type=Path, default=None, help="where the pictures go (default: a temporary directory)")
    args = p.parse_args()

    from stella_avalanche.benchmarks.synthetic import synthetic_benchmark
    from stella_avalanche.evaluation.downstream import run_downstream, summary_lines
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the one-time cache build decodes small clips: fastest on one thread
    bm = synthetic_benchmark(args.root, seed=0, preset=args.preset)
    print(f"benchmark ready in {time.perf_counter() - t0:.1f} s (one-time data generation / feature cache)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", bm.features))
    results = None
    if args.run is not None:
        from stella_avalanche.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(args.run / "checkpoints")
        if ckpt is None:
            raise SystemExit(f"{args.run}: no checkpoint")
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["strategy"]["model"])
        results = json.loads((args.run / "results.json").read_text())
    if results is None or not results.get("modality_gap"):
        t = len(bm.task_names)  # a synthetic gap matrix: the gap task's cost does not depend on its values
        results = {"modality_gap": [[0.5 - 0.01 * (l - k) for k in range(t)] for l in range(t)],
                   "tasks": list(bm.task_names), "strategy": "cost"}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        t1, c1 = time.perf_counter(), time.process_time()
        block = run_downstream(model, bm, results=results, out_dir=out, progress=True)
        total, cpu = time.perf_counter() - t1, time.process_time() - c1
    print(summary_lines(block))
    print(f"\ndownstream suite on preset {args.preset!r}, tiny model, {args.threads} thread(s): {total:.1f} s "
          f"(target <= {TARGET_SECONDS:.0f} s: {'OK' if total <= TARGET_SECONDS else 'over'}); "
          f"CPU time {cpu:.1f} s (on a shared machine the CPU time / threads bounds the unloaded wall time)")
    for task, sec in block["seconds"].items():
        print(f"  {task:9s} {sec:7.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
