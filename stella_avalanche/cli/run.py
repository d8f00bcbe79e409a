r"""Main entry: one continual pre-training strategy on one benchmark, evaluated by zero-shot
audio<->video retrieval after every task.

Examples::

    stella-run                                  # STELLA, synthetic, tiny model
    stella-run --strategy finetune --out runs/ft
    stella-run --strategy multitask --seed 1 train.epochs=2
    stella-run --benchmark vggsound --data-root /data --model base \
        --init-checkpoint stage1.pt --avm-checkpoint avm.pt

Also ``python -m stella_avalanche.cli.run`` or ``experiments/run_stella.py``.

Outputs in --out (default runs/<benchmark>-<strategy>-seed<seed>): results.json (rewritten atomically
after every task), summary.md, recall-matrix, task-curve and loss-curve PNGs, metrics.jsonl (every
metric value and the training losses), TensorBoard events (tb/), log.txt. The terminal shows progress
bars and one recall line per task; --verbose prints every metric value, --quiet only the final table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stella_avalanche.training.strategies import ABLATION_STRATEGIES, STRATEGY_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=STRATEGY_NAMES, default=None,
                   help="continual strategy (default: the config's, stella); ablation variants of STELLA: "
                        + ", ".join(ABLATION_STRATEGIES))
    p.add_argument("--benchmark", choices=("synthetic", "vggsound", "audioset"), default="synthetic")
    p.add_argument("--data-root", default=None, help="data root of a real benchmark (prepared splits)")
    p.add_argument("--model", choices=("tiny", "base"), default=None, help="backbone size preset")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task")
    p.add_argument("--batch-size", type=int, default=None, help="current batch size N")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="output directory (default runs/<benchmark>-<strategy>-seed<seed>)")
    p.add_argument("--config", default=None,
                   help="YAML config: a file path or a packaged preset name (synthetic_tiny, vggsound_paper, "
                        "audioset_paper); default: the benchmark's preset")
    p.add_argument("--init-checkpoint", default=None,
                   help="stage-1 backbone: project checkpoint, CAV-MAE or ImageNet-MAE weights; 'none' = random")
    p.add_argument("--avm-checkpoint", default=None, help="stage-2 AVM checkpoint (pretrain_avm.py)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (feature caches, synthetic initialisation, training) and no per-task "
                        "lines; warnings and the final table still print")
    p.add_argument("--verbose", action="store_true",
                   help="print every metric value of every evaluation (Avalanche's InteractiveLogger) instead of "
                        "one recall line per task; the files in --out hold everything either way")
    # downstream suite (issue 12): config key downstream.enabled; unset = on for the synthetic benchmark
    p.add_argument("--downstream", action=argparse.BooleanOptionalAction, default=None,
                   help="run the frozen-backbone downstream suite (probe, transfer, localisation, gap) at the end "
                        "of the stream and add a 'downstream' block to results.json (default: on for synthetic)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=3e-4 strategy.params.mem_size=500")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stella_avalanche.distributed import get_rank
    from stella_avalanche.experiment import load_config, run_experiment
    from stella_avalanche.evaluation.report import summary_table_markdown
    from stella_avalanche.utils import set_progress

    set_progress(not args.quiet)

    overrides = list(args.overrides)
    if args.config is None:
        overrides.insert(0, f"benchmark.name={args.benchmark}")
    for flag, key in (("strategy", "strategy.name"), ("data_root", "benchmark.root"), ("model", "model.preset"),
                      ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
                      ("init_checkpoint", "init.checkpoint"), ("avm_checkpoint", "init.avm_checkpoint")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.downstream is not None:  # downstream suite (issue 12)
        overrides.append(f"downstream.enabled={'true' if args.downstream else 'false'}")
    cfg = load_config(args.config, benchmark=args.benchmark, overrides=overrides)
    out = Path(args.out or f"runs/{cfg['benchmark']['name']}-{cfg['strategy']['name']}-seed{args.seed}")
    if get_rank() == 0:
        print(f"output folder: {out}  (results.json, summary.md, plots, metrics.jsonl, tb/, log.txt)", flush=True)
    results = run_experiment(cfg, out_dir=out, seed=args.seed, device=args.device, progress=not args.quiet,
                             resume=args.resume, verbose=args.verbose)
    if get_rank() == 0:  # under torchrun every rank returns the same results: one voice
        print()
        print(summary_table_markdown(results))
        print(f"\nresults: {out / 'results.json'}  (summary.md and plots in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
