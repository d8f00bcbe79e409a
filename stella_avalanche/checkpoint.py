"""Project-owned checkpoints: resume a killed run exactly where it stopped.

A checkpoint is one ``torch.save`` file holding plain state dicts (never pickled strategies or
datasets, unlike Avalanche's dill checkpoints, which pickle whole strategies and break when a class
changes):

- the strategy's training state (:meth:`AudioVideoPretraining.training_state_dict`): model,
  optimizer(s), GradScaler, every plugin's ``state_dict()`` (buffers in their compact form, AVM,
  EMA copies, selection generators) keyed by the plugin's identity (:func:`plugin_state_key`), not
  by its position in the plugin list, Avalanche clock and cost counters;
- the evaluation state (recall-matrix rows so far);
- the RNG states of python, numpy, torch (CPU and CUDA);
- the position: experience index, epoch inside it, batches already done in that epoch.

Files are written atomically (temp file + rename) every N iterations and after each experience's
evaluation; the last K are kept. Training order does not depend on how often one checkpoints
(:class:`~stella_avalanche.training.template.EpochSampler`), so resuming from any of them on CPU
with a fixed seed reproduces the uninterrupted run's results.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin

from stella_avalanche.utils import atomic_torch_save

__all__ = ["Position", "CheckpointPlugin", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "restore_strategy", "rng_state", "set_rng_state", "plugin_state_key", "plugin_states",
           "load_plugin_states", "PluginStateMismatch"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


@dataclass(frozen=True)
class Position:
    """Where training continues: experience ``experience``, epoch ``epoch``, after ``batches`` batches."""

    experience: int
    epoch: int = 0
    batches: int = 0


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and every CUDA device)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PluginStateMismatch(RuntimeError):
    """A checkpoint's plugin states do not match the plugins of the strategy resuming from it."""


def plugin_state_key(plugin: Any) -> str:
    """The identity under which a plugin's state is checkpointed.

    A plugin may name itself with a ``state_key`` attribute (needed only to tell apart two stateful
    plugins of one class whose order may change); otherwise the key is its class's qualified name,
    without the module, so that moving a class to another module keeps old checkpoints loadable.
    """
    explicit = getattr(plugin, "state_key", None)
    if explicit:
        return str(explicit)
    return type(plugin).__qualname__


def _keyed(plugins: Any) -> dict[str, Any]:
    """``{identity: plugin}`` of the stateful plugins; a repeated identity gets ``#2``, ``#3``, ... in
    list order (so several plugins of one class are matched in their order)."""
    out: dict[str, Any] = {}
    for p in plugins:
        if not callable(getattr(p, "state_dict", None)):
            continue
        base = plugin_state_key(p)
        key, n = base, 1
        while key in out:
            n += 1
            key = f"{base}#{n}"
        out[key] = p
    return out


def plugin_states(plugins: Any) -> dict[str, dict]:
    """``{identity: state_dict()}`` of every plugin that has a ``state_dict`` method."""
    return {k: p.state_dict() for k, p in _keyed(plugins).items()}


_LEGACY_KEY = re.compile(r"^(\d+):(\w+)$")


def _from_legacy(states: dict, keyed: dict[str, Any]) -> dict:
    """Checkpoints written before identity keys used ``"<position>:<class name>"``: match those by
    class name, in position order."""
    by_class: dict[str, list[str]] = {}
    for key in keyed:
        by_class.setdefault(type(keyed[key]).__name__, []).append(key)
    out = {}
    for old in sorted(states, key=lambda k: int(_LEGACY_KEY.match(k).group(1))):  # type: ignore[union-attr]
        name = _LEGACY_KEY.match(old).group(2)  # type: ignore[union-attr]
        candidates = by_class.get(name, [])
        out[candidates.pop(0) if candidates else f"<no {name} plugin>"] = states[old]
    return out


def load_plugin_states(plugins: Any, states: dict) -> None:
    """Give every stateful plugin its checkpointed state, matched by identity (the order of the
    plugin list does not matter).

    :raises PluginStateMismatch: when the checkpoint holds a state no plugin claims, or a stateful
        plugin has no state in the checkpoint (it would silently start from scratch), naming both
        sides.
    """
    keyed = _keyed(plugins)
    if states and all(_LEGACY_KEY.match(k) for k in states):
        states = _from_legacy(states, keyed)
    extra = sorted(set(states) - set(keyed))
    missing = sorted(set(keyed) - set(states))
    if extra or missing:
        raise PluginStateMismatch(
            "the checkpoint's plugin states do not match the strategy's plugins: "
            + (f"states without a plugin: {extra}; " if extra else "")
            + (f"plugins without a state: {missing}; " if missing else "")
            + f"checkpoint has {sorted(states)}, strategy has {sorted(keyed)}. Resume with the same "
              "strategy and plugins (their order may differ; give two plugins of one class a "
              "`state_key` to tell them apart).")
    for key, plugin in keyed.items():
        plugin.load_state_dict(states[key])


_ITER_COUNTERS = ("train_iterations", "train_exp_iterations", "train_epoch_iterations", "total_iterations")


def save_checkpoint(directory: str | Path, strategy: Any, position: Position, *,
                    extra: Optional[dict] = None, keep_last: int = 3, mid_iteration: bool = False) -> Path:
    """Write ``ckpt-<iteration>.pt`` atomically in ``directory`` and prune to the last ``keep_last``.

    :param mid_iteration: called from ``after_training_iteration``, before Avalanche's clock has
        counted the finished iteration: the stored clock is advanced by one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = strategy.training_state_dict()
    if mid_iteration:
        for k in _ITER_COUNTERS:
            if k in state["clock"]:
                state["clock"][k] += 1
    it = int(state["clock"].get("train_iterations", 0))
    path = directory / f"ckpt-{it:09d}.pt"
    atomic_torch_save({"format": 1, "position": asdict(position), "strategy": state,
                       "rng": rng_state(), "extra": extra or {}}, path)
    for old in sorted(p for p in directory.iterdir() if _NAME.match(p.name))[:-keep_last]:
        old.unlink(missing_ok=True)
    log.debug("checkpoint %s at %s", path.name, position)
    return path


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    """The newest complete checkpoint in ``directory`` (temp files of an interrupted write are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or obj.get("format") != 1:
        raise ValueError(f"{path}: not a stella_avalanche checkpoint")
    obj["position"] = Position(**obj["position"])
    return obj


def restore_strategy(strategy: Any, ckpt: dict) -> Position:
    """Load a checkpoint's training state and RNG states into a freshly built strategy.

    The next ``strategy.train(...)`` call continues at the stored epoch and batch of the stored
    experience.
    """
    strategy.load_training_state_dict(ckpt["strategy"])
    set_rng_state(ckpt["rng"])
    pos: Position = ckpt["position"]
    if pos.epoch or pos.batches:
        strategy.resume_at(pos.epoch, pos.batches)
    return pos


class CheckpointPlugin(SupervisedPlugin, supports_distributed=True):
    """Save a checkpoint every ``every_n_iterations`` training iterations (0: never mid-experience).

    :param directory: where ``ckpt-*.pt`` files go.
    :param every_n_iterations: period in iterations.
    :param keep_last: number of files kept.
    :param extra_state: callable returning extra state to store (e.g. the recall matrix so far).
    :param is_main: only the main process writes (DDP).
    """

    def __init__(self, *, directory: str | Path, every_n_iterations: int = 0, keep_last: int = 3,
                 extra_state: Optional[Callable[[], dict]] = None, is_main: bool = True) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.every = int(every_n_iterations)
        self.keep_last = keep_last
        self.extra_state = extra_state or (lambda: {})
        self.is_main = is_main

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.every <= 0 or (strategy.clock.train_iterations + 1) % self.every != 0 or not self.is_main:
            return
        # train_iterations is incremented by the Clock plugin *after* this callback: +1 = done.
        done = strategy.batches_in_epoch
        epoch = strategy.epoch_in_exp
        n_batches = len(strategy.dataloader)
        if done >= n_batches:  # epoch finished: continue at the next one
            epoch, done = epoch + 1, 0
        if epoch >= strategy.train_epochs:
            return  # the end-of-experience checkpoint (written after evaluation) covers this
        pos = Position(experience=int(strategy.clock.train_exp_counter), epoch=epoch, batches=done)
        save_checkpoint(self.directory, strategy, pos, extra=self.extra_state(), keep_last=self.keep_last,
                        mid_iteration=True)
