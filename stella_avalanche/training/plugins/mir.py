"""MIR: maximally interfered retrieval, self-supervised form (``docs/method.md`` §8).

1. Draw ``search_factor·M`` candidates (fewer when the buffer is smaller) and compute their
   per-sample losses at the current weights θ without grad (per-sample MAE_a + MAE_v + NCE, the
   negatives being the other candidates).
2. Take a *virtual* Adam step on the current batch's loss (:func:`virtual_adam_params`; the
   optimizer state is not modified).
3. Recompute the candidate losses at θ' (independent random masks, D17); score = post - pre; keep
   the M highest-scoring candidates.
4. θ is untouched (the look-ahead is functional), so the step trains as ER on
   ``concat[current; selected]``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from stella_avalanche.training.plugins.replay_base import (
    ReplayPluginBase,
    forward_with_params,
)
from stella_avalanche.training.replay_storage import ReplayStorage

__all__ = ["MIRPlugin"]


class MIRPlugin(ReplayPluginBase, supports_distributed=True):
    """MIR replay.

    :param mem_size: reservoir capacity.
    :param replay_batch: replay rows per step M (``None`` = the current batch size).
    :param seed: seeds the reservoir and the candidate draws.
    :param search_factor: candidates drawn per replay row (paper: 5).
    :param compact: uint8 video / fp16 audio storage (``False``: fp32).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """

    def __init__(self, *, mem_size: int = 2000, replay_batch: int | None = None, seed: int = 0,
                 search_factor: int = 5, compact: bool = True,
                 buffer_device: str | torch.device | None = None,
                 storage: ReplayStorage | None = None) -> None:
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, compact=compact,
                         buffer_device=buffer_device, storage=storage)
        if search_factor < 1:
            raise ValueError(f"MIRPlugin: search_factor must be >= 1, got {search_factor}")
        self.search_factor = int(search_factor)
        #: scores (post - pre) of the last step's candidates, and the chosen candidate positions
        self.last_scores: Optional[Tensor] = None
        self.last_chosen: Optional[Tensor] = None

    def candidate_losses(self, strategy: Any, cands: Mapping[str, Tensor],
                         params: Optional[Mapping[str, Tensor]]) -> Tensor:
        """Per-sample losses (C,) of the candidates at θ (``params=None``) or at θ', without grad."""
        with torch.no_grad():
            out = forward_with_params(strategy, {"video": cands["video"], "audio": cands["audio"]},
                                      params)
        return out["per_sample_loss"].detach().float()


    def draw_replay(self, strategy: Any, m: int) -> Optional[dict[str, Tensor]]:
        assert self.buffer is not None
        n_cand = min(self.search_factor * m, len(self.buffer))
        cands, slots = self.sample(n_cand, strategy.device)
        if n_cand <= m:  # nothing to choose from
            self.last_scores, self.last_chosen = None, torch.arange(n_cand)
            self._rep_slots = slots
            return cands
        pre = self.candidate_losses(strategy, cands, None)
        theta1 = self.lookahead_params(strategy)
        post = self.candidate_losses(strategy, cands, theta1)
        del theta1
        scores = post - pre
        chosen = scores.topk(m, largest=True, sorted=True).indices
        self.last_scores, self.last_chosen = scores, chosen.cpu()
        self._rep_slots = slots[chosen.cpu()]
        return {k: v.index_select(0, chosen.to(v.device)) for k, v in cands.items()}
