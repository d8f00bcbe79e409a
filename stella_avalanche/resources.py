"""Data files shipped inside the package, read through :mod:`importlib.resources`.

Two kinds of files travel with ``stella_avalanche`` (declared as package data in ``pyproject.toml``), so
an ordinary, non-editable install works from any working directory:

- ``stella_avalanche/configs/*.yaml``: the experiment presets (``synthetic_tiny``,
  ``vggsound_paper``, ``audioset_paper``) that :func:`stella_avalanche.config.load_config` reads;
- ``stella_avalanche/benchmarks/split_tables/*.csv``: the class -> task tables the split rules of
  :mod:`stella_avalanche.benchmarks.splits` read (``vggsound_categories.csv``,
  ``audioset_tasks.csv``; their columns are described in the README next to them).

Nothing here assumes the files are plain files on disk: readers get a
:class:`~importlib.resources.abc.Traversable` and open it, or use :func:`as_path` when a library
needs a real path.
"""
from __future__ import annotations

import contextlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Iterator

__all__ = ["CONFIG_DIR", "SPLIT_TABLE_DIR", "config_presets", "config_preset", "split_table", "as_path"]

#: folder of the experiment presets, relative to the package root
CONFIG_DIR = "configs"
#: folder of the split tables, relative to the package root
SPLIT_TABLE_DIR = "benchmarks/split_tables"


def _package_dir(relative: str) -> Traversable:
    node = resources.files("stella_avalanche")
    for part in relative.split("/"):
        node = node / part
    return node


def config_presets() -> dict[str, Traversable]:
    """``{preset name: file}`` of every packaged YAML preset (name = file name without ``.yaml``)."""
    return {f.name[: -len(".yaml")]: f for f in _package_dir(CONFIG_DIR).iterdir()
            if f.name.endswith(".yaml") and f.is_file()}


def config_preset(name: str) -> Traversable:
    """The packaged preset ``name`` (with or without ``.yaml``).

    :raises FileNotFoundError: naming the presets that exist.
    """
    presets = config_presets()
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if key not in presets:
        raise FileNotFoundError(f"no packaged config preset {name!r}; presets: {', '.join(sorted(presets))}")
    return presets[key]


def split_table(name: str) -> Traversable:
    """The packaged split table ``name`` (e.g. ``"vggsound_categories.csv"``).

    :raises FileNotFoundError: naming the tables that exist.
    """
    node = _package_dir(SPLIT_TABLE_DIR) / name
    if not node.is_file():
        have = sorted(f.name for f in _package_dir(SPLIT_TABLE_DIR).iterdir() if f.name.endswith(".csv"))
        raise FileNotFoundError(f"no packaged split table {name!r}; tables: {', '.join(have)}")
    return node


@contextlib.contextmanager
def as_path(node: Traversable) -> Iterator[Path]:
    """A real file-system path for ``node`` for the duration of the block (a temporary copy when the
    package is imported from an archive)."""
    with resources.as_file(node) as path:
        yield Path(path)
