"""Host-synchronisation audit of a code region, runnable on the CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports every operation that waits for the
device. On the CPU nothing waits, but the *same calls* can be found: every read of a tensor value by
the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ...), every operation
whose output size depends on tensor values (``nonzero``, boolean-mask indexing, ``unique``, ...),
and every device copy requested without ``non_blocking=True`` (``.to(device)``: a host-to-device
copy from pageable memory or a device-to-host copy waits for the stream on CUDA).
:class:`HostSyncAudit` records each such call with the first caller frame outside torch, so a
training step can be audited on the CPU and the list compared with the GPU's sync-debug pass.

A CPU run cannot tell whether a ``.to(device)`` would cross host and device; those calls are
reported as their own kind (``device_copy``) for the reader to classify. Two more kinds copy host
data into a device tensor with a blocking copy on CUDA: ``host_data`` (``torch.tensor(list,
device=...)``, ``new_tensor``) and ``scalar_write`` (``t[idx] = 0.0``: the Python number becomes a
host tensor that is copied to ``t``'s device).
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Any, Iterable, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncAudit", "VALUE_READS", "SHAPE_FROM_VALUES"]

#: methods that hand a tensor value to Python (a device sync on CUDA)
VALUE_READS = frozenset({"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy",
                         "cpu"})
#: operations whose output shape depends on tensor values (a device sync on CUDA)
SHAPE_FROM_VALUES = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                               "repeat_interleave", "nonzero_static"})

from stella_avalanche.paths import portable_path

_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller(skip_dirs: tuple[str, ...]) -> str:
    """First frame outside ``skip_dirs`` as ``file:line``; `` via torch/...`` when torch made the call."""
    f = sys._getframe(2)
    via = ""
    while f is not None:
        path = f.f_code.co_filename
        if path == __file__:
            f = f.f_back
            continue
        if not path.startswith(skip_dirs):
            # repository-relative: the audit goes into published GPU result files
            return f"{portable_path(path)}:{f.f_lineno}" + (f" via {via}" if via else "")
        if not via:
            via = "torch/" + os.path.relpath(path, _TORCH_DIR)
        f = f.f_back
    return "?"


def _is_bool_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class HostSyncAudit(TorchFunctionMode):
    """Context manager recording host synchronisation points (see the module docstring).

    :param keep: path fragments of the caller files to keep (``None`` = every caller).
    :param skip_dirs: caller directories skipped when looking for the responsible frame (torch's own).

    After the ``with`` block: :attr:`events` is a list of ``(kind, name, "file:line")`` and
    :meth:`summary` counts them per (kind, name, site).
    """

    def __init__(self, *, keep: Optional[Iterable[str]] = None,
                 skip_dirs: tuple[str, ...] = (_TORCH_DIR,)) -> None:
        super().__init__()
        self.keep = tuple(keep) if keep is not None else None
        self.skip_dirs = skip_dirs
        self.events: list[tuple[str, str, str]] = []

    def _record(self, kind: str, name: str) -> None:
        site = _caller(self.skip_dirs)
        if self.keep is None or any(k in site for k in self.keep):
            self.events.append((kind, name, site))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in VALUE_READS and args and torch.is_tensor(args[0]):
            self._record("value_read", name)
        elif name in SHAPE_FROM_VALUES:
            if not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                self._record("value_shape", name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1 \
                and _is_bool_index(args[1]):
            self._record("value_shape", f"{name}[bool mask]")
        elif name == "where" and len(args) == 1 and not kwargs:
            self._record("value_shape", "where(cond)")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None and args \
                and not torch.is_tensor(args[0]):
            self._record("host_data", name)
        elif name == "new_tensor" and len(args) > 1 and not torch.is_tensor(args[1]):
            self._record("host_data", name)
        elif name == "__setitem__" and len(args) > 2 and isinstance(args[2], (bool, int, float, complex)):
            self._record("scalar_write", name)
        elif name in ("to", "cuda") and not kwargs.get("non_blocking", False):
            # .to(device[, dtype][, non_blocking]) names a device; .to(dtype) does not
            moves = name == "cuda" or "device" in kwargs or (
                len(args) > 1 and isinstance(args[1], (torch.device, str)))
            if moves and not (name == "to" and len(args) > 3 and args[3] is True) \
                    and not (name == "to" and len(args) > 2 and args[2] is True):
                self._record("device_copy", name)
        return func(*args, **kwargs)

    def summary(self) -> list[tuple[str, str, str, int]]:
        """``(kind, name, site, count)`` sorted by kind, then site."""
        c = collections.Counter(self.events)
        return sorted(((k, n, s, v) for (k, n, s), v in c.items()), key=lambda r: (r[0], r[2], r[1]))

    def counts(self) -> dict[str, int]:
        """Events per kind."""
        return dict(collections.Counter(k for k, _, _ in self.events))
