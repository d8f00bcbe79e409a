"""``stella-pretrain``: the two stages before the continual stream.

``stella-pretrain init`` (stage 1) pre-trains the backbone with MAE + contrastive losses on data
outside the stream; ``stella-pretrain avm`` (stage 2) trains the audio-video matching module STELLA
needs with that backbone frozen. Their outputs are the ``--init-checkpoint`` and ``--avm-checkpoint``
of ``stella-run``.

- Synthetic benchmark (no ``--split-csv``): stage 1 trains on the generator's ``init`` split (classes
  in no task, fresh clips every step) and both stages go into the cache ``stella-run`` uses
  (``--out`` copies the file elsewhere too). ``stella-run`` builds them on first use anyway.
- Real data: ``--split-csv`` under ``--data-root``, e.g. the VGGSound "unused" list that
  ``stella-prepare vggsound`` writes (docs/method.md §2). ``--backbone`` of stage 2 also accepts a
  published CAV-MAE pre-training checkpoint (mapped by ``stella_avalanche/models/weights.py``).

Examples::

    stella-pretrain init                                         # synthetic, tiny model
    stella-pretrain init --split-csv DATA/vgg_unused_cleaned_shrink8.csv --data-root DATA \\
        --model base --steps 20000 --batch-size 48 --lr 1e-4 --out stage1.pt
    stella-pretrain avm --backbone stage1.pt --split-csv DATA/vgg_unused_cleaned_shrink8.csv \\
        --data-root DATA --model base --steps 15000 --out avm.pt

``experiments/pretrain_init.py`` and ``experiments/pretrain_avm.py`` are the two subcommands as scripts.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from typing import Optional, Sequence

import torch

__all__ = ["build_parser", "main"]


def _init_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("tiny", "base"), default="tiny")
    p.add_argument("--preset", default="default", help="synthetic preset")
    p.add_argument("--seed", type=int, default=0, help="data seed (the stream's and the init stream's clips)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="synthetic: seed of the training of both stages (default: the data seed)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--split-csv", default=None, help="real-data initialisation list (STELLA split csv)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--out", default=None, help="also write the checkpoint here")
    p.add_argument("--workers", type=int, default=4, help="data-loader workers (real data)")


def _avm_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--workers", type=int, default=4, help="data-loader workers (real data)")


def _stage1(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Stage 1: the backbone initialisation (synthetic cache, or a real-data split)."""
    from stella_avalanche.data.features import FeatureConfig
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.cav import CAVMAE
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
        sched = dataclasses.replace(sched, **{k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                                                                 ("train_seed", args.train_seed)) if v is not None})
        paths = synthetic_initialisation(cfg, preset=args.preset, seed=args.seed, schedule=sched,
                                         device=device, force=args.force)
        print(f"backbone: {paths['backbone']}\nAVM: {paths['avm']}")
        if args.out:
            shutil.copyfile(paths["backbone"], args.out)
            print(f"copied to {args.out}")
        return 0

    if not args.data_root or not args.out:
        parser.error("--split-csv needs --data-root and --out")
    from torch.utils.data import DataLoader

    from stella_avalanche.data.datasets import AudioVideoDataset, collate_av
    from stella_avalanche.data.manifests import read_split_csv

    feats = FeatureConfig.paper()
    records = read_split_csv(args.split_csv, data_root=args.data_root)
    tasks = sorted({r.category for r in records})
    ds = AudioVideoDataset(records, features=feats, train=True, task_names=tasks, on_error="skip", seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size or 48, shuffle=True, drop_last=True,
                        collate_fn=collate_av, num_workers=args.workers)
    cfg = model_config_for(args.model, feats)
    torch.manual_seed(args.seed)
    model = CAVMAE(cfg)
    hist = pretrain_backbone(model, loader, steps=args.steps or 10000, lr=args.lr or 1e-4, device=device)
    atomic_torch_save({"model": model.state_dict(), "meta": {"split_csv": args.split_csv, "history": hist[-50:]}},
                      args.out)
    print(f"backbone: {args.out}")
    return 0



def _stage2(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Stage 2: the AVM on a frozen stage-1 backbone (synthetic cache, or a real-data split)."""
    from stella_avalanche.data.features import FeatureConfig
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.cav import CAVMAE
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
        parser.error("--split-csv needs --backbone, --data-root and --out")
    from torch.utils.data import DataLoader

    from stella_avalanche.data.datasets import AudioVideoDataset, collate_av
    from stella_avalanche.data.manifests import read_split_csv

    feats = FeatureConfig.paper()
    records = read_split_csv(args.split_csv, data_root=args.data_root)
    ds = AudioVideoDataset(records, features=feats, train=True, task_names=sorted({r.category for r in records}),
                           on_error="skip", seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate_av,
                        num_workers=args.workers)
    cfg = model_config_for(args.model, feats)
    model = CAVMAE(cfg)
    load_backbone_weights(model, args.backbone)
    avm = build_avm(model)
    hist = pretrain_avm(model, avm, loader, steps=args.steps or 10000, lr=args.lr, device=device,
                        generator=torch.Generator().manual_seed(args.seed))
    atomic_torch_save({"avm": avm.state_dict(), "meta": {"history": hist[-50:]}}, args.out)
    print(f"AVM: {args.out}")
    return 0



def build_parser() -> argparse.ArgumentParser:
    """The command line: ``init`` (stage 1) and ``avm`` (stage 2)."""
    p = argparse.ArgumentParser(prog="stella-pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    init = sub.add_parser("init", help="stage 1: backbone initialisation (MAE + contrastive)")
    _init_options(init)
    init.set_defaults(run=_stage1, parser=init)
    avm = sub.add_parser("avm", help="stage 2: the AVM on the frozen stage-1 backbone")
    _avm_options(avm)
    avm.set_defaults(run=_stage2, parser=avm)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
