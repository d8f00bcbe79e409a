"""experiments/probe_avm_input.py: a fresh AVM trained on a frozen backbone's joint, unimodal or code features."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from stella_avalanche.data.synthetic import default_features
from stella_avalanche.models.cav import CAVMAE
from stella_avalanche.models.config import model_config_for

_SPEC = importlib.util.spec_from_file_location(
    "probe_avm_input", Path(__file__).resolve().parents[1] / "experiments" / "probe_avm_input.py")
probe_avm_input = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe_avm_input)


@pytest.mark.parametrize("features", ["joint", "unimodal", "codes"])
def test_probe_reports_loss_and_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture, features: str) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pt"
    torch.save({"model": CAVMAE(model_config_for("tiny", default_features("tiny"))).state_dict()}, ckpt)
    assert probe_avm_input.main(["--backbone", str(ckpt), "--preset", "tiny", "--features", features,
                                 "--steps", "2", "--eval-every", "1", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["features"] == features for r in rows)
    assert all(0.0 < r["train_loss"] < 2.0 and 0.0 <= r["avm_auc"] <= 1.0 for r in rows)
    assert all(r["video_object_lift"] > 0 and 0.0 <= r["audio_sounding_recall_candidates"] <= 1.0 for r in rows)


def test_codes_probe_feeds_the_encoder_outputs_to_the_avm() -> None:
    """The ``codes`` input is the modality encoder's output itself; ``unimodal`` adds the fusion pass."""
    from stella_avalanche.models.avm import avm_inputs

    cfg = model_config_for("tiny", default_features("tiny"))
    torch.manual_seed(0)
    codes, uni = probe_avm_input._probe_backbone(cfg, "codes"), probe_avm_input._probe_backbone(cfg, "unimodal")
    uni.load_state_dict(codes.state_dict())
    U_a, U_v = torch.randn(2, cfg.num_audio_tokens, cfg.embed_dim), torch.randn(2, cfg.num_video_tokens, cfg.embed_dim)
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(avm_inputs(codes, U_a, U_v), (U_a, U_v)))
        assert not torch.allclose(avm_inputs(uni, U_a, U_v)[1], U_v)
