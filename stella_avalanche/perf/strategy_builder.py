"""The one way the perf scripts build a strategy to time: a fresh seeded backbone (plus an AVM for the
STELLA variants) on a chosen buffer placement, with plugin settings from a ``name:key=value,...`` spec."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from stella_avalanche.config import field_override

__all__ = ["split_variant", "build_strategy"]


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``"stella:head_chunk=12"`` -> ``("stella", {"head_chunk": 12})``: a strategy name and plugin
    arguments, each item parsed by :func:`stella_avalanche.config.field_override`."""
    base, _, rest = name.partition(":")
    return base, dict(field_override(item) for item in rest.split(",") if item)


def build_strategy(name: str, cfg: Any, *, batch: int, device: torch.device, mem_size: int = 0,
                   buffer_device: str | None = None, amp: str = "auto", plugins: Sequence[Any] = (),
                   num_workers: int = 0, compile_blocks: bool = False, bf16_stream: bool = False,
                   **strategy_kwargs: Any) -> Any:
    """A strategy of one training epoch per experience, on a fresh backbone seeded with 0.

    :param name: a registered strategy, optionally with plugin settings (:func:`split_variant`);
        ``compile=1`` among them compiles the backbone's blocks, as the runner's ``train.compile``;
        ``bf16_stream=1`` sets ``CAVConfig.bf16_stream`` (the runner's ``model.overrides.bf16_stream``).
    :param cfg: the backbone config.
    :param batch: current samples per step (``train_mb_size``).
    :param device: where the model trains.
    :param mem_size: replay memory in items (ignored by finetune).
    :param buffer_device: where the replay buffer lives (``None``: the plugin's default).
    :param amp: mixed-precision mode of the template.
    :param plugins: extra plugins (timers, audits).
    :param num_workers: training-loader workers.
    :param compile_blocks: compile the backbone's blocks (also set by ``compile=1`` in ``name``).
    :param bf16_stream: bf16 residual stream under bf16 autocast (also set by ``bf16_stream=1`` in ``name``).
    :param strategy_kwargs: further template arguments (e.g. ``evaluator``, ``eval_mb_size``).
    """
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.training.strategies import make_strategy

    base, extra = split_variant(name)
    # backbone options, not plugin arguments: taken out before the rest goes to the plugin
    compile_blocks = bool(extra.pop("compile", 0)) or compile_blocks
    if extra.pop("bf16_stream", 0) or bf16_stream:
        cfg = dataclasses.replace(cfg, bf16_stream=True)
    torch.manual_seed(0)
    model = CAVMAE(cfg)
    if compile_blocks:
        model.compile_blocks()
    avm = build_avm(model) if base.startswith("stella") else None
    pk: dict[str, Any] = {}
    if base != "finetune":
        pk = {"mem_size": mem_size, **extra}
        if buffer_device is not None:
            pk["buffer_device"] = buffer_device
    return make_strategy(base, model=model, avm=avm, plugins=list(plugins), plugin_kwargs=pk, train_mb_size=batch,
                         train_epochs=1, device=device, amp=amp, num_workers=num_workers, **strategy_kwargs)
