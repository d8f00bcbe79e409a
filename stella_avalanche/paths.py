"""Machine-independent names for files that published outputs mention.

A results.json, a GPU measurement or a curve file is read on other machines, so it must not carry
the path of the machine that wrote it (a home directory, a checkout, a virtual environment). The
functions here name such a file relative to something every reader has:

- a file in the package cache (``~/.cache/stella_avalanche`` or ``$STELLA_CACHE``) as
  ``$STELLA_CACHE/<path inside the cache>``, e.g. ``$STELLA_CACHE/init/synthetic-default-<key>/backbone.pt``
  (the cache key names the initialisation);
- a file of this checkout by its path relative to the repository root;
- a file of an installed package by its path after ``site-packages/``;
- a file under the working directory by its relative path;
- any other absolute path by its file name alone.

:func:`find_machine_paths` is the check the test suite runs over ``docs/`` and the README.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

__all__ = ["CACHE_PREFIX", "portable_path", "cache_file", "repository_root", "find_machine_paths", "MACHINE_PATH_RE"]

#: how a cached file is named in published outputs (the variable that relocates the cache)
CACHE_PREFIX = "$STELLA_CACHE"

#: absolute paths that only exist on one machine: POSIX home / temp / work / mount trees and Windows drives
MACHINE_PATH_RE = re.compile(
    r"(?<![\w.$~-])(?:/(?:root|home|tmp|work|Users|mnt|opt|scratch|private|var/folders)(?=/|\b)"
    r"|[A-Za-z]:\\{1,2}(?=[\w.$-]))")


def repository_root() -> Optional[Path]:
    """The checkout this package runs from (the folder holding ``pyproject.toml`` next to the
    package), or None for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _relative(path: Path, base: Optional[Path]) -> Optional[str]:
    if base is None:
        return None
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return None


def portable_path(path: str | os.PathLike | None) -> Optional[str]:
    """``path`` as published outputs name it (see the module docstring); None stays None and a
    relative path is kept as given."""
    if path is None:
        return None
    text = os.fspath(path)
    p = Path(text)
    if not p.is_absolute():
        return p.as_posix()
    from stella_avalanche.utils import default_cache_dir

    resolved = p.resolve()
    inside_cache = _relative(resolved, default_cache_dir())
    if inside_cache is not None:
        return f"{CACHE_PREFIX}/{inside_cache}"
    parts = resolved.parts
    if "site-packages" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("site-packages"):])
    for base in (repository_root(), Path.cwd()):
        rel = _relative(resolved, base)
        if rel is not None:
            return rel
    return resolved.name


def cache_file(name: Optional[str]) -> Optional[Path]:
    """The inverse of :func:`portable_path` for cached files: ``$STELLA_CACHE/<rest>`` as a path in this
    machine's cache; None for any other name (or None)."""
    if not name or not name.startswith(CACHE_PREFIX + "/"):
        return None
    from stella_avalanche.utils import default_cache_dir

    return default_cache_dir() / name[len(CACHE_PREFIX) + 1:]


def find_machine_paths(text: str) -> list[str]:
    """The machine-specific absolute paths in ``text`` (each with a little context), empty if none."""
    return [text[max(0, m.start() - 20):m.end() + 40].replace("\n", " ") for m in MACHINE_PATH_RE.finditer(text)]
