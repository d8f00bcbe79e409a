"""Probe: is RCA's coin (C near 0.5 for twins and unrelated clips alike) caused by an AVM that reads no
class, and would an AVM that reads the class make RCA informative?

STELLA's AVM is trained to tell a clip's own pair from a random mismatch. On the synthetic default a
random mismatch differs from the clip in its on/off pattern 5 times out of 6, so the AVM can match by
timing alone and never needs the class (``avm_class_auc`` about 0.5), and RCA's summary queries of
the buffer and the current clip then differ in nothing it reads. This probe takes a trained backbone
and AVM (a run's checkpoint), freezes the backbone, trains the AVM further on the stream's training
clips with one of two kinds of negatives, and measures the selection diagnostics on the retrieval
clips (``stella_avalanche.evaluation.diagnostics``):

- ``random``: a random other clip of the pool (the paper's objective; the control for more steps);
- ``same_pattern``: a clip with the same on/off pattern and another class, so timing cannot reject it
  and only the class can.

It changes nothing in the method; it tests an explanation.

    python experiments/probe_avm_negatives.py --checkpoint runs/stella/seed0/checkpoints/ckpt-000000576.pt \
        --negatives same_pattern --steps 300 --out probe_same_pattern.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stella_avalanche.evaluation.diagnostics import _codes, run_diagnostics, same_pattern_partners
from stella_avalanche.models.avm import avm_inputs
from stella_avalanche.utils import atomic_write_json

#: diagnostics the probe reports (docs/diagnostics.md)
KEYS = ("avm_accuracy", "avm_auc", "avm_class_auc", "rca_twin_auc", "rca_twin_c", "rca_unrelated_c",
        "video_object_lift", "video_object_recall_candidates", "video_object_recall_selected",
        "video_object_recall_selected_no_twin", "video_object_recall_selected_no_rca",
        "audio_sounding_recall_kept_no_twin", "audio_sounding_recall_kept_no_rca")


def negative_partners(labels: torch.Tensor, patterns: torch.Tensor, kind: str, generator: torch.Generator
                      ) -> torch.Tensor:
    """(N,) the pool row whose video is each clip's negative (-1 where the kind has none: for
    ``same_pattern`` the clips that have a same-pattern partner of their own class and of another, as
    ``avm_class_auc`` measures them; in a pool of 20 clips per class nearly all)."""
    n = labels.numel()
    if kind == "random":
        shift = torch.randint(1, n, (n,), generator=generator)
        return (torch.arange(n) + shift) % n
    rows, _, other = same_pattern_partners(labels, patterns, generator)
    out = torch.full((n,), -1, dtype=torch.long)
    out[rows] = other
    return out


def train_avm(model: torch.nn.Module, avm: torch.nn.Module, clips: dict, *, kind: str, steps: int, batch: int,
              lr: float, seed: int) -> list[float]:
    """Train the AVM with the backbone frozen: half of each batch own pairs, half negatives of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    labels = clips["label"]
    patterns = torch.as_tensor(np.array([t["pattern"] for t in clips["truth"]], dtype=bool))
    model.eval()
    avm.train()
    opt = torch.optim.Adam(avm.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        partner = negative_partners(labels, patterns, kind, g)
        pool = torch.nonzero(partner >= 0).flatten()
        rows = pool[torch.randperm(pool.numel(), generator=g)[:batch]]
        neg = torch.rand(rows.numel(), generator=g) < 0.5
        vid_rows = torch.where(neg, partner[rows], rows)
        with torch.no_grad():
            U_a, U_v = _codes(model, clips["video"][vid_rows], clips["audio"][rows])
            E_a, E_v = avm_inputs(model, U_a, U_v)
        logit = avm(E_a, E_v)
        loss = F.binary_cross_entropy_with_logits(logit.float(), (~neg).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a STELLA run's checkpoint (backbone and AVM)")
    p.add_argument("--negatives", choices=("random", "same_pattern"), required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="the continual phase's rate on the synthetic preset")
    p.add_argument("--train-per-class", type=int, default=20, help="training clips per class in the pool")
    p.add_argument("--per-class", type=int, default=5, help="retrieval clips per class for the diagnostics")
    p.add_argument("--preset", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stella_avalanche.data.synthetic import render_split
    from stella_avalanche.evaluation.diagnosed_models import load_models

    model, avm, source = load_models(checkpoint=args.checkpoint, preset=args.preset)
    for q in model.parameters():
        q.requires_grad_(False)
    pool = render_split(args.preset, 0, "train", per_class=args.train_per_class)
    retrieval = render_split(args.preset, 0, "retrieval", per_class=args.per_class)
    before = run_diagnostics(model, avm, preset=args.preset, clips=retrieval)
    losses = train_avm(model, avm, pool, kind=args.negatives, steps=args.steps, batch=args.batch, lr=args.lr,
                       seed=args.seed)
    after = run_diagnostics(model, avm, preset=args.preset, clips=retrieval)
    out = {"source": Path(args.checkpoint).name, "negatives": args.negatives, "steps": args.steps,
           "lr": args.lr, "train_clips": int(pool["label"].numel()),
           "loss_first_last_25": [float(np.mean(losses[:25])), float(np.mean(losses[-25:]))],
           "before": {k: before.get(k) for k in KEYS}, "after": {k: after.get(k) for k in KEYS}}
    print(json.dumps(out, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
