"""Inert stand-ins for packages that avalanche-lib imports at start-up but a training step never uses.

A GPU machine without those packages (no network to install them) can still run the perf scripts: a
finder on ``sys.meta_path`` answers their imports with modules whose every attribute, call or subclass
is another inert object.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

__all__ = ["STUB_CANDIDATES", "install_stubs"]

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
