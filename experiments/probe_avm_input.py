"""Probe: can a fresh AVM learn to match on a given backbone, from joint-pass or unimodal features?

Trains a freshly initialised AVM (the model preset's pooling) on init-stream batches with the backbone
frozen, and every ``--eval-every`` steps prints its training loss and its ROC AUC on the stream's
retrieval clips (each clip against the next clip's video). ``--features joint`` feeds the AVM what
STELLA feeds it (the joint fusion pass, docs/method.md §3); ``--features unimodal`` feeds each
modality's own fusion pass instead. On the default synthetic initialisation the AVM stays at ln 2 on
joint features and learns on unimodal ones (docs/synthetic.md, "The default recipe").

    python experiments/probe_avm_input.py --features joint
    python experiments/probe_avm_input.py --features unimodal --steps 250
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", choices=("joint", "unimodal"), default="joint")
    p.add_argument("--backbone", default=None, help="stage-1 checkpoint (default: the cached synthetic init)")
    p.add_argument("--preset", default="default", help="synthetic preset")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch.utils.data import DataLoader

    from stella_avalanche.data import synthetic as S
    from stella_avalanche.evaluation.diagnostics import roc_auc
    from stella_avalanche.experiment import model_config_for
    from stella_avalanche.models.avm import build_avm, matching_pairs
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.loading import load_backbone_weights
    from stella_avalanche.training.pretrain import synthetic_initialisation

    cfg = model_config_for("tiny", S.default_features(args.preset))
    backbone = args.backbone or synthetic_initialisation(cfg, preset=args.preset)["backbone"]
    torch.manual_seed(0)
    model = CAVMAE(cfg)
    load_backbone_weights(model, backbone)
    model.eval()
    avm = build_avm(model)
    opt = torch.optim.Adam(avm.parameters(), lr=args.lr)

    @torch.no_grad()
    def features(video: torch.Tensor, audio: torch.Tensor, vidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AVM inputs for audio row n paired with video row ``vidx[n]``."""
        U_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
        U_v = model.encode_modality(model.patchify_video(video), None, "video")
        if args.features == "joint":
            return model.fuse_joint(U_a, None, U_v[vidx], None)
        return (model.fuse_unimodal(U_a, None, "audio", final_norm=False),
                model.fuse_unimodal(U_v, None, "video", final_norm=False)[vidx])

    clips = S.render_split(args.preset, 0, "retrieval", per_class=5)
    n = clips["video"].shape[0]

    @torch.no_grad()
    def stream_auc() -> float:
        pos = avm(*features(clips["video"], clips["audio"], torch.arange(n)))
        neg = avm(*features(clips["video"], clips["audio"], torch.arange(n).roll(1)))
        return roc_auc(pos, neg)

    batches = iter(DataLoader(S.SyntheticInitDataset(preset=args.preset, seed=0), batch_size=32))
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        batch = next(batches)
        labels, vidx, _ = matching_pairs(batch["video"].shape[0], generator=gen)
        loss = F.binary_cross_entropy_with_logits(avm(*features(batch["video"], batch["audio"], vidx)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            recent = losses[-args.eval_every:]
            print(json.dumps({"features": args.features, "step": step, "train_loss": round(sum(recent) / len(recent), 4),
                              "stream_auc": round(stream_auc(), 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
