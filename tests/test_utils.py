"""Shared helpers (utils.py): the inter-process build lock, atomic writes and the training process's threads."""
from __future__ import annotations

import json
import os
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


def test_build_lock_lets_other_entries_build_side_by_side(tmp_path):
    """Two seeds' initialisations live in one cache folder: the second must not wait for the first."""
    entered, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with build_lock(tmp_path / "cache" / "seed0"):
            entered.set()
            release.wait(5)
            order.append("seed0 done")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(5)
    with build_lock(tmp_path / "cache" / "seed1"):   # would block until release (5 s) with one folder lock
        order.append("seed1 entered")
    release.set()
    t.join()
    assert order == ["seed1 entered", "seed0 done"]
    assert list((tmp_path / "cache").iterdir()) == []


def test_build_lock_many_waiters_hold_it_one_at_a_time(tmp_path):
    """Waiters that wake on a lock file its holder has removed must lock the new one, never share."""
    target, inside, worst = tmp_path / "cache" / "entry", [0], [0]
    guard = threading.Lock()

    def builder() -> None:
        for _ in range(20):
            with build_lock(target):
                with guard:
                    inside[0] += 1
                    worst[0] = max(worst[0], inside[0])
                threading.Event().wait(0.001)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=builder) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst[0] == 1 and list((tmp_path / "cache").iterdir()) == []


def test_atomic_write_json_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})   # not serialisable: fails half-way
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_main_process_threads_leaves_the_loader_workers_their_cores():
    from stella_avalanche.utils import main_process_threads

    # the H200 measurement: 16 cores, 8 workers -> 4 threads (end to end 0.99 of device-resident, 0.29 with 16)
    assert main_process_threads(None, num_workers=8, cpu_count=16) == 4
    assert main_process_threads(3, num_workers=8, cpu_count=16) == 3          # train.threads wins
    assert main_process_threads(None, num_workers=0, cpu_count=16) is None    # no workers: torch's default
    assert main_process_threads(None, num_workers=8, cpu_count=2) == 1        # never below one
    # four training processes on 64 cores: 16 each, 8 of them to the workers
    assert main_process_threads(None, num_workers=8, cpu_count=64, processes=4) == 4


def test_runner_applies_the_thread_rule(monkeypatch, tmp_path):
    """experiment._build sets torch's threads from train.threads / train.num_workers before anything else."""
    import torch

    from stella_avalanche import experiment
    from stella_avalanche.config import load_config

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    monkeypatch.setattr(experiment, "_build_benchmark", lambda cfg: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cfg = load_config(None, benchmark="synthetic", overrides=["train.num_workers=8"])
    with pytest.raises(RuntimeError, match="stop"):
        experiment._build(cfg, out_dir=tmp_path, seed=0, device="cpu", progress=False)
    assert seen == [4]
