"""CLS-ER, self-supervised form (``docs/method.md`` §8).

Two frozen EMA copies of the backbone, *plastic* and *stable*, start from the initial weights and
live outside ``strategy.model``. For the M replay rows both copies embed randomly masked clips
(encoder + unimodal fusion, no decoder) and build their audio↔video softmax similarity matrices
over the replay batch (τ = 0.05). Per replay item the **video** target comes from the copy with
the higher audio→video diagonal probability and the **audio** target from the copy with the higher
video→audio diagonal probability (ties: plastic). The penalty
``reg_weight·(MSE(z_a, target_a) + MSE(z_v, target_v))`` is added on the replay rows of the ER
forward. After each step, with probability 0.8 (0.6) the plastic (stable) copy is updated as
``θ_c ← α θ_c + (1-α) θ`` with ``α = min(1 - 1/(t+1), α_c)``, t = steps completed (1 after the
first step).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_avalanche.training.plugins.replay_base import (
    ReplayPluginBase,
    autocast_for,
    ema_update_,
    make_ema_copy,
    masked_embeddings,
)
from stella_avalanche.training.replay_storage import ReplayStorage
from stella_avalanche.training.template import add_loss_term

__all__ = ["CLSERPlugin", "diagonal_probabilities"]


def diagonal_probabilities(z_audio: Tensor, z_video: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Diagonal of the audio→video and video→audio softmax matrices of a batch.

    :param z_audio: (M, D), ``z_video``: (M, D) un-normalised embeddings (L2-normalised here).
    :returns: ``(p_av, p_va)``, each (M,): ``softmax_j(a_n·v_j/τ)[n]`` and ``softmax_j(v_n·a_j/τ)[n]``.
    """
    a = F.normalize(z_audio.float(), dim=-1)
    v = F.normalize(z_video.float(), dim=-1)
    logits = a @ v.t() / temperature  # rows: audio queries over video keys
    p_av = logits.softmax(dim=1).diagonal()
    p_va = logits.t().softmax(dim=1).diagonal()
    return p_av, p_va


class CLSERPlugin(ReplayPluginBase, supports_distributed=True):
    """CLS-ER: ER + consistency with the better of two EMA copies.

    :param mem_size: reservoir capacity.
    :param replay_batch: replay rows per step (``None`` = the current batch size).
    :param seed: seeds the reservoir, the replay draws and the EMA update coin flips.
    :param reg_weight: weight of the consistency penalty (paper: 0.1).
    :param plastic_update_prob: probability of a plastic-copy update per step (0.8).
    :param plastic_alpha: plastic EMA decay cap α_p (0.999).
    :param stable_update_prob: probability of a stable-copy update per step (0.6).
    :param stable_alpha: stable EMA decay cap α_s (0.999).
    :param temperature: τ of the similarity softmax that picks the target copy (0.05).
    :param compact: uint8 video / fp16 audio storage (``False``: fp32).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """

    def __init__(self, *, mem_size: int = 2000, replay_batch: int | None = None, seed: int = 0,
                 reg_weight: float = 0.1, plastic_update_prob: float = 0.8, plastic_alpha: float = 0.999,
                 stable_update_prob: float = 0.6, stable_alpha: float = 0.999, temperature: float = 0.05,
                 compact: bool = True, buffer_device: str | torch.device | None = None,
                 storage: ReplayStorage | None = None) -> None:
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, compact=compact,
                         buffer_device=buffer_device, storage=storage)
        self.reg_weight = float(reg_weight)
        self.plastic_update_prob = float(plastic_update_prob)
        self.plastic_alpha = float(plastic_alpha)
        self.stable_update_prob = float(stable_update_prob)
        self.stable_alpha = float(stable_alpha)
        self.temperature = float(temperature)
        self.plastic: Optional[nn.Module] = None
        self.stable: Optional[nn.Module] = None
        self._pending: Optional[dict[str, Any]] = None
        #: diagnostics of the last step: penalty, fraction of stable targets, which copies updated
        self.last_penalty: Optional[Tensor] = None
        self.last_updates: tuple[bool, bool] = (False, False)

    # ------------------------------------------------------------------ EMA copies
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.plastic is None:  # created once, from the weights the stream starts with
            self.plastic = make_ema_copy(strategy.backbone)
            self.stable = make_ema_copy(strategy.backbone)
        if self._pending is not None:
            self.plastic.load_state_dict(self._pending["plastic"])
            self.stable.load_state_dict(self._pending["stable"])
            self._pending = None

    def ema_alpha(self, cap: float) -> float:
        """``min(1 - 1/(t+1), cap)`` with t = ``self.step`` (steps completed)."""
        return min(1.0 - 1.0 / (self.step + 1), cap)

    def finish_step(self, strategy: Any) -> None:
        u = torch.rand(2, generator=self.generator)
        up_p = bool(u[0] < self.plastic_update_prob)
        up_s = bool(u[1] < self.stable_update_prob)
        if up_p:
            ema_update_(self.plastic, strategy.backbone, self.ema_alpha(self.plastic_alpha))
        if up_s:
            ema_update_(self.stable, strategy.backbone, self.ema_alpha(self.stable_alpha))
        self.last_updates = (up_p, up_s)

    # ------------------------------------------------------------------ penalty
    def targets(self, strategy: Any, rep: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-item targets ``(target_a, target_v)``, each (M, D), from the better EMA copy."""
        assert self.plastic is not None and self.stable is not None
        with torch.no_grad(), autocast_for(strategy):
            za_p, zv_p = masked_embeddings(self.plastic, rep["video"], rep["audio"])
            za_s, zv_s = masked_embeddings(self.stable, rep["video"], rep["audio"])
        za_p, zv_p, za_s, zv_s = (z.float() for z in (za_p, zv_p, za_s, zv_s))
        pav_p, pva_p = diagonal_probabilities(za_p, zv_p, self.temperature)
        pav_s, pva_s = diagonal_probabilities(za_s, zv_s, self.temperature)
        target_v = torch.where((pav_s > pav_p)[:, None], zv_s, zv_p)
        target_a = torch.where((pva_s > pva_p)[:, None], za_s, za_p)
        return target_a, target_v

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.last_penalty = None
        if self._rep is None:
            return
        target_a, target_v = self.targets(strategy, self._rep)
        out = strategy.mb_output
        sl = slice(self.n_cur, self.n_cur + self.n_rep)
        term = self.reg_weight * (F.mse_loss(out["z_audio"][sl].float(), target_a)
                                  + F.mse_loss(out["z_video"][sl].float(), target_v))
        self.last_penalty = term.detach()
        add_loss_term(strategy, "clser_consistency", term)

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict[str, Any]:
        if self.plastic is None:
            return dict(self._pending or {})
        return {"plastic": self.plastic.state_dict(), "stable": self.stable.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.plastic is None:  # before before_training: applied when the copies exist
            self._pending = dict(state)
        else:
            self.plastic.load_state_dict(state["plastic"])
            self.stable.load_state_dict(state["stable"])
