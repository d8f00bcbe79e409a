"""Avalanche plugins: :class:`STELLAPlugin` and the paper's replay baselines (``docs/method.md`` §8).

Classes are imported lazily (PEP 562), so importing one plugin does not import the others.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["STELLAPlugin", "ReplayPluginBase", "ERPlugin", "DERPPPlugin", "LUMPPlugin", "MIRPlugin",
           "GMEDPlugin", "CLSERPlugin", "ESMERPlugin"]

_WHERE = {
    "STELLAPlugin": "stella",
    "ReplayPluginBase": "replay_base",
    "ERPlugin": "er",
    "DERPPPlugin": "der",
    "LUMPPlugin": "lump",
    "MIRPlugin": "mir",
    "GMEDPlugin": "gmed",
    "CLSERPlugin": "clser",
    "ESMERPlugin": "esmer",
}


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
