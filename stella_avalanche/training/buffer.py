"""A compact, preallocated tensor reservoir updated every iteration (``docs/method.md`` §4 step 12, §6).

:class:`ReservoirBuffer` keeps one preallocated tensor per field (pinned host memory when CUDA is
available and the buffer lives on the CPU). Insertion is the vectorised reservoir: all random draws of a
batch at once, duplicate slot hits resolved explicitly so that the *last* sample wins (sequential
semantics). The buffer is agnostic of what it stores; the encoders below and the field-spec builders
define the compact STELLA / STELLA+ layouts.

Compact storage (Deviation (allowed), §6): video as uint8 pixels before ImageNet normalisation; audio
as uint8 with a per-item affine scale (or fp16); summary statistics (I, C, qbar) in fp16; the regression
targets z in fp32; ids in int16. At the paper's sizes this gives 747,598 B per STELLA item and
377,118 B per STELLA+ item (budgets 750,000 B and 400,000 B); §6's layout (fp16 audio, fp32
statistics) gives 886,912 / 445,712 B (+6 B category/index) and stays available through
``audio_storage="float16", stats_dtype=torch.float32``. Why these choices: the fp16 -> 8-bit audio step
(per-item min/max affine, error <= range/510, ~0.01 for a normalised fbank) is the only one that saves
enough (131,072 B); I, C and qbar are sampling weights / probabilities / query summaries for which fp16's
1e-3 relative error is immaterial; z stays fp32 because it is the DER regression target.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor

__all__ = [
    "ReservoirBuffer",
    "FieldSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "video_to_uint8",
    "video_from_uint8",
    "video_patches_to_uint8",
    "video_patches_from_uint8",
    "audio_to_uint8",
    "audio_from_uint8",
    "stella_fields",
    "stella_plus_fields",
    "bytes_per_item",
]

#: field name -> (per-item shape, dtype)
FieldSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: the ImageNet constants per device: building them with ``torch.tensor(list, device=cuda)`` is a
#: blocking host-to-device copy, which cost two stream waits per buffer insertion and per draw
_STATS_BY_DEVICE: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _channel_stats(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    stats = _STATS_BY_DEVICE.get(x.device)
    if stats is None:
        stats = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device),
                 torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device))
        _STATS_BY_DEVICE[x.device] = stats
    shape = [1] * x.ndim
    shape[channel_dim] = 3
    return stats[0].view(shape), stats[1].view(shape)


def video_to_uint8(x_norm: Tensor) -> Tensor:
    """ImageNet-normalised frames (..., 3, H, W) -> uint8 pixels ``round((x*std + mean)*255)``, clamped.

    The error after :func:`video_from_uint8` is at most 0.5/255 per pixel before normalisation.
    """
    if x_norm.ndim < 3 or x_norm.shape[-3] != 3:
        raise ValueError(f"video_to_uint8 expects (..., 3, H, W), got {tuple(x_norm.shape)}")
    mean, std = _channel_stats(x_norm, x_norm.ndim - 3)
    return torch.round((x_norm.float() * std + mean) * 255.0).clamp_(0, 255).to(torch.uint8)


def video_from_uint8(x_u8: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels (..., 3, H, W) -> ImageNet-normalised frames of ``dtype``."""
    if x_u8.ndim < 3 or x_u8.shape[-3] != 3:
        raise ValueError(f"video_from_uint8 expects (..., 3, H, W), got {tuple(x_u8.shape)}")
    mean, std = _channel_stats(x_u8, x_u8.ndim - 3)
    return ((x_u8.float() / 255.0 - mean) / std).to(dtype)


def video_patches_to_uint8(p_norm: Tensor) -> Tensor:
    """Normalised video patch vectors (..., 3p^2) in (row, col, channel) order -> uint8 pixels."""
    if p_norm.shape[-1] % 3:
        raise ValueError(f"video patch vectors must hold 3p^2 values, got {p_norm.shape[-1]}")
    x = p_norm.reshape(*p_norm.shape[:-1], -1, 3)          # channel is the fastest axis
    mean, std = _channel_stats(x, x.ndim - 1)
    return torch.round((x.float() * std + mean) * 255.0).clamp_(0, 255).to(torch.uint8).reshape(p_norm.shape)


def video_patches_from_uint8(p_u8: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`video_patches_to_uint8`: uint8 (..., 3p^2) -> normalised patch vectors."""
    x = p_u8.reshape(*p_u8.shape[:-1], -1, 3)
    mean, std = _channel_stats(x, x.ndim - 1)
    return ((x.float() / 255.0 - mean) / std).to(dtype).reshape(p_u8.shape)


def audio_to_uint8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-item affine 8-bit quantisation of a batch of normalised fbanks / audio patches.

    Each item (first axis) is mapped to 256 levels between its own min and max, so the error is at
    most ``(max - min) / 510`` (about 0.01 for normalised fbanks spanning ~5 units).

    :param x: (B, ...) float. :return: ``(q uint8 (B, ...), lo (B,) fp32, scale (B,) fp32)``.
    """
    flat = x.detach().float().reshape(x.shape[0], -1)
    lo = flat.amin(dim=1)
    scale = ((flat.amax(dim=1) - lo) / 255.0).clamp_min(1e-12)
    q = torch.round((flat - lo[:, None]) / scale[:, None]).clamp_(0, 255).to(torch.uint8)
    return q.view(x.shape), lo, scale


def audio_from_uint8(q: Tensor, lo: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`audio_to_uint8`: (B, ...) uint8 with (B,) ``lo``/``scale`` -> float."""
    shape = (q.shape[0],) + (1,) * (q.ndim - 1)
    return (q.float() * scale.float().view(shape) + lo.float().view(shape)).to(dtype)


def bytes_per_item(fields: FieldSpec) -> int:
    """Bytes one item of ``fields`` occupies, without allocating anything."""
    total = 0
    for name, (shape, dtype) in fields.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        total += int(math.prod(shape)) * itemsize
    return total


def _audio_fields(prefix: str, shape: tuple[int, ...], audio_storage: str) -> dict:
    if audio_storage == "uint8":
        return {prefix: (shape, torch.uint8), f"{prefix}_lo": ((), torch.float32),
                f"{prefix}_scale": ((), torch.float32)}
    if audio_storage == "float16":
        return {prefix: (shape, torch.float16)}
    raise ValueError(f"audio_storage must be 'uint8' or 'float16', got {audio_storage!r}")


def stella_fields(*, num_frames: int, img_size: int, audio_length: int, mel_bins: int, embed_dim: int,
                  num_heads: int, video_tokens: int, audio_tokens: int, audio_storage: str = "uint8",
                  stats_dtype: torch.dtype = torch.float16) -> dict:
    """Compact STELLA buffer layout (§6): the full clip plus z, qbar, C and I.

    Fields: ``video`` uint8 (T,3,S,S); ``audio`` (1,A,F) uint8 + ``audio_lo``/``audio_scale`` fp32, or
    fp16; ``z_a``, ``z_v`` fp32 (D); ``qbar_a``, ``qbar_v`` (H, D/H); ``I_v``, ``C_v`` (L_V); ``I_a``,
    ``C_a`` (L_A) in ``stats_dtype``; ``category`` int16; ``index`` int32.

    Paper sizes (T=4, S=224, A=1024, F=128, D=768, H=12): 747,598 B per item with the defaults
    (uint8 audio, fp16 statistics); 886,912 B is §6's layout (fp16 audio, fp32 statistics, no
    category/index).
    """
    head_dim = embed_dim // num_heads
    f = {"video": ((num_frames, 3, img_size, img_size), torch.uint8)}
    f.update(_audio_fields("audio", (1, audio_length, mel_bins), audio_storage))
    f.update({
        "z_a": ((embed_dim,), torch.float32), "z_v": ((embed_dim,), torch.float32),
        "qbar_a": ((num_heads, head_dim), stats_dtype), "qbar_v": ((num_heads, head_dim), stats_dtype),
        "I_v": ((video_tokens,), stats_dtype), "C_v": ((video_tokens,), stats_dtype),
        "I_a": ((audio_tokens,), stats_dtype), "C_a": ((audio_tokens,), stats_dtype),
        "category": ((), torch.int16), "index": ((), torch.int32),
    })
    return f


def stella_plus_fields(*, keep_video: int, keep_audio: int, patch_size: int, embed_dim: int,
                       num_heads: int, audio_storage: str = "uint8",
                       stats_dtype: torch.dtype = torch.float16) -> dict:
    """Compact STELLA+ buffer layout (§5, §6): the selected patches and their ids, plus z and qbar.

    Fields: ``video_patches`` uint8 (K_V, 3p^2) (pixels before normalisation, (row, col, channel)
    order); ``audio_patches`` (K_A, p^2) uint8 + ``audio_patches_lo``/``_scale`` fp32, or fp16;
    ``video_ids`` (K_V), ``audio_ids`` (K_A) int16; ``z_a``, ``z_v`` fp32 (D); ``qbar_a``, ``qbar_v``
    (H, D/H) in ``stats_dtype``; ``category`` int16; ``index`` int32.

    Paper sizes: 377,118 B per item with the defaults (445,712 B in §6's layout).
    """
    head_dim = embed_dim // num_heads
    p2 = patch_size * patch_size
    f = {"video_patches": ((keep_video, 3 * p2), torch.uint8)}
    f.update(_audio_fields("audio_patches", (keep_audio, p2), audio_storage))
    f.update({
        "video_ids": ((keep_video,), torch.int16), "audio_ids": ((keep_audio,), torch.int16),
        "z_a": ((embed_dim,), torch.float32), "z_v": ((embed_dim,), torch.float32),
        "qbar_a": ((num_heads, head_dim), stats_dtype), "qbar_v": ((num_heads, head_dim), stats_dtype),
        "category": ((), torch.int16), "index": ((), torch.int32),
    })
    return f


class ReservoirBuffer:
    """Fixed-capacity reservoir of tensor items, one preallocated tensor per field.

    :param capacity: maximum number of items (the paper: 2000 on one device, D16).
    :param fields: ``{name: (per-item shape, dtype)}``.
    :param device: where the tensors live ("cpu" or a CUDA device).
    :param pin_memory: pin host tensors; ``None`` = pin when CUDA is available and the buffer is on CPU.
    :param generator: default generator for insertion and sampling draws (part of the state).
    """

    def __init__(self, capacity: int, *, fields: FieldSpec, device: str | torch.device = "cpu",
                 pin_memory: Optional[bool] = None, generator: Optional[torch.Generator] = None) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if not fields:
            raise ValueError("buffer needs at least one field")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: (tuple(int(s) for s in shape), dtype) for k, (shape, dtype) in fields.items()}
        if pin_memory is None:
            pin_memory = self.device.type == "cpu" and torch.cuda.is_available()
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu"
        self.generator = generator if generator is not None else torch.Generator(device="cpu")
        self.data: dict[str, Tensor] = {
            k: torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device,
                           pin_memory=self.pin_memory)
            for k, (shape, dtype) in self.fields.items()}
        self._seen = 0

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def item_bytes(fields: FieldSpec) -> int:
        """Bytes per item for a field spec, without allocating (same as :func:`bytes_per_item`)."""
        return bytes_per_item(fields)

    def bytes_per_item(self) -> int:
        """Bytes one stored item occupies."""
        return bytes_per_item(self.fields)

    def nbytes(self) -> int:
        """Bytes held by the preallocated tensors (capacity x bytes per item)."""
        return self.capacity * self.bytes_per_item()

    def __len__(self) -> int:
        return min(self._seen, self.capacity)

    @property
    def seen(self) -> int:
        """Number of stream samples offered to :meth:`add` so far (the reservoir counter s)."""
        return self._seen

    def __repr__(self) -> str:
        return (f"ReservoirBuffer({len(self)}/{self.capacity} items, seen={self._seen}, "
                f"{self.bytes_per_item()} B/item, device={self.device})")

    # ------------------------------------------------------------------ helpers
    def _rows_of(self, batch: Mapping[str, Tensor], where: str) -> int:
        missing = [k for k in self.fields if k not in batch]
        if missing:
            raise KeyError(f"ReservoirBuffer.{where}: batch lacks field(s) {missing}")
        n = None
        for name, (shape, dtype) in self.fields.items():
            v = batch[name]
            if not torch.is_tensor(v):
                raise TypeError(f"ReservoirBuffer.{where}: field {name!r} is {type(v).__name__}, not a tensor")
            if tuple(v.shape[1:]) != shape:
                raise ValueError(f"ReservoirBuffer.{where}: field {name!r} has item shape "
                                 f"{tuple(v.shape[1:])}, expected {shape}")
            if v.is_floating_point() and not dtype.is_floating_point:
                # a silent float -> int cast would corrupt e.g. normalised video; encode explicitly
                raise TypeError(f"ReservoirBuffer.{where}: field {name!r} is {v.dtype} but stored as "
                                f"{dtype}; encode it first (e.g. video_to_uint8 / audio_to_uint8)")
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                raise ValueError(f"ReservoirBuffer.{where}: field {name!r} has {v.shape[0]} rows, "
                                 f"other fields have {n}")
        return int(n or 0)

    def _store(self, slots: Tensor, batch: Mapping[str, Tensor], rows: Optional[Tensor] = None) -> None:
        """Write ``batch[rows]`` into ``slots`` (slots must be distinct)."""
        # the host index tensors go to the device once and without waiting for the stream (a
        # non-blocking copy from pageable memory is staged before the call returns)
        idx = slots.to(self.device, non_blocking=True)
        on_device: dict[torch.device, Tensor] = {}
        staged: list[tuple[str, Tensor]] = []
        source: Optional[torch.device] = None
        for name, (_, dtype) in self.fields.items():
            v = batch[name].detach()
            if rows is not None:
                if v.device not in on_device:
                    on_device[v.device] = rows.to(v.device, non_blocking=True)
                v = v[on_device[v.device]]
            if self.device.type == "cpu" and v.is_cuda:
                # device -> host buffer: start every field's copy, then wait once for all of them
                # (a blocking copy per field would wait for the stream once per field)
                staged.append((name, v.to(device=self.device, dtype=dtype, non_blocking=True)))
                source = v.device
            else:
                self.data[name].index_copy_(0, idx, v.to(device=self.device, dtype=dtype))
        if staged:
            torch.cuda.current_stream(source).synchronize()
            for name, v in staged:
                self.data[name].index_copy_(0, idx, v)

    # ------------------------------------------------------------------ API
    def reservoir_slots(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw the reservoir slots of the next ``n`` stream samples and advance the counter.

        Sample k (stream index ``s + k``) goes to slot ``s + k`` while the buffer is not full, else to
        ``r ~ U{0..s+k}`` when ``r < capacity``; -1 = skipped. One uniform per sample is always drawn,
        so the generator advances identically whether or not the buffer is full.

        :return: (n,) int64 slots on the CPU, before duplicate resolution.
        """
        gen = generator if generator is not None else self.generator
        stream_idx = self._seen + torch.arange(n, dtype=torch.float64)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        r = torch.floor(u * (stream_idx + 1)).long()      # U{0..s+k}, exact in float64
        slots = torch.where(stream_idx < self.capacity, stream_idx.long(), r)
        slots = torch.where(slots < self.capacity, slots, torch.full_like(slots, -1))
        self._seen += n
        return slots

    def add(self, batch: Mapping[str, Tensor], generator: Optional[torch.Generator] = None) -> Tensor:
        """Offer a batch of ``n`` stream samples to the reservoir (vectorised §4 step 12).

        :param batch: ``{field: (n, *shape)}`` for every field (extra keys are ignored).
        :return: (n,) int64 slot where each row now lives; -1 when it was skipped or overwritten by a
            later row of the same batch (last one wins, as in sequential insertion).
        """
        n = self._rows_of(batch, "add")
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        slots = self.reservoir_slots(n, generator)
        valid = slots >= 0
        rows = torch.arange(n)
        # explicit last-wins: the winner of a slot is the largest row index hitting it
        last = torch.full((self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slots[valid], rows[valid], reduce="amax")
        winner = valid & (last[slots.clamp(min=0)] == rows)
        if bool(winner.any()):
            self._store(slots[winner], batch, rows[winner])
        return torch.where(winner, slots, torch.full_like(slots, -1))

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[dict[str, Tensor], Tensor]:
        """Draw ``n`` distinct filled slots uniformly at random.

        :return: ``({field: (n, *shape)}, slots (n,) int64)``; tensors on the buffer's device.
        """
        size = len(self)
        if not 0 <= n <= size:
            raise ValueError(f"ReservoirBuffer.sample: cannot draw {n} items from {size} stored")
        gen = generator if generator is not None else self.generator
        slots = torch.randperm(size, generator=gen, device=gen.device)[:n].cpu()
        idx = slots.to(self.device, non_blocking=True)  # no stream wait (see _store)
        return {k: v.index_select(0, idx) for k, v in self.data.items()}, slots

    def write(self, slots: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Overwrite the items in ``slots`` (e.g. GMED's edited clips); the counter is unchanged.

        Only the fields present in ``batch`` are written; ``slots`` must be distinct filled slots.
        """
        slots = torch.as_tensor(slots, dtype=torch.long).cpu()
        size = len(self)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= size):
            raise IndexError(f"ReservoirBuffer.write: slots must be in [0, {size}), got "
                             f"[{int(slots.min())}, {int(slots.max())}]")
        if slots.unique().numel() != slots.numel():
            raise ValueError("ReservoirBuffer.write: duplicate slots")
        unknown = [k for k in batch if k not in self.fields]
        if unknown:
            raise KeyError(f"ReservoirBuffer.write: unknown field(s) {unknown}")
        for name, v in batch.items():
            shape, dtype = self.fields[name]
            if tuple(v.shape) != (slots.numel(), *shape):
                raise ValueError(f"ReservoirBuffer.write: field {name!r} has shape {tuple(v.shape)}, "
                                 f"expected {(slots.numel(), *shape)}")
            if v.is_floating_point() and not dtype.is_floating_point:
                raise TypeError(f"ReservoirBuffer.write: field {name!r} is {v.dtype}, stored as {dtype}")
            self.data[name].index_copy_(0, slots.to(self.device), v.detach().to(self.device, dtype))

    def state_dict(self) -> dict:
        """Filled tensors (CPU), counters and generator state."""
        size = len(self)
        return {
            "capacity": self.capacity,
            "seen": self._seen,
            "fields": {k: (list(shape), str(dtype)) for k, (shape, dtype) in self.fields.items()},
            "data": {k: v[:size].detach().cpu().clone() for k, v in self.data.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; the field spec and capacity must match."""
        spec = {k: (list(shape), str(dtype)) for k, (shape, dtype) in self.fields.items()}
        if dict(state["fields"]) != spec:
            raise ValueError(f"ReservoirBuffer.load_state_dict: field spec {state['fields']} != {spec}")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"ReservoirBuffer.load_state_dict: capacity {state['capacity']} != "
                             f"{self.capacity}")
        self._seen = int(state["seen"])
        size = len(self)
        for k, v in state["data"].items():
            if v.shape[0] != size:
                raise ValueError(f"ReservoirBuffer.load_state_dict: field {k!r} has {v.shape[0]} rows, "
                                 f"expected {size}")
            self.data[k][:size].copy_(v.to(self.device))
            self.data[k][size:].zero_()
        self.generator.set_state(state["generator"])
