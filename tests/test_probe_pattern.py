"""experiments/probe_pattern.py: where a backbone keeps the on/off pattern both modalities share."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "probe_pattern", Path(__file__).resolve().parents[1] / "experiments" / "probe_pattern.py")
probe_pattern = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe_pattern)


def test_the_segment_means_hold_the_pattern_that_the_token_mean_of_a_time_blind_encoder_loses(
        capsys: pytest.CaptureFixture) -> None:
    """An untrained encoder without a frame code: each segment's tokens still show whether it is on,
    but their global mean (the paper's pooling) cannot say which segments were on."""
    assert probe_pattern.main(["--random", "--preset", "tiny", "--per-class", "5", "--threads", "1",
                               "--model-override", "video_time_code=none", "embed_segments=1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["clips"] == 120 and out["embed_segments"] == 1
    for m in ("audio", "video"):
        seg, glob, emb = out[m]["segment"], out[m]["global"], out[m]["embedding"]
        assert len(seg) == len(glob) == len(emb) == 4
        assert min(seg) >= 0.8 and max(glob) <= 0.7 and max(emb) <= 0.7, (m, seg, glob, emb)
    assert 0.4 <= out["pair_auc"]["all"] <= 0.6
