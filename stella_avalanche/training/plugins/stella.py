"""STELLA / STELLA+ as an Avalanche plugin (``docs/method.md`` §4, §5, §6; ``docs/avalanche.md`` §5).

The whole STELLA step is driven from plugin callbacks; the backbone's pre-training forward is untouched
(it only receives kept-patch ids, and for STELLA+ patch vectors, through the mini-batch dict).

Per training iteration:

* ``before_forward``: stash the N current rows; no-grad full-clip unimodal codes and joint features;
  the VAM loss (gradient to the AVM only); AVM projections -> importance, candidates, summary queries;
  replay draw (M = min(replay batch, |B|)); RCA for the current rows (row n paired with item n mod M,
  D8); exclusion and selection over the R = N + M rows (STELLA+: current rows only, replay rows as
  stored patches); the concatenated rows and the kept ids are written into ``strategy.mbatch``.
* ``before_backward``: ``loss += vam_weight * L_VAM + alpha * (MSE(z_a^buf, z_a[N:]) + MSE(z_v^buf, z_v[N:]))``.
* ``after_training_iteration``: reservoir-insert the N current rows (compact storage, §6).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche.training.plugins import SupervisedPlugin

from stella_avalanche.batch_keys import AUDIO, KEEP_KEYS, PATCH_KEYS, VIDEO
from stella_avalanche.training.buffer import (
    ReservoirBuffer,
    audio_from_uint8,
    audio_to_uint8,
    stella_fields,
    stella_plus_fields,
    video_from_uint8,
    video_patches_from_uint8,
    video_patches_to_uint8,
    video_to_uint8,
)
from stella_avalanche.training.contract import HostRequirements, check_host
from stella_avalanche.training.selection import (
    PatchSelector,
    candidate_ids,
    importance_from_projections,
    rca_probability,
    summary_queries,
)
from stella_avalanche.utils import derive_seed

__all__ = ["STELLAPlugin"]

#: batch keys the plugin reads from ``strategy.mbatch`` (current rows)
_REQUIRED_KEYS = ("video", "audio", "category")


def _backbone(strategy: Any) -> nn.Module:
    bb = getattr(strategy, "backbone", None)
    if bb is None:
        bb = strategy.model
        bb = bb.module if hasattr(bb, "module") and isinstance(bb.module, nn.Module) else bb
    return bb


def _placeholder(like: Tensor, rows: int) -> Tensor:
    """Rows for a batch key the buffer does not store (e.g. ``label``): -1 for ints, 0 for floats."""
    fill = 0 if like.is_floating_point() or like.dtype == torch.bool else -1
    return torch.full((rows, *like.shape[1:]), fill, dtype=like.dtype, device=like.device)


class STELLAPlugin(SupervisedPlugin, supports_distributed=True):
    """STELLA (``plus=False``) or STELLA+ (``plus=True``) continual audio-video pre-training.

    **What the strategy must provide** (``AudioVideoPretraining`` does):

    - ``strategy.mbatch`` is a dict with at least ``video`` (N, T, 3, S, S) ImageNet-normalised,
      ``audio`` (N, 1, A, F) and ``category`` (N,) int (``label``, ``index`` and other per-row tensors
      are carried along: replay rows get the stored ``index`` and ``-1``/``0`` placeholders elsewhere);
      its ``forward`` passes ``video``, ``audio``, ``video_keep``, ``audio_keep``, ``video_patches``,
      ``audio_patches`` to the model (dropping a full modality when its patches are given);
    - ``strategy.mb_output`` is a dict with ``z_audio``, ``z_video`` (R, D), rows in mbatch order;
    - ``strategy.extra_optimizers``: a list of optimizers zeroed / stepped with the main one (the
      plugin appends its AVM optimizer there in ``before_training``);
    - ``strategy.backbone``: the unwrapped model (falls back to ``strategy.model`` / ``.module``);
    - ``strategy.device``, ``strategy.is_training`` and optionally ``strategy.amp_dtype``.

    **What the model must provide** (``docs/contracts.md``, ``CAVMAE``): ``config`` with ``num_frames``,
    ``img_size``, ``patch_size``, ``audio_length``, ``mel_bins``, ``embed_dim``, ``num_video_tokens``,
    ``num_audio_tokens``, ``audio_time_tokens``, ``audio_freq_tokens``; ``patchify_video``,
    ``patchify_audio``, ``encode_modality(patches, None, m)``, ``fuse_joint(U_a, None, U_v, None)``;
    its forward accepts ``video_keep``/``audio_keep`` (and ``video_patches``/``audio_patches``) and
    returns ``z_audio``/``z_video``. The AVM must provide ``project``, ``matching_loss`` and
    ``num_heads`` (``AVMatching``).

    Mini-batch keys written in ``before_forward`` (training only): ``video_keep`` (R, K_V),
    ``audio_keep`` (R, K_A) int64; STELLA: ``video``, ``audio``, ``category``, ... hold R = N + M rows
    (current first); STELLA+: ``video_patches`` (R, K_V, 3p²), ``audio_patches`` (R, K_A, p²), while
    ``video``/``audio`` keep the N current clips (the model reads the patches).

    :param avm: the audio-video matching module (load the stage-2 weights first, D6). It is kept
        outside ``strategy.model`` and trained by the plugin's own Adam.
    :param mem_size: reservoir capacity (2000 on one device, D16).
    :param replay_batch: replay items drawn per step; None = the current batch size N.
    :param alpha: DER penalty weight per modality (0.5).
    :param keep_ratio_video: kappa_v (0.5). :param keep_ratio_audio: kappa_a (0.5).
    :param chunk: audio chunk length in time tokens (4).
    :param tau_att: LPIS softmax temperature (0.4).
    :param vam_weight: lambda_m, weight of the matching loss (1.0).
    :param plus: STELLA+ (store selected patches + ids; replay rows are not re-selected).
    :param refresh_replay_stats: D2 option (STELLA only): recompute I and C of the replay rows with the
        current AVM, C against the stored query of another replay item (item m+1 mod M), instead of
        using the stored values.
    :param lr: AVM Adam learning rate (1e-4). :param betas: (0.95, 0.999).
    :param weight_decay: L2 on AVM matrices (5e-7).
    :param seed: the plugin's seed, already per DDP rank (``make_strategy`` derives it with
        ``derive_seed(run seed, "plugin", rank=rank)``); the selection / VAM and buffer generators
        are derived from it (``stella_avalanche.utils.derive_seed``).
    :param buffer_device: where the buffer lives ("cpu" is pinned when CUDA is available).
    :param audio_storage: "uint8" (per-item affine, default) or "float16" buffer audio.
    :param stats_dtype: dtype of the stored I, C and qbar (fp16 by default; z are always fp32).
    :param head_chunk: AVM heads processed at once for the importance maps.
    :param importance: ``"avm"`` (LPIS, the method) or ``"uniform"`` (ablation: equal importance,
        so candidates and video patches are drawn uniformly and audio chunks visited in uniform order).
    :param rca: replay-guided exclusion (the method); ``False`` (ablation): ``C = 0``, no exclusion.
        ``importance="uniform", rca=False`` is random patch selection (strategy ``stella_random``).
    """

    def __init__(self, *, avm: nn.Module, mem_size: int = 2000, replay_batch: Optional[int] = None,
                 alpha: float = 0.5, keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5,
                 chunk: int = 4, tau_att: float = 0.4, vam_weight: float = 1.0, plus: bool = False,
                 refresh_replay_stats: bool = False, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.95, 0.999), weight_decay: float = 5e-7, seed: int = 0,
                 buffer_device: str | torch.device = "cpu", audio_storage: str = "uint8",
                 stats_dtype: torch.dtype = torch.float16, head_chunk: int = 1, importance: str = "avm",
                 rca: bool = True) -> None:
        super().__init__()
        if plus and refresh_replay_stats:
            raise ValueError("refresh_replay_stats needs full replay clips: not available with plus=True")
        if importance not in ("avm", "uniform"):
            raise ValueError(f"importance must be 'avm' or 'uniform', got {importance!r}")
        if refresh_replay_stats and (importance != "avm" or not rca):
            raise ValueError("refresh_replay_stats recomputes AVM importance and RCA: it needs "
                             "importance='avm' and rca=True")
        self.importance = importance
        self.rca = bool(rca)
        if mem_size < 1:
            raise ValueError(f"mem_size must be >= 1, got {mem_size}")
        if replay_batch is not None and replay_batch < 1:
            raise ValueError(f"replay_batch must be >= 1 or None, got {replay_batch}")
        self.avm = avm
        self.mem_size = int(mem_size)
        self.replay_batch = replay_batch
        self.alpha = float(alpha)
        self.keep_ratio_video = float(keep_ratio_video)
        self.keep_ratio_audio = float(keep_ratio_audio)
        self.chunk = int(chunk)
        self.tau_att = float(tau_att)
        self.vam_weight = float(vam_weight)
        self.plus = bool(plus)
        self.refresh_replay_stats = bool(refresh_replay_stats)
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.seed = int(seed)
        self.buffer_device = buffer_device
        self.audio_storage = audio_storage
        self.stats_dtype = stats_dtype
        self.head_chunk = int(head_chunk)
        # built lazily from the backbone's config in before_training
        self.buffer: Optional[ReservoirBuffer] = None
        self.selector: Optional[PatchSelector] = None
        self.avm_optimizer: Optional[torch.optim.Optimizer] = None
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, "stella_steps"))
        self._pending_state: Optional[dict] = None
        self._reset_step()
        # scalars of the last step, kept as tensors (no device sync in the step; see last_stats)
        self._stats: dict[str, Any] = {}
        #: per-epoch means of the matching loss / accuracy, mean C and penalty (also logged)
        self.epoch_log: list[dict[str, float]] = []

    @property
    def buffer_bytes_per_item(self) -> Optional[int]:
        """Replay-buffer bytes per stored item (None before the buffer is built)."""
        return None if self.buffer is None else self.buffer.bytes_per_item()

    @property
    def last_stats(self) -> dict[str, float]:
        """Scalars of the last step as floats: ``current_rows``, ``replay_rows``, ``first_step``,
        ``mean_C_v`` / ``mean_C_a`` (mean correlation probability over the candidates), ``loss_vam``,
        ``penalty``. Converting synchronises with the device, so call it only for logging."""
        return {k: float(v) for k, v in self._stats.items()}

    # ------------------------------------------------------------------ construction
    def _reset_step(self) -> None:
        self._n_cur = 0
        self._m_rep = 0
        self._loss_vam: Optional[Tensor] = None
        self._z_buf: Optional[tuple[Tensor, Tensor]] = None
        self._to_store: Optional[dict[str, Tensor]] = None

    def _build(self, strategy: Any) -> None:
        backbone = _backbone(strategy)
        cfg = backbone.config
        device = strategy.device
        self.avm.to(device)
        if self.buffer is None:
            self.selector = PatchSelector(
                keep_ratio_video=self.keep_ratio_video, keep_ratio_audio=self.keep_ratio_audio,
                chunk=self.chunk, tau=self.tau_att, video_tokens=cfg.num_video_tokens,
                audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens,
                head_chunk=self.head_chunk, importance=self.importance, rca=self.rca)
            if self.plus:
                fields = stella_plus_fields(
                    keep_video=self.selector.keep_video, keep_audio=self.selector.keep_audio,
                    patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, num_heads=self.avm.num_heads,
                    audio_storage=self.audio_storage, stats_dtype=self.stats_dtype)
            else:
                fields = stella_fields(
                    num_frames=cfg.num_frames, img_size=cfg.img_size, audio_length=cfg.audio_length,
                    mel_bins=cfg.mel_bins, embed_dim=cfg.embed_dim, num_heads=self.avm.num_heads,
                    video_tokens=cfg.num_video_tokens, audio_tokens=cfg.num_audio_tokens,
                    audio_storage=self.audio_storage, stats_dtype=self.stats_dtype)
            if max(cfg.num_video_tokens, cfg.num_audio_tokens) > torch.iinfo(torch.int16).max:
                raise ValueError("token ids exceed int16: STELLA+ id storage needs L <= 32767")
            self.buffer = ReservoirBuffer(
                self.mem_size, fields=fields, device=self.buffer_device,
                generator=torch.Generator().manual_seed(derive_seed(self.seed, "stella_buffer")))
        if self.avm_optimizer is None:
            from stella_avalanche.training.template import make_adam

            self.avm_optimizer = make_adam(self.avm, lr=self.lr, betas=self.betas,  # type: ignore[arg-type]
                                           weight_decay=self.weight_decay)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_built(state)

    # ------------------------------------------------------------------ callbacks
    @property
    def host_requirements(self) -> HostRequirements:
        """What the strategy must provide (``training/contract.py``): the kept-patch ids (and for
        STELLA+ the patch rows) must reach the model, the AVM optimizer is stepped with the main one."""
        keys = (VIDEO, AUDIO, *KEEP_KEYS, *(PATCH_KEYS if self.plus else ()))
        return HostRequirements(host=("extra_optimizers", "device"), model_inputs=keys,
                                model=("config", "patchify_video", "patchify_audio", "encode_modality",
                                       "fuse_joint"))

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        check_host(strategy, self)  # a host that would ignore the kept ids is an error, not a no-op
        self._build(strategy)
        extra = strategy.extra_optimizers
        if not any(o is self.avm_optimizer for o in extra):
            extra.append(self.avm_optimizer)
        self.avm.train()

    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if not strategy.is_training:
            return
        if self.buffer is None:  # plugin attached without before_training (e.g. manual loops)
            self.before_training(strategy)
        assert self.buffer is not None and self.selector is not None
        b = strategy.mbatch
        if not isinstance(b, dict):
            raise TypeError(f"STELLAPlugin needs dict mini-batches, got {type(b).__name__}")
        missing = [k for k in _REQUIRED_KEYS if k not in b]
        if missing:
            raise KeyError(f"STELLAPlugin: mini-batch lacks key(s) {missing}")
        self._reset_step()
        backbone = _backbone(strategy)
        video, audio = b["video"].detach(), b["audio"].detach()
        n = video.shape[0]
        device = video.device
        amp = getattr(strategy, "amp_dtype", None)
        autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

        # steps 1-2: unimodal codes and joint features of the unmasked clips (no grad)
        with torch.no_grad(), autocast:
            pv_all = backbone.patchify_video(video)
            pa_all = backbone.patchify_audio(audio)
            U_a = backbone.encode_modality(pa_all, None, "audio")
            U_v = backbone.encode_modality(pv_all, None, "video")
            E_a, E_v = backbone.fuse_joint(U_a, None, U_v, None)
            proj = self.avm.project(E_a, E_v)
        # step 3: VAM loss, gradient to the AVM only (the positives reuse E, D12)
        with autocast:
            self._loss_vam = self.avm.matching_loss(backbone, U_a, U_v, joint=(E_a, E_v),
                                                    generator=self.generator)

        # step 8.1: replay draw
        size = len(self.buffer)
        m = min(self.replay_batch or n, size)
        items: Optional[dict[str, Tensor]] = None
        if m > 0:
            items, _ = self.buffer.sample(m, generator=self.buffer.generator)
            items = {k: v.to(device, non_blocking=True) for k, v in items.items()}
        replay_stats = None
        if items is not None:
            replay_stats = {"qbar_a": items["qbar_a"].float(), "qbar_v": items["qbar_v"].float()}
            if not self.plus:
                for k in ("I_v", "I_a", "C_v", "C_a"):
                    replay_stats[k] = items[k].float()

        # steps 4-9 (the replay rows' full clips are decoded now: needed for refresh and the batch)
        rep_video = rep_audio = None
        if items is not None and not self.plus:
            rep_video = video_from_uint8(items["video"], video.dtype)
            rep_audio = self._decode_audio(items, "audio", audio.dtype)
            if self.refresh_replay_stats:
                replay_stats.update(self._refresh(backbone, rep_video, rep_audio, items, autocast))
        with torch.no_grad():
            sel = self.selector.select(proj=proj, replay=replay_stats, select_replay=not self.plus,
                                       generator=self.generator)

        # step 10 inputs: write the R rows and kept ids into the mini-batch
        v_ids, a_ids = sel.video_ids, sel.audio_ids
        cur_v_ids, cur_a_ids = v_ids[:n], a_ids[:n]
        if self.plus:
            cur_vp = torch.gather(pv_all, 1, cur_v_ids[..., None].expand(-1, -1, pv_all.shape[-1]))
            cur_ap = torch.gather(pa_all, 1, cur_a_ids[..., None].expand(-1, -1, pa_all.shape[-1]))
            vp, ap, vk, ak = cur_vp, cur_ap, cur_v_ids, cur_a_ids
            if items is not None:
                rep_vp = video_patches_from_uint8(items["video_patches"], cur_vp.dtype)
                rep_ap = self._decode_audio(items, "audio_patches", cur_ap.dtype)
                vp, ap = torch.cat([cur_vp, rep_vp]), torch.cat([cur_ap, rep_ap])
                vk = torch.cat([cur_v_ids, items["video_ids"].long()])
                ak = torch.cat([cur_a_ids, items["audio_ids"].long()])
            b["video_patches"], b["audio_patches"] = vp, ap
            b["video_keep"], b["audio_keep"] = vk, ak
        else:
            if items is not None:
                b["video"] = torch.cat([b["video"], rep_video])
                b["audio"] = torch.cat([b["audio"], rep_audio])
            b["video_keep"], b["audio_keep"] = v_ids, a_ids
        if items is not None:
            self._extend_other_keys(b, n, m, items)
            self._z_buf = (items["z_a"].float(), items["z_v"].float())
        self._n_cur, self._m_rep = n, m

        # what the buffer will store for the current rows (z is added after the forward)
        store: dict[str, Tensor] = {
            "qbar_a": sel.qbar_a, "qbar_v": sel.qbar_v,
            "category": b["category"][:n].detach(),
            "index": (b["index"][:n].detach() if "index" in b
                      else torch.full((n,), -1, dtype=torch.long, device=device)),
        }
        if self.plus:
            store["video_patches"] = video_patches_to_uint8(cur_vp)
            store.update(self._encode_audio(cur_ap, "audio_patches"))
            store["video_ids"], store["audio_ids"] = cur_v_ids, cur_a_ids
        else:
            store["video"] = video_to_uint8(video)
            store.update(self._encode_audio(audio, "audio"))
            store.update({"I_v": sel.I_v, "I_a": sel.I_a, "C_v": sel.C_v, "C_a": sel.C_a})
        self._to_store = store
        self._stats = {"replay_rows": m, "current_rows": n, "first_step": sel.first_step,
                       "mean_C_v": sel.C_v.sum() / max(1, sel.cand_v.numel()),
                       "mean_C_a": sel.C_a.sum() / max(1, sel.cand_a.numel())}

    def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if not strategy.is_training or self._loss_vam is None:
            return
        extra = self.vam_weight * self._loss_vam
        self._stats["loss_vam"] = self._loss_vam.detach()
        self._stats["penalty"] = 0.0
        if self._z_buf is not None and self._m_rep > 0:
            out = strategy.mb_output
            lo, hi = self._n_cur, self._n_cur + self._m_rep
            z_a, z_v = out["z_audio"][lo:hi].float(), out["z_video"][lo:hi].float()
            if z_a.shape[0] != self._m_rep:
                raise RuntimeError(f"STELLAPlugin: mb_output has {out['z_audio'].shape[0]} rows, expected "
                                   f"{hi} (current {self._n_cur} + replay {self._m_rep})")
            za_buf, zv_buf = self._z_buf
            penalty = self.alpha * (F.mse_loss(z_a, za_buf) + F.mse_loss(z_v, zv_buf))
            self._stats["penalty"] = penalty.detach()
            extra = extra + penalty
        strategy.loss = strategy.loss + extra

    # ------------------------------------------------------------------ per-epoch logging
    _EPOCH_KEYS = ("loss_vam", "avm_accuracy", "mean_C_v", "mean_C_a", "penalty")

    def _accumulate_epoch(self) -> None:
        """Add the step's scalars to the epoch sums (tensors: no device sync inside the step)."""
        acc = getattr(self.avm, "last_accuracy", None)
        step = {"loss_vam": self._stats.get("loss_vam"), "avm_accuracy": acc,
                "mean_C_v": self._stats.get("mean_C_v"), "mean_C_a": self._stats.get("mean_C_a"),
                "penalty": self._stats.get("penalty")}
        sums = self.__dict__.setdefault("_epoch_sums", {})
        for k, v in step.items():
            if v is None:
                continue
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            sums[k] = sums[k] + v if k in sums else v
        self.__dict__["_epoch_steps"] = self.__dict__.get("_epoch_steps", 0) + 1

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Log the epoch means of the matching loss and accuracy, mean C and the DER penalty to the
        strategy's loggers (metrics.jsonl, TensorBoard, text) as ``stella/<name>``."""
        sums, n = self.__dict__.pop("_epoch_sums", {}), self.__dict__.pop("_epoch_steps", 0)
        if not n:
            return
        means = {k: float(v) / n for k, v in sums.items()}
        self.epoch_log.append({"experience": int(getattr(strategy.clock, "train_exp_counter", 0)),
                               "epoch": int(getattr(strategy.clock, "train_exp_epochs", 0)), **means})
        evaluator = getattr(strategy, "evaluator", None)
        x = int(getattr(strategy.clock, "train_iterations", 0))
        for logger in getattr(evaluator, "loggers", None) or []:
            for k, v in means.items():
                try:
                    logger.log_single_metric(f"stella/{k}", v, x)
                except Exception:  # a logger that cannot take scalars must not end the run
                    pass

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self._to_store is None or self.buffer is None:
            return
        n = self._n_cur
        out = strategy.mb_output
        store = dict(self._to_store)
        self._accumulate_epoch()
        store["z_a"] = out["z_audio"][:n].detach().float()
        store["z_v"] = out["z_video"][:n].detach().float()
        self.buffer.add(store)
        self._reset_step()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._reset_step()  # no tensors of the last step survive (checkpoint-friendly)

    # ------------------------------------------------------------------ helpers
    def _encode_audio(self, x: Tensor, name: str) -> dict[str, Tensor]:
        if self.audio_storage == "uint8":
            q, lo, scale = audio_to_uint8(x)
            return {name: q, f"{name}_lo": lo, f"{name}_scale": scale}
        return {name: x.detach().to(torch.float16)}

    def _decode_audio(self, items: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> Tensor:
        if self.audio_storage == "uint8":
            return audio_from_uint8(items[name], items[f"{name}_lo"], items[f"{name}_scale"], dtype)
        return items[name].to(dtype)

    @staticmethod
    def _extend_other_keys(b: dict, n: int, m: int, items: Mapping[str, Tensor]) -> None:
        """Append M rows to every other per-row entry of the mini-batch (stored or placeholder)."""
        for k, v in list(b.items()):
            if k in ("video", "audio", "video_keep", "audio_keep", "video_patches", "audio_patches"):
                continue
            if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n:
                if k in ("category", "index"):
                    b[k] = torch.cat([v, items[k].to(v.device, v.dtype)])
                else:
                    b[k] = torch.cat([v, _placeholder(v, m)])
            elif isinstance(v, list) and len(v) == n:
                b[k] = v + [None] * m

    def _refresh(self, backbone: nn.Module, rep_video: Tensor, rep_audio: Tensor,
                 items: Mapping[str, Tensor], autocast: Any) -> dict[str, Tensor]:
        """D2 option: I and C of the replay rows under the current backbone and AVM."""
        assert self.selector is not None
        with torch.no_grad():
            with autocast:
                U_a = backbone.encode_modality(backbone.patchify_audio(rep_audio), None, "audio")
                U_v = backbone.encode_modality(backbone.patchify_video(rep_video), None, "video")
                p = self.avm.project(*backbone.fuse_joint(U_a, None, U_v, None))
            I_v, I_a = importance_from_projections(p["q_a"], p["k_a"], p["q_v"], p["k_v"], self.tau_att,
                                                   head_chunk=self.head_chunk)
            cand_v = candidate_ids(I_v, self.selector.keep_video)
            cand_a = candidate_ids(I_a, self.selector.keep_audio)
            m = I_v.shape[0]
            if m < 2:
                return {"I_v": I_v, "I_a": I_a}
            other = (torch.arange(m, device=I_v.device) + 1) % m
            qa_now = summary_queries(p["q_a"], I_a, cand_a)
            qv_now = summary_queries(p["q_v"], I_v, cand_v)
            C_v = rca_probability(p["k_v"], items["qbar_a"].float()[other], qa_now, cand_v)
            C_a = rca_probability(p["k_a"], items["qbar_v"].float()[other], qv_now, cand_a)
        return {"I_v": I_v, "I_a": I_a, "C_v": C_v, "C_a": C_a}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Buffer, AVM, AVM optimizer and generator states (CPU tensors)."""
        state: dict[str, Any] = {
            "avm": {k: v.detach().cpu().clone() for k, v in self.avm.state_dict().items()},
            "generator": self.generator.get_state(),
            "plus": self.plus,
        }
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        elif self._pending_state is not None and "buffer" in self._pending_state:
            state["buffer"] = self._pending_state["buffer"]
        if self.avm_optimizer is not None:
            state["avm_optimizer"] = copy.deepcopy(self.avm_optimizer.state_dict())
        elif self._pending_state is not None and "avm_optimizer" in self._pending_state:
            state["avm_optimizer"] = self._pending_state["avm_optimizer"]
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`. Buffer and optimizer parts are applied once the plugin is built
        (immediately if it already is, else at the next ``before_training``)."""
        if bool(state.get("plus", self.plus)) != self.plus:
            raise ValueError(f"state is for plus={state.get('plus')}, plugin has plus={self.plus}")
        self.avm.load_state_dict(state["avm"])
        self.generator.set_state(state["generator"])
        rest = {k: state[k] for k in ("buffer", "avm_optimizer") if k in state}
        if self.buffer is not None and self.avm_optimizer is not None:
            self._load_built(rest)
        else:
            self._pending_state = rest

    def _load_built(self, state: Mapping) -> None:
        assert self.buffer is not None and self.avm_optimizer is not None
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        if "avm_optimizer" in state:
            self.avm_optimizer.load_state_dict(state["avm_optimizer"])
