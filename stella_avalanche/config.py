"""Experiment configuration: packaged YAML presets plus dotted ``key=value`` overrides.

A configuration is a nested dict (sections ``benchmark``, ``model``, ``init``, ``train``,
``strategy``, ``eval``, ``checkpoint``; see the presets in ``stella_avalanche/configs``). It is loaded
from a YAML file given by path, or from a preset shipped with the package (by name, or the default
preset of a benchmark), then overridden key by key; values of overrides are parsed as YAML, so
``train.lr=3e-4`` gives a float and ``strategy.params.plus=true`` a bool.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from stella_avalanche import resources

__all__ = ["DEFAULT_PRESETS", "default_preset", "load_config", "read_config_text", "field_override"]

#: benchmark name -> packaged preset used when no config is given
DEFAULT_PRESETS = {"synthetic": "synthetic_tiny", "vggsound": "vggsound_paper", "audioset": "audioset_paper"}


def default_preset(benchmark: str) -> str:
    """The name of the packaged preset used for ``benchmark`` when ``--config`` is not given."""
    if benchmark not in DEFAULT_PRESETS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(DEFAULT_PRESETS)}")
    return DEFAULT_PRESETS[benchmark]


def read_config_text(path_or_preset: str | Path) -> tuple[str, str]:
    """``(text, where)`` of a config: an existing file path, else a packaged preset name.

    :raises FileNotFoundError: when it is neither, naming the path and the available presets.
    """
    path = Path(path_or_preset)
    if path.is_file():
        return path.read_text(), str(path)
    try:
        node = resources.config_preset(str(path_or_preset))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"config file not found: {path} (and it is not a packaged preset: {exc})") from None
    return node.read_text(), f"preset {node.name}"


def load_config(path: Optional[str | Path] = None, *, benchmark: str = "synthetic",
                overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Load a YAML config and apply dotted ``key=value`` overrides (values parsed as YAML).

    :param path: a YAML file, or the name of a packaged preset (``synthetic_tiny``, ...); ``None``
        = the benchmark's default preset.
    :param benchmark: picks the default preset when ``path`` is None.
    :param overrides: ``["train.lr=3e-4", ...]``, applied in order.
    :returns: a plain nested dict.
    """
    from omegaconf import OmegaConf

    text, where = read_config_text(path if path else default_preset(benchmark))
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a config must be a YAML mapping, got {type(data).__name__}")
    cfg = OmegaConf.create(data)
    for item in overrides or []:
        key, value = field_override(item)
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    return OmegaConf.to_container(cfg, resolve=True)


def field_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``: one ``key=value`` override, the value parsed as
    YAML. Used by :func:`load_config` and, as an argparse ``type``, by the experiment scripts'
    ``--model-override`` (flat model-preset fields such as ``embed_segments=4``).

    :raises ValueError: an item without ``=`` or without a key, naming it.
    """
    field, sep, value = item.partition("=")
    if not sep or not field:
        raise ValueError(f"override {item!r} is not of the form key=value")
    return field, yaml.safe_load(value)
