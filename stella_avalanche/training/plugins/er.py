"""ER: experience replay with a reservoir buffer (``docs/method.md`` §8).

Each step draws M clips uniformly without replacement, trains on ``concat[current; replay]`` (so
the InfoNCE spans both) and then inserts the current clips into the reservoir.
"""
from __future__ import annotations

from stella_avalanche.training.plugins.replay_base import ReplayPluginBase

__all__ = ["ERPlugin"]


class ERPlugin(ReplayPluginBase, supports_distributed=True):
    """Experience replay (memory 2000, M = N by default).

    :param mem_size: reservoir capacity.
    :param replay_batch: replay rows per step (``None`` = the current batch size).
    :param seed: seeds the reservoir and the replay draws.
    :param compact: uint8 video / fp16 audio storage (``False``: fp32).
    :param buffer_device: where the reservoir lives (``None``: the strategy's device).
    :param storage: the items' storage (default: ``ReplayPluginBase``'s reservoir of ``mem_size`` items).
    """
