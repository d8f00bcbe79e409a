"""experiments/stage1_curve.py: the pair-AUC curve of a long stage 1, and pretrain_backbone's on_step."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_cli():
    spec = importlib.util.spec_from_file_location("stage1_curve", ROOT / "experiments" / "stage1_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_on_step_sees_every_step_and_the_model_trains_again() -> None:
    from stella_avalanche.models.cav import build_model
    from stella_avalanche.training.pretrain import pretrain_backbone

    torch.manual_seed(0)
    model = build_model("tiny")
    cfg = model.config
    batch = {"video": torch.randn(4, cfg.num_frames, 3, cfg.img_size, cfg.img_size),
             "audio": torch.randn(4, 1, cfg.audio_length, cfg.mel_bins)}
    seen = []

    def on_step(step, history):
        seen.append((step, len(history)))
        model.eval()  # what an evaluation does; training must go on in train mode

    pretrain_backbone(model, [batch] * 3, steps=3, lr=1e-3, progress=False, contrastive_only_steps=3,
                      on_step=on_step)
    assert seen == [(1, 1), (2, 2), (3, 3)] and model.training


def test_curve_rows_and_checkpoint(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    cli = _load_cli()
    assert cli.main(["--preset", "tiny", "--steps", "4", "--eval-every", "2", "--per-class", "2",
                     "--save-at", "4", "--out-dir", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    saved = json.loads((tmp_path / "curve.json").read_text())["curve"]
    assert [r["step"] for r in lines] == [2, 4] and saved == lines
    for r in lines:
        assert 0 <= r["stream_pair_auc_same_class"] <= 1 and 0 <= r["stream_pair_auc_other_class"] <= 1
        assert 0 <= r["init_heldout_pair_auc"] <= 1 and r["train_nce"] > 0
    from stella_avalanche.data import synthetic as S
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.loading import load_backbone_weights

    model = CAVMAE(model_config_for("tiny", S.default_features("tiny")))
    load_backbone_weights(model, tmp_path / "backbone_step4.pt")  # loads as a stage-1 checkpoint


def test_model_override_items_are_parsed_and_bad_ones_refused(capsys) -> None:
    from stella_avalanche.config import field_override

    assert field_override("embed_segments=1") == ("embed_segments", 1)
    assert field_override("temperature=0.2") == ("temperature", 0.2)
    with pytest.raises(ValueError, match="'embed_segments' is not of the form key=value"):
        field_override("embed_segments")
    with pytest.raises(SystemExit):
        _load_cli().main(["--steps", "1", "--model-override", "embed_segments"])
    assert "invalid field_override value" in capsys.readouterr().err
