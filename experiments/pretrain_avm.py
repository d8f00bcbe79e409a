#!/usr/bin/env python
"""Stage 2: train the audio-video matching (AVM) module with the backbone frozen.

    python experiments/pretrain_avm.py --backbone stage1.pt --split-csv vgg_unused_cleaned_shrink8.csv \
        --data-root /data --model base --steps 15000 --out avm.pt
    python experiments/pretrain_avm.py            # synthetic: builds/caches the default AVM (as run_stella.py does)
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "base"), default="tiny")
    p.add_argument("--backbone", default=None, help="stage-1 checkpoint (real data)")
    p.add_argument("--split-csv", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from stella_avalanche.data.features import FeatureConfig
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.loading import load_backbone_weights
    from stella_avalanche.training.pretrain import pretrain_avm, synthetic_initialisation
    from stella_avalanche.utils import atomic_torch_save, resolve_device

    device = resolve_device(args.device)
    if args.split_csv is None:
        feats = FeatureConfig.synthetic()
        cfg = model_config_for(args.model, feats)
        paths = synthetic_initialisation(cfg, device=device)
        print(f"AVM: {paths['avm']}")
        if args.out:
            shutil.copyfile(paths["avm"], args.out)
        return 0
    if not (args.backbone and args.data_root and args.out):
        p.error("--split-csv needs --backbone, --data-root and --out")
    from torch.utils.data import DataLoader

    from stella_avalanche.data.datasets import AudioVideoDataset, collate_av
    from stella_avalanche.data.manifests import read_split_csv

    feats = FeatureConfig.paper()
    records = read_split_csv(args.split_csv, data_root=args.data_root)
    ds = AudioVideoDataset(records, features=feats, train=True, task_names=sorted({r.category for r in records}),
                           on_error="skip", seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate_av,
                        num_workers=4)
    cfg = model_config_for(args.model, feats)
    model = CAVMAE(cfg)
    load_backbone_weights(model, args.backbone)
    avm = build_avm(model)
    hist = pretrain_avm(model, avm, loader, steps=args.steps or 10000, lr=args.lr, device=device,
                        generator=torch.Generator().manual_seed(args.seed))
    atomic_torch_save({"avm": avm.state_dict(), "meta": {"history": hist[-50:]}}, args.out)
    print(f"AVM: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
