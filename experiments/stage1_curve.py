"""Where does stage 1 saturate? The backbone's pair AUC on the stream's clips during a long stage 1.

Trains the synthetic initialisation's backbone from scratch with the default recipe's first phase
(InfoNCE alone on unmasked clips of the per-clip init stream, ``InitSchedule.contrastive_only_steps``)
for ``--steps`` steps, and every ``--eval-every`` steps prints one JSON line: the mean training
InfoNCE of the last window (ln batch = chance), the pair AUC on the stream's retrieval clips (own
partner against same-class and other-class clips; 0.5 = no correspondence) and on held-out init
clips. ``--save-at`` writes backbone checkpoints at chosen steps (loadable with
``experiments/probe_avm_input.py --backbone`` or ``run_stella.py init.backbone=...``); the decoder is
untrained in them, as after the InfoNCE phase of the default recipe.

    python experiments/stage1_curve.py --steps 3000 --eval-every 250 --save-at 1000 3000 --out-dir runs/s1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stella_avalanche.config import field_override
from stella_avalanche.paths import portable_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="synthetic preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--per-class", type=int, default=5, help="stream retrieval clips per class scored")
    p.add_argument("--lr", type=float, default=None, help="default: the InitSchedule's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the InitSchedule's")
    p.add_argument("--save-at", type=int, nargs="*", default=[], help="steps at which to save the backbone")
    p.add_argument("--out-dir", default=None, help="folder for --save-at checkpoints and curve.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model-override", nargs="*", default=[], metavar="FIELD=VALUE", type=field_override,
                   help="tiny-preset fields to change, e.g. embed_segments=4 (values parsed as YAML)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.save_at and not args.out_dir:
        p.error("--save-at needs --out-dir")

    import dataclasses

    from torch.utils.data import DataLoader

    from stella_avalanche.data import synthetic as S
    from stella_avalanche.evaluation.diagnostics import embed_clips, pair_auc
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.training.pretrain import InitSchedule, pretrain_backbone
    from stella_avalanche.utils import atomic_torch_save, atomic_write_json

    sched = InitSchedule()
    lr = args.lr if args.lr is not None else sched.lr
    bs = args.batch_size or sched.batch_size
    cfg = model_config_for("tiny", S.default_features(args.preset), **dict(args.model_override))
    torch.manual_seed(args.seed)
    model = CAVMAE(dataclasses.replace(cfg, contrastive_input=sched.contrastive_input))
    loader = DataLoader(S.SyntheticInitDataset(preset=args.preset, seed=args.seed), batch_size=bs)
    clips = S.render_split(args.preset, args.seed, "retrieval", per_class=args.per_class)
    held = S.SyntheticInitRetrievalDataset(preset=args.preset, seed=args.seed)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    curve: list[dict] = []
    t0 = time.perf_counter()

    @torch.no_grad()
    def on_step(step: int, history: list[dict]) -> None:
        if step % args.eval_every == 0 or step == args.steps:
            stream = pair_auc(*embed_clips(model, clips["video"], clips["audio"]), clips["label"])
            init = pair_auc(*embed_clips(model, held.video, held.audio), held.label)
            window = [h["loss_nce"] for h in history[-args.eval_every:]]
            row = {"step": step, "seconds": round(time.perf_counter() - t0),
                   "train_nce": round(statistics.fmean(window), 4),
                   "stream_pair_auc_same_class": round(stream["same_class"], 4),
                   "stream_pair_auc_other_class": round(stream["other_class"], 4),
                   "init_heldout_pair_auc": round(init["all"], 4)}
            curve.append(row)
            print(json.dumps(row), flush=True)
            if out_dir:
                atomic_write_json(out_dir / "curve.json", {"args": {**vars(args), "out_dir": portable_path(out_dir)}, "lr": lr, "batch_size": bs,
                                                           "curve": curve})
        if step in args.save_at:
            atomic_torch_save({"model": model.state_dict(),
                               "meta": {"stage1_curve_step": step, "preset": args.preset, "seed": args.seed}},
                              out_dir / f"backbone_step{step}.pt")

    pretrain_backbone(model, loader, steps=args.steps, lr=lr, warmup_steps=sched.warmup_steps, progress=False,
                      contrastive_only_steps=args.steps, on_step=on_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
