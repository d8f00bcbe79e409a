"""Retrieval oracles of a synthetic preset from the generator's ground truth (no model, no training).

    python -m stella_avalanche.cli.oracle                       # the default preset, printed
    python -m stella_avalanche.cli.oracle --preset default instance_cues half_sounding --out docs/results/synthetic_oracle

Prints, per preset, the expected R@1/5/10 and their mean (Avg 𝒜 of a model that never changes) of a
ranker that knows only the instance cues and of one that also knows each clip's class, on the
retrieval split ranked as the runs rank it (``--gallery-pools`` sub-pools); ``--cue-bins`` adds the
binned continuous cues (pitch shift, loudness) to the instance cues. See
:mod:`stella_avalanche.evaluation.oracle`. With ``--out`` it writes ``oracle.json`` and ``oracle.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from stella_avalanche.evaluation.oracle import retrieval_oracles, split_truths
from stella_avalanche.utils import atomic_write


def oracle_table(presets: Sequence[str], *, data_seed: int = 0, gallery_pools: int = 4,
                 cue_bins: Sequence[int] = (0,)) -> dict[str, dict]:
    """``{preset: {"cue_bins=<b>": retrieval_oracles(...)}}`` for every preset and cue resolution."""
    out: dict[str, dict] = {}
    for name in presets:
        s = split_truths(name, data_seed)
        out[name] = {f"cue_bins={b}": retrieval_oracles(s["truth"], s["label"], s["index"],
                                                         gallery_pools=gallery_pools, cue_bins=b)
                     for b in cue_bins}
    return out


def oracle_markdown(table: dict[str, dict]) -> str:
    lines = ["| preset | instance cues | gallery | instance-only R@1 / R@5 / R@10 | instance-only Avg | "
             "class-aware R@1 / R@5 / R@10 | class-aware Avg |", "|---|---|---|---|---|---|---|"]
    for name, by_bins in table.items():
        for bins, o in by_bins.items():
            cues = "on/off pattern" if bins == "cue_bins=0" else f"pattern + pitch, loudness in {bins.split('=')[1]} bins"
            i, c = o["instance_only"], o["class_aware"]
            lines.append(f"| {name} | {cues} | {o['gallery']['clips_per_pool']:.0f} | "
                         f"{i['R@1']:.1f} / {i['R@5']:.1f} / {i['R@10']:.1f} | {i['avg']:.1f} | "
                         f"{c['R@1']:.1f} / {c['R@5']:.1f} / {c['R@10']:.1f} | {c['avg']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["default"], help="synthetic preset(s)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--gallery-pools", type=int, default=4, help="the runs' eval.gallery_pools")
    p.add_argument("--cue-bins", nargs="+", type=int, default=[0, 3],
                   help="0: the on/off pattern only; B > 0: also pitch shift and loudness in B bins")
    p.add_argument("--out", type=Path, default=None, help="directory for oracle.json and oracle.md")
    args = p.parse_args(argv)
    table = oracle_table(args.preset, data_seed=args.data_seed, gallery_pools=args.gallery_pools,
                         cue_bins=args.cue_bins)
    md = oracle_markdown(table)
    print(md, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out / "oracle.json") as fh:
            fh.write(json.dumps({"data_seed": args.data_seed, "gallery_pools": args.gallery_pools,
                                 "oracles": table}, indent=1, sort_keys=True) + "\n")
        with atomic_write(args.out / "oracle.md") as fh:
            fh.write(md)
        print(f"wrote {args.out}/oracle.json and oracle.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
