"""Where does stage 2 saturate? The AVM's held-out matching accuracy during a long stage 2.

Trains the synthetic initialisation's AVM on a cached (or newly built) stage-1 backbone of the default
recipe for ``--steps`` steps without stopping at the target accuracy, evaluating every
``InitSchedule.avm_eval_every`` steps on the held-out init clips (the criterion's own measurement),
and prints the stage-2 record as JSON. The AVM is cached under its own key like any other build.

    python experiments/stage2_curve.py --train-seed 1 --steps 1000 --out stage2_curve.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--train-seed", type=int, default=None, help="training seed (default: the data seed)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stella_avalanche.data.synthetic import default_features
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.training.pretrain import InitSchedule, synthetic_initialisation
    from stella_avalanche.utils import atomic_write_json

    cfg = model_config_for("tiny", default_features(args.preset))
    # a target above 1 never stops the loop: the whole curve is recorded
    sched = dataclasses.replace(InitSchedule(), train_seed=args.train_seed, avm_steps=args.steps,
                                avm_target_accuracy=1.01)
    paths = synthetic_initialisation(cfg, preset=args.preset, seed=args.seed, schedule=sched, device="cpu",
                                     progress=False)
    meta = torch.load(paths["avm"], map_location="cpu", weights_only=False)["meta"]
    out = {"preset": args.preset, "seed": args.seed, "train_seed": args.train_seed, "steps": args.steps,
           "backbone_key": meta["key"], **meta["stage2"]}
    print(json.dumps(out, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
