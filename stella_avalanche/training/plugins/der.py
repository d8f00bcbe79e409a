"""DER++ in its self-supervised form (``docs/method.md`` §8).

ER plus, stored with each clip, the pooled embeddings ``z_a``, ``z_v`` (§1.5: un-normalised means of
the visible tokens) produced in the step where the clip was current. On the replay rows of the
concatenated forward the penalty ``α·MSE(z_a^buf, z_a) + α·MSE(z_v^buf, z_v)`` (α = 0.5) is added;
there is no label term. STELLA without LPIS and RCA reduces to this.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stella_avalanche.training.plugins.replay_base import ReplayPluginBase, der_penalty
from stella_avalanche.training.replay_storage import ReplayStorage
from stella_avalanche.training.template import add_loss_term

__all__ = ["DERPPPlugin"]


class DERPPPlugin(ReplayPluginBase, supports_distributed=True):
    """DER++ (SSL): reservoir replay + MSE to the stored pooled embeddings.

    Extra buffer fields ``z_a``, ``z_v`` (D,) fp32.

    :param mem_size: reservoir capacity.
    :param replay_batch: replay rows per step (``None`` = the current batch size).
    :param seed: seeds the reservoir and the replay draws.
    :param alpha: weight of each modality's MSE penalty (paper: 0.5).
    :param compact: uint8 video / fp16 audio storage (``False``: fp32).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """

    def __init__(self, *, mem_size: int = 2000, replay_batch: int | None = None, seed: int = 0,
                 alpha: float = 0.5, compact: bool = True,
                 buffer_device: str | torch.device | None = None,
                 storage: ReplayStorage | None = None) -> None:
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, compact=compact,
                         buffer_device=buffer_device, storage=storage)
        self.alpha = float(alpha)
        #: last penalty added (detached scalar), for logging and tests
        self.last_penalty: Tensor | None = None

    def penalty(self, z_audio: Tensor, z_video: Tensor, rep: dict[str, Tensor]) -> Tensor:
        """``α·MSE(z_a, z_a^buf) + α·MSE(z_v, z_v^buf)`` over the replay rows.

        :param z_audio: (M, D) current-model embeddings of the replay rows; ``z_video`` likewise.
        :param rep: replay rows with stored ``z_a``, ``z_v`` (M, D).
        """
        return der_penalty(z_audio, z_video, rep["z_a"], rep["z_v"], self.alpha)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        term = self.der_term(strategy, self.alpha)
        self.last_penalty = None if term is None else term.detach()
        if term is not None:
            add_loss_term(strategy, "der_penalty", term)

    def insertion_extras(self, strategy: Any) -> dict[str, Tensor]:
        out = strategy.mb_output
        return {"z_a": out["z_audio"][: self.n_cur].detach().float(),
                "z_v": out["z_video"][: self.n_cur].detach().float()}
