"""The zero-shot row: every run records the initialisation's recall before the first task, and
measuring it does not change what the run trains."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("STELLA_CACHE", str(path))
    return path


def _cfg():
    from stella_avalanche import experiment as E

    return E.load_config(benchmark="synthetic", overrides=[
        "benchmark.preset=tiny", "init.checkpoint=none", "init.avm_checkpoint=none", "train.batch_size=8",
        "train.eval_batch_size=32", "train.epochs=1", "checkpoint.every_n_iterations=0",
        "downstream.enabled=false", "strategy.name=derpp"])


def test_runs_record_the_initialisation_row_without_changing_training(cache, tmp_path: Path, monkeypatch) -> None:
    from stella_avalanche import experiment as E

    res = E.run_experiment(_cfg(), out_dir=tmp_path / "with", seed=0, device="cpu", progress=False)
    init = res["recall_initial"]
    for d in ("a2v", "v2a"):
        for k in ("R@1", "R@5", "R@10"):
            row = init[d][k]
            assert len(row) == len(res["tasks"]) and all(0.0 <= v <= 100.0 for v in row)
    monkeypatch.setattr(E, "_evaluate_initialisation", lambda run: None)
    res0 = E.run_experiment(_cfg(), out_dir=tmp_path / "without", seed=0, device="cpu", progress=False)
    assert "recall_initial" not in res0
    # the zero-shot evaluation runs under fork_rng: training draws the same batches and masks
    assert res["recall"] == res0["recall"]
