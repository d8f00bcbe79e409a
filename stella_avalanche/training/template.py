"""``AudioVideoPretraining``: Avalanche's ``SupervisedTemplate`` adapted to self-supervised
audio-video pre-training on dict mini-batches.

What changes with respect to the stock template (see ``docs/avalanche.md`` §3, §11, §13):

- mini-batches are dicts (``video``, ``audio``, ``category``, ``label``, ``index``), moved to the
  device key by key; ``mb_y`` / ``mb_task_id`` are the task ids so Avalanche's bookkeeping works;
- the training loader honours the dataset's collate function and is seeded per experience;
- ``forward`` calls the backbone's pre-training forward (MAE + contrastive) in training and the
  retrieval embedding in evaluation; ``criterion`` returns the loss the model computed, so plugins
  add their terms in ``before_backward``;
- AMP (bf16, or fp16 with a ``GradScaler``) on CUDA, fp32 on CPU; optional gradient clipping;
- one optimizer for the whole stream: Avalanche's per-experience optimizer reset is disabled;
- plugins may register extra optimizers (e.g. the AVM's) in ``extra_optimizers``: they are
  stepped together with the main one, through the same scaler;
- a non-finite loss stops training with :class:`NonFiniteLossError` instead of corrupting weights;
- no evaluation before training (``eval_every=-1`` by default).
"""
from __future__ import annotations

import logging
import resource
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate

from stella_avalanche.batch_keys import MODEL_INPUT_KEYS  # re-exported: the keys ``forward`` passes on
from stella_avalanche.batch_keys import SKIPPED

__all__ = ["AudioVideoPretraining", "NonFiniteLossError", "make_adam", "unwrap_model",
           "MODEL_INPUT_KEYS", "EpochSampler", "add_loss_term", "record_loss_terms", "MODEL_LOSS_PARTS"]



log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


#: the model output's loss parts and the names they are logged under (``loss_epoch/<name>``, ...)
MODEL_LOSS_PARTS = {"loss_mae_audio": "mae_audio", "loss_mae_video": "mae_video", "loss_nce": "nce"}


def record_loss_terms(strategy: Any, **terms: Optional[torch.Tensor | float]) -> None:
    """Name the terms a plugin has added to ``strategy.loss`` this iteration, for the loss logs.

    The strategy's total loss is logged anyway; this adds each named part (``None`` entries are
    skipped). A host without the loss logs (``record_loss_term`` missing) ignores the call, so a
    plugin can call it on any strategy.
    """
    record = getattr(strategy, "record_loss_term", None)
    if record is None:
        return
    for name, term in terms.items():
        if term is not None:
            record(name, term)


def add_loss_term(strategy: Any, name: str, term: torch.Tensor) -> None:
    """``strategy.loss += term`` (in ``before_backward``), logged as ``name`` (see :func:`record_loss_terms`)."""
    strategy.loss = strategy.loss + term
    record_loss_terms(strategy, **{name: term})


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare backbone under a DDP / DataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def make_adam(model: nn.Module, *, lr: float = 1e-4, betas: tuple[float, float] = (0.95, 0.999),
              weight_decay: float = 5e-7) -> torch.optim.Adam:
    """The paper's optimizer: Adam with L2 weight decay on matrices only.

    Biases, norms and positional / modality / mask tokens are excluded from weight decay; the model
    may name extra exclusions through ``no_weight_decay()``.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=betas)


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices whose order depends only on (seed, experience, epoch).

    Each epoch's permutation is drawn from a generator seeded by those three numbers instead of a
    generator that advances across epochs, so a run resumed in the middle of an epoch reproduces
    the uninterrupted order exactly (``skip`` drops the samples already consumed). Under DDP each
    rank takes every ``num_replicas``-th index of the padded permutation (as ``DistributedSampler``).

    :param length: dataset size.
    :param seed: run seed.
    :param experience: experience counter (a new order per experience).
    :param shuffle: shuffle or keep the dataset order.
    :param num_replicas: world size.
    :param rank: this process's rank.
    """

    def __init__(self, length: int, *, seed: int, experience: int, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.seed, self.experience, self.shuffle = length, seed, experience, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0  # samples of this rank's share to drop at the start of the current epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            order = torch.arange(self.length)
        else:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.experience * 10_007 + self.epoch) % (2**63 - 1))
            order = torch.randperm(self.length, generator=g)
        if self.num_replicas > 1:  # pad to a multiple of the world size, then shard
            per_rank = -(-self.length // self.num_replicas)
            pad = per_rank * self.num_replicas - self.length
            order = torch.cat([order, order[:pad]])[self.rank::self.num_replicas]
        return order

    def __iter__(self):
        return iter(self._order()[self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, -(-self.length // self.num_replicas) - self.skip)


class AudioVideoPretraining(SupervisedTemplate):
    """Self-supervised continual audio-video pre-training (the ``finetune`` strategy on its own).

    :param model: a backbone with ``pretrain_forward`` (also its ``forward``) and ``embed``
        (see ``docs/contracts.md``).
    :param optimizer: defaults to :func:`make_adam` with the paper's hyperparameters.
    :param train_mb_size: current-batch size N.
    :param train_epochs: epochs per experience.
    :param eval_mb_size: evaluation batch size.
    :param device: "cpu", "cuda", ... ("auto" picks CUDA when available).
    :param plugins: Avalanche plugins (e.g. ``STELLAPlugin``, baselines, ``LRSchedulerPlugin``).
    :param evaluator: an ``EvaluationPlugin``; the default one logs nothing (never Avalanche's
        default evaluator, whose accuracy metric crashes on embeddings).
    :param eval_every: Avalanche periodic evaluation (-1: none). The initial evaluation that
        Avalanche runs before each ``train()`` is disabled.
    :param amp: "auto" (bf16 on CUDA when supported, else fp16; fp32 on CPU), "bf16", "fp16" or None.
    :param grad_clip: max gradient norm, or None.
    :param seed: seeds the training loader's shuffling (per experience).
    :param num_workers: training-loader workers.
    :param loss_log_every: log the training loss and its parts (means over the last this many
        iterations) as ``loss_iter/<name>``; 0 = per epoch only. Per-epoch means are always logged
        as ``loss_epoch/<name>`` (``total``, the model's ``mae_audio``, ``mae_video``, ``nce`` and
        every term plugins name through :func:`add_loss_term` / :func:`record_loss_terms`) to the
        evaluator's loggers (metrics.jsonl, TensorBoard) and kept in :attr:`loss_epochs`.
    """

    def __init__(self, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 train_mb_size: int = 32, train_epochs: int = 1, eval_mb_size: int = 64,
                 device: str | torch.device = "cpu", plugins: Optional[Sequence[Any]] = None,
                 evaluator: Optional[EvaluationPlugin] = None, eval_every: int = -1,
                 amp: Optional[str] = "auto", grad_clip: Optional[float] = None, seed: int = 0,
                 num_workers: int = 0, loss_log_every: int = 25, **kwargs: Any) -> None:
        device = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available()
                              else ("cpu" if str(device) == "auto" else device))
        model = model.to(device)
        if optimizer is None:
            optimizer = make_adam(model)
        if evaluator is None:
            evaluator = EvaluationPlugin(loggers=[])
        super().__init__(model=model, optimizer=optimizer, criterion=nn.Identity(),
                         train_mb_size=train_mb_size, train_epochs=train_epochs,
                         eval_mb_size=eval_mb_size, device=device, plugins=plugins,
                         evaluator=evaluator, eval_every=eval_every, **kwargs)
        for p in self.plugins:  # never evaluate before training starts
            if type(p).__name__ == "PeriodicEval":
                p.do_initial = False
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.grad_clip = grad_clip
        self.extra_optimizers: list[torch.optim.Optimizer] = []
        self.amp_dtype = self._resolve_amp(amp, self.device)
        use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        # cost accounting for results.json
        self.train_seconds = 0.0
        self.train_samples = 0
        self._t_exp: float | None = None
        # position inside the current experience (for checkpoints and resume)
        self.epoch_in_exp = 0
        self.batches_in_epoch = 0
        self._resume_position: Optional[tuple[int, int]] = None  # (epoch, batches already done)
        self.sampler: Optional[EpochSampler] = None
        self.world_size = 1
        self.rank = 0
        #: clips dropped from their batches because they failed to decode (each time one is drawn)
        self.skipped_at_run_time = 0
        # loss logs: this iteration's named parts (detached), sums over the window and the epoch
        from stella_avalanche.training.epoch_log import EpochMeans

        self.loss_log_every = int(loss_log_every)
        self.loss_terms: dict[str, torch.Tensor] = {}
        self._loss_window, self._loss_epoch = EpochMeans(), EpochMeans()
        #: one entry per finished epoch: ``experience``, ``epoch`` and the mean of every loss part
        self.loss_epochs: list[dict[str, float]] = []

    # ------------------------------------------------------------------ properties
    @staticmethod
    def _resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
        if amp is None or device.type != "cuda":
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    @property
    def backbone(self) -> nn.Module:
        """The unwrapped model (DDP-safe access to ``encode_modality``, ``embed``, ...)."""
        return unwrap_model(self.model)

    @property
    def mb_x(self) -> dict:
        return self.mbatch

    @property
    def mb_y(self) -> torch.Tensor:
        return self.mbatch["category"]

    @property
    def mb_task_id(self) -> torch.Tensor:
        return self.mbatch["category"]

    # ------------------------------------------------------------------ data
    def _unpack_minibatch(self) -> None:
        skipped = self.mbatch.pop(SKIPPED, None)  # never seen by plugins or the model
        if skipped:
            self._count_skipped(skipped)
        self.mbatch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                       for k, v in self.mbatch.items()}

    def _count_skipped(self, skipped: Sequence[Any]) -> None:
        """Clips ``collate_av`` dropped because they failed to decode when read (``on_error="skip"``,
        no feature cache): counted here and in their dataset's skip report, logged once per clip.
        (Under DDP the ranks' batches then differ in size, which the gathered InfoNCE refuses.)"""
        from stella_avalanche.data.datasets import record_runtime_skips

        self.skipped_at_run_time += len(skipped)
        for clip in record_runtime_skips(skipped):
            log.warning("dropped a clip that failed to decode from its batch (on_error='skip'; %d dropped "
                        "so far): %s", self.skipped_at_run_time, clip)

    def make_train_dataloader(self, num_workers: Optional[int] = None, shuffle: bool = True,
                              pin_memory: Optional[bool] = None, persistent_workers: bool = False,
                              drop_last: Optional[bool] = None, **kwargs: Any) -> None:
        """Avalanche's loader drops the collate function and seeding (#1531): build our own.

        The order comes from :class:`EpochSampler` (a function of seed, experience and epoch), so a
        resumed run sees the same batches; under DDP the sampler shards the data across ranks.
        """
        ds = self.adapted_dataset
        workers = self.num_workers if num_workers is None else num_workers
        if drop_last is None:  # InfoNCE needs >1 sample: drop a ragged tail if there is a full batch
            drop_last = len(ds) // self.world_size > self.train_mb_size
        self.sampler = EpochSampler(len(ds), seed=self.seed, experience=self.clock.train_exp_counter,
                                    shuffle=shuffle, num_replicas=self.world_size, rank=self.rank)
        self.dataloader = DataLoader(
            ds, batch_size=self.train_mb_size, sampler=self.sampler, num_workers=workers,
            drop_last=drop_last, collate_fn=getattr(ds, "collate_fn", None),
            # own generator: creating the iterator must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
            pin_memory=self.device.type == "cuda" if pin_memory is None else pin_memory,
            persistent_workers=False, worker_init_fn=_seed_worker if workers > 0 else None)

    def make_eval_dataloader(self, num_workers: int = 0, shuffle: bool = False,
                             pin_memory: Optional[bool] = None, persistent_workers: bool = False,
                             **kwargs: Any) -> None:
        """Ordered eval loader with the dataset's collate; sharded across ranks under DDP (the
        retrieval metrics gather the embeddings and drop the padding duplicates by sample index)."""
        ds = self.adapted_dataset
        sampler = None
        if self.world_size > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(ds, num_replicas=self.world_size, rank=self.rank, shuffle=False)
        self.dataloader = DataLoader(
            ds, batch_size=self.eval_mb_size, shuffle=False, sampler=sampler, num_workers=num_workers,
            collate_fn=getattr(ds, "collate_fn", None), generator=torch.Generator().manual_seed(self.seed),
            pin_memory=self.device.type == "cuda" if pin_memory is None else pin_memory)

    def _train_exp(self, experience: Any, eval_streams: Any = None, **kwargs: Any) -> None:
        """Avalanche's epoch loop, able to start in the middle of an experience (resume)."""
        if eval_streams is None:
            eval_streams = [experience]
        for i, exp in enumerate(eval_streams):
            if not isinstance(exp, (list, tuple)) and not hasattr(exp, "__iter__"):
                eval_streams[i] = [exp]
        start_epoch, skip_batches = self._resume_position or (0, 0)
        self._resume_position = None
        for epoch in range(start_epoch, self.train_epochs):
            self.epoch_in_exp = epoch
            skip = skip_batches if epoch == start_epoch else 0
            self.batches_in_epoch = skip
            if self.sampler is not None:
                self.sampler.set_epoch(epoch, skip * self.train_mb_size)
            self._before_training_epoch(**kwargs)
            if self._stop_training:  # early stopping
                self._stop_training = False
                break
            self.training_epoch(**kwargs)
            self._after_training_epoch(**kwargs)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next ``train()`` call start at ``epoch`` after ``batches_done`` batches."""
        self._resume_position = (int(epoch), int(batches_done))

    # ------------------------------------------------------------------ optimisation
    def check_model_and_optimizer(self, reset_optimizer_state: bool = False, **kwargs: Any) -> None:
        """One optimizer for the whole stream: no per-experience reset or re-population.

        (Avalanche's first ``make_optimizer`` would reset the state and put every parameter in
        group 0, losing the no-weight-decay group and any resumed optimizer state.)
        """
        self.model = self.model.to(self.device)

    def make_optimizer(self, **kwargs: Any) -> None:  # see check_model_and_optimizer
        return None

    #: the batch keys :meth:`forward` passes to the model (the host contract, ``training/contract.py``:
    #: a subclass that overrides ``forward`` must declare its own)
    model_input_keys = MODEL_INPUT_KEYS

    def forward(self) -> dict:
        batch = self.mbatch
        if self.is_training:
            inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
            if "video_patches" in inputs:
                inputs.pop("video", None)
            if "audio_patches" in inputs:
                inputs.pop("audio", None)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                return self.model(**inputs)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            z_audio, z_video = self.backbone.embed(batch["video"], batch["audio"])
        return {"z_audio": z_audio.float(), "z_video": z_video.float(),
                "loss": torch.zeros((), device=self.device)}

    def criterion(self) -> torch.Tensor:
        if self.is_training:  # the model's own parts start this iteration's loss log
            out = self.mb_output
            self.loss_terms = {name: out[key].detach().float() for key, name in MODEL_LOSS_PARTS.items()
                               if torch.is_tensor(out.get(key))}
        return self.mb_output["loss"]

    def record_loss_term(self, name: str, term: torch.Tensor | float) -> None:
        """Log ``term`` (a part of this iteration's loss) under ``name``; the same name twice adds up."""
        value = term.detach().float().sum() if torch.is_tensor(term) else torch.tensor(float(term))
        self.loss_terms[name] = self.loss_terms[name] + value if name in self.loss_terms else value

    def _all_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *self.extra_optimizers]

    def backward(self) -> None:
        if not torch.isfinite(self.loss).all():
            parts = {k: float(v) for k, v in self.mb_output.items()
                     if torch.is_tensor(v) and v.ndim == 0}
            raise NonFiniteLossError(
                f"non-finite training loss {self.loss.detach().flatten().tolist()} at iteration "
                f"{self.clock.train_iterations} (experience {self.clock.train_exp_counter}); "
                f"loss terms: {parts}. Training stopped; the last checkpoint is untouched.")
        self.scaler.scale(self.loss.sum()).backward()

    def optimizer_step(self) -> None:
        for opt in self._all_optimizers():
            self.scaler.unscale_(opt)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for opt in self._all_optimizers():
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.extra_optimizers:  # the main one is zeroed by Avalanche's loop
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ cost accounting
    def _before_training(self, **kwargs: Any) -> None:
        # the host contract, once per train() call before any plugin hook: stock plugins that cannot
        # work here and plugins whose needs this strategy does not meet fail now, naming the reason
        from stella_avalanche.training.contract import check_strategy

        check_strategy(self)
        super()._before_training(**kwargs)

    def _before_training_exp(self, **kwargs: Any) -> None:
        super()._before_training_exp(**kwargs)
        self._t_exp = time.perf_counter()

    def _after_training_iteration(self, **kwargs: Any) -> None:
        self.train_samples += int(self._current_batch_size)
        self.batches_in_epoch += 1
        # tensors only: the sums are read (a device sync) when they are logged, not every step
        parts = {"total": self.loss.detach().float().sum(), **self.loss_terms}
        self._loss_window.add(parts)
        self._loss_epoch.add(parts)
        super()._after_training_iteration(**kwargs)  # the clock counts this iteration
        if self.loss_log_every > 0 and self.clock.train_iterations % self.loss_log_every == 0:
            from stella_avalanche.training.epoch_log import log_scalars

            log_scalars(self, self._loss_window.pop(), prefix="loss_iter")

    def _after_training_epoch(self, **kwargs: Any) -> None:
        entry = self._loss_epoch.flush(self, prefix="loss_epoch")
        if entry is not None:
            entry["epoch"] = int(self.epoch_in_exp)
            self.loss_epochs.append(entry)
        super()._after_training_epoch(**kwargs)

    def _before_forward(self, **kwargs: Any) -> None:
        # number of *current* samples (plugins may append replay rows in before_forward)
        self._current_batch_size = len(self.mbatch["category"])
        super()._before_forward(**kwargs)

    def _after_training_exp(self, **kwargs: Any) -> None:
        if self._t_exp is not None:
            self.train_seconds += time.perf_counter() - self._t_exp
            self._t_exp = None
        super()._after_training_exp(**kwargs)

    def cost(self) -> dict:
        """Training cost so far: seconds, current samples per second, peak memory in bytes."""
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        sps = self.train_samples / self.train_seconds if self.train_seconds > 0 else 0.0
        return {"train_seconds": round(self.train_seconds, 3), "samples_per_second": round(sps, 3),
                "peak_memory_bytes": peak}


    # ------------------------------------------------------------------ state (checkpoints)
    def training_state_dict(self) -> dict:
        """Everything needed to continue training: model, optimizer, scaler, plugin states (plugins
        own their extra optimizers, buffers and generators; keyed by plugin identity, see
        :func:`stella_avalanche.checkpoint.plugin_state_key`), Avalanche clock and cost counters (the
        checkpoint module adds RNG states and the position)."""
        from stella_avalanche.checkpoint import plugin_states

        return {"model": self.backbone.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "plugins": plugin_states(self.plugins),
                "clock": {k: v for k, v in vars(self.clock).items() if isinstance(v, int)},
                "cost": {"train_seconds": self.train_seconds, "train_samples": self.train_samples}}

    def load_training_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`training_state_dict`, on a freshly built strategy (plugins must accept
        ``load_state_dict`` before their ``before_training`` hook has run)."""
        self.backbone.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        from stella_avalanche.checkpoint import load_plugin_states

        load_plugin_states(self.plugins, state["plugins"])  # by plugin identity, not list position
        for k, v in state["clock"].items():
            setattr(self.clock, k, v)
        self.train_seconds = state["cost"]["train_seconds"]
        self.train_samples = state["cost"]["train_samples"]


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
