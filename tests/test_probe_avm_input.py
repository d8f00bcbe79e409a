"""experiments/probe_avm_input.py: a fresh AVM trained on a frozen backbone's joint or unimodal features."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from stella_avalanche.data.synthetic import default_features
from stella_avalanche.experiment import model_config_for
from stella_avalanche.models.cav import CAVMAE

_SPEC = importlib.util.spec_from_file_location(
    "probe_avm_input", Path(__file__).resolve().parents[1] / "experiments" / "probe_avm_input.py")
probe_avm_input = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe_avm_input)


@pytest.mark.parametrize("features", ["joint", "unimodal"])
def test_probe_reports_loss_and_stream_auc(tmp_path: Path, capsys: pytest.CaptureFixture, features: str) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pt"
    torch.save({"model": CAVMAE(model_config_for("tiny", default_features("tiny"))).state_dict()}, ckpt)
    assert probe_avm_input.main(["--backbone", str(ckpt), "--preset", "tiny", "--features", features,
                                 "--steps", "2", "--eval-every", "1", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["features"] == features for r in rows)
    assert all(0.0 < r["train_loss"] < 2.0 and 0.0 <= r["stream_auc"] <= 1.0 for r in rows)
