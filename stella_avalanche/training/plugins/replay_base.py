"""Shared plumbing of the replay baselines (``docs/method.md`` §8, ``docs/avalanche.md`` §4-5).

Every rehearsal baseline of the paper (ER, DER++, LUMP, MIR, GMED, CLS-ER, ESMER) follows the same
step, which :class:`ReplayPluginBase` implements once:

``before_forward``
    stash a detached reference to the *current* rows of ``strategy.mbatch`` (by
    ``after_training_iteration`` the mini-batch also holds the replay rows, pitfall 11 of
    ``docs/avalanche.md``), draw ``M = min(replay_batch or N, len(buffer))`` items uniformly
    without replacement from the reservoir (:meth:`ReplayPluginBase.draw_replay`, overridden by
    MIR / GMED) and apply them
    (:meth:`ReplayPluginBase.apply_replay`: concatenation after the current rows on every stored
    key, so that the InfoNCE spans both; LUMP mixes instead);
``before_backward``
    subclasses add their penalty (``strategy.loss = strategy.loss + term``) or re-weight the loss;
``after_training_iteration``
    reservoir-insert the stashed current rows (plus per-method extras, e.g. DER++'s pooled z), then
    run per-step bookkeeping (EMA updates) and drop the stash.

Items live in the plugin's :class:`~stella_avalanche.training.replay_storage.ReplayStorage` (the
``storage`` argument, as Avalanche's storage policy): a
:class:`~stella_avalanche.training.buffer.ReservoirBuffer`, created at the first insertion from the
batch's per-item shapes (or up front with a known layout, :meth:`ensure_buffer`), and a codec
(``training/item_codec.py``). The default storage is the reservoir of ``mem_size`` items with the
compact codec (video as uint8 pixels, audio as fp16, ``docs/method.md`` §6); ``compact=False`` stores
fp32 (GMED needs this, its input edits are far below the uint8 quantisation step). ``STELLAPlugin``
runs on the same step with its own codec, AVM pass and selection.

Shared pieces: :func:`extend_batch` (replay rows after the current ones), :func:`der_penalty` (DER++,
STELLA), :func:`autocast_for`, :func:`unwrap_backbone` (defined in ``training/contract.py``).

Also here: the helpers MIR and GMED share (:func:`virtual_adam_params`, a look-ahead Adam step that
never touches the optimizer, and :func:`forward_with_params`), the masked-input embedding used by
the EMA teachers of CLS-ER and ESMER (:func:`masked_embeddings`) and the EMA update
(:func:`ema_update_`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from avalanche.training.plugins import SupervisedPlugin

from stella_avalanche.batch_keys import SAMPLE_KEYS
from stella_avalanche.training.buffer import ReservoirBuffer
from stella_avalanche.training.contract import unwrap_backbone  # re-exported: one unwrapping rule
from stella_avalanche.training.item_codec import ClipCodec
from stella_avalanche.training.replay_storage import ReplayStorage
from stella_avalanche.utils import derive_seed

__all__ = [
    "ReplayPluginBase",
    "REPLAY_KEYS",
    "virtual_adam_params",
    "forward_with_params",
    "masked_embeddings",
    "ema_update_",
    "make_ema_copy",
    "autocast_for",
    "loss_scale",
    "unwrap_backbone",
    "der_penalty",
    "extend_batch",
]

#: mini-batch keys stored in the reservoir and concatenated with the replay rows (when present)
REPLAY_KEYS = SAMPLE_KEYS


# ---------------------------------------------------------------------------------- helpers
def autocast_for(strategy: Any) -> contextlib.AbstractContextManager:
    """The strategy's autocast context (``AudioVideoPretraining.amp_dtype``; fp32 when absent)."""
    dtype = getattr(strategy, "amp_dtype", None)
    device = torch.device(getattr(strategy, "device", "cpu"))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def der_penalty(z_audio: Tensor, z_video: Tensor, z_a_buf: Tensor, z_v_buf: Tensor, alpha: float) -> Tensor:
    """The DER penalty of ``docs/method.md`` §4 step 11 (DER++, STELLA, STELLA+):
    ``α·MSE(z_a, z_a^buf) + α·MSE(z_v, z_v^buf)``, in fp32.

    :param z_audio, z_video: (M, D) current-model embeddings of the M replay rows.
    :param z_a_buf, z_v_buf: (M, D) the embeddings stored with those items.
    :raises RuntimeError: when the row counts differ (the model output lacks replay rows).
    """
    if z_audio.shape[0] != z_a_buf.shape[0] or z_video.shape[0] != z_v_buf.shape[0]:
        raise RuntimeError(f"DER penalty: the model output has {z_audio.shape[0]} replay rows, the buffer "
                           f"draw {z_a_buf.shape[0]} (mb_output rows must follow mbatch: current, then replay)")
    za, zv = z_audio.float(), z_video.float()
    return alpha * (F.mse_loss(za, z_a_buf.to(za.device).float()) + F.mse_loss(zv, z_v_buf.to(zv.device).float()))


def _placeholder(like: Tensor, rows: int) -> Tensor:
    """Rows for a batch key the buffer does not store (e.g. ``label``): -1 for ints, 0 for floats."""
    fill = 0 if like.is_floating_point() or like.dtype == torch.bool else -1
    return torch.full((rows, *like.shape[1:]), fill, dtype=like.dtype, device=like.device)


def extend_batch(batch: dict, n: int, rep: Mapping[str, Tensor], *, skip: tuple[str, ...] = (),
                 placeholders: bool = False) -> None:
    """Append the M replay rows after the N current rows of every per-row entry of ``batch``.

    A key that ``rep`` holds is concatenated (cast to the batch's dtype). Any other tensor with N
    rows raises, or with ``placeholders`` gets M rows of -1 (integers) / 0 (floats), and a list of N
    entries gets M ``None``. Keys in ``skip`` are left as they are.

    :raises KeyError: a per-row tensor key that ``rep`` lacks, without ``placeholders``.
    """
    m = int(next(iter(rep.values())).shape[0]) if rep else 0
    for k, v in list(batch.items()):
        if k in skip:
            continue
        if torch.is_tensor(v) and k in rep:
            batch[k] = torch.cat([v, rep[k].to(device=v.device, dtype=v.dtype)], dim=0)
        elif torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n:
            if not placeholders:
                raise KeyError(f"mini-batch key {k!r} has one row per sample but is not stored in the "
                               f"replay buffer (stored: {sorted(rep)})")
            batch[k] = torch.cat([v, _placeholder(v, m)])
        elif placeholders and isinstance(v, list) and len(v) == n:
            batch[k] = v + [None] * m


def loss_scale(strategy: Any) -> float:
    """The fp16 GradScaler's current scale (1 when the strategy has no enabled scaler)."""
    scaler = getattr(strategy, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0


def virtual_adam_params(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, *,
                        grad_scale: float = 1.0) -> dict[str, Tensor]:
    """Look-ahead parameters θ' after one Adam step on ``loss`` (MIR / GMED, §8), optimizer untouched.

    For every parameter held by ``optimizer`` with a gradient, using its state (``exp_avg`` m,
    ``exp_avg_sq`` v, ``step`` t; zeros before the first real step) and its group's lr, betas, eps
    and (L2) weight_decay:

    ``g = ∇θ loss + wd·θ``, ``m' = β1 m + (1-β1) g``, ``v' = β2 v + (1-β2) g²``,
    ``θ' = θ - lr·sqrt(1-β2^(t+1))/(1-β1^(t+1))·m'/(sqrt(v') + ε)``.

    Gradients come from :func:`torch.autograd.grad`, so ``.grad`` fields are not touched either.

    :param model: the module whose parameters are differentiated (the unwrapped backbone).
    :param optimizer: an Adam-like optimizer holding (some of) the model's parameters.
    :param loss: scalar loss built from the model's current parameters.
    :param grad_scale: multiply the loss before differentiating and divide the gradients after
        (the fp16 GradScaler's scale, to avoid gradient underflow).
    :returns: ``{parameter name: θ' (detached)}`` for the parameters that moved; empty when the
        gradients are not finite (fp16 overflow: the look-ahead step is skipped, as the scaler would).
    """
    group_of: dict[int, dict] = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in group_of]
    if not named:
        return {}
    grads = torch.autograd.grad(loss * grad_scale if grad_scale != 1.0 else loss,
                                [p for _, p in named], allow_unused=True)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for (name, p), g in zip(named, grads):
            if g is None:
                continue
            g = g.float() / grad_scale
            if not bool(torch.isfinite(g).all()):
                return {}
            group = group_of[id(p)]
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, wd = float(group["eps"]), float(group.get("weight_decay", 0.0))
            state = optimizer.state.get(p, {})
            t = float(state["step"]) + 1.0 if "step" in state else 1.0
            theta = p.detach().float()
            if wd:
                g = g + wd * theta
            m = state.get("exp_avg")
            v = state.get("exp_avg_sq")
            m1 = (1 - beta1) * g if m is None else beta1 * m.float() + (1 - beta1) * g
            v1 = (1 - beta2) * g * g if v is None else beta2 * v.float() + (1 - beta2) * g * g
            if group.get("amsgrad") and state.get("max_exp_avg_sq") is not None:
                v1 = torch.maximum(state["max_exp_avg_sq"].float(), v1)
            step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            out[name] = (theta - step_size * m1 / (v1.sqrt() + eps)).to(p.dtype)
    return out


def forward_with_params(strategy: Any, inputs: Mapping[str, Tensor],
                        params: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """Run the backbone's pre-training forward on ``inputs``, optionally at substituted parameters.

    :param strategy: provides ``backbone`` (unwrapped model) and the autocast settings.
    :param inputs: keyword inputs of ``pretrain_forward`` (``video`` (R,T,3,S,S), ``audio`` (R,1,A,F)).
    :param params: ``{name: tensor}`` replacing the backbone's parameters for this call only
        (:func:`torch.func.functional_call`); ``None`` = the current parameters.
    :returns: the model's output dict (``loss``, ``per_sample_loss`` (R,), ``z_audio``, ...).
    """
    model = strategy.backbone
    with autocast_for(strategy):
        if params:
            return functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False)
        return model(**inputs)


def masked_embeddings(model: nn.Module, video: Tensor, audio: Tensor, *,
                      mask_ratio: Optional[float] = None,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Pooled embeddings of randomly masked clips, encoder + unimodal fusion only (no decoder).

    Used by the EMA teachers of CLS-ER and ESMER (§8): same visible-token count as training
    (``floor(L (1 - ρ))``), an independent random subset per clip.

    :param model: a :class:`~stella_avalanche.models.cav.CAVMAE` (or compatible).
    :param video: (B, T, 3, S, S) normalised frames; ``audio``: (B, 1, A, F) fbank.
    :param mask_ratio: ρ (default: the model's ``config.mask_ratio``).
    :param generator: source of the random token subsets.
    :returns: ``(z_audio, z_video)``, each (B, D), not L2-normalised (like the training forward's).
    """
    cfg = model.config
    rho = cfg.mask_ratio if mask_ratio is None else mask_ratio
    zs = []
    for modality, x in (("audio", audio), ("video", video)):
        patches = model.patchify_audio(x) if modality == "audio" else model.patchify_video(x)
        b, L, _ = patches.shape
        n_vis = cfg.num_visible(modality, rho)
        gdev = generator.device if generator is not None else patches.device
        ids = torch.rand((b, L), generator=generator, device=gdev).to(patches.device).argsort(dim=1)
        ids = ids[:, :n_vis]
        vis = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))
        U = model.encode_modality(vis, ids, modality)
        zs.append(model.pool(model.fuse_unimodal(U, ids, modality, final_norm=False), modality,
                             normed=False, ids=ids))
    return zs[0], zs[1]


def make_ema_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (outside ``strategy.model``: no optimizer, no grads)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, alpha: float) -> None:
    """In place ``θ_ema ← α θ_ema + (1 - α) θ`` for all parameters (buffers are copied).

    :param alpha: EMA decay in [0, 1]; 0 copies the model.
    """
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    if len(e_params) != len(m_params):
        raise ValueError("ema_update_: the EMA copy and the model have different parameter lists")
    # lerp(θ_ema, θ, 1-α) = θ_ema + (1-α)(θ - θ_ema) = α θ_ema + (1-α) θ
    torch._foreach_lerp_(e_params, m_params, 1.0 - float(alpha))
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


# ---------------------------------------------------------------------------------- base plugin
class ReplayPluginBase(SupervisedPlugin, supports_distributed=True):
    """Reservoir replay shared by the baselines; on its own it is ER without anything else.

    Subclasses override the hooks :meth:`draw_replay`, :meth:`apply_replay`,
    :meth:`insertion_extras`, :meth:`insertion_mask`, :meth:`finish_step` and
    :meth:`extra_state` / :meth:`load_extra_state`, and the Avalanche callbacks they need
    (``before_training``, ``before_backward``; calling ``super()``).

    :param mem_size: reservoir capacity (the paper: 2000 in total, D16).
    :param replay_batch: replay draws per step M; ``None`` = the current batch size N (§7). The
        actual M is ``min(replay_batch, len(buffer))`` (D8).
    :param seed: seeds the reservoir and the plugin's own draws.
    :param compact: store video as uint8 pixels and audio as fp16 (§6); ``False`` = fp32.
    :param buffer_device: where the reservoir lives; ``None`` = the strategy's device.
    :param storage: the items' storage (buffer + codec), as Avalanche's storage policy; ``None`` = a
        :class:`~stella_avalanche.training.replay_storage.ReplayStorage` of ``mem_size`` items with
        :class:`~stella_avalanche.training.item_codec.ClipCodec` (``compact``) on ``buffer_device``,
        seeded from ``seed``. A given storage's capacity is the plugin's ``mem_size``.
    """

    #: purposes of the two seeds derived from ``seed``: the plugin's own draws, the reservoir
    seed_purposes: tuple[str, str] = ("replay_draws", "replay_buffer")
    #: mini-batch tensors every training step must hold
    required_keys: tuple[str, ...] = ("video", "audio")

    def __init__(self, *, mem_size: int = 2000, replay_batch: Optional[int] = None, seed: int = 0,
                 compact: bool = True, buffer_device: Optional[str | torch.device] = None,
                 storage: Optional[ReplayStorage] = None) -> None:
        super().__init__()
        if mem_size < 1:
            raise ValueError(f"{type(self).__name__}: mem_size must be >= 1, got {mem_size}")
        if replay_batch is not None and replay_batch < 1:
            raise ValueError(f"{type(self).__name__}: replay_batch must be >= 1 or None, got {replay_batch}")
        self.replay_batch = replay_batch
        self.seed = int(seed)
        self.compact = bool(compact)
        draws, reservoir = self.seed_purposes
        #: where the items live and in what form (buffer + codec)
        self.storage = storage if storage is not None else ReplayStorage(
            capacity=mem_size, codec=ClipCodec(compact=compact), seed=derive_seed(self.seed, reservoir),
            device=buffer_device)
        self.mem_size = self.storage.capacity
        self.buffer_device = self.storage.device
        #: the plugin's own draws (replay sampling, MIR candidates, LUMP λ, EMA coin flips, ...)
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, draws))
        #: the generator of the replay draws (:meth:`sample`)
        self.draw_generator = self.generator
        #: training steps completed (drives the EMA / running-statistics α schedules)
        self.step = 0
        # per-iteration state (never checkpointed: it lives between before_forward and the end of
        # the same iteration)
        self._cur: Optional[dict[str, Tensor]] = None
        self._rep: Optional[dict[str, Tensor]] = None
        self._rep_slots: Optional[Tensor] = None
        self.n_cur = 0
        self.n_rep = 0

    # ------------------------------------------------------------------ storage
    @property
    def buffer(self) -> Optional[ReservoirBuffer]:
        """The storage's reservoir (``None`` until the first insertion fixes the layout)."""
        return self.storage.buffer

    @property
    def codec(self) -> Any:
        """How batch rows are stored and read back (the storage's codec, ``training/item_codec.py``)."""
        return self.storage.codec

    @property
    def buffer_bytes_per_item(self) -> Optional[int]:
        """Bytes one reservoir item occupies (``None`` until the first insertion fixes the shapes)."""
        return self.storage.bytes_per_item

    def replay_size(self, n_cur: int) -> int:
        """M for a current batch of ``n_cur`` rows: ``min(replay_batch or N, len(buffer))``."""
        return min(self.replay_batch or n_cur, len(self.storage))

    def encode(self, items: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Batch rows -> stored form (:attr:`codec`)."""
        return self.codec.encode(items)

    def decode(self, stored: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Stored rows -> training tensors on ``device`` (:attr:`codec`, inverse of :meth:`encode`)."""
        return self.codec.decode(stored, device)

    def ensure_buffer(self, fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      device: torch.device) -> ReservoirBuffer:
        """Create the buffer with a known layout (on ``buffer_device``, else ``device``), or check
        that a loaded one has this layout and capacity (:meth:`ReplayStorage.ensure`).

        :raises ValueError: a loaded buffer that does not fit, naming both layouts.
        """
        return self.storage.ensure(fields, device, owner=type(self).__name__)

    def insert(self, items: Mapping[str, Tensor], device: torch.device) -> Tensor:
        """Reservoir-insert batch rows (float form); creates the buffer on first use.

        :returns: (n,) slots (-1 = not stored), see :meth:`ReservoirBuffer.add`.
        """
        return self.storage.insert(items, device)

    def sample(self, m: int, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
        """Draw ``m`` distinct items uniformly; returns (decoded rows on ``device``, slots (m,))."""
        return self.storage.sample(m, device, self.draw_generator)

    # ------------------------------------------------------------------ hooks for subclasses
    def draw_replay(self, strategy: Any, m: int) -> Optional[dict[str, Tensor]]:
        """Choose the ``m`` (> 0) replay rows of this step (uniform draw; MIR / GMED override).

        :returns: decoded rows on the strategy's device (all stored fields), or ``None``.
        """
        rows, slots = self.sample(m, strategy.device)
        self._rep_slots = slots
        return rows

    def apply_replay(self, strategy: Any, rep: Mapping[str, Tensor]) -> None:
        """Concatenate the replay rows after the current rows on every stored batch key.

        A tensor key of the mini-batch with N rows that the buffer does not hold raises, rather
        than leaving the batch ragged.
        """
        try:
            extend_batch(strategy.mbatch, self.n_cur, rep)
        except KeyError as e:
            raise KeyError(f"{type(self).__name__}: {e.args[0]}") from None

    def der_term(self, strategy: Any, alpha: float) -> Optional[Tensor]:
        """:func:`der_penalty` between the model's ``z_audio`` / ``z_video`` of this step's replay rows
        and their stored ``z_a`` / ``z_v``; None without replay rows."""
        if self._rep is None:
            return None
        out, rows = strategy.mb_output, slice(self.n_cur, self.n_cur + self.n_rep)
        return der_penalty(out["z_audio"][rows], out["z_video"][rows], self._rep["z_a"], self._rep["z_v"], alpha)

    def insertion_extras(self, strategy: Any) -> dict[str, Tensor]:
        """Per-item extras stored with the current rows (e.g. DER++'s z). Default: none."""
        return {}

    def insertion_mask(self, strategy: Any) -> Optional[Tensor]:
        """(N,) bool: which current rows are offered to the reservoir (``None`` = all)."""
        return None

    def prepare_replay(self, strategy: Any) -> None:
        """Called in ``before_forward`` after stashing the current rows, before replay is drawn."""

    def lookahead_params(self, strategy: Any) -> dict[str, Tensor]:
        """θ' after a virtual Adam step on the current rows' batch loss (MIR, GMED).

        One extra forward + backward of the current rows; neither the weights, their ``.grad`` nor
        the optimizer state change (:func:`virtual_adam_params`).
        """
        cur = self._cur
        assert cur is not None, "lookahead_params is only valid inside a training iteration"
        out = forward_with_params(strategy, {"video": cur["video"], "audio": cur["audio"]})
        return virtual_adam_params(strategy.backbone, strategy.optimizer, out["loss"].float(),
                                   grad_scale=loss_scale(strategy))

    def finish_step(self, strategy: Any) -> None:
        """Per-step bookkeeping after the insertion (EMA updates); ``self.step`` already counts it."""

    def extra_state(self) -> dict[str, Any]:
        """Method-specific checkpoint state (EMA copies, running statistics)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    # ------------------------------------------------------------------ Avalanche callbacks
    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self.stash_current(strategy)
        self.prepare_replay(strategy)
        self.replay(strategy)

    def stash_current(self, strategy: Any) -> None:
        """Check the mini-batch and keep a detached reference to its N current rows (inserted after the step)."""
        batch = strategy.mbatch
        if not isinstance(batch, dict):
            raise TypeError(f"{type(self).__name__} needs dict mini-batches, got {type(batch).__name__}")
        for k in self.required_keys:
            if k not in batch or not torch.is_tensor(batch[k]):
                raise KeyError(f"{type(self).__name__}: the mini-batch has no tensor {k!r} "
                               f"(keys: {sorted(batch)})")
        self.n_cur = int(batch["video"].shape[0])
        # references suffice: apply_replay builds new tensors instead of writing into these
        self._cur = {k: batch[k].detach() for k in REPLAY_KEYS if k in batch and torch.is_tensor(batch[k])}
        self._rep, self._rep_slots, self.n_rep = None, None, 0

    def replay(self, strategy: Any) -> None:
        """Draw this step's M replay rows (:meth:`draw_replay`) and add them to the batch (:meth:`apply_replay`)."""
        m = self.replay_size(self.n_cur)
        if m > 0:
            rep = self.draw_replay(strategy, m)
            if rep is not None:
                self._rep = rep
                self.n_rep = int(next(iter(rep.values())).shape[0])
                self.apply_replay(strategy, rep)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._cur is None:
            return
        items = dict(self._cur)
        items.update(self.insertion_extras(strategy))
        mask = self.insertion_mask(strategy)
        if mask is not None:
            keep = mask.to(torch.bool).nonzero().flatten()
            items = {k: v.index_select(0, keep.to(v.device)) for k, v in items.items()}
        self.insert(items, strategy.device)
        self.step += 1
        self.finish_step(strategy)
        self._cur, self._rep, self._rep_slots = None, None, None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._cur, self._rep, self._rep_slots = None, None, None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Buffer (tensors, counters, reservoir RNG), the plugin RNG, the step and method state."""
        return {
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "buffer_device": None if self.buffer is None else str(self.buffer.device),
            "generator": self.generator.get_state(),
            "step": self.step,
            "extra": self.extra_state(),
        }

    def load_buffer_state(self, bstate: Optional[Mapping[str, Any]], saved_device: Optional[str] = None) -> None:
        """Rebuild the buffer from a saved state (:meth:`ReplayStorage.load_state`); ``None`` empties it."""
        self.storage.load_state(bstate, saved_device)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the buffer is rebuilt from the saved field spec)."""
        self.load_buffer_state(state.get("buffer"), state.get("buffer_device"))
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.load_extra_state(state.get("extra", {}))
