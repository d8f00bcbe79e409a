"""STELLA / STELLA+ as an Avalanche plugin: :meth:`STELLAPlugin.before_forward` lists docs/method.md §4's steps in order;
``avm_step.py`` (1-3), ``selection.py`` (4-9), the codec, the storage and ``replay_base.py`` do the work."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from stella_avalanche import batch_keys as K
from stella_avalanche.training.avm_step import AVMPass, AVMStep
from stella_avalanche.training.contract import HostRequirements, check_host, unwrap_backbone
from stella_avalanche.training.epoch_log import StepScalars
from stella_avalanche.training.item_codec import StellaCodec
from stella_avalanche.training.plugins.replay_base import ReplayPluginBase, autocast_for, extend_batch
from stella_avalanche.training.replay_storage import ReplayStorage
from stella_avalanche.training.selection import PatchSelector, SelectionResult
from stella_avalanche.training.template import record_loss_terms
from stella_avalanche.utils import derive_seed

__all__ = ["STELLAPlugin"]


class STELLAPlugin(ReplayPluginBase, supports_distributed=True):
    """STELLA (``plus=False``) or STELLA+ (``plus=True``) continual audio-video pre-training.

    Writes into the training mini-batch ``video_keep`` (R, K_V), ``audio_keep`` (R, K_A) for R = N + M
    rows, current first; STELLA appends the replay clips to ``video``, ``audio`` and the other per-row
    keys (-1 / 0 where not stored), STELLA+ writes the rows as ``video_patches``, ``audio_patches``.

    :param avm: the matching module (load the stage-2 weights first, D6), trained by the plugin's own
        Adam (``lr`` 1e-4, ``betas`` (0.95, 0.999), ``weight_decay`` 5e-7 on its matrices).
    :param mem_size, replay_batch: reservoir capacity (2000 on one device, D16); replay items per step (None: N).
    :param alpha, vam_weight: DER penalty weight per modality (0.5), matching-loss weight lambda_m (1.0).
    :param keep_ratio_video, keep_ratio_audio: kappa_v, kappa_a (0.5).
    :param chunk: audio chunk length in time tokens (4). :param tau_att: LPIS temperature (0.4).
    :param plus: STELLA+ (store selected patches + ids; replay rows are not re-selected).
    :param refresh_replay_stats: D2 option (STELLA only): I and C of the replay rows recomputed with the
        current AVM (``PatchSelector.rescore``) instead of the stored values.
    :param seed: the plugin's seed, already per DDP rank (``make_strategy``); the selection / VAM and
        buffer generators derive from it (``stella_avalanche.utils.derive_seed``).
    :param buffer_device, audio_storage, stats_dtype: where the buffer lives ("cpu" is pinned with CUDA),
        its audio ("uint8" per-item affine or "float16") and the dtype of its I, C, qbar (z are fp32).
    :param head_chunk: AVM heads at once for the importance maps. :param storage: default the StellaCodec above.
    :param importance, rca: the method is ``"avm"`` (LPIS) with replay-guided exclusion; the ablations
        use ``"uniform"`` (equal importance) and / or ``rca=False`` (``C = 0``, no exclusion).
    """

    #: the selection / VAM draws, and the reservoir (whose generator also draws the replay items)
    seed_purposes = ("stella_steps", "stella_buffer")
    required_keys = (K.VIDEO, K.AUDIO, K.CATEGORY)

    def __init__(self, *, avm: nn.Module, mem_size: int = 2000, replay_batch: Optional[int] = None,
                 alpha: float = 0.5, keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5,
                 chunk: int = 4, tau_att: float = 0.4, vam_weight: float = 1.0, plus: bool = False,
                 refresh_replay_stats: bool = False, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.95, 0.999), weight_decay: float = 5e-7, seed: int = 0,
                 buffer_device: str | torch.device = "cpu", audio_storage: str = "uint8",
                 stats_dtype: torch.dtype = torch.float16, head_chunk: int = 1, importance: str = "avm",
                 rca: bool = True, storage: Optional[ReplayStorage] = None) -> None:
        storage = storage or ReplayStorage(capacity=mem_size, seed=derive_seed(seed, self.seed_purposes[1]),
                                           codec=StellaCodec(plus=plus, audio_storage=audio_storage,
                                                             stats_dtype=stats_dtype), device=buffer_device)
        super().__init__(mem_size=mem_size, replay_batch=replay_batch, seed=seed, storage=storage)
        if importance not in ("avm", "uniform"):
            raise ValueError(f"importance must be 'avm' or 'uniform', got {importance!r}")
        if refresh_replay_stats and (plus or importance != "avm" or not rca):
            raise ValueError("refresh_replay_stats recomputes AVM importance and RCA of full replay clips: it "
                             "needs plus=False, importance='avm' and rca=True")
        self.avm, self.plus, self.importance, self.rca = avm, bool(plus), importance, bool(rca)
        self.alpha, self.vam_weight, self.refresh_replay_stats = float(alpha), float(vam_weight), refresh_replay_stats
        self.avm_step = AVMStep(avm=avm, lr=lr, betas=betas, weight_decay=weight_decay)
        self._selector_kwargs = dict(keep_ratio_video=keep_ratio_video, keep_ratio_audio=keep_ratio_audio,
                                     chunk=chunk, tau=tau_att, head_chunk=head_chunk, importance=importance, rca=rca)
        self.selector: Optional[PatchSelector] = None  # needs the backbone's token grid (_build)
        self.draw_generator = self.storage.generator  # replay items drawn with the reservoir's generator
        self._pass: Optional[AVMPass] = None  # this step's AVM pass and selection (until step 12)
        self._sel: Optional[SelectionResult] = None
        self.scalars = StepScalars(prefix="stella")
        #: per-epoch means of loss_vam, avm_accuracy, mean_C_v, mean_C_a, penalty (logged as stella/<name>)
        self.epoch_log = self.scalars.epochs

    @property
    def avm_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self.avm_step.optimizer  # the AVM's Adam, in strategy.extra_optimizers once training starts

    @property
    def last_stats(self) -> dict[str, float]:
        """The last step's rows, ``first_step``, mean C over candidates, losses as floats (syncs: logging only)."""
        return self.scalars.floats()

    @property
    def host_requirements(self) -> HostRequirements:
        """The kept ids (STELLA+: the patch rows) reach the model; the AVM's Adam is stepped with the rest."""
        return HostRequirements(host=("extra_optimizers", "device"),
                                model_inputs=(K.VIDEO, K.AUDIO, *K.KEEP_KEYS, *(K.PATCH_KEYS if self.plus else ())),
                                model=("config", "patchify_video", "patchify_audio", "encode_modality", "fuse_joint",
                                       "fuse_unimodal"))

    def _build(self, strategy: Any) -> None:
        """Selector and buffer for the backbone's token grid; the AVM and its Adam on the device."""
        cfg = unwrap_backbone(strategy).config
        if self.selector is None:
            self.selector = PatchSelector(video_tokens=cfg.num_video_tokens, audio_time_tokens=cfg.audio_time_tokens,
                                          audio_freq_tokens=cfg.audio_freq_tokens, **self._selector_kwargs)
        self.ensure_buffer(self.codec.fields(config=cfg, keep_video=self.selector.keep_video,
                                             keep_audio=self.selector.keep_audio, num_heads=self.avm.num_heads),
                           strategy.device)
        self.avm_step.to(strategy.device)

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        check_host(strategy, self)  # a host that would ignore the kept ids is an error, not a no-op
        self._build(strategy)
        self.avm_step.attach(strategy)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        """Steps 1-10 in order; 11 in :meth:`before_backward`, 12 (insertion, :meth:`insertion_extras`) after it."""
        if not strategy.is_training:
            return
        if self.selector is None:  # attached without before_training (e.g. manual loops)
            self.before_training(strategy)
        self.stash_current(strategy)  # the N current rows, stored at step 12
        # steps 1-3 on the current clips: codes, joint features, AVM projections; matching loss
        self._pass = self.avm_step.run(unwrap_backbone(strategy), self._cur[K.VIDEO], self._cur[K.AUDIO],
                                       autocast=autocast_for(strategy), generator=self.generator)
        self.replay(strategy)  # step 8.1 before 4-7: their RCA scores the replay rows
        self.select(strategy)  # steps 4-9, and step 10's kept ids into the batch

    def draw_replay(self, strategy: Any, m: int) -> Optional[dict[str, Tensor]]:
        """Step 8.1: M items drawn uniformly and decoded; with the D2 option scored anew."""
        rep = super().draw_replay(strategy, m)
        if rep is not None and self.refresh_replay_stats:
            proj = self.avm_step.project(unwrap_backbone(strategy), rep[K.VIDEO], rep[K.AUDIO],
                                         autocast=autocast_for(strategy))
            with torch.no_grad():
                rep.update(self.selector.rescore(proj=proj, qbar_a=rep["qbar_a"], qbar_v=rep["qbar_v"]))
        return rep

    def apply_replay(self, strategy: Any, rep: dict[str, Tensor]) -> None:
        """Replay rows after the current ones (STELLA+ keeps the N clips; its patch rows: :meth:`select`)."""
        extend_batch(strategy.mbatch, self.n_cur, rep, skip=(K.VIDEO, K.AUDIO) if self.plus else (), placeholders=True)

    def select(self, strategy: Any) -> None:
        """Steps 4-9 over the R rows (STELLA+: the N current ones); step 10's kept ids into the batch."""
        b, rep, cur = strategy.mbatch, self._rep, self._cur
        with torch.no_grad():
            sel = self.selector.select(proj=self._pass.proj, replay=rep, select_replay=not self.plus,
                                       generator=self.generator)
        if self.plus:  # §5: current rows as their selected patches (also what is stored), replay rows as stored
            cur.update(zip(K.PATCH_KEYS, self._pass.selected_patches(sel.video_ids, sel.audio_ids)))
            cur.update(video_ids=sel.video_ids, audio_ids=sel.audio_ids)
            for key, src in ((K.VIDEO_PATCHES, K.VIDEO_PATCHES), (K.AUDIO_PATCHES, K.AUDIO_PATCHES),
                             (K.VIDEO_KEEP, "video_ids"), (K.AUDIO_KEEP, "audio_ids")):
                b[key] = cur[src] if rep is None else torch.cat([cur[src], rep[src].to(cur[src].dtype)])
        else:
            b[K.VIDEO_KEEP], b[K.AUDIO_KEEP] = sel.video_ids, sel.audio_ids
        self._sel = sel
        self.scalars.last = {"replay_rows": self.n_rep, "current_rows": self.n_cur, "first_step": sel.first_step,
                             "mean_C_v": sel.C_v.sum() / max(1, sel.cand_v.numel()),
                             "mean_C_a": sel.C_a.sum() / max(1, sel.cand_a.numel())}

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Step 11: ``loss += vam_weight * L_VAM + alpha * (MSE_a + MSE_v)`` (penalty on the replay rows)."""
        if not strategy.is_training or self._pass is None:
            return
        penalty, extra = self.der_term(strategy, self.alpha), self.vam_weight * self._pass.loss
        self.scalars.last.update(loss_vam=self._pass.loss.detach(),
                                 penalty=0.0 if penalty is None else penalty.detach())
        strategy.loss = strategy.loss + (extra if penalty is None else extra + penalty)
        record_loss_terms(strategy, stella_matching=extra, stella_penalty=penalty)

    def insertion_extras(self, strategy: Any) -> dict[str, Tensor]:
        """Step 12 stores with each current row its z, q̄ and (STELLA) I and C before exclusion (codec: the clip)."""
        sel, n, out = self._sel, self.n_cur, strategy.mb_output
        extras = {"z_a": out["z_audio"][:n].detach().float(), "z_v": out["z_video"][:n].detach().float(),
                  "qbar_a": sel.qbar_a, "qbar_v": sel.qbar_v}
        return extras if self.plus else {**extras, "I_v": sel.I_v, "I_a": sel.I_a, "C_v": sel.C_v, "C_a": sel.C_a}

    def finish_step(self, strategy: Any) -> None:
        self.scalars.end_step(("loss_vam", "avm_accuracy", "mean_C_v", "mean_C_a", "penalty"),
                              avm_accuracy=getattr(self.avm, "last_accuracy", None))
        self._pass = self._sel = None  # no tensors of this step survive it (checkpoint-friendly)

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.scalars.end_epoch(strategy)  # logged as stella/<name>, kept in epoch_log

    def state_dict(self) -> dict:
        """``avm``, ``avm_optimizer``, the selection ``generator``, ``plus`` and the ``buffer`` (CPU)."""
        buffer = {} if self.buffer is None else {"buffer": self.buffer.state_dict()}
        return {**self.avm_step.state_dict(), "generator": self.generator.get_state(), "plus": self.plus, **buffer}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict` (the buffer from its saved layout, checked by ``_build``)."""
        if bool(state.get("plus", self.plus)) != self.plus:
            raise ValueError(f"state is for plus={state.get('plus')}, plugin has plus={self.plus}")
        self.avm_step.load_state_dict(state)
        self.generator.set_state(state["generator"])
        if "buffer" in state:
            self.load_buffer_state(state["buffer"])

