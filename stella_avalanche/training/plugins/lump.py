"""LUMP: mixup between current and buffered clips (``docs/method.md`` §8).

Per step, M clips are drawn and one ``λ ~ Beta(α, α)`` (α = 0.5); the model trains on
``λ·x_cur + (1-λ)·x_buf`` for both the normalised frames and the fbank. There is no concatenation
(the batch stays N rows: current n is paired with buffered item ``n mod M`` when M < N, D8) and the
*unmixed* current clips are inserted. With an empty buffer the step is plain finetuning.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from stella_avalanche.training.plugins.replay_base import ReplayPluginBase
from stella_avalanche.training.replay_storage import ReplayStorage

__all__ = ["LUMPPlugin", "sample_beta"]


def sample_beta(a: float, b: float, generator: torch.Generator | None = None, *, block: int = 64) -> float:
    """One draw of Beta(a, b) from uniforms only (Jöhnk's rejection method), so it is seedable.

    ``X = U^(1/a)``, ``Y = V^(1/b)``; accept when ``X + Y <= 1`` and return ``X / (X + Y)``. Draws a
    block of candidate pairs at once (acceptance is π/4 for a = b = 0.5) and computes in log space to
    stay exact for small a, b.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"sample_beta: parameters must be > 0, got ({a}, {b})")
    while True:
        u = torch.rand((block, 2), generator=generator, dtype=torch.float64).clamp_min(1e-300)
        lx = u[:, 0].log() / a
        ly = u[:, 1].log() / b
        lsum = torch.logaddexp(lx, ly)
        ok = (lsum <= 0).nonzero()
        if ok.numel():
            i = int(ok[0, 0])
            return float(torch.exp(lx[i] - lsum[i]))


class LUMPPlugin(ReplayPluginBase, supports_distributed=True):
    """LUMP (mixup replay).

    :param mem_size: reservoir capacity.
    :param replay_batch: buffered clips drawn per step (``None`` = the current batch size).
    :param seed: seeds the reservoir, the draws and λ.
    :param mixup_alpha: the Beta(α, α) parameter of λ (paper: 0.5).
    :param compact: uint8 video / fp16 audio storage (``False``: fp32).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """

    def __init__(self, *, mem_size: int = 2000, replay_batch: int | None = None, seed: int = 0,
                 mixup_alpha: float = 0.5, compact: bool = True,
                 buffer_device: str | torch.device | None = None,
                 storage: ReplayStorage | None = None) -> None:
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, compact=compact,
                         buffer_device=buffer_device, storage=storage)
        self.mixup_alpha = float(mixup_alpha)
        #: λ of the last mixed step (None when the step was not mixed)
        self.last_lambda: float | None = None

    def prepare_replay(self, strategy: Any) -> None:
        self.last_lambda = None

    def apply_replay(self, strategy: Any, rep: Mapping[str, Tensor]) -> None:
        """Replace video and audio by ``λ x_cur + (1-λ) x_buf[n mod M]``; other keys stay current."""
        lam = sample_beta(self.mixup_alpha, self.mixup_alpha, self.generator)
        self.last_lambda = lam
        batch = strategy.mbatch
        m = int(rep["video"].shape[0])
        pair = torch.arange(self.n_cur, device=rep["video"].device) % m
        for k in ("video", "audio"):
            cur = batch[k]
            buf = rep[k].index_select(0, pair).to(device=cur.device, dtype=cur.dtype)
            batch[k] = lam * cur + (1.0 - lam) * buf
