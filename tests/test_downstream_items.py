"""experiments/downstream_items.py: per-item downstream outcomes added to a finished run from its final
checkpoint, only when the recomputation reproduces every recorded mean."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from stella_avalanche import experiment as E

_SPEC = importlib.util.spec_from_file_location(
    "downstream_items", Path(__file__).resolve().parents[1] / "experiments" / "downstream_items.py")
downstream_items = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(downstream_items)


def test_items_are_added_to_an_old_run_only_when_its_means_reproduce(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STELLA_CACHE", str(tmp_path / "cache"))
    cfg = E.load_config(benchmark="synthetic", overrides=[
        "benchmark.preset=tiny", "init.checkpoint=none", "init.avm_checkpoint=none", "train.batch_size=4",
        "train.eval_batch_size=16", "train.epochs=1", "train.threads=1", "strategy.name=finetune",
        "downstream.enabled=true", "downstream.tasks=[transfer,localise]", "downstream.transfer_classes=3",
        "downstream.transfer_per_class=3", "downstream.localise_fit_per_class=3", "downstream.localise_steps=20"])
    threads = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        E.run_experiment(cfg, out_dir=run, seed=0, device="cpu", progress=False)
        res_path = run / "results.json"
        full = json.loads(res_path.read_text())
        block = full["downstream"]
        ranks, iou = block["transfer"]["ranks"], block["localise"]["iou_pixel"]
        assert len(ranks["a2v"]) == block["transfer"]["num_clips"] == 9
        assert 100 * np.mean(np.asarray(ranks["v2a"]) <= 5) == block["transfer"]["v2a"]["R@5"]
        assert len(iou) == block["localise"]["num_test_frames"]
        assert abs(np.mean(iou) - block["localise"]["miou_pixel"]) < 1e-3
        # a run from before the items were recorded: means only
        old = json.loads(res_path.read_text())
        del old["downstream"]["transfer"]["ranks"]
        for k in ("iou_patch", "iou_pixel"):
            del old["downstream"]["localise"][k]
        res_path.write_text(json.dumps(old))
        assert downstream_items.main([str(run)]) == 0
        back = json.loads(res_path.read_text())["downstream"]
        assert back["transfer"]["ranks"] == ranks and back["localise"]["iou_pixel"] == iou
        assert back["localise"]["iou_patch"] == block["localise"]["iou_patch"]
        assert "added" in capsys.readouterr().out
        # a recorded mean the checkpoint does not reproduce: the run is left as it is, and named
        old["downstream"]["transfer"]["a2v"]["R@5"] += 1.0
        res_path.write_text(json.dumps(old))
        before = res_path.read_text()
        assert downstream_items.main([str(run)]) == 1
        assert res_path.read_text() == before
        assert "transfer/a2v/R@5" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
