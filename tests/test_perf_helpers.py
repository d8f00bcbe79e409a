"""The perf scripts' shared helpers (stella_avalanche/perf): variant specs, random clips, the step timer."""
from __future__ import annotations

import pytest
import torch

from stella_avalanche.models.config import model_config_for
from stella_avalanche.perf.random_clips import RandomClips, random_clip_stream
from stella_avalanche.perf.strategy_builder import build_strategy, split_variant
from stella_avalanche.perf.timing import StepTimer, spread


def test_variant_specs_use_the_config_parser() -> None:
    assert split_variant("stella") == ("stella", {})
    assert split_variant("stella:head_chunk=12,compile=1") == ("stella", {"head_chunk": 12, "compile": 1})
    with pytest.raises(ValueError, match="not of the form key=value"):
        split_variant("stella:head_chunk")


def test_pooled_random_clips_repeat_the_pool_and_keep_their_index() -> None:
    cfg = model_config_for("tiny")
    fresh, pooled = RandomClips(cfg, 6, category=1), RandomClips(cfg, 6, category=1, pool=2)
    assert torch.equal(pooled[0]["video"], fresh[0]["video"]) and torch.equal(pooled[3]["audio"], fresh[1]["audio"])
    assert pooled[3]["index"] == 3 and not torch.equal(fresh[3]["video"], fresh[1]["video"])
    assert fresh[0]["video"].shape == (cfg.num_frames, 3, cfg.img_size, cfg.img_size)


def test_step_timer_times_only_active_iterations_of_a_built_strategy() -> None:
    torch.set_num_threads(1)
    cfg = model_config_for("tiny")
    timer = StepTimer(device=torch.device("cpu"))
    strategy = build_strategy("derpp", cfg, batch=2, device=torch.device("cpu"), mem_size=4, plugins=[timer.plugin])
    warm, measured = random_clip_stream(cfg, [2, 4], pool=2).train_stream
    strategy.train(warm, eval_streams=[])
    assert timer.seconds() == [] and len(timer.losses) == 1
    timer.reset(active=True)
    strategy.train(measured, eval_streams=[])
    secs = timer.seconds()
    assert len(secs) == 2 and all(s > 0 for s in secs) and len(timer.losses) == 3
    assert spread([1.0, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "std": 1.0, "values": [1.0, 3.0]}
