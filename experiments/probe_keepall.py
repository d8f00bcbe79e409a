#!/usr/bin/env python
"""Per-seed table of the keep-all probe (``stella_keepall``) against the published runs of the same seeds.

``stella_keepall`` is STELLA's plugin with uniform importance and no RCA, as random patches, but with
every token kept (κ = 1). It tests whether random patches' deficit to full-clip replay comes from the
halved token budget (docs/comparison-statistics.md). When the probe's runs were made where the
published ones were (same initialisation builds), put them under the comparison's ``runs/`` folder and
``ablation.md`` decides it with paired intervals. When they were made on another machine, their
initialisation builds differ and the bootstrap's pairing would be wrong; this script then writes a
per-seed table instead, with how far each probe build's zero-shot recall is from the published build's.

    python experiments/probe_keepall.py --probe-runs docs/results/synthetic_v5/probes/keepall \\
        --published docs/results/synthetic_v5/runs --out docs/results/synthetic_v5/probes/keepall/README.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stella_avalanche.evaluation.comparison import DIRS, PRETTY, _initial_avg

#: the published runs each probe seed is set beside
REFERENCES = ("stella_random", "stella", "er", "derpp")


def _avg(res: dict, d: str) -> float:
    return float(res["summary"][d]["Avg"]["A"])


def _localise(res: dict) -> str:
    loc = (res.get("downstream") or {}).get("localise") or {}
    if loc.get("miou_patch") is None:
        return "–"
    return f"{loc['miou_patch']:.1f} / {loc['miou_pixel']:.1f}"


def table(probe: dict[int, dict], published: dict[str, dict[int, dict]], pretty: dict[str, str]) -> list[str]:
    """Markdown lines: one block per seed, the probe and the references, Avg 𝒜 and the probe's lead."""
    lines = ["| seed | method | A→V 𝒜 | V→A 𝒜 | keep-all − method A→V / V→A | mIoU patch / pixel | kernel path |",
             "|---|---|---|---|---|---|---|"]
    for seed, res in sorted(probe.items()):
        rows = [("stella_keepall", res)] + [(k, published[k][seed]) for k in REFERENCES if seed in published.get(k, {})]
        for key, r in rows:
            lead = ("–" if key == "stella_keepall" else
                    " / ".join(f"{_avg(res, d) - _avg(r, d):+.2f}" for d, _ in DIRS))
            lines.append(f"| {seed} | {pretty.get(key, key)} | {_avg(r, 'a2v'):.2f} | {_avg(r, 'v2a'):.2f} | {lead} | "
                         f"{_localise(r)} | {(r.get('environment') or {}).get('cpu_capability', '?')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe-runs", type=Path, required=True, help="folder with seed<s>/results.json of stella_keepall")
    p.add_argument("--published", type=Path, required=True, help="the comparison's runs/ folder")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (atomically) as well")
    args = p.parse_args(argv)
    from stella_avalanche.utils import print_and_write

    probe = {}
    for f in sorted(args.probe_runs.glob("seed*/results.json")):
        r = json.loads(f.read_text())
        if r.get("strategy") != "stella_keepall" or not r.get("complete"):
            raise SystemExit(f"{f}: not a complete stella_keepall run")
        probe[int(r["seed"])] = r
    if not probe:
        raise SystemExit(f"{args.probe_runs}: no seed*/results.json")
    published: dict[str, dict[int, dict]] = {}
    for k in REFERENCES:
        for f in sorted((args.published / k).glob("seed*/results.json")):
            r = json.loads(f.read_text())
            published.setdefault(k, {})[int(r["seed"])] = r
    builds = []
    for seed, r in sorted(probe.items()):
        ref = published.get("stella", {}).get(seed)
        if ref is None:
            continue
        same = r["recall_initial"] == ref["recall_initial"]
        gap = " / ".join(f"{_initial_avg(r, d, 'Avg') - _initial_avg(ref, d, 'Avg'):+.2f}" for d, _ in DIRS)
        builds.append(f"- seed {seed}: " + ("the same build as the published runs (zero-shot recall identical)" if same
                      else f"another build than the published runs: zero-shot Avg A→V / V→A differs by {gap}"))
    lines = ["# Keep-all probe: random patches with every token kept", "",
             "Written by `python experiments/probe_keepall.py --probe-runs docs/results/synthetic_v5/probes/keepall "
             "--published docs/results/synthetic_v5/runs --out docs/results/synthetic_v5/probes/keepall/README.md`.",
             "", "`stella_keepall` differs from random patches only in κ (1 instead of 0.5): the same visible "
             "tokens, the same stored clips, but the MAE reconstructs every masked patch instead of only the kept "
             "ones. Avg 𝒜 (mean of R@1/5/10, %); localisation from the downstream block.", "",
             *table(probe, published, PRETTY), "", "Initialisation builds:", *builds, ""]
    if any("another build" in b for b in builds):
        lines += ["The probe's builds are not the published runs' (another CPU kernel path gives other floating-point "
                  "results), so these differences are not paired over the initialisation: a run's Avg 𝒜 can move by "
                  "a few points between two builds of one configuration, which is why a comparison starts every "
                  "strategy of a seed from one build. "
                  "Differences much larger than that are still informative; a decision with intervals needs "
                  "the probe run beside the published runs (`compare.py --strategies stella_keepall`, same machine).", ""]
    text = "\n".join(lines)
    print_and_write(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
