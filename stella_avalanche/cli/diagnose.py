"""Does STELLA's selection see what it selects? Diagnostics of a backbone + AVM on ground truth.

    stella-diagnose                        # the cached synthetic initialisation
    stella-diagnose --checkpoint runs/stella/checkpoints/ckpt-000000576.pt
    stella-diagnose --backbone b.pt --avm a.pt --out diag/

Scores the synthetic benchmark's retrieval clips (rendered from the generator with their ground truth;
never training clips) and prints one JSON object: the backbone's pair AUC, the AVM's matching accuracy
and AUC, video / audio importance lift and recall, RCA on visual twins vs unrelated clips, and the
geometry oracle. With ``--out`` it also writes ``diagnostics.json`` and pictures (frames with the
importance heat map and the selected patches outlined; the spectrogram with the kept chunks shaded and
the ground-truth sounding segments marked). See docs/diagnostics.md for every key.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point (``stella-diagnose``); returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None,
                     help="a run's checkpoint (ckpt-*.pt): its backbone and, for STELLA, its AVM")
    src.add_argument("--backbone", default=None, help="a stage-1 backbone checkpoint (needs --avm)")
    p.add_argument("--avm", default=None, help="a stage-2 AVM checkpoint (with --backbone)")
    p.add_argument("--preset", default="default", help="synthetic preset (default: default)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=None, help="retrieval clips per class (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for diagnostics.json and the pictures")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.backbone and not args.avm:
        p.error("--backbone needs --avm")

    import torch

    from stella_avalanche.evaluation.diagnosed_models import load_models
    from stella_avalanche.evaluation.diagnostics import run_diagnostics

    if args.threads:
        torch.set_num_threads(args.threads)
    model, avm, source = load_models(checkpoint=args.checkpoint, backbone=args.backbone, avm=args.avm,
                                     preset=args.preset, data_seed=args.data_seed)
    result = run_diagnostics(model, avm, preset=args.preset, data_seed=args.data_seed, per_class=args.per_class,
                             out_dir=args.out)
    result["source"] = source
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
