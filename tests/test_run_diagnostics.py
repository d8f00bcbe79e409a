"""Selection diagnostics inside a STELLA run: results.json, summary.md, per-epoch logs, AVM learning rate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("STELLA_CACHE", str(path))
    return path


def test_stella_run_writes_diagnostics_and_epoch_logs(cache, tmp_path: Path, monkeypatch) -> None:
    from stella_avalanche import experiment as E
    from stella_avalanche.training.plugins.stella import STELLAPlugin

    seen = {}
    real_init = STELLAPlugin.__init__

    def spy(self, **kw):
        seen.update(kw)
        real_init(self, **kw)

    monkeypatch.setattr(STELLAPlugin, "__init__", spy)
    cfg = E.load_config(benchmark="synthetic", overrides=[
        "benchmark.preset=tiny", "init.checkpoint=none", "init.avm_checkpoint=none", "train.batch_size=4",
        "train.eval_batch_size=16", "train.epochs=1", "train.lr=0.0007", "checkpoint.every_n_iterations=0",
        "downstream.enabled=false", "diagnostics.per_class=2", "strategy.name=stella"])
    res = E.run_experiment(cfg, out_dir=tmp_path / "run", seed=0, device="cpu", progress=False)
    diag = res["diagnostics"]
    assert [d["after"] for d in diag] == ["init", *res["tasks"]]
    for d in diag:
        for k in ("avm_accuracy", "init_pair_auc_other_class", "video_object_lift", "audio_sounding_lift",
                  "rca_twin_c", "rca_unrelated_c"):
            assert isinstance(d[k], float)
    assert diag[0]["avm_at_chance"]          # a random AVM is at chance, and the run says so
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(on_disk["diagnostics"]) == len(diag)
    env = on_disk["environment"]   # where the run was trained (compare.py marks GPU-trained sweep cells)
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["threads"] >= 1
    # what a bit-exact rerun elsewhere needs to match: the torch build and the kernels' vector ISA
    assert env["torch_git"] == torch.version.git_version
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "Selection diagnostics" in (tmp_path / "run" / "summary.md").read_text()
    names = {json.loads(line).get("name") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert {"stella/loss_vam", "stella/avm_accuracy", "stella/mean_C_v", "stella/penalty"} <= names
    assert seen["lr"] == pytest.approx(7e-4)  # the AVM follows the backbone's learning rate
