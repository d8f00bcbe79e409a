#!/usr/bin/env python
"""The keep-all probe (``stella_keepall``): paired intervals on its own builds, and a per-seed table
beside the published runs.

``stella_keepall`` is STELLA's plugin with uniform importance and no RCA, as random patches, but with
every token kept (κ = 1). It tests whether random patches' deficit to full-clip replay comes from the
halved token budget (docs/comparison-statistics.md). When the probe's runs are made where the published
ones were (same initialisation builds), put them under the comparison's ``runs/`` folder and
``ablation.md`` decides it. When they are made on another machine, their builds differ from the
published ones and pairing with those would be wrong, so the probe folder carries its own references:

* ``<probe>/runs/<key>/seed<s>/results.json``, laid out as a comparison folder: ``stella_keepall`` and
  any references (random patches, DER++, ...) run on the same machine from the same builds;
* paired differences with bootstrap intervals (seeds and queries) over the seeds every key ran from one
  build;
* the per-seed table beside the published runs of the same seeds, with the kernel path of each; and how
  far one configuration moved between the two machines (the same strategy, seed and command).

    python experiments/probe_keepall.py --probe docs/results/synthetic_v5/probes/keepall \\
        --published docs/results/synthetic_v5/runs --out docs/results/synthetic_v5/probes/keepall/README.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stella_avalanche.evaluation.comparison import (DIRS, KEEP_ALL, PRETTY, _difference_rows, _initial_avg,
                                                    bootstrap_all, load_runs, load_runs_in)

#: the references each probe seed is set beside, in table order
REFERENCES = ("stella_random", "stella", "er", "derpp")
#: bootstrap replicates of the paired section (as compare.py's default)
N_BOOT = 2000


def _avg(res: dict, d: str) -> float:
    return float(res["summary"][d]["Avg"]["A"])


def _localise(res: dict) -> str:
    loc = (res.get("downstream") or {}).get("localise") or {}
    if loc.get("miou_patch") is None:
        return "–"
    return f"{loc['miou_patch']:.1f} / {loc['miou_pixel']:.1f}"


def _by_seed(runs: dict[str, list[dict]]) -> dict[str, dict[int, dict]]:
    return {k: {int(r["seed"]): r for r in group} for k, group in runs.items()}


def _kernel(res: dict) -> str:
    return (res.get("environment") or {}).get("cpu_capability", "?")


def paired_seeds(probe: dict[str, dict[int, dict]]) -> tuple[list[int], list[str]]:
    """Seeds at which every key of the probe folder ran, from one initialisation build (identical
    zero-shot recall), and the notes on the seeds left out."""
    keys = list(probe)
    common = sorted(set.intersection(*(set(v) for v in probe.values())))
    seeds, notes = [], []
    for s in common:
        ref = probe[KEEP_ALL][s]["recall_initial"]
        other = [k for k in keys if probe[k][s]["recall_initial"] != ref]
        if other:
            notes.append(f"seed {s} left out of the paired section: {', '.join(other)} started from another "
                         "build than the probe")
        else:
            seeds.append(s)
    return seeds, notes


def paired_section(probe: dict[str, dict[int, dict]], *, n_boot: int = N_BOOT) -> list[str]:
    """Markdown lines: per-key mean Avg 𝒜 and the paired differences over the one-build seeds."""
    refs = [k for k in REFERENCES if k in probe] + sorted(k for k in probe if k not in REFERENCES and k != KEEP_ALL)
    if not refs:
        return []
    seeds, notes = paired_seeds(probe)
    lines = ["## Paired on the probe's own builds", ""]
    if not seeds:
        return lines + ["No seed has every key from one build.", *[f"- {n}" for n in notes], ""]
    keys = [KEEP_ALL] + refs
    runs = {k: [probe[k][s] for s in seeds] for k in keys}
    boot = bootstrap_all(runs, n_boot=n_boot)
    cap = sorted({_kernel(r) for group in runs.values() for r in group})
    lines += [f"Every key below ran seeds {', '.join(map(str, seeds))} on one machine ({'/'.join(cap)} kernel path), "
              "each seed from one initialisation build, so the differences are paired over seeds and queries "
              f"(bootstrap, {n_boot} replicates, 95 % intervals; ≈0: the interval contains zero). With "
              f"{len(seeds)} seed(s) the seed part of an interval is coarse: read the point values with it.", "",
              "| method | " + " | ".join(f"𝒜 {dn} (per seed)" for _, dn in DIRS) + " |", "|---|---|---|"]
    for k in keys:
        cells = [f"{np.mean([_avg(r, d) for r in runs[k]]):.2f} ("
                 + ", ".join(f"{_avg(r, d):.2f}" for r in runs[k]) + ")" for d, _ in DIRS]
        lines.append(f"| {PRETTY.get(k, k)} | " + " | ".join(cells) + " |")
    bases = [b for b in refs if b not in ("stella_random", "stella")]
    pairs = [("stella", b) for b in (["stella_random"] + bases) if "stella" in refs and b in refs]
    pairs += [("stella_random", b) for b in bases] if "stella_random" in refs else []
    pairs += [(KEEP_ALL, k) for k in refs]
    lines += ["", "Differences: *STELLA − random patches* is what the guide chooses at the same kept tokens, "
              "*random patches − baseline* the deficit under test, *keep-all − random patches* what keeping "
              "only half of the tokens costs, *keep-all − baseline* what remains with every token kept.", "",
              "| difference | Δ𝒜 A→V | Δ𝒜 V→A |", "|---|---|---|"]
    lines += [r.replace("≈0", "**≈0**") for r in _difference_rows(boot, pairs)]
    return lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])


def seed_table(probe: dict[str, dict[int, dict]], published: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown lines: per seed, the probe's runs and the published references, Avg 𝒜 and the probe's lead."""
    lines = ["| seed | method | made | A→V 𝒜 | V→A 𝒜 | keep-all − method A→V / V→A | mIoU patch / pixel | kernel path |",
             "|---|---|---|---|---|---|---|---|"]
    order = [KEEP_ALL] + list(REFERENCES) + sorted(k for k in probe if k not in REFERENCES and k != KEEP_ALL)
    for seed, keep in sorted(probe[KEEP_ALL].items()):
        rows = [(k, "probe", probe[k][seed]) for k in order if seed in probe.get(k, {})]
        rows += [(k, "published", published[k][seed]) for k in REFERENCES if seed in published.get(k, {})]
        for key, made, r in rows:
            lead = ("–" if r is keep else " / ".join(f"{_avg(keep, d) - _avg(r, d):+.2f}" for d, _ in DIRS))
            lines.append(f"| {seed} | {PRETTY.get(key, key)} | {made} | {_avg(r, 'a2v'):.2f} | {_avg(r, 'v2a'):.2f} | "
                         f"{lead} | {_localise(r)} | {_kernel(r)} |")
    return lines


def machine_section(probe: dict[str, dict[int, dict]], published: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown lines: one configuration (strategy, seed, command) on the probe's machine and on the
    published runs' machine: the difference in zero-shot and final Avg 𝒜, against the published seed SD."""
    rows = []
    for k in probe:
        for s, r in sorted(probe[k].items()):
            pub = published.get(k, {}).get(s)
            if pub is None:
                continue
            sd = [float(np.std([_avg(x, d) for x in published[k].values()], ddof=1))
                  if len(published[k]) > 1 else float("nan") for d, _ in DIRS]
            zero = " / ".join(f"{_initial_avg(r, d, 'Avg') - _initial_avg(pub, d, 'Avg'):+.2f}" for d, _ in DIRS)
            final = " / ".join(f"{_avg(r, d) - _avg(pub, d):+.2f}" for d, _ in DIRS)
            rows.append(f"| {PRETTY.get(k, k)} | {s} | {_kernel(r)} − {_kernel(pub)} | {zero} | {final} | "
                        f"{sd[0]:.2f} / {sd[1]:.2f} |")
    if not rows:
        return []
    return ["## One configuration on two machines", "",
            "The same strategy, seed and recorded command (`train.threads=1`), run on the probe's machine and on "
            "the machine of the published runs; each machine built its own initialisation for the seed. "
            "Differences are probe − published (A→V / V→A); the last column is the published runs' SD of Avg 𝒜 "
            "over seeds for that strategy.", "",
            "| method | seed | kernel paths | zero-shot Avg 𝒜 | final Avg 𝒜 | published seed SD |",
            "|---|---|---|---|---|---|", *rows, ""]


def build_notes(probe: dict[str, dict[int, dict]], published: dict[str, dict[int, dict]]) -> list[str]:
    notes = []
    for seed, r in sorted(probe[KEEP_ALL].items()):
        ref = published.get("stella", {}).get(seed)
        if ref is None:
            continue
        gap = " / ".join(f"{_initial_avg(r, d, 'Avg') - _initial_avg(ref, d, 'Avg'):+.2f}" for d, _ in DIRS)
        notes.append(f"- seed {seed}: " + ("the same build as the published runs (zero-shot recall identical)"
                                           if r["recall_initial"] == ref["recall_initial"] else
                                           f"another build than the published runs: zero-shot Avg A→V / V→A "
                                           f"differs by {gap}"))
    return notes


def report(probe_dir: Path, published_dir: Path, *, n_boot: int = N_BOOT) -> str:
    runs = load_runs(probe_dir)
    if KEEP_ALL not in runs:
        raise SystemExit(f"{probe_dir}: no complete {KEEP_ALL} run under runs/{KEEP_ALL}/seed*/results.json")
    for k, group in runs.items():
        for r in group:
            if r.get("strategy") != k.split("-mem")[0]:
                raise SystemExit(f"{probe_dir}/runs/{k}/seed{r.get('seed')}: a run of {r.get('strategy')!r}, "
                                 f"not of {k!r}")
    probe = _by_seed(runs)
    published = _by_seed({k: g for k, g in load_runs_in(published_dir).items() if k in REFERENCES})
    builds = build_notes(probe, published)
    paired = paired_section(probe, n_boot=n_boot)
    lines = ["# Keep-all probe: random patches with every token kept", "",
             "Written by `python experiments/probe_keepall.py --probe docs/results/synthetic_v5/probes/keepall "
             "--published docs/results/synthetic_v5/runs --out docs/results/synthetic_v5/probes/keepall/README.md`.",
             "", "`stella_keepall` differs from random patches only in κ (1 instead of 0.5): the same visible "
             "tokens, the same stored clips, but the MAE reconstructs every masked patch instead of only the kept "
             "ones. Avg 𝒜 (mean of R@1/5/10, %); localisation from the downstream block.", "",
             *paired,
             "## Per seed, beside the published runs", "",
             *seed_table(probe, published), "", "Initialisation builds of the probe against the published runs:",
             *builds, ""]
    if any("another build" in b for b in builds):
        lines += ["Rows marked *published* come from other builds (another CPU kernel path gives other "
                  "floating-point results), so the probe's lead over them is not paired over the initialisation. "
                  + ("The paired section above compares runs of one build." if paired else
                     "A decision with intervals needs references run from the probe's builds (same machine)."), ""]
    lines += machine_section(probe, published)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=Path, required=True,
                   help="folder with runs/<key>/seed<s>/results.json: stella_keepall and its references")
    p.add_argument("--published", type=Path, required=True, help="the comparison's runs/ folder")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (atomically) as well")
    p.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap replicates of the paired section")
    args = p.parse_args(argv)
    from stella_avalanche.utils import print_and_write

    print_and_write(report(args.probe, args.published, n_boot=args.n_boot), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
