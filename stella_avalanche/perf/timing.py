"""Timing of training steps: the one step-timer plugin of the perf scripts and the summary of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

__all__ = ["StepTimer", "spread", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(xs: list[float]) -> dict[str, Any]:
    """Mean, min, max, population std and the values of repeated measurements."""
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "values": xs}


class StepTimer:
    """Time of each training iteration without the wait for the loader's next batch.

    On CUDA two events are recorded per iteration (``before_training_iteration`` and
    ``after_training_iteration``) and read once at the end, so timing adds no synchronisation: the
    first event runs when the host reaches the step or the previous step's work ends, whichever is
    later, the second when the step's work ends. On the CPU the host clock is read instead. Marks are
    taken only while :attr:`active` (see :meth:`reset`); the loss of every iteration is kept on the
    device (``losses``) and read by the caller at the end.

    :param device: the device the strategy trains on.
    """

    def __init__(self, *, device: torch.device) -> None:
        from avalanche.training.plugins import SupervisedPlugin

        self.device = device
        self.active = False
        self.marks: list[Any] = []
        self.losses: list[torch.Tensor] = []
        timer = self

        class _Plugin(SupervisedPlugin):
            def before_training_iteration(self, strategy: Any, **kw: Any) -> None:
                timer._mark()

            def after_backward(self, strategy: Any, **kw: Any) -> None:
                timer.losses.append(strategy.loss.detach().float().sum())  # read once, at the end

            def after_training_iteration(self, strategy: Any, **kw: Any) -> None:
                timer._mark()

        self.plugin = _Plugin()

    def reset(self, active: bool) -> None:
        """Forget the marks taken so far; time the following iterations only if ``active``."""
        self.active, self.marks = active, []

    def _mark(self) -> None:
        if not self.active:
            return
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds per timed iteration (pairs of marks)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks[::2], self.marks[1::2])]
        return [b - a for a, b in zip(self.marks[::2], self.marks[1::2])]
