"""Loggers: a JSON-lines metric log plus the stock Avalanche loggers, created on the main process only.

Avalanche's ``CSVLogger`` silently drops custom metrics (it hard-codes accuracy and loss names), so
results are logged as JSON lines instead: one ``{"name", "value", "x"}`` object per metric value.
``BaseLogger.__init__`` raises on non-main ranks, hence :func:`make_loggers` returns ``[]`` there.
"""
from __future__ import annotations

import json
import numbers
import os
import re
import sys
import warnings
from pathlib import Path
from typing import IO, Any, Sequence

import torch
from avalanche.distributed.distributed_helper import DistributedHelper
from avalanche.logging import BaseLogger

__all__ = ["JSONLLogger", "ProgressLogger", "make_loggers"]


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


#: the stream-level recall the recall-matrix metric reports after an evaluation (no task / experience suffix)
_STREAM_RECALL = re.compile(r"^(A2V|V2A)_R@(\d+)_[A-Za-z]+/eval_phase/[\w-]+_stream$")
_ARROWS = {"A2V": "A→V", "V2A": "V→A"}


class ProgressLogger(BaseLogger):
    """Terminal output for a person: a progress bar while a task trains and while the retrieval set is
    embedded, then one line per evaluation with the recall@K over the whole retrieval stream.

    This is the default of ``stella-run``; Avalanche's ``InteractiveLogger`` (every metric of every
    task, hundreds of lines) comes with ``--verbose``. In a log file (not a TTY) the bars refresh at
    most every few tens of seconds (:func:`stella_avalanche.utils.tqdm_options`).

    :param task_names: the stream's task names (for the ``task k/n`` prefix); None: counts only.
    :param file: where the bars and lines go (default ``sys.stdout``).
    """

    def __init__(self, *, task_names: Sequence[str] | None = None, file: IO[str] | None = None) -> None:
        super().__init__()
        self.task_names = list(task_names) if task_names is not None else None
        self.file = file
        self._bar: Any = None
        self._recall: dict[tuple[str, int], float] = {}

    @property
    def _out(self) -> IO[str]:
        return self.file if self.file is not None else sys.stdout

    # -- metric values: only the stream-level recall is kept, for the line after the evaluation
    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        m = _STREAM_RECALL.match(name)
        v = _jsonable(value)
        if m and isinstance(v, (int, float)):
            self._recall[(m.group(1), int(m.group(2)))] = float(v)

    # -- bars
    def _open(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        from stella_avalanche.utils import progress_enabled, tqdm_options

        self._close()
        if progress_enabled():
            self._bar = tqdm(total=total, desc=desc, leave=False, **tqdm_options(self._out))

    def _step(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _task(self, strategy: Any) -> str:
        k = int(getattr(strategy.clock, "train_exp_counter", 0))  # experiences trained so far
        if k == 0:  # the zero-shot evaluation every run makes before its first task
            return "initialisation (no training)"
        n = len(self.task_names) if self.task_names else None
        name = f" ({self.task_names[k - 1]})" if self.task_names and 0 < k <= len(self.task_names) else ""
        return f"task {k}/{n}{name}" if n else f"task {k}{name}"

    def before_training_epoch(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        k = int(getattr(strategy.clock, "train_exp_counter", 0)) + 1
        n = f"/{len(self.task_names)}" if self.task_names else ""
        epochs = int(getattr(strategy, "train_epochs", 1))
        epoch = int(getattr(strategy.clock, "train_exp_epochs", 0)) + 1
        self._open(len(strategy.dataloader), f"training task {k}{n}, epoch {epoch}/{epochs}")

    def after_training_iteration(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self._step()

    def after_training_epoch(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self._close()

    def before_eval(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self._recall = {}

    def before_eval_exp(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        exp = getattr(getattr(strategy, "experience", None), "current_experience", None)
        self._open(len(strategy.dataloader), "evaluating retrieval" + (f" (set {exp + 1})" if exp is not None else ""))

    def after_eval_iteration(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self._step()

    def after_eval_exp(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self._close()

    def after_eval(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        """One line: after which task, then R@K of each direction over the whole retrieval stream."""
        self._close()
        if not self._recall:
            return
        parts = []
        for d in ("A2V", "V2A"):
            ks = sorted(k for dd, k in self._recall if dd == d)
            if ks:
                parts.append(f"{_ARROWS[d]} R@{'/'.join(map(str, ks))} "
                             + "/".join(f"{self._recall[(d, k)]:.1f}" for k in ks))
        print(f"{self._task(strategy)}: " + ", ".join(parts), file=self._out, flush=True)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bar"], state["file"] = None, None  # a bar and a stream cannot be pickled (checkpoints)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def make_loggers(out_dir: str | os.PathLike, *, interactive: bool = True, text: bool = True,
                 tensorboard: bool = True, jsonl: bool = True, append: bool = False, progress: bool = False,
                 task_names: Sequence[str] | None = None) -> list[BaseLogger]:
    """Loggers for one run directory, on the main process only (``[]`` on other ranks).

    :param out_dir: run directory; creates ``log.txt``, ``tb/`` and ``metrics.jsonl`` inside.
    :param interactive: Avalanche ``InteractiveLogger`` (stdout: progress bars and every metric value).
    :param progress: :class:`ProgressLogger` (stdout: progress bars and one recall line per evaluation),
        the quiet alternative to ``interactive``.
    :param task_names: the stream's task names, for :class:`ProgressLogger`'s lines.
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
    if progress:
        loggers.append(ProgressLogger(task_names=task_names))
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
