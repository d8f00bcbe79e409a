"""ESMER: error-sensitivity-modulated experience replay, self-supervised form (``docs/method.md`` §8).

- An EMA copy of the backbone (outside ``strategy.model``) computes per-sample losses ℓ_n of the
  current rows (per-sample MAE_a + MAE_v + NCE, §1.4).
- Once a running mean μ > 0 exists, rows with ``ℓ_n >= margin·μ`` get weight ``μ/ℓ_n`` (others 1)
  and rows with ``ℓ_n > margin·μ`` are *not inserted* into the buffer.
- With a non-empty buffer the step trains on ``concat[current; replay]`` with the per-sample
  losses, the current rows weighted, then averaged over all rows; plus
  ``reg_weight·(MSE(z_a, z_a^EMA) + MSE(z_v, z_v^EMA))`` on the replay rows, the EMA embeddings
  coming from randomly masked input. With an empty buffer the plain unweighted loss is used (so
  weighting starts with replay, D17).
- Running statistics: drop current rows with ``ℓ_n > mean + std_margin·std`` of the batch, then
  ``μ ← a μ + (1-a) mean(rest)`` and ``σ ← a σ + (1-a) std(rest)`` with
  ``a = min(1 - 1/(t+1), loss_alpha)``, t = steps completed before this one (the first batch
  initialises μ). The weights of a step use μ from before its own update.
- The EMA copy is updated after a step with probability 0.2, ``α = min(1 - 1/(t+1), 0.999)``,
  t = steps completed including this one.
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
from stella_avalanche.training.template import record_loss_terms

__all__ = ["ESMERPlugin"]


class ESMERPlugin(ReplayPluginBase, supports_distributed=True):
    """ESMER replay.

    :param mem_size: reservoir capacity.
    :param replay_batch: replay rows per step (``None`` = the current batch size).
    :param seed: seeds the reservoir, the replay draws and the EMA update coin flips.
    :param reg_weight: weight of the EMA consistency penalty (paper: 0.15).
    :param ema_alpha: EMA decay cap (0.999).
    :param ema_update_prob: probability of an EMA update per step (0.2).
    :param loss_margin: high-loss threshold as a multiple of μ (2.5).
    :param loss_alpha: decay cap of the running loss statistics (0.99).
    :param std_margin: outlier cut (in batch std) before updating the running statistics (1).
    :param compact: uint8 video / fp16 audio storage (``False``: fp32).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """

    def __init__(self, *, mem_size: int = 2000, replay_batch: int | None = None, seed: int = 0,
                 reg_weight: float = 0.15, ema_alpha: float = 0.999, ema_update_prob: float = 0.2,
                 loss_margin: float = 2.5, loss_alpha: float = 0.99, std_margin: float = 1.0,
                 compact: bool = True, buffer_device: str | torch.device | None = None,
                 storage: ReplayStorage | None = None) -> None:
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, compact=compact,
                         buffer_device=buffer_device, storage=storage)
        self.reg_weight = float(reg_weight)
        self.ema_alpha = float(ema_alpha)
        self.ema_update_prob = float(ema_update_prob)
        self.loss_margin = float(loss_margin)
        self.loss_alpha = float(loss_alpha)
        self.std_margin = float(std_margin)
        self.ema: Optional[nn.Module] = None
        self._pending: Optional[Mapping[str, Tensor]] = None
        #: running mean μ and std σ of the EMA model's per-sample loss (0 = not yet available)
        self.loss_mean = 0.0
        self.loss_std = 0.0
        # per-step state (set in before_forward)
        self.weights: Optional[Tensor] = None
        self.insert_mask: Optional[Tensor] = None
        self.last_losses: Optional[Tensor] = None
        self.last_penalty: Optional[Tensor] = None

    # ------------------------------------------------------------------ EMA copy
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.ema is None:
            self.ema = make_ema_copy(strategy.backbone)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    def finish_step(self, strategy: Any) -> None:
        if bool(torch.rand(1, generator=self.generator)[0] < self.ema_update_prob):
            ema_update_(self.ema, strategy.backbone, min(1.0 - 1.0 / (self.step + 1), self.ema_alpha))

    # ------------------------------------------------------------------ sample weighting
    def ema_losses(self, strategy: Any, video: Tensor, audio: Tensor) -> Tensor:
        """Per-sample losses (N,) of the current rows under the EMA copy (random masks, no grad)."""
        assert self.ema is not None, "ESMERPlugin: before_training has not created the EMA copy"
        with torch.no_grad(), autocast_for(strategy):
            out = self.ema(video=video, audio=audio)
        return out["per_sample_loss"].detach().float()

    def update_running_stats(self, losses: Tensor, t: int) -> None:
        """Outlier-filtered EMA of the batch loss mean and std (see module doc)."""
        if losses.numel() == 0:
            return
        mean = losses.mean()
        std = losses.std(unbiased=True) if losses.numel() > 1 else torch.zeros_like(mean)
        rest = losses[losses <= mean + self.std_margin * std]
        if rest.numel() == 0:
            rest = losses
        r_mean = float(rest.mean())
        r_std = float(rest.std(unbiased=True)) if rest.numel() > 1 else 0.0
        a = min(1.0 - 1.0 / (t + 1), self.loss_alpha)
        self.loss_mean = a * self.loss_mean + (1 - a) * r_mean
        self.loss_std = a * self.loss_std + (1 - a) * r_std

    def prepare_replay(self, strategy: Any) -> None:
        cur = self._cur
        assert cur is not None
        losses = self.ema_losses(strategy, cur["video"], cur["audio"])
        self.last_losses = losses
        mu = self.loss_mean
        if mu > 0:
            thr = self.loss_margin * mu
            self.weights = torch.where(losses >= thr, mu / losses.clamp_min(1e-12),
                                       torch.ones_like(losses))
            self.insert_mask = losses <= thr
        else:
            self.weights = torch.ones_like(losses)
            self.insert_mask = None
        self.update_running_stats(losses, self.step)

    def insertion_mask(self, strategy: Any) -> Optional[Tensor]:
        return self.insert_mask

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.last_penalty = None
        if self._rep is None:  # empty buffer: plain unweighted loss (D17)
            return
        assert self.ema is not None and self.weights is not None
        out = strategy.mb_output
        per = out["per_sample_loss"].float()
        w = torch.cat([self.weights.to(per.device), per.new_ones(self.n_rep)])
        weighted = (w * per).mean()
        with torch.no_grad(), autocast_for(strategy):
            za_e, zv_e = masked_embeddings(self.ema, self._rep["video"], self._rep["audio"])
        sl = slice(self.n_cur, self.n_cur + self.n_rep)
        term = self.reg_weight * (F.mse_loss(out["z_audio"][sl].float(), za_e.float())
                                  + F.mse_loss(out["z_video"][sl].float(), zv_e.float()))
        self.last_penalty = term.detach()
        # replace the criterion's unweighted loss by the weighted one, keeping other plugins' terms
        strategy.loss = strategy.loss - out["loss"].float() + weighted + term
        record_loss_terms(strategy, esmer_weighted=weighted, esmer_consistency=term)

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict[str, Any]:
        ema = self.ema.state_dict() if self.ema is not None else self._pending
        return {"ema": ema, "loss_mean": self.loss_mean, "loss_std": self.loss_std}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.loss_mean = float(state["loss_mean"])
        self.loss_std = float(state["loss_std"])
        if state.get("ema") is not None:
            if self.ema is None:
                self._pending = state["ema"]
            else:
                self.ema.load_state_dict(state["ema"])
