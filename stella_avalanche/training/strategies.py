"""The strategy registry and the ``make_strategy(name, ...)`` factory.

One table, :data:`REGISTRY`, maps every strategy name to how its plugin is built, its display name and
its place in the paper's table order. The CLI choices (``experiments/run_stella.py``), the runner
(``stella_avalanche/experiment.py``) and the comparison (``experiments/compare.py``) all read it, so a
new strategy is one new entry here.

- ``finetune`` is :class:`AudioVideoPretraining` alone; ``multitask`` is the same learner trained
  once on the union of all tasks (the caller builds that single experience, see
  ``stella_avalanche.benchmarks.common``; :attr:`StrategySpec.joint` says so).
- ``stella`` / ``stella_plus`` are :class:`STELLA`: the template plus :class:`STELLAPlugin`; the
  ablation variants ``stella_random`` (uniform importance, no RCA), ``stella_lpis`` (importance, no
  RCA) and ``stella_rca`` (RCA over uniform importance) set the plugin's ``importance`` / ``rca``;
  the probe ``stella_keepall`` is random patches with every token kept (κ = 1).
- the replay baselines are the template plus one plugin from ``training/plugins``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from stella_avalanche.distributed import get_rank
from stella_avalanche.training.template import AudioVideoPretraining
from stella_avalanche.utils import SEED_STRIDE, derive_seed

__all__ = ["STELLA", "make_strategy", "StrategySpec", "REGISTRY", "STRATEGY_NAMES", "MAIN_STRATEGIES",
           "ABLATION_STRATEGIES", "BASELINE_PLUGINS", "get_spec", "display_name", "paper_order",
           "RANK_SEED_STRIDE"]

#: per-rank offset of a replay plugin's seed (each rank draws its own replay items, as the paper's
#: per-GPU reservoirs); see ``stella_avalanche.utils.derive_seed``
RANK_SEED_STRIDE = SEED_STRIDE


@dataclass(frozen=True)
class StrategySpec:
    """How one named strategy is built and shown.

    :param name: the CLI name (``derpp``, ``stella_random``, ...).
    :param display: the name in tables and plots.
    :param order: position in the paper's table order (tables sort by it).
    :param plugin: ``(module, class)`` of the strategy's own plugin; ``None`` for the plain template.
    :param plugin_defaults: fixed constructor arguments of that plugin (e.g. STELLA's ablation flags).
    :param needs_avm: the plugin takes the stage-2 AVM (``avm=...``).
    :param joint: trained once on the union of all tasks (the multitask upper bound).
    :param group: ``"main"`` (the comparison table), ``"ablation"`` (the component ablation) or
        ``"probe"`` (a variant that tests an explanation; shown only in the ablation's decomposition).
    """

    name: str
    display: str
    order: int
    plugin: Optional[tuple[str, str]] = None
    plugin_defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_avm: bool = False
    joint: bool = False
    group: str = "main"

    @property
    def takes_params(self) -> bool:
        """Whether the preset's ``strategy.params`` (mem_size, ...) apply: only strategies with a plugin."""
        return self.plugin is not None

    def plugin_factory(self) -> Optional[type]:
        """The plugin class (imported on demand), or ``None``."""
        if self.plugin is None:
            return None
        module, cls = self.plugin
        return getattr(importlib.import_module(module), cls)


_STELLA = ("stella_avalanche.training.plugins.stella", "STELLAPlugin")
_P = "stella_avalanche.training.plugins."

#: every strategy, in the paper's table order (main table first, then the ablation variants)
REGISTRY: dict[str, StrategySpec] = {s.name: s for s in (
    StrategySpec("finetune", "Finetune", 0),
    StrategySpec("er", "ER", 1, (_P + "er", "ERPlugin")),
    StrategySpec("mir", "MIR", 2, (_P + "mir", "MIRPlugin")),
    StrategySpec("derpp", "DER++", 3, (_P + "der", "DERPPPlugin")),
    StrategySpec("gmed", "GMED", 4, (_P + "gmed", "GMEDPlugin")),
    StrategySpec("clser", "CLS-ER", 5, (_P + "clser", "CLSERPlugin")),
    StrategySpec("lump", "LUMP", 6, (_P + "lump", "LUMPPlugin")),
    StrategySpec("esmer", "ESMER", 7, (_P + "esmer", "ESMERPlugin")),
    StrategySpec("stella", "STELLA", 8, _STELLA, {"plus": False}, needs_avm=True),
    StrategySpec("stella_plus", "STELLA+", 9, _STELLA, {"plus": True}, needs_avm=True),
    StrategySpec("multitask", "Multitask", 10, joint=True),
    StrategySpec("stella_random", "STELLA: random patches (no LPIS, no RCA)", 11, _STELLA,
                 {"plus": False, "importance": "uniform", "rca": False}, needs_avm=True, group="ablation"),
    StrategySpec("stella_lpis", "STELLA: LPIS only (no RCA)", 12, _STELLA,
                 {"plus": False, "importance": "avm", "rca": False}, needs_avm=True, group="ablation"),
    StrategySpec("stella_rca", "STELLA: RCA only (uniform importance)", 13, _STELLA,
                 {"plus": False, "importance": "uniform", "rca": True}, needs_avm=True, group="ablation"),
    # an explanation probe, not one of the paper's variants: random patches with every token kept, so it
    # differs from stella_random only in the kept fraction (the MAE targets and the stored tokens)
    StrategySpec("stella_keepall", "STELLA: all tokens (κ = 1, no LPIS, no RCA)", 14, _STELLA,
                 {"plus": False, "importance": "uniform", "rca": False,
                  "keep_ratio_video": 1.0, "keep_ratio_audio": 1.0}, needs_avm=True, group="probe"),
)}

#: every strategy name, paper order
STRATEGY_NAMES: tuple[str, ...] = tuple(sorted(REGISTRY, key=lambda n: REGISTRY[n].order))
#: the main comparison (11 strategies) and the component ablation variants
MAIN_STRATEGIES: tuple[str, ...] = tuple(n for n in STRATEGY_NAMES if REGISTRY[n].group == "main")
ABLATION_STRATEGIES: tuple[str, ...] = tuple(n for n in STRATEGY_NAMES if REGISTRY[n].group == "ablation")
#: strategy name -> (module, plugin class) for the replay baselines
BASELINE_PLUGINS: dict[str, tuple[str, str]] = {
    n: s.plugin for n, s in REGISTRY.items() if s.plugin is not None and not s.needs_avm}


def get_spec(name: str) -> StrategySpec:
    """The registry entry of ``name`` (case-insensitive); a clear error for an unknown name."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}") from None


def display_name(name: str) -> str:
    """Table name of a strategy (the name itself when it is not registered)."""
    spec = REGISTRY.get(name.lower())
    return spec.display if spec is not None else name


def paper_order(name: str) -> tuple[int, str]:
    """Sort key: registered strategies in the paper's order, unknown names after them by name."""
    spec = REGISTRY.get(name.lower())
    return (spec.order, name) if spec is not None else (len(REGISTRY), name)


class STELLA(AudioVideoPretraining):
    """STELLA (or STELLA+ with ``plus=True``): backbone + AVM + replay-and-patch-selection plugin.

    The AVM lives in the plugin, outside ``strategy.model``; the plugin trains it with its own Adam
    (same hyperparameters as the backbone's), registered in ``extra_optimizers``.

    :param model: the backbone.
    :param avm: an :class:`~stella_avalanche.models.avm.AVMatching` (load the stage-2 weights first).
    :param plus: STELLA+ (store only the selected patches).
    :param stella_kwargs: forwarded to :class:`STELLAPlugin` (mem_size, alpha, keep ratios,
        importance, rca, ...).
    :param kwargs: forwarded to :class:`AudioVideoPretraining`.
    """

    def __init__(self, *, model: nn.Module, avm: nn.Module, plus: bool = False,
                 plugins: Optional[Sequence[Any]] = None,
                 stella_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        from stella_avalanche.training.plugins.stella import STELLAPlugin

        skw = dict(stella_kwargs or {})
        # built directly (not by make_strategy): the plugin's seed is per rank of the process group
        skw.setdefault("seed", derive_seed(int(kwargs.get("seed", 0)), "plugin", rank=get_rank()))
        self.stella_plugin = STELLAPlugin(avm=avm, plus=plus, **skw)
        super().__init__(model=model, plugins=[self.stella_plugin, *(plugins or [])], **kwargs)


def make_strategy(name: str, *, model: nn.Module, avm: Optional[nn.Module] = None,
                  plugins: Optional[Sequence[Any]] = None,
                  plugin_kwargs: Optional[dict] = None, rank: int = 0, world_size: int = 1,
                  **kwargs: Any) -> AudioVideoPretraining:
    """Build a strategy by name (see :data:`REGISTRY`).

    :param name: one of :data:`STRATEGY_NAMES`.
    :param model: the backbone.
    :param avm: the AVM (strategies whose spec ``needs_avm``).
    :param plugins: extra Avalanche plugins (e.g. ``LRSchedulerPlugin``).
    :param plugin_kwargs: constructor arguments of the strategy's own plugin. Without an explicit
        ``seed`` the plugin gets ``seed + RANK_SEED_STRIDE * rank`` (its own replay draws per rank).
    :param rank: this process's DDP rank (0 without DDP); set on the strategy before it trains.
    :param world_size: number of DDP processes (1 without DDP).
    :param kwargs: forwarded to :class:`AudioVideoPretraining` (batch sizes, device, seed, ...).
    """
    spec = get_spec(name)
    plugin_kwargs = dict(plugin_kwargs or {})
    if not 0 <= rank < max(1, world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if spec.plugin is None:
        if plugin_kwargs:
            raise ValueError(f"strategy {spec.name!r} takes no plugin arguments, got {sorted(plugin_kwargs)}")
        strategy = AudioVideoPretraining(model=model, plugins=plugins, **kwargs)
    else:
        plugin_kwargs.setdefault("seed", derive_seed(int(kwargs.get("seed", 0)), "plugin", rank=int(rank)))
        fixed = {k: v for k, v in spec.plugin_defaults.items() if k in plugin_kwargs and plugin_kwargs[k] != v}
        if fixed:
            raise ValueError(f"strategy {spec.name!r} fixes {sorted(fixed)} to "
                             f"{ {k: spec.plugin_defaults[k] for k in fixed} }; use another strategy name")
        if spec.needs_avm:
            if avm is None:
                raise ValueError(f"strategy {spec.name!r} needs an AVM module (avm=...)")
            skw = {k: v for k, v in spec.plugin_defaults.items() if k != "plus"}
            skw.update(plugin_kwargs)
            skw.pop("plus", None)  # fixed by the name (checked above)
            strategy = STELLA(model=model, avm=avm, plus=bool(spec.plugin_defaults.get("plus", False)),
                              plugins=plugins, stella_kwargs=skw, **kwargs)
        else:
            plugin = spec.plugin_factory()(**{**spec.plugin_defaults, **plugin_kwargs})
            strategy = AudioVideoPretraining(model=model, plugins=[plugin, *(plugins or [])], **kwargs)
    strategy.world_size, strategy.rank = int(world_size), int(rank)
    return strategy
