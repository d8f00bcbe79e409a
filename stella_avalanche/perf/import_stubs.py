"""Inert stand-ins for packages that avalanche-lib imports at start-up but a training step never uses.

A GPU machine without those packages (no network to install them) can still run the perf scripts: a
finder on ``sys.meta_path`` answers their imports with modules whose every attribute, call or subclass
is another inert object.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["STUB_CANDIDATES", "install_stubs", "add_import_arguments", "prepare_imports"]

#: packages avalanche-lib imports at start-up that a training step never uses
STUB_CANDIDATES = ("wandb", "qpsolvers", "quadprog", "gdown", "pytorchcv", "GPUtil")


class _InertMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert


class _Inert(metaclass=_InertMeta):
    """Any attribute, call or subclassing of a stand-in module gives another inert object."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __call__(self, *a: Any, **k: Any) -> "_Inert":
        return _Inert()

    def __getattr__(self, name: str) -> "_Inert":
        return _Inert()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: D102
        mod = _StubModule(spec.name)
        mod.__path__ = []  # a package: submodules resolve through this finder too
        return mod

    def exec_module(self, module):  # noqa: D102
        pass


def install_stubs(names: list[str] | None, *, only_missing: bool) -> list[str]:
    """Put inert stand-ins for ``names`` (default: :data:`STUB_CANDIDATES`) on ``sys.meta_path``.

    :param only_missing: stub only the names that cannot be imported here.
    :returns: the stubbed names.
    """
    names = list(names or STUB_CANDIDATES)
    if only_missing:
        names = [n for n in names if importlib.util.find_spec(n) is None]
    if names:
        sys.meta_path.insert(0, _StubFinder(set(names)))
    return names


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """``--site``, ``--stub-missing`` and ``--stub``: how a perf script finds avalanche-lib on a machine
    without it (``benchmarks/perf/gpu_bundle.sh`` copies it into ``.gpu_site/``).

    :param parser: the script's parser, extended in place.
    """
    parser.add_argument("--site", default=None, help="a folder of carried packages to put first on sys.path")
    parser.add_argument("--stub-missing", action="store_true", help="inert stand-ins for missing STUB_CANDIDATES")
    parser.add_argument("--stub", nargs="*", default=None, help="stub exactly these packages (even if installed)")


def prepare_imports(args: argparse.Namespace) -> list[str]:
    """Apply the :func:`add_import_arguments` options; call before anything imports avalanche.

    :param args: parsed arguments holding ``site``, ``stub_missing`` and ``stub``.
    :returns: the stubbed package names.
    """
    if args.site:
        sys.path.insert(0, str(Path(args.site).resolve()))
    if args.stub is not None:
        return install_stubs(args.stub, only_missing=False)
    if args.stub_missing:
        return install_stubs(None, only_missing=True)
    return []
