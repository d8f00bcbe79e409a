"""A tiny task dataset of random uint8 frames and Gaussian fbanks for strategy tests (not a test module)."""
from __future__ import annotations

import torch

from stella_avalanche.training.buffer import video_from_uint8


class NoiseClips(torch.utils.data.Dataset):
    """``clips`` random clips of task ``task`` shaped for a backbone config; ``index`` is unique across
    tasks (``100 * task + i``), the noise is seeded by ``seed_base + task``."""

    def __init__(self, cfg, task: int, *, clips: int, seed_base: int) -> None:
        g = torch.Generator().manual_seed(seed_base + task)
        u8 = torch.randint(0, 256, (clips, cfg.num_frames, 3, cfg.img_size, cfg.img_size), generator=g,
                           dtype=torch.uint8)
        self.n = clips
        self.b = {"video": video_from_uint8(u8),
                  "audio": torch.randn((clips, 1, cfg.audio_length, cfg.mel_bins), generator=g),
                  "category": torch.full((clips,), task), "label": torch.zeros(clips, dtype=torch.long),
                  "index": torch.arange(100 * task, 100 * task + clips)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.b.items()}
