#!/usr/bin/env python
"""STELLA in your own Avalanche strategy.

Your strategy derives from ``AudioVideoPretraining`` (the template that passes STELLA's patch
selection on to the model: see ``stella_avalanche/training/contract.py``), STELLA is one plugin
among others (here Avalanche's ``LRSchedulerPlugin``), and an ``EvaluationPlugin`` collects this
project's retrieval metrics and sends them to Avalanche's stock loggers.

    python examples/stella_in_your_strategy.py                       # synthetic benchmark, 8 tasks
    python examples/stella_in_your_strategy.py --tasks 2 --epochs 1  # a quick look

Output: progress and every metric on the terminal (``InteractiveLogger``), TensorBoard events and
CSV files in ``--out`` (Avalanche's ``CSVLogger`` writes only its own accuracy and loss columns, so
the CSV holds the training loss; the recall values are on the terminal and in TensorBoard), and the
recall matrix printed at the end. The tests run it on the ``tiny``
preset (tests/test_examples.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import torch
from avalanche.evaluation.metrics import loss_metrics
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

from stella_avalanche.benchmarks.synthetic import synthetic_benchmark
from stella_avalanche.evaluation.metrics import average_accuracy, find_recall_matrix_plugin, retrieval_metrics
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import build_model
from stella_avalanche.training.plugins import STELLAPlugin
from stella_avalanche.training.template import AudioVideoPretraining, add_loss_term, make_adam


class WeightedContrastivePretraining(AudioVideoPretraining):
    """A user's strategy: the template's pre-training with the InfoNCE term weighted up.

    It keeps the template's ``forward`` (which declares the batch keys it passes to the model, so
    STELLA's kept-patch ids reach it) and changes only the loss. ``add_loss_term`` adds the extra
    term to ``self.loss`` and logs it by name next to the model's MAE and InfoNCE parts.

    :param nce_weight: weight of the model's InfoNCE term (1.0: the template's loss).
    :param kwargs: the template's arguments (model, optimizer, batch sizes, plugins, evaluator, ...).
    """

    def __init__(self, *, nce_weight: float = 1.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nce_weight = float(nce_weight)

    def _before_backward(self, **kwargs: Any) -> None:
        add_loss_term(self, "extra_nce", (self.nce_weight - 1.0) * self.mb_output["loss_nce"])
        super()._before_backward(**kwargs)  # then the plugins add theirs (STELLA: matching loss, penalty)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="synthetic preset: default, tiny (tests)")
    p.add_argument("--tasks", type=int, default=8, help="train on the first N tasks")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mem-size", type=int, default=200, help="STELLA's replay memory (clips)")
    p.add_argument("--out", default="runs/example_strategy", help="TensorBoard and CSV logs")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    bm = synthetic_benchmark(preset=args.preset, tasks=[f"task{t}" for t in range(args.tasks)])
    model = build_model("tiny", num_frames=bm.features.num_frames, img_size=bm.features.frame_size,
                        audio_length=bm.features.target_length, mel_bins=bm.features.mel_bins)
    optimizer = make_adam(model, lr=5e-4)

    metrics = retrieval_metrics(ks=(1, 5, 10), num_tasks=len(bm.task_names))
    # Avalanche's own loss metric (the total training loss per epoch, also the CSV's training_loss);
    # the template logs the loss parts (MAE, InfoNCE, extra_nce, STELLA's terms) to the same loggers
    evaluator = EvaluationPlugin(*metrics, loss_metrics(epoch=True), loggers=[InteractiveLogger(), TensorboardLogger(f"{args.out}/tb"),
                                                   CSVLogger(f"{args.out}/csv")])
    plugins = [
        STELLAPlugin(avm=build_avm(model), mem_size=args.mem_size, lr=5e-4),
        LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9), step_granularity="epoch"),
    ]
    strategy = WeightedContrastivePretraining(model=model, optimizer=optimizer, plugins=plugins, evaluator=evaluator,
                                              train_mb_size=args.batch_size, train_epochs=args.epochs,
                                              eval_mb_size=64, device="auto", nce_weight=1.5)

    for experience in bm.train_stream:
        strategy.train(experience)
        strategy.eval(bm.retrieval_stream)  # zero-shot retrieval over every task's retrieval clips

    tracker = find_recall_matrix_plugin(metrics)
    r1 = tracker.matrix.matrix("a2v", 1)
    print("\nA->V R@1 recall matrix (row: after task l, column: task k):")
    for row in r1:
        print("  " + " ".join(f"{v:5.1f}" for v in row))
    print(f"A->V R@1 average accuracy: {average_accuracy(r1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
