"""Replay storage: where a replay plugin's items live and in what form (Avalanche's storage policy).

A :class:`ReplayStorage` pairs a codec (``training/item_codec.py``: batch rows <-> stored form) with a
:class:`~stella_avalanche.training.buffer.ReservoirBuffer`, created at the first insertion from the
encoded rows' per-item shapes or up front from a known layout. Replay plugins receive one as their
``storage`` argument (:class:`~stella_avalanche.training.plugins.replay_base.ReplayPluginBase`), as
Avalanche's ``ReplayPlugin`` receives its ``storage_policy``; by default each plugin builds the reservoir
of ``mem_size`` items with its own codec.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from stella_avalanche.training.buffer import FieldSpec, ReservoirBuffer

__all__ = ["ReplayStorage"]


def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name.split(".")[-1], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a replay plugin state")
    return dtype


class ReplayStorage:
    """A reservoir of ``capacity`` items stored through ``codec``.

    :param capacity: maximum number of items.
    :param codec: object with ``encode(rows) -> stored`` and ``decode(stored, device) -> rows`` (e.g.
        :class:`~stella_avalanche.training.item_codec.ClipCodec`).
    :param seed: seeds the reservoir's generator (insertion draws; also the replay draws of plugins
        that sample with it).
    :param device: where the buffer lives; ``None`` = the device of the first insertion (the
        strategy's device).
    """

    def __init__(self, *, capacity: int, codec: Any, seed: int,
                 device: Optional[str | torch.device] = None) -> None:
        if capacity < 1:
            raise ValueError(f"ReplayStorage: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.codec = codec
        self.device = device
        self.generator = torch.Generator().manual_seed(int(seed))
        #: the reservoir (``None`` until the first insertion or :meth:`ensure` fixes the layout)
        self.buffer: Optional[ReservoirBuffer] = None

    def __len__(self) -> int:
        return 0 if self.buffer is None else len(self.buffer)

    @property
    def bytes_per_item(self) -> Optional[int]:
        """Bytes one item occupies (``None`` until the layout is known)."""
        return None if self.buffer is None else self.buffer.bytes_per_item()

    def _new_buffer(self, fields: FieldSpec, device: torch.device) -> ReservoirBuffer:
        dev = torch.device(self.device) if self.device is not None else device
        return ReservoirBuffer(self.capacity, fields=fields, device=dev, generator=self.generator)

    def ensure(self, fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device,
               owner: str = "ReplayStorage") -> ReservoirBuffer:
        """Create the buffer with a known layout, or check that a loaded one has this layout and capacity.

        :param owner: named in the error (the plugin).
        :raises ValueError: a loaded buffer that does not fit, naming both layouts.
        """
        fields = {k: (tuple(int(s) for s in shape), dt) for k, (shape, dt) in fields.items()}
        if self.buffer is None:
            self.buffer = self._new_buffer(fields, device)
        elif self.buffer.fields != fields or self.buffer.capacity != self.capacity:
            raise ValueError(f"{owner}: the loaded buffer ({self.buffer.capacity} items of "
                             f"{self.buffer.fields}) does not fit this plugin ({self.capacity} of {fields})")
        return self.buffer

    def insert(self, items: Mapping[str, Tensor], device: torch.device) -> Tensor:
        """Encode batch rows and reservoir-insert them; creates the buffer on first use.

        :returns: (n,) slots (-1 = not stored), see :meth:`ReservoirBuffer.add`.
        """
        encoded = self.codec.encode(items)
        if self.buffer is None:
            self.buffer = self._new_buffer({k: (tuple(v.shape[1:]), v.dtype) for k, v in encoded.items()}, device)
        return self.buffer.add(encoded)

    def sample(self, m: int, device: torch.device, generator: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        """Draw ``m`` distinct items uniformly with ``generator``; (decoded rows on ``device``, slots (m,))."""
        assert self.buffer is not None
        stored, slots = self.buffer.sample(m, generator=generator)
        return self.codec.decode(stored, device), slots

    def load_state(self, bstate: Optional[Mapping[str, Any]], saved_device: Optional[str] = None) -> None:
        """Rebuild the buffer from a :meth:`ReservoirBuffer.state_dict` (its saved field spec), on
        :attr:`device`, else where it was saved unless that was a GPU this machine lacks; ``None``
        empties it."""
        if bstate is None:
            self.buffer = None
            return
        fields = {k: (tuple(shape), _dtype_from_str(dt)) for k, (shape, dt) in bstate["fields"].items()}
        dev = self.device
        if dev is None:
            dev = saved_device or "cpu"
            if str(dev).startswith("cuda") and not torch.cuda.is_available():
                dev = "cpu"
        self.buffer = ReservoirBuffer(int(bstate["capacity"]), fields=fields, device=dev, generator=self.generator)
        self.buffer.load_state_dict(bstate)
