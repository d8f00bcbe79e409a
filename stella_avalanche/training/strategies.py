"""Strategy classes and the ``make_strategy(name, ...)`` factory.

Names (the CLI contract): ``finetune``, ``multitask``, ``er``, ``derpp``, ``lump``, ``mir``,
``gmed``, ``clser``, ``esmer``, ``stella``, ``stella_plus``.

- ``finetune`` is :class:`AudioVideoPretraining` alone; ``multitask`` is the same learner trained
  once on the union of all tasks (the caller builds that single experience, see
  ``stella_avalanche.benchmarks.common``).
- ``stella`` / ``stella_plus`` are :class:`STELLA`: the template plus :class:`STELLAPlugin`.
- the replay baselines are the template plus one plugin from ``training/plugins``.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from stella_avalanche.training.template import AudioVideoPretraining

__all__ = ["STELLA", "make_strategy", "STRATEGY_NAMES", "BASELINE_PLUGINS"]

STRATEGY_NAMES = ("finetune", "multitask", "er", "derpp", "lump", "mir", "gmed", "clser", "esmer",
                  "stella", "stella_plus")

#: strategy name -> (module, plugin class) for the replay baselines
BASELINE_PLUGINS = {
    "er": ("stella_avalanche.training.plugins.er", "ERPlugin"),
    "derpp": ("stella_avalanche.training.plugins.der", "DERPPPlugin"),
    "lump": ("stella_avalanche.training.plugins.lump", "LUMPPlugin"),
    "mir": ("stella_avalanche.training.plugins.mir", "MIRPlugin"),
    "gmed": ("stella_avalanche.training.plugins.gmed", "GMEDPlugin"),
    "clser": ("stella_avalanche.training.plugins.clser", "CLSERPlugin"),
    "esmer": ("stella_avalanche.training.plugins.esmer", "ESMERPlugin"),
}


class STELLA(AudioVideoPretraining):
    """STELLA (or STELLA+ with ``plus=True``): backbone + AVM + replay-and-patch-selection plugin.

    The AVM lives in the plugin, outside ``strategy.model``; the plugin trains it with its own Adam
    (same hyperparameters as the backbone's), registered in ``extra_optimizers``.

    :param model: the backbone.
    :param avm: an :class:`~stella_avalanche.models.avm.AVMatching` (load the stage-2 weights first).
    :param plus: STELLA+ (store only the selected patches).
    :param stella_kwargs: forwarded to :class:`STELLAPlugin` (mem_size, alpha, keep ratios, ...).
    :param kwargs: forwarded to :class:`AudioVideoPretraining`.
    """

    def __init__(self, *, model: nn.Module, avm: nn.Module, plus: bool = False,
                 plugins: Optional[Sequence[Any]] = None,
                 stella_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        from stella_avalanche.training.plugins.stella import STELLAPlugin

        skw = dict(stella_kwargs or {})
        skw.setdefault("seed", kwargs.get("seed", 0))
        self.stella_plugin = STELLAPlugin(avm=avm, plus=plus, **skw)
        super().__init__(model=model, plugins=[self.stella_plugin, *(plugins or [])], **kwargs)


def make_strategy(name: str, *, model: nn.Module, avm: Optional[nn.Module] = None,
                  plugins: Optional[Sequence[Any]] = None,
                  plugin_kwargs: Optional[dict] = None, **kwargs: Any) -> AudioVideoPretraining:
    """Build a strategy by name.

    :param name: one of :data:`STRATEGY_NAMES`.
    :param model: the backbone.
    :param avm: the AVM (``stella`` / ``stella_plus`` only).
    :param plugins: extra Avalanche plugins (e.g. ``LRSchedulerPlugin``).
    :param plugin_kwargs: constructor arguments of the strategy's own plugin.
    :param kwargs: forwarded to :class:`AudioVideoPretraining` (batch sizes, device, ...).
    """
    name = name.lower()
    plugin_kwargs = dict(plugin_kwargs or {})
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    if name in ("finetune", "multitask"):
        if plugin_kwargs:
            raise ValueError(f"strategy {name!r} takes no plugin arguments, got {sorted(plugin_kwargs)}")
        return AudioVideoPretraining(model=model, plugins=plugins, **kwargs)
    if name in ("stella", "stella_plus"):
        if avm is None:
            raise ValueError(f"strategy {name!r} needs an AVM module (avm=...)")
        return STELLA(model=model, avm=avm, plus=name == "stella_plus", plugins=plugins,
                      stella_kwargs=plugin_kwargs, **kwargs)
    module, cls = BASELINE_PLUGINS[name]
    plugin_cls = getattr(importlib.import_module(module), cls)
    plugin_kwargs.setdefault("seed", kwargs.get("seed", 0))
    plugin = plugin_cls(**plugin_kwargs)
    return AudioVideoPretraining(model=model, plugins=[plugin, *(plugins or [])], **kwargs)
