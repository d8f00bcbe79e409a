"""Random-content clips in the batch-dict format, for timing and for tests that need data of the
right shapes but no meaning (see docs/contracts.md for the sample keys)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["RandomClips"]


class RandomClips(Dataset):
    """``n`` clips of Gaussian noise shaped for a backbone config, deterministic per (category, index).

    Samples: ``video`` (T, 3, S, S), ``audio`` (1, A, F) float32, ``category`` = ``category``,
    ``label`` 0, ``index`` i.

    :param cfg: a ``CAVConfig`` (``num_frames``, ``img_size``, ``audio_length``, ``mel_bins``).
    :param n: number of clips.
    :param category: task id of every clip (also seeds the noise, so two categories differ).
    """

    def __init__(self, cfg: Any, n: int, category: int = 0) -> None:
        self.cfg, self.n, self.category = cfg, int(n), int(category)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        c = self.cfg
        g = torch.Generator().manual_seed(self.category * 1_000_003 + int(i))
        return {"video": torch.randn(c.num_frames, 3, c.img_size, c.img_size, generator=g),
                "audio": torch.randn(1, c.audio_length, c.mel_bins, generator=g),
                "category": self.category, "label": 0, "index": int(i)}
