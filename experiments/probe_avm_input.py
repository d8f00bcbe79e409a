"""Probe: what can a fresh AVM learn on a frozen backbone, from which of its features?

Trains a freshly initialised AVM (the model preset's pooling) on init-stream batches with the backbone
frozen. Every ``--eval-every`` steps it prints its training loss and the selection diagnostics on the
stream's retrieval clips (``stella_avalanche/evaluation/diagnostics.py``): matching AUC against the
next clip's video, and the importance lift / candidate recall on the sounding object and the sounding
audio tokens. The AVM input is chosen with ``--features``:

- ``joint``: the joint fusion pass over both modalities (the paper's AVM input);
- ``unimodal``: each modality's own fusion pass (``avm_features="unimodal"``);
- ``codes``: the modality encoders' outputs, before any fusion block (probe only).

On the default synthetic initialisation the AVM matches only on unimodal features and localises the
object only on the codes (docs/synthetic.md, "Which features the AVM reads").

    python experiments/probe_avm_input.py --features joint
    python experiments/probe_avm_input.py --features codes --steps 300 --eval-every 100
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

#: the diagnostics each evaluation prints (docs/diagnostics.md)
REPORTED = ("avm_accuracy", "avm_auc", "video_object_lift", "video_object_recall_candidates",
            "audio_sounding_lift", "audio_sounding_recall_candidates")


def _probe_backbone(cfg, features: str):
    """A backbone whose AVM inputs are the requested features (``codes``: the fusion pass skipped)."""
    from stella_avalanche.models.cav import CAVMAE

    class _CodesBackbone(CAVMAE):
        def fuse_unimodal(self, U, ids, modality, *, final_norm=True):  # AVM input = the codes themselves
            return U

    source = "joint" if features == "joint" else "unimodal"
    cls = _CodesBackbone if features == "codes" else CAVMAE
    return cls(dataclasses.replace(cfg, avm_features=source))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", choices=("joint", "unimodal", "codes"), default="joint")
    p.add_argument("--backbone", default=None, help="stage-1 checkpoint (default: the cached synthetic init)")
    p.add_argument("--preset", default="default", help="synthetic preset")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--per-class", type=int, default=5, help="stream retrieval clips per class scored")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch.utils.data import DataLoader

    from stella_avalanche.data import synthetic as S
    from stella_avalanche.evaluation.diagnostics import diagnose
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.loading import load_backbone_weights
    from stella_avalanche.training.pretrain import avm_training_step, synthetic_initialisation

    cfg = model_config_for("tiny", S.default_features(args.preset))
    backbone = args.backbone or synthetic_initialisation(cfg, preset=args.preset)["backbone"]
    torch.manual_seed(0)
    model = _probe_backbone(cfg, args.features)
    load_backbone_weights(model, backbone)
    model.eval()
    avm = build_avm(model)
    opt = torch.optim.Adam(avm.parameters(), lr=args.lr)
    clips = S.render_split(args.preset, 0, "retrieval", per_class=args.per_class)
    batches = iter(DataLoader(S.SyntheticInitDataset(preset=args.preset, seed=0), batch_size=32))
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        losses.append(avm_training_step(model, avm, next(batches), opt, generator=gen))
        if step % args.eval_every == 0 or step == args.steps:
            recent = losses[-args.eval_every:]
            res = diagnose(model, avm, clips, preset=args.preset)
            print(json.dumps({"features": args.features, "step": step,
                              "train_loss": round(sum(recent) / len(recent), 4),
                              **{k: round(float(res[k]), 4) for k in REPORTED}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
