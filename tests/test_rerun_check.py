"""experiments/rerun_check.py: a run reruns bit-exactly from its results.json (config + seed) on one
machine and thread count, and the comparison notices a changed rank."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from stella_avalanche import experiment as E

_SPEC = importlib.util.spec_from_file_location(
    "rerun_check", Path(__file__).resolve().parents[1] / "experiments" / "rerun_check.py")
rerun_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rerun_check)


def test_a_tiny_run_reruns_bit_exactly_from_its_results_json(tmp_path, capsys):
    cfg = E.load_config(benchmark="synthetic", overrides=[
        "benchmark.preset=tiny", "init.checkpoint=none", "init.avm_checkpoint=none", "train.batch_size=4",
        "train.eval_batch_size=16", "train.epochs=1", "train.threads=1", "checkpoint.every_n_iterations=0",
        "downstream.enabled=false", "strategy.name=finetune"])
    threads = torch.get_num_threads()
    try:
        E.run_experiment(cfg, out_dir=tmp_path / "published", seed=3, device="cpu", progress=False)
        published = tmp_path / "published" / "results.json"
        assert rerun_check.main([str(published), "--out", str(tmp_path / "rerun")]) == 0
    finally:
        torch.set_num_threads(threads)
    a = json.loads(published.read_text())
    b = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert rerun_check.compare_results(a, b)["bit_exact"]
    b["ranks"]["a2v"][-1][0] += 1                               # one query one place lower
    res = rerun_check.compare_results(a, b)
    assert not res["bit_exact"] and res["differing"] == ["ranks/a2v"]
    b["environment"]["threads"] = 2
    assert rerun_check.compare_results(a, b)["environment_differences"]["threads"] == [1, 2]
