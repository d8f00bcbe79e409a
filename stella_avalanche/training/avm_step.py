"""STELLA's audio-video matching pass: steps 1-3 of ``docs/method.md`` §4, and the AVM's optimizer.

:class:`AVMStep` owns the AVM module (``stella_avalanche/models/avm.py``, used through its
``project`` and ``matching_loss``) and the Adam that trains it. Per training step it encodes the
unmasked current clips with the backbone (no gradient), fuses them (jointly as in the paper, or per
modality: the config's ``avm_features``, ``models/avm.avm_inputs``), projects those features to the
AVM's per-head queries and keys, and computes the matching loss, whose gradient reaches the AVM only
(the positives reuse the features, D12).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from stella_avalanche.models.avm import avm_inputs

__all__ = ["AVMStep", "AVMPass"]


@dataclass
class AVMPass:
    """Output of :meth:`AVMStep.run` for N clips.

    ``video_patches`` (N, L_V, 3p²) and ``audio_patches`` (N, L_A, p²) are the backbone's patch rows
    (STELLA+ stores the selected ones); ``proj`` holds ``q_a``, ``k_a`` (N, H, L_A, d) and ``q_v``,
    ``k_v`` (N, H, L_V, d); ``loss`` is the scalar matching loss (graph to the AVM only).
    """

    video_patches: Tensor
    audio_patches: Tensor
    proj: dict[str, Tensor]
    loss: Tensor

    def selected_patches(self, video_ids: Tensor, audio_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of the kept ids, (N, K_V) and (N, K_A): ``(N, K_V, 3p²)``, ``(N, K_A, p²)``."""
        return tuple(torch.gather(p, 1, ids[..., None].expand(-1, -1, p.shape[-1]))  # type: ignore[return-value]
                     for p, ids in ((self.video_patches, video_ids), (self.audio_patches, audio_ids)))


class AVMStep:
    """The AVM, its forward passes and its Adam.

    :param avm: the matching module (``AVMatching``: ``project``, ``matching_loss``, ``num_heads``).
    :param lr: Adam learning rate. :param betas: Adam betas. :param weight_decay: L2 on the AVM's
        matrices (``training/template.make_adam``).
    """

    def __init__(self, *, avm: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
        self.avm = avm
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._pending_optimizer: Optional[dict] = None

    def to(self, device: torch.device | str) -> "AVMStep":
        """Move the AVM to ``device``; build the optimizer there (once) and apply a loaded state."""
        self.avm.to(device)
        if self.optimizer is None:
            from stella_avalanche.training.template import make_adam

            self.optimizer = make_adam(self.avm, lr=self.lr, betas=self.betas,  # type: ignore[arg-type]
                                       weight_decay=self.weight_decay)
        if self._pending_optimizer is not None:
            self.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None
        return self

    def attach(self, strategy: Any) -> None:
        """Training starts: the AVM and its Adam on the strategy's device, the Adam stepped with the
        main optimizer (``strategy.extra_optimizers``, once), the AVM in train mode."""
        self.to(strategy.device)
        if not any(o is self.optimizer for o in strategy.extra_optimizers):
            strategy.extra_optimizers.append(self.optimizer)
        self.avm.train()

    @staticmethod
    def _features(backbone: nn.Module, video: Tensor, audio: Tensor) -> tuple[Tensor, ...]:
        """Patches, unimodal codes and AVM inputs of full clips (steps 1-2; the caller holds
        ``no_grad`` and the autocast context)."""
        pv = backbone.patchify_video(video)
        pa = backbone.patchify_audio(audio)
        U_a = backbone.encode_modality(pa, None, "audio")
        U_v = backbone.encode_modality(pv, None, "video")
        E_a, E_v = avm_inputs(backbone, U_a, U_v)
        return pv, pa, U_a, U_v, E_a, E_v

    def project(self, backbone: nn.Module, video: Tensor, audio: Tensor, *,
                autocast: contextlib.AbstractContextManager) -> dict[str, Tensor]:
        """AVM projections of full clips without gradient (the D2 refresh of replay rows).

        :param video: (M, T, 3, S, S); ``audio``: (M, 1, A, F). :return: as :attr:`AVMPass.proj`.
        """
        with torch.no_grad(), autocast:
            *_, E_a, E_v = self._features(backbone, video, audio)
            return self.avm.project(E_a, E_v)

    def run(self, backbone: nn.Module, video: Tensor, audio: Tensor, *,
            autocast: contextlib.AbstractContextManager, generator: Optional[torch.Generator]) -> AVMPass:
        """Steps 1-3 for the N current clips: codes, AVM inputs and projections without
        gradient, then the matching loss with gradient to the AVM.

        :param video: (N, T, 3, S, S) normalised frames; ``audio``: (N, 1, A, F).
        :param generator: source of the loss's negative pairing.
        """
        with torch.no_grad(), autocast:
            pv, pa, U_a, U_v, E_a, E_v = self._features(backbone, video, audio)
            proj = self.avm.project(E_a, E_v)
        with autocast:
            loss = self.avm.matching_loss(backbone, U_a, U_v, own=(E_a, E_v), generator=generator)
        return AVMPass(pv, pa, proj, loss)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``avm`` (CPU copies) and, once built or loaded, ``avm_optimizer``."""
        state: dict[str, Any] = {"avm": {k: v.detach().cpu().clone() for k, v in self.avm.state_dict().items()}}
        if self.optimizer is not None:
            state["avm_optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        elif self._pending_optimizer is not None:
            state["avm_optimizer"] = self._pending_optimizer
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the optimizer part waits for :meth:`to` when not yet built
        (so that its moments land on the AVM's device)."""
        self.avm.load_state_dict(state["avm"])
        if "avm_optimizer" in state:
            self._pending_optimizer = state["avm_optimizer"]
            if self.optimizer is not None:
                self.optimizer.load_state_dict(self._pending_optimizer)
                self._pending_optimizer = None
