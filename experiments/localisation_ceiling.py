#!/usr/bin/env python
"""What the pixel-level localisation column can show on the synthetic benchmark: a test of why it
disagrees with the patch-level column.

The localisation head is fitted on patch targets where a patch is positive if it holds any object pixel;
the pixel column upsamples the head's patch logits bilinearly and binarises them at a threshold chosen
on the fit frames. This script builds the synthetic transfer frames of a run's configuration (no model)
and scores maps made from the ground truth in exactly that way:

- ``ideal_patch_head``: logits ±s on the any-pooled mask, a head that learned its target perfectly
  (patch mIoU 100), for several sharpnesses s;
- ``coverage_graded``: logit of each patch's object coverage, a head that says how much of a patch is
  object.

It also reads every published run's two localisation means and gives their rank correlation. If the
ideal head scores about what the trained heads score at pixel level, and the two columns are negatively
correlated across runs, a higher patch score cannot be expected to raise the pixel score on this grid.

    python experiments/localisation_ceiling.py --runs docs/results/synthetic_v5/runs \\
        --out docs/results/synthetic_v5/localisation_ceiling.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: sharpnesses s of the ideal head's logits (±s): a softer map upsamples into a graded boundary
SHARPNESS = (1.0, 2.0, 4.0, 8.0)


def published_localisation(runs: Path) -> list[dict[str, Any]]:
    """``{"key", "seed", "miou_patch", "miou_pixel"}`` of every complete run under ``runs`` with a localise block."""
    from stella_avalanche.evaluation.comparison import load_runs_in

    rows = []
    for key, group in load_runs_in(runs).items():
        for r in group:
            loc = (r.get("downstream") or {}).get("localise") or {}
            if loc.get("miou_patch") is not None and loc.get("miou_pixel") is not None:
                rows.append({"key": key, "seed": r.get("seed"),
                             "miou_patch": float(loc["miou_patch"]), "miou_pixel": float(loc["miou_pixel"])})
    return rows


def ceiling(cfg: dict) -> dict[str, Any]:
    """Model-free pixel scores of ground-truth maps on the synthetic transfer frames of ``cfg``."""
    import torch

    from stella_avalanche.data.synthetic.transfer import SyntheticTransferDataset
    from stella_avalanche.evaluation import downstream as D
    from stella_avalanche.experiment import _build_benchmark
    from stella_avalanche.models.config import model_config_for

    bm = _build_benchmark(cfg)
    dc = D.DownstreamConfig.from_dict(cfg.get("downstream"))
    mc = model_config_for(cfg["model"]["preset"], bm.features, **(cfg["model"].get("overrides") or {}))
    patch, size = mc.patch_size, mc.img_size
    px = {}
    for part, per_class in (("fit", dc.localise_fit_per_class), ("eval", dc.transfer_per_class)):
        ds = SyntheticTransferDataset(preset=bm.preset, seed=bm.seed, part=part, per_class=per_class,
                                      num_classes=dc.transfer_classes, features=bm.features, progress=False)
        masks, valid = torch.from_numpy(ds.masks(patch_size=1, frame_size=size)), torch.from_numpy(ds.sounding())
        px[part] = masks[valid]
    pos = D.patch_coverage(px["eval"], patch)[D._any_pooled(px["eval"], patch)]
    out: dict[str, Any] = {
        "grid": size // patch, "patch": patch, "frame_size": size,
        "frames": {k: len(v) for k, v in px.items()},
        "patch_positive_share": round(float(D._any_pooled(px["eval"], patch).float().mean()), 4),
        "pixel_positive_share": round(float(px["eval"].float().mean()), 4),
        "positive_patch_coverage": {"median": round(float(pos.median()), 4),
                                    "share_below_0.25": round(float((pos < 0.25).float().mean()), 4),
                                    "share_below_0.5": round(float((pos < 0.5).float().mean()), 4)},
        "ideal_patch_head": {}}

    def maps(part: str, kind: str, s: float = 1.0) -> torch.Tensor:
        m = px[part]
        if kind == "ideal":
            return (D._any_pooled(m, patch).reshape(len(m), -1).float() * 2 - 1) * s
        return torch.logit(D.patch_coverage(m, patch).reshape(len(m), -1).clamp(0.02, 0.98))

    for s in SHARPNESS:
        r = D.pixel_score_of_patch_maps(maps("fit", "ideal", s), maps("eval", "ideal", s), px["fit"], px["eval"])
        out["ideal_patch_head"][f"s={s:g}"] = {"threshold": r["threshold"], "miou_pixel": round(r["miou_pixel"], 2)}
    r = D.pixel_score_of_patch_maps(maps("fit", "cov"), maps("eval", "cov"), px["fit"], px["eval"])
    out["coverage_graded"] = {"threshold": r["threshold"], "miou_pixel": round(r["miou_pixel"], 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="a comparison's runs/ folder (configs and localisation means)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (atomically) as well as printing it")
    args = p.parse_args(argv)
    import torch
    from scipy.stats import spearmanr

    from stella_avalanche.utils import print_and_write

    torch.set_num_threads(1)
    rows = published_localisation(args.runs)
    if not rows:
        raise SystemExit(f"{args.runs}: no complete run with a localisation block")
    first = next(args.runs.glob("*/seed*/results.json"))
    out = {"command": "python experiments/localisation_ceiling.py --runs " + args.runs.as_posix(),
           **ceiling(json.loads(first.read_text())["config"])}
    rho = spearmanr([r["miou_patch"] for r in rows], [r["miou_pixel"] for r in rows])
    out["runs"] = {"count": len(rows), "spearman_patch_vs_pixel": round(float(rho.statistic), 3),
                   "p_value": float(f"{rho.pvalue:.2g}"),
                   "miou_patch_range": [min(r["miou_patch"] for r in rows), max(r["miou_patch"] for r in rows)],
                   "miou_pixel_range": [min(r["miou_pixel"] for r in rows), max(r["miou_pixel"] for r in rows)]}
    text = json.dumps(out, indent=1) + "\n"
    print_and_write(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
