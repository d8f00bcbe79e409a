"""Small shared helpers: atomic file writes, seeding (and seed derivation), device selection, the
process-wide progress-bar switch."""
from __future__ import annotations

import functools
import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["cached_arange", "atomic_write", "atomic_write_json", "atomic_torch_save", "module_device", "seed_everything", "resolve_device",
           "default_cache_dir", "build_lock", "SEED_STRIDE", "SEED_PURPOSES", "derive_seed",
           "progress_enabled", "set_progress", "tqdm_options"]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    The target is therefore either the old complete file or the new complete file, never a
    half-written one (a killed run cannot leave a truncated results.json or checkpoint).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> None:
    """Write ``obj`` as JSON atomically (valid JSON at every moment)."""
    kwargs.setdefault("indent", 2)
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, **kwargs)


@functools.lru_cache(maxsize=64)
def cached_arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n, device=device)`` (int64), built once per ``(n, device)`` and shared read-only.

    A training step that needs the same small index ranges every iteration (row numbers, kept slots,
    chunk numbers) would otherwise launch one kernel per fresh ``arange`` on a GPU, where STELLA's
    step at the paper's batch is host-bound. Callers must never write into the result (``clone``
    first); it is built outside inference mode so that it may be used anywhere.

    :param n: length. :param device: a ``torch.device`` (hashable; pass ``tensor.device``).
    """
    with torch.inference_mode(False), torch.no_grad():
        return torch.arange(n, device=device)


def module_device(model: torch.nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for a module without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def print_and_write(text: str, out: str | os.PathLike | None) -> None:
    """Print a script's report and, when ``out`` is given, write the same text there atomically."""
    print(text, end="")
    if out is not None:
        with atomic_write(out) as fh:
            fh.write(text)


@contextmanager
def build_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive inter-process lock while the cache entry ``target`` is built.

    Several runs started together (``compare.py --jobs``) would otherwise all build the same data
    set or initialisation at once and race to rename it into place. The lock is per entry: runs that
    need the same entry take turns, builds of different entries (the initialisations of different
    seeds) go ahead side by side, which matters when each build runs on one thread. It is an
    ``flock`` on a hidden file ``.<name>.lock`` beside the entry, removed again on release; a waiter
    that wakes on a file already removed takes the lock anew, so two holders are impossible. Callers
    re-check the cache after entering, so the runs that waited reuse what the first one built. Where
    ``fcntl`` does not exist (Windows) this is a no-op and the atomic renames alone keep the cache
    valid. Not re-entrant for one entry.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break                      # the file we hold is still the lock
        except FileNotFoundError:
            pass
        os.close(fd)                       # the holder before us removed it: lock the new one
    try:
        yield
    finally:
        try:
            lock.unlink()                  # while still held: a waiter on it then retries
        except FileNotFoundError:  # pragma: no cover - removed by hand
            pass
        os.close(fd)  # closing the descriptor releases the lock


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


#: the prime between derived seeds (ranks, purposes); small run seeds never make two of them collide
SEED_STRIDE = 7919

#: purpose -> (multiplier, offset): ``derive_seed`` returns ``base * multiplier + offset`` with
#: ``base = seed + SEED_STRIDE * rank``. The formulas are those the seeded runs always used, so
#: their numbers do not change. (Kept for that reason: a baseline's reservoir stream on rank r equals
#: its draw stream on rank r + 1; the two streams drive different choices.)
SEED_PURPOSES: dict[str, tuple[int, int]] = {
    "plugin": (1, 0),                    # a strategy plugin's own seed (each DDP rank its own)
    "replay_draws": (1, 0),              # ReplayPluginBase: replay sampling, MIR candidates, LUMP mixing, ...
    "replay_buffer": (1, SEED_STRIDE),   # ReplayPluginBase: reservoir insertion
    "stella_steps": (SEED_STRIDE, 1),    # STELLAPlugin: patch sampling and matching-loss negatives
    "stella_buffer": (SEED_STRIDE, 2),   # STELLAPlugin: reservoir insertion
}


def derive_seed(seed: int, purpose: str, *, rank: int = 0) -> int:
    """The seed of one random stream of a run: a function of the run seed, the purpose and the rank.

    Every generator of the package that is not the global one is seeded through here, so that two
    streams of one run never share a seed by accident and the rank offset is applied exactly once.
    The strategy factory derives a plugin's seed with ``purpose="plugin"`` and the DDP rank; the
    plugin then derives its own streams from that seed with ``rank=0`` (the rank is already in it).

    :param seed: the run seed (or a plugin's seed).
    :param purpose: a key of :data:`SEED_PURPOSES`.
    :param rank: the DDP rank (0 without DDP).
    :returns: a non-negative int below 2**63.
    """
    try:
        mult, offset = SEED_PURPOSES[purpose]
    except KeyError:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {', '.join(SEED_PURPOSES)}") from None
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    base = int(seed) + SEED_STRIDE * int(rank)
    return (base * mult + offset) % (2**63 - 1)


_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Switch every progress bar of the package on or off (``run_stella.py --quiet`` switches them
    off: feature-cache builds, the synthetic initialisation, Avalanche's interactive logger)."""
    _PROGRESS["enabled"] = bool(enabled)


def progress_enabled() -> bool:
    """Whether progress bars are shown: switched on (:func:`set_progress`) and, under DDP, rank 0."""
    if not _PROGRESS["enabled"]:
        return False
    from stella_avalanche.distributed import get_rank

    return get_rank() == 0


#: seconds between two refreshes of a progress bar written to a log file instead of a terminal
LOG_REFRESH_SECONDS = 30.0


def tqdm_options(stream: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``tqdm`` that suit where its output goes: on a terminal a bar that
    redraws in place; in a log file (stdout/stderr not a TTY, e.g. ``make demo > log``) a refresh
    every :data:`LOG_REFRESH_SECONDS` at most, because each refresh there becomes a line of its own.

    :param stream: the bar's output stream (default ``sys.stderr``, tqdm's own default).
    """
    import sys

    stream = sys.stderr if stream is None else stream
    try:
        interactive = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        interactive = False
    return {"file": stream, "dynamic_ncols": interactive,
            "mininterval": 0.1 if interactive else LOG_REFRESH_SECONDS,
            "maxinterval": 10.0 if interactive else 10 * LOG_REFRESH_SECONDS}


def main_process_threads(threads: int | None, *, num_workers: int, cpu_count: int | None = None,
                         processes: int = 1) -> int | None:
    """Torch threads for the training process: ``threads`` when given, else half the cores the loader
    workers leave free when there are workers, else ``None`` (torch's default, one per core).

    Why: with the default, the main process's OpenMP threads and the loader workers share the cores,
    and host-side tensor work (STELLA's replay buffer in host memory) waits on busy cores. On an H200
    machine (16 cores, 8 workers, batch 48) STELLA's end-to-end rate fell to 0.29 of its rate on
    device-resident batches with 16 threads and was 0.99 with 4 (docs/results/gpu_step.md).

    :param threads: an explicit count (``train.threads``); wins when set.
    :param num_workers: training-loader workers per process.
    :param cpu_count: cores (default ``os.cpu_count()``).
    :param processes: training processes sharing the machine (one per GPU under torchrun).
    """
    if threads:
        return int(threads)
    if num_workers <= 0:
        return None
    cores = (cpu_count or os.cpu_count() or 1) // max(1, processes)
    return max(1, (cores - num_workers) // 2)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_cache_dir() -> Path:
    """User cache dir for generated data and cached initialisations (``$STELLA_CACHE`` overrides)."""
    env = os.environ.get("STELLA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stella_avalanche"
