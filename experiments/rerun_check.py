"""Does a published run regenerate bit-exactly? Rerun it from what its results.json records and compare.

A run's ``results.json`` records its resolved configuration (``config``, including ``train.threads``),
its ``seed`` and where it was trained (``environment``: threads, torch build, CPU capability and flags).
This script reruns the same configuration and seed into ``--out`` and compares, exactly, the per-query
ranks (every row, both directions, pooled and per-task galleries), the recall matrices and the zero-shot
recall. It prints one JSON object: ``bit_exact`` and, when not, the differing entries and the largest
recall difference; plus the environment keys that differ between the two machines (a bit-exact rerun
needs the same thread count, torch build and kernel path).

    python experiments/rerun_check.py docs/results/synthetic_v5/runs/finetune/seed1/results.json --out runs/rerun
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: results.json blocks compared exactly (each a nested dict of lists of numbers)
COMPARED = ("ranks", "recall", "recall_initial", "recall_task_gallery")


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into ``path -> list/number`` leaves."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Exact comparison of the :data:`COMPARED` blocks of two results dicts, and their environments."""
    diffs: list[str] = []
    max_recall = 0.0
    for block in COMPARED:
        la, lb = _leaves(a.get(block, {}), block), _leaves(b.get(block, {}), block)
        if la.keys() != lb.keys():
            diffs.append(f"{block}: different keys ({sorted(set(la) ^ set(lb))[:3]})")
            continue
        for key in la:
            x, y = la[key], lb[key]
            if isinstance(x, str) or isinstance(y, str):
                if x != y:
                    diffs.append(key)
                continue
            xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            if xa.shape != ya.shape or not np.array_equal(xa, ya):
                diffs.append(key)
                if block != "ranks" and xa.shape == ya.shape:
                    max_recall = max(max_recall, float(np.nanmax(np.abs(xa - ya))))
    env_a, env_b = a.get("environment", {}), b.get("environment", {})
    env = {k: [env_a.get(k), env_b.get(k)] for k in sorted(set(env_a) | set(env_b)) if env_a.get(k) != env_b.get(k)}
    return {"bit_exact": not diffs, "differing": diffs[:10], "n_differing": len(diffs),
            "max_recall_difference": max_recall, "environment_differences": env}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="the published run's results.json")
    p.add_argument("--out", required=True, help="folder of the rerun (must not hold another run)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from stella_avalanche.experiment import run_experiment

    published = json.loads(Path(args.results).read_text())
    if not published.get("complete"):
        raise SystemExit(f"{args.results}: the run is not complete")
    run_experiment(published["config"], out_dir=Path(args.out), seed=int(published["seed"]), device=args.device,
                   progress=False)
    # compare the files, not the returned dict: both sides then went through the same JSON round trip
    rerun = json.loads((Path(args.out) / "results.json").read_text())
    rel = os.path.relpath(args.results)   # the report may be published: no machine paths
    report = {"published": rel if not rel.startswith("..") else Path(args.results).name,
              "seed": published["seed"], "strategy": published.get("strategy"), **compare_results(published, rerun)}
    print(json.dumps(report, indent=1))
    return 0 if report["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
