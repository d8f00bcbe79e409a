"""Per-epoch means of a plugin's per-step scalars, logged through the strategy's loggers.

The sums stay tensors during the epoch, so a training step never waits for the device; the means
are read once per epoch. Not part of any checkpoint: an epoch cut by a resume restarts its sums.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["EpochMeans", "StepScalars", "log_scalars"]


class EpochMeans:
    """Running sums of per-step scalars; :meth:`pop` returns their means over the steps added."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._steps = 0

    def add(self, values: Mapping[str, Optional[Tensor | float]]) -> None:
        """Add one step's scalars (tensors or numbers; ``None`` entries are skipped for this step
        but the step still counts)."""
        for k, v in values.items():
            if v is None:
                continue
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._steps += 1

    def pop(self) -> dict[str, float]:
        """``{name: sum / steps}`` since the last pop (empty when no step was added); resets."""
        sums, n = self._sums, self._steps
        self._sums, self._steps = {}, 0
        return {k: float(v) / n for k, v in sums.items()} if n else {}

    def flush(self, strategy: Any, *, prefix: str) -> Optional[dict[str, float]]:
        """End of an epoch: :meth:`pop` the means, log them (:func:`log_scalars`) and return them with
        the strategy's ``experience`` and ``epoch`` counters; None when no step was added."""
        means = self.pop()
        if not means:
            return None
        log_scalars(strategy, means, prefix=prefix)
        return {"experience": int(getattr(strategy.clock, "train_exp_counter", 0)),
                "epoch": int(getattr(strategy.clock, "train_exp_epochs", 0)), **means}


def log_scalars(strategy: Any, values: Mapping[str, float], *, prefix: str) -> None:
    """Log ``values`` as ``<prefix>/<name>`` at the strategy's iteration count to every logger of
    its evaluator (metrics.jsonl, TensorBoard, text); a logger that cannot take scalars is skipped."""
    evaluator = getattr(strategy, "evaluator", None)
    x = int(getattr(strategy.clock, "train_iterations", 0))
    for logger in getattr(evaluator, "loggers", None) or []:
        for k, v in values.items():
            try:
                logger.log_single_metric(f"{prefix}/{k}", v, x)
            except Exception:  # a logger that cannot take scalars must not end the run
                pass


class StepScalars:
    """A plugin's scalars: those of the last step (tensors, read as floats only when logged), their
    per-epoch means (:class:`EpochMeans`) and the list of past epochs' means.

    :param prefix: the loggers' metric prefix (``<prefix>/<name>``).
    """

    def __init__(self, *, prefix: str) -> None:
        self.prefix = prefix
        #: the current step's scalars (tensors or numbers)
        self.last: dict[str, Any] = {}
        #: one entry per finished epoch: ``experience``, ``epoch`` and the means
        self.epochs: list[dict[str, float]] = []
        self._means = EpochMeans()

    def floats(self) -> dict[str, float]:
        """:attr:`last` as floats (synchronises with the device)."""
        return {k: float(v) for k, v in self.last.items()}

    def end_step(self, keys: tuple[str, ...], **extra: Any) -> None:
        """Add the step's ``keys`` to the epoch sums, in that order: from ``extra`` when given there,
        else from :attr:`last` (missing ones are skipped)."""
        self._means.add({k: extra[k] if k in extra else self.last.get(k) for k in keys})

    def end_epoch(self, strategy: Any) -> None:
        """Log the epoch's means and append them to :attr:`epochs` (nothing when no step ran)."""
        entry = self._means.flush(strategy, prefix=self.prefix)
        if entry is not None:
            self.epochs.append(entry)
