"""Loggers: a JSON-lines metric log plus the stock Avalanche loggers, created on the main process only.

Avalanche's ``CSVLogger`` silently drops custom metrics (it hard-codes accuracy and loss names), so
results are logged as JSON lines instead: one ``{"name", "value", "x"}`` object per metric value.
``BaseLogger.__init__`` raises on non-main ranks, hence :func:`make_loggers` returns ``[]`` there.
"""
from __future__ import annotations

import json
import numbers
import os
import warnings
from pathlib import Path
from typing import IO, Any

import torch
from avalanche.distributed.distributed_helper import DistributedHelper
from avalanche.logging import BaseLogger

__all__ = ["JSONLLogger", "make_loggers"]


_SKIP = object()


def _jsonable(value: Any) -> Any:
    """A JSON-serialisable form of a metric value, or ``_SKIP`` for images/figures."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if v == v and abs(v) != float("inf") else None  # NaN/inf are not valid JSON
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # numpy scalar / 1-element array
        return _jsonable(value.item())
    return _SKIP


class JSONLLogger(BaseLogger):
    """Appends every scalar metric value as one JSON object per line, flushed immediately.

    Lines look like ``{"name": "A2V_R@1_Pooled/eval_phase/retrieval_stream/Task000", "value": 12.5,
    "x": 40}`` (``x`` = training iterations). Non-scalar values (images, figures) are skipped.
    Pickling (Avalanche checkpoints) drops the file handle; it is reopened in append mode.

    :param path: the ``.jsonl`` file (parent directories are created).
    :param append: keep existing lines (resume) instead of truncating.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, "a" if append else "w", encoding="utf-8")

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        v = _jsonable(value)
        if v is _SKIP:
            return
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps({"name": name, "value": v, "x": int(x_plot)}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file (further values reopen it in append mode)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def make_loggers(out_dir: str | os.PathLike, *, interactive: bool = True, text: bool = True,
                 tensorboard: bool = True, jsonl: bool = True, append: bool = False) -> list[BaseLogger]:
    """Loggers for one run directory, on the main process only (``[]`` on other ranks).

    :param out_dir: run directory; creates ``log.txt``, ``tb/`` and ``metrics.jsonl`` inside.
    :param interactive: Avalanche ``InteractiveLogger`` (stdout with progress bars).
    :param text: Avalanche ``TextLogger`` writing ``log.txt``.
    :param tensorboard: Avalanche ``TensorboardLogger`` writing ``tb/`` (skipped with a warning if
        tensorboard is not installed).
    :param jsonl: :class:`JSONLLogger` writing ``metrics.jsonl``.
    :param append: append to existing ``log.txt`` / ``metrics.jsonl`` (resume).
    :return: list of loggers for ``EvaluationPlugin(loggers=...)``.
    """
    if not DistributedHelper.is_main_process:
        return []
    from avalanche.logging import InteractiveLogger, TextLogger

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loggers: list[BaseLogger] = []
    if interactive:
        loggers.append(InteractiveLogger())
    if text:
        # line-buffered so that log.txt is readable while the run is going
        loggers.append(TextLogger(open(out / "log.txt", "a" if append else "w", buffering=1, encoding="utf-8")))
    if tensorboard:
        try:
            from avalanche.logging import TensorboardLogger
            loggers.append(TensorboardLogger(tb_log_dir=out / "tb"))
        except ImportError as exc:  # tensorboard is optional
            warnings.warn(f"TensorboardLogger disabled: {exc}")
    if jsonl:
        loggers.append(JSONLLogger(out / "metrics.jsonl", append=append))
    return loggers
