#!/usr/bin/env python
"""Your own backbone, trained with DER++ and with STELLA.

The plugins never need this project's ``CAVMAE`` class: they call the methods that
``stella_avalanche.training.contract.PretrainingModel`` lists (``pretrain_forward`` and ``embed``
for every strategy; the patch, encoder, fusion and pooling methods for STELLA's selection). Any
``nn.Module`` with those methods and shapes works. This one is its own class: it owns a two-stream
encoder trunk (built from the ``tiny`` preset here; put your own encoders behind the same methods),
delegates the token-level methods to it, and has its own pre-training objective (the MAE terms
weighted by ``mae_weight``) and its own retrieval embedding (a learned projection head).

    python examples/your_own_backbone.py --strategy derpp
    python examples/your_own_backbone.py --strategy stella --tasks 2 --epochs 1

The tests run both strategies on the ``tiny`` preset (tests/test_examples.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.training.plugins import EvaluationPlugin
from torch import Tensor, nn

from stella_avalanche.benchmarks.synthetic import synthetic_benchmark
from stella_avalanche.evaluation.loggers import ProgressLogger
from stella_avalanche.evaluation.metrics import average_accuracy, find_recall_matrix_plugin, retrieval_metrics
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import build_model
from stella_avalanche.training.contract import PretrainingModel
from stella_avalanche.training.plugins import DERPPPlugin, STELLAPlugin
from stella_avalanche.training.template import AudioVideoPretraining, make_adam


class MyBackbone(nn.Module):
    """A backbone of your own that satisfies ``PretrainingModel``.

    :param trunk: the two-stream token encoder (``patchify_*``, ``encode_modality``, ``fuse_*``, ``pool``).
    :param mae_weight: weight of the reconstruction terms in the pre-training loss.
    """

    def __init__(self, *, trunk: nn.Module, mae_weight: float = 0.5) -> None:
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config  # sizes the plugins and the AVM read
        self.mae_weight = float(mae_weight)
        d = trunk.config.embed_dim
        self.head_a, self.head_v = nn.Linear(d, d), nn.Linear(d, d)  # retrieval projection heads

    # -- what every strategy calls
    def pretrain_forward(self, video: Tensor | None = None, audio: Tensor | None = None, **kw: Any) -> dict:
        out = dict(self.trunk.pretrain_forward(video, audio, **kw))  # kept-patch ids etc. pass through
        mae = out["loss_mae_audio"] + out["loss_mae_video"]
        out["loss"] = self.mae_weight * mae + out["loss_nce"]
        return out

    def forward(self, video: Tensor | None = None, audio: Tensor | None = None, **kw: Any) -> dict:
        return self.pretrain_forward(video, audio, **kw)

    def embed(self, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        z_a, z_v = self.trunk.embed(video, audio)
        return F.normalize(self.head_a(z_a), dim=-1), F.normalize(self.head_v(z_v), dim=-1)

    # -- what STELLA's patch selection calls (delegated to the trunk)
    def patchify_video(self, video: Tensor) -> Tensor:
        return self.trunk.patchify_video(video)

    def patchify_audio(self, audio: Tensor) -> Tensor:
        return self.trunk.patchify_audio(audio)

    def encode_modality(self, patches: Tensor, ids: Optional[Tensor], modality: str) -> Tensor:
        return self.trunk.encode_modality(patches, ids, modality)

    def fuse_joint(self, U_a: Tensor, a_ids: Any, U_v: Tensor, v_ids: Any) -> tuple:
        return self.trunk.fuse_joint(U_a, a_ids, U_v, v_ids)

    def fuse_unimodal(self, U: Tensor, ids: Any, modality: str, **kw: Any) -> Tensor:
        return self.trunk.fuse_unimodal(U, ids, modality, **kw)

    def pool(self, latent: Tensor, modality: str, **kw: Any) -> Tensor:
        return self.trunk.pool(latent, modality, **kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=("derpp", "stella"), default="stella")
    p.add_argument("--preset", default="default", help="synthetic preset: default, tiny (tests)")
    p.add_argument("--tasks", type=int, default=8, help="train on the first N tasks")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mem-size", type=int, default=200, help="replay memory (clips)")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    bm = synthetic_benchmark(preset=args.preset, tasks=[f"task{t}" for t in range(args.tasks)])
    f = bm.features
    trunk = build_model("tiny", num_frames=f.num_frames, img_size=f.frame_size, audio_length=f.target_length,
                        mel_bins=f.mel_bins)
    model = MyBackbone(trunk=trunk)
    assert isinstance(model, PretrainingModel)  # the protocol's methods are all there

    if args.strategy == "stella":
        plugin = STELLAPlugin(avm=build_avm(model), mem_size=args.mem_size, lr=5e-4)
    else:
        plugin = DERPPPlugin(mem_size=args.mem_size)
    metrics = retrieval_metrics(ks=(1, 5, 10), num_tasks=len(bm.task_names))
    strategy = AudioVideoPretraining(model=model, optimizer=make_adam(model, lr=5e-4), plugins=[plugin],
                                     evaluator=EvaluationPlugin(*metrics, loggers=[ProgressLogger(task_names=bm.task_names)]),
                                     train_mb_size=args.batch_size, train_epochs=args.epochs, device="auto")
    for experience in bm.train_stream:
        strategy.train(experience)
        strategy.eval(bm.retrieval_stream)

    matrix = find_recall_matrix_plugin(metrics).matrix
    for direction in ("a2v", "v2a"):
        print(f"{args.strategy} {direction} R@1 average accuracy: {average_accuracy(matrix.matrix(direction, 1)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
