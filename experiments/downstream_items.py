#!/usr/bin/env python
"""Add the downstream per-item outcomes to finished runs that were made before they were recorded.

The comparison's claim 7 (transfer and localisation, ``verdicts.md``) resamples the downstream test
items: each transfer clip's rank and each localisation frame's IoU. Runs made before the downstream block
recorded them hold only the means. For each run directory given, this script loads the final checkpoint
and the recorded configuration, recomputes the transfer and localisation tasks at the run's thread count,
and checks that every recorded mean comes out the same. Only then does it write the per-item lists
(``transfer.ranks``, ``localise.iou_pixel`` / ``iou_patch``) into the run's results.json, atomically.
The probe and the gap are not recomputed. A run whose means do not match is left unchanged and named,
and the exit status is 1.

    python experiments/downstream_items.py runs/cmp/runs/stella/seed0 runs/cmp/runs/derpp/seed0
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

#: the recorded means that the recomputation must reproduce: (block, path)
CHECKED = (("transfer", ("a2v", "R@1")), ("transfer", ("a2v", "R@5")), ("transfer", ("a2v", "R@10")),
           ("transfer", ("v2a", "R@1")), ("transfer", ("v2a", "R@5")), ("transfer", ("v2a", "R@10")),
           ("localise", ("miou_patch",)), ("localise", ("miou_pixel",)), ("localise", ("threshold_patch",)),
           ("localise", ("threshold_pixel",)))
#: tolerance on a recorded mean: the per-frame IoUs are summed in another order than before (float64)
TOLERANCE = 1e-9


def _get(block: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        block = block.get(key) if isinstance(block, dict) else None
    return block


def mismatches(recorded: dict, fresh: dict) -> list[str]:
    """The :data:`CHECKED` entries where ``fresh`` differs from ``recorded`` (both downstream blocks)."""
    out = []
    for part, path in CHECKED:
        a, b = _get(recorded, (part, *path)), _get(fresh, (part, *path))
        if (a is None) != (b is None) or (a is not None and abs(float(a) - float(b)) > TOLERANCE):
            out.append(f"{part}/{'/'.join(path)}: recorded {a}, recomputed {b}")
    return out


def add_items(run: Path, *, device: str = "cpu") -> list[str]:
    """Recompute ``run``'s transfer and localisation and, when the means match, write the per-item lists
    into its results.json. Returns the mismatches (empty: written)."""
    import dataclasses

    import torch

    from stella_avalanche.cli.downstream import build_model, latest_run_checkpoint
    from stella_avalanche.evaluation import downstream as D
    from stella_avalanche.evaluation.report import write_results_json

    res_path = run / "results.json"
    results = json.loads(res_path.read_text())
    block = results.get("downstream")
    if not results.get("complete") or not isinstance(block, dict):
        raise SystemExit(f"{run}: not a complete run with a downstream block")
    cfg = results["config"]
    torch.set_num_threads(int((cfg.get("train") or {}).get("threads") or 1))
    bm, model = build_model(cfg, str(latest_run_checkpoint(run)), device=device)
    # the run's own downstream suite, restricted to the two tasks that have per-item outcomes
    dcfg = dataclasses.replace(D.DownstreamConfig.from_dict(cfg.get("downstream")), tasks=("transfer", "localise"))
    fresh = D.run_downstream(model, bm, cfg=dcfg, progress=False)
    bad = mismatches(block, fresh)
    if bad:
        return bad
    block["transfer"]["ranks"] = fresh["transfer"]["ranks"]
    block["localise"]["iou_patch"] = fresh["localise"]["iou_patch"]
    block["localise"]["iou_pixel"] = fresh["localise"]["iou_pixel"]
    block["items_added"] = "experiments/downstream_items.py (final checkpoint; recorded means reproduced)"
    write_results_json(res_path, results)
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (results.json + checkpoints/)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    status = 0
    for run in args.runs:
        block = json.loads((run / "results.json").read_text()).get("downstream")
        if _get(block, ("transfer", "ranks")) is not None and _get(block, ("localise", "iou_patch")) is not None:
            print(f"{run}: has its per-item outcomes already")
            continue
        bad = add_items(run, device=args.device)
        if bad:
            status = 1
            print(f"{run}: left unchanged, the recomputation differs: " + "; ".join(bad))
        else:
            print(f"{run}: per-item outcomes added (every recorded mean reproduced)")
    return status


if __name__ == "__main__":
    sys.exit(main())
