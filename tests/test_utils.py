"""Shared helpers (utils.py): the inter-process build lock and atomic writes."""
from __future__ import annotations

import json
import threading

import pytest

from stella_avalanche.utils import atomic_write_json, build_lock


def test_build_lock_makes_the_second_builder_wait(tmp_path):
    target = tmp_path / "cache" / "entry"
    entered, order = threading.Event(), []

    def first() -> None:
        with build_lock(target):
            entered.set()
            threading.Event().wait(0.3)        # hold the lock while "building"
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(5)
    with build_lock(target):                   # blocks until the first builder has left
        order.append("second entered")
    t.join()
    assert order == ["first done", "second entered"]
    assert list((tmp_path / "cache").iterdir()) == []    # the lock leaves no file behind


def test_atomic_write_json_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})   # not serialisable: fails half-way
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
