"""GMED: gradient-based memory editing, self-supervised form (``docs/method.md`` §8).

1. Draw M replay items with their slots.
2. With the replay inputs x (normalised frames and fbank) requiring grad: ``ℓ_pre`` = batch loss
   at θ, ``g1 = ∇x ℓ_pre``; a virtual Adam step on the current batch gives θ' (optimizer state
   untouched); ``ℓ_post`` = batch loss at θ', ``g2 = ∇x ℓ_post``.
3. Edit ``x ← x + s·(1-edit_decay)^age·(g2 - g1 + β·g1)`` and write the edited x back into the
   *same slots* (the reservoir counter is unchanged).
4. Train as ER on ``concat[current; edited replay]``.

As in the official buffer the age is never incremented, so the decay factor is always
``(1-edit_decay)^0 = 1`` (D17), and pre/post use independent random masks. The sign of the β term
follows the official port (§8 note).

Storage is fp32 by default (``compact=False``): the edits are orders of magnitude below the uint8
video quantisation step (1/255 of the pixel range), so a compact buffer would silently drop them.
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

__all__ = ["GMEDPlugin"]


class GMEDPlugin(ReplayPluginBase, supports_distributed=True):
    """GMED replay with in-place memory editing.

    :param mem_size: reservoir capacity.
    :param replay_batch: replay rows per step M (``None`` = the current batch size).
    :param seed: seeds the reservoir and the replay draws.
    :param edit_decay: decay of the edit with the item's age (paper: 1.0; the age is always 0).
    :param grad_stride: edit step size s (paper: 0.1).
    :param reg_strength: β (paper: 0.05).
    :param compact: uint8 video / fp16 audio storage; default ``False`` (fp32, see module doc).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """

    def __init__(self, *, mem_size: int = 2000, replay_batch: int | None = None, seed: int = 0,
                 edit_decay: float = 1.0, grad_stride: float = 0.1, reg_strength: float = 0.05,
                 compact: bool = False, buffer_device: str | torch.device | None = None,
                 storage: ReplayStorage | None = None) -> None:
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, compact=compact,
                         buffer_device=buffer_device, storage=storage)
        self.edit_decay = float(edit_decay)
        self.grad_stride = float(grad_stride)
        self.reg_strength = float(reg_strength)
        #: the last edit applied, {"video": (M,T,3,S,S), "audio": (M,1,A,F)}, and its slots (M,)
        self.last_edit: Optional[dict[str, Tensor]] = None
        self.last_slots: Optional[Tensor] = None

    def replay_loss(self, strategy: Any, video: Tensor, audio: Tensor,
                    params: Optional[Mapping[str, Tensor]]) -> Tensor:
        """Scalar batch loss of the replay rows at θ (``params=None``) or θ' (differentiable in x)."""
        return forward_with_params(strategy, {"video": video, "audio": audio}, params)["loss"].float()


    def draw_replay(self, strategy: Any, m: int) -> Optional[dict[str, Tensor]]:
        assert self.buffer is not None
        rows, slots = self.sample(m, strategy.device)
        xv = rows["video"].detach().clone().requires_grad_(True)
        xa = rows["audio"].detach().clone().requires_grad_(True)
        g1v, g1a = torch.autograd.grad(self.replay_loss(strategy, xv, xa, None), [xv, xa])
        theta1 = self.lookahead_params(strategy)
        g2v, g2a = torch.autograd.grad(self.replay_loss(strategy, xv, xa, theta1), [xv, xa])
        del theta1
        decay = (1.0 - self.edit_decay) ** 0  # the official buffer never ages items (D17): always 1
        scale = self.grad_stride * decay
        beta = self.reg_strength
        edit = {"video": scale * (g2v - g1v + beta * g1v), "audio": scale * (g2a - g1a + beta * g1a)}
        new_v = (xv.detach() + edit["video"]).detach()
        new_a = (xa.detach() + edit["audio"]).detach()
        self.buffer.write(slots, self.encode({"video": new_v, "audio": new_a}))
        self.last_edit, self.last_slots = edit, slots
        self._rep_slots = slots
        rows = dict(rows)
        rows["video"], rows["audio"] = new_v, new_a
        return rows
