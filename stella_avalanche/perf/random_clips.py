"""Random-content clips in the batch-dict format, for timing and for tests that need data of the
right shapes but no meaning (see docs/contracts.md for the sample keys), and the stream of them that
every perf script trains on."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["RandomClips", "random_clip_stream"]


class RandomClips(Dataset):
    """``n`` clips of Gaussian noise shaped for a backbone config, deterministic per (category, index).

    Samples: ``video`` (T, 3, S, S), ``audio`` (1, A, F) float32, ``category`` = ``category``,
    ``label`` 0, ``index`` i.

    :param cfg: a ``CAVConfig`` (``num_frames``, ``img_size``, ``audio_length``, ``mel_bins``).
    :param n: number of clips.
    :param category: task id of every clip (also seeds the noise, so two categories differ).
    :param pool: draw only this many distinct clips (once, in the constructor) and index them cyclically:
        a loader then only copies tensors, so large batches of base-size clips time the step, not the
        random number generator. ``None``: every clip drawn afresh in ``__getitem__``.
    """

    def __init__(self, cfg: Any, n: int, category: int = 0, *, pool: int | None = None) -> None:
        self.cfg, self.n, self.category = cfg, int(n), int(category)
        self._pool = None if pool is None else [self._draw(i) for i in range(int(pool))]

    def _draw(self, i: int) -> dict:
        c = self.cfg
        g = torch.Generator().manual_seed(self.category * 1_000_003 + int(i))
        return {"video": torch.randn(c.num_frames, 3, c.img_size, c.img_size, generator=g),
                "audio": torch.randn(1, c.audio_length, c.mel_bins, generator=g),
                "category": self.category, "label": 0, "index": int(i)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if self._pool is None:
            return self._draw(i)
        clip = self._pool[int(i) % len(self._pool)]
        return {**clip, "index": int(i)}


def random_clip_stream(cfg: Any, sizes: Sequence[int], *, pool: int | None = None) -> Any:
    """An Avalanche benchmark of random clips: experience ``c`` holds ``sizes[c]`` clips of category ``c``.

    :param cfg: the backbone config the clips are shaped for.
    :param sizes: clips per experience (e.g. ``[batch * warmup_steps, batch * steps, ...]``).
    :param pool: distinct clips per experience (see :class:`RandomClips`).
    """
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from torch.utils.data import default_collate

    return benchmark_from_datasets(train=[AvalancheDataset([RandomClips(cfg, n, category=c, pool=pool)],
                                                           collate_fn=default_collate)
                                          for c, n in enumerate(sizes)])
