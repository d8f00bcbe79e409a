#!/usr/bin/env python
"""What each seed's initialisation build learned, beside what that seed's runs ended at.

With ``compare.py --init per-seed`` seed s of every strategy starts from the synthetic initialisation
built with training seed s. This report reads, for every seed of a comparison folder, the build its
runs name (results.json ``init``, resolved in ``$STELLA_CACHE``) and gives

- stage 1: the InfoNCE loss over the last logged steps, against its chance value ln(batch) (a loss at
  ln(batch) means audio and video are not aligned at all), and where the build records it (builds
  made since the ``stage1`` summary was added) the InfoNCE at the end of the InfoNCE-only phase;
- stage 2: the AVM's held-out matching accuracy at its last check, and whether it met its target;
- the zero-shot Avg 𝒜 of the runs of that seed (identical for every strategy of a seed), and the
  mean final Avg 𝒜 of those runs.

Builds missing from the cache are reported as such (their rows keep the run-derived columns), so the
report can be written on a machine that built only some seeds.

    python experiments/init_builds.py --runs docs/results/synthetic_v5/runs \\
        --out docs/results/synthetic_v5/init_builds.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

#: directions of the retrieval tables, in print order
DIRS = (("a2v", "A→V"), ("v2a", "V→A"))


def build_record(backbone: Optional[Path], avm: Optional[Path]) -> dict[str, Any]:
    """Stage-1 and stage-2 figures of one build from its checkpoints' ``meta`` (``found`` False when the
    backbone is not in this cache)."""
    import torch

    if backbone is None or not backbone.is_file():
        return {"found": False}
    from stella_avalanche.training.pretrain import stage1_summary

    meta = torch.load(backbone, map_location="cpu", weights_only=False).get("meta") or {}
    hist = [h for h in meta.get("history") or [] if isinstance(h, dict) and "loss_nce" in h]
    schedule = meta.get("schedule") or {}
    # the stored history is the last logged steps only; builds made since the stage-1 summary was added
    # also record the InfoNCE-only phase's end, which that history no longer holds
    summary = stage1_summary(hist, batch_size=int(schedule.get("batch_size") or 0), window=len(hist) or 1)
    rec: dict[str, Any] = {"found": True, "train_seed": schedule.get("train_seed"),
                           "nce_last": summary["nce_end"], "nce_steps": len(hist), "nce_chance": summary["nce_chance"],
                           "nce_contrastive_end": (meta.get("stage1") or {}).get("nce_contrastive_end")}
    if avm is not None and avm.is_file():
        stage2 = (torch.load(avm, map_location="cpu", weights_only=False).get("meta") or {}).get("stage2") or {}
        held = stage2.get("heldout") or []
        rec["avm_accuracy"] = float(held[-1]["accuracy"]) if held else None
        rec["avm_target_met"] = bool(stage2.get("criterion_met"))
    return rec


def seed_rows(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per seed of the complete runs under ``runs_dir`` (``<key>/seed<s>/results.json``).

    :raises SystemExit: when the runs of one seed name different builds or start from different
        zero-shot recall (they would not be one seed's runs of one comparison).
    """
    from stella_avalanche.evaluation.comparison import _initial_avg, load_runs_in
    from stella_avalanche.paths import cache_file

    runs = load_runs_in(runs_dir)
    by_seed: dict[int, list[dict]] = {}
    keyed: dict[int, list[str]] = {}
    for key, group in runs.items():
        for r in group:
            by_seed.setdefault(int(r["seed"]), []).append(r)
            keyed.setdefault(int(r["seed"]), []).append(key)
    # the final column averages the strategies that ran every seed, so that seeds compare
    every = sorted(k for k, g in runs.items() if {int(r["seed"]) for r in g} == set(by_seed))
    rows = []
    for seed in sorted(by_seed):
        group = by_seed[seed]
        inits = {(str((r.get("init") or {}).get("backbone")), str((r.get("init") or {}).get("avm"))) for r in group}
        if len(inits) != 1:
            raise SystemExit(f"seed {seed}: its runs name {len(inits)} different initialisation builds")
        backbone, avm = next(iter(inits))
        row: dict[str, Any] = {"seed": seed, "runs": len(group), "backbone": backbone, "final_keys": every}
        common = [r for r, k in zip(group, keyed[seed]) if k in every]
        for d, _ in DIRS:
            zero = {round(v, 9) for v in (_initial_avg(r, d, "Avg") for r in group) if v is not None}
            if len(zero) > 1:
                raise SystemExit(f"seed {seed}: its runs start from different zero-shot {d} recall {sorted(zero)}")
            row[f"zero_shot_{d}"] = next(iter(zero)) if zero else None
            row[f"final_{d}"] = (float(sum(r["summary"][d]["Avg"]["A"] for r in common) / len(common))
                                 if common else None)
        row.update(build_record(cache_file(backbone), cache_file(avm)))
        rows.append(row)
    return rows


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(rows: list[dict[str, Any]], runs_dir: str) -> str:
    """The report: one table row per seed."""
    lines = ["# Initialisation builds, one per seed", "",
             f"Written by `python experiments/init_builds.py --runs {runs_dir} --out <this file>` from the runs' "
             "results.json and the builds they name in `$STELLA_CACHE` (– where a build is not in the cache "
             "of the machine that wrote it). Stage-1 InfoNCE: mean of the last logged steps; chance is ln(batch), "
             "the loss of audio and video that are not aligned at all; a → b: the InfoNCE-only phase ended at a "
             "and the whole stage at b (where the build records a). AVM: held-out matching accuracy at "
             "stage 2's last check. Zero-shot: Avg 𝒜 of the initialisation before the first task (the same for "
             "every run of a seed); final: mean Avg 𝒜 after the last task over the strategies that ran every seed ("
             + ", ".join(rows[0]["final_keys"] if rows else []) + ").", "",
             "| seed | runs | stage-1 InfoNCE (chance) | AVM accuracy (target met) | zero-shot A→V / V→A | "
             "final A→V / V→A |", "|---|---|---|---|---|---|"]
    for r in rows:
        phase = "" if r.get("nce_contrastive_end") is None else f"{r['nce_contrastive_end']:.3f} → "
        nce = ("–" if not r.get("found") or r.get("nce_last") is None
               else f"{phase}{r['nce_last']:.3f} ({_num(r.get('nce_chance'), '{:.3f}')})")
        avm = ("–" if r.get("avm_accuracy") is None
               else f"{r['avm_accuracy']:.3f} ({'yes' if r.get('avm_target_met') else 'no'})")
        lines.append(f"| {r['seed']} | {r['runs']} | {nce} | {avm} | {_num(r['zero_shot_a2v'])} / "
                     f"{_num(r['zero_shot_v2a'])} | {_num(r['final_a2v'])} / {_num(r['final_v2a'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="a folder of <key>/seed<s>/results.json")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (atomically) as well")
    args = p.parse_args(argv)
    from stella_avalanche.paths import portable_path
    from stella_avalanche.utils import print_and_write

    rows = seed_rows(args.runs)
    if not rows:
        raise SystemExit(f"no complete runs under {args.runs}")
    print_and_write(markdown(rows, portable_path(args.runs) or str(args.runs)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
