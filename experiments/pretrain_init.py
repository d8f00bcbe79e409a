#!/usr/bin/env python
"""Stage 1 (pretrained initialisation): MAE + contrastive pre-training of the backbone.

- Synthetic benchmark: trains on the generator's ``init`` split (12 classes not in any task, fresh
  clips every step) and stores the checkpoint in the cache that ``run_stella.py`` uses
  (``--out`` copies it elsewhere too). This is what ``run_stella.py`` builds automatically on first use.
- Real data: ``--split-csv`` (e.g. the VGGSound "unused" list, docs/method.md §2) under ``--data-root``.

    python experiments/pretrain_init.py                        # synthetic, tiny model
    python experiments/pretrain_init.py --split-csv vgg_unused_cleaned_shrink8.csv --data-root /data \
        --model base --steps 20000 --batch-size 48 --lr 1e-4 --out stage1.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "base"), default="tiny")
    p.add_argument("--preset", default="default", help="synthetic preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--split-csv", default=None, help="real-data initialisation list (STELLA split csv)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--out", default=None, help="also write the checkpoint here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from stella_avalanche.data.features import FeatureConfig
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.training.pretrain import InitSchedule, pretrain_backbone, synthetic_initialisation
    from stella_avalanche.utils import atomic_torch_save, resolve_device

    device = resolve_device(args.device)
    if args.split_csv is None:
        feats = FeatureConfig.synthetic()
        cfg = model_config_for(args.model, feats)
        sched = InitSchedule()
        if args.steps is not None:  # keep the recipe's share of contrastive-only steps
            sched = dataclasses.replace(sched, backbone_steps=args.steps, contrastive_only_steps=args.steps
                                        * sched.contrastive_only_steps // sched.backbone_steps)
        sched = dataclasses.replace(sched, **{k: v for k, v in (("batch_size", args.batch_size),
                                                                 ("lr", args.lr)) if v is not None})
        paths = synthetic_initialisation(cfg, preset=args.preset, seed=args.seed, schedule=sched,
                                         device=device, force=args.force)
        print(f"backbone: {paths['backbone']}\nAVM: {paths['avm']}")
        if args.out:
            shutil.copyfile(paths["backbone"], args.out)
            print(f"copied to {args.out}")
        return 0

    if not args.data_root or not args.out:
        p.error("--split-csv needs --data-root and --out")
    from torch.utils.data import DataLoader

    from stella_avalanche.data.datasets import AudioVideoDataset, collate_av
    from stella_avalanche.data.manifests import read_split_csv

    feats = FeatureConfig.paper()
    records = read_split_csv(args.split_csv, data_root=args.data_root)
    tasks = sorted({r.category for r in records})
    ds = AudioVideoDataset(records, features=feats, train=True, task_names=tasks, on_error="skip", seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size or 48, shuffle=True, drop_last=True,
                        collate_fn=collate_av, num_workers=4)
    cfg = model_config_for(args.model, feats)
    torch.manual_seed(args.seed)
    model = CAVMAE(cfg)
    hist = pretrain_backbone(model, loader, steps=args.steps or 10000, lr=args.lr or 1e-4, device=device)
    atomic_torch_save({"model": model.state_dict(), "meta": {"split_csv": args.split_csv, "history": hist[-50:]}},
                      args.out)
    print(f"backbone: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
