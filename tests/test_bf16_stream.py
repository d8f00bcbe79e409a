"""The opt-in bf16 residual stream (``CAVConfig.bf16_stream``): unchanged numbers when off or without a
bf16 autocast, a bf16 stream under one, its plumbing (runner overrides, perf variants) and the numerics
script's ``--smoke``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stella_avalanche.models.cav import CAVMAE, StreamLayerNorm, build_model

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


def _model(**overrides: Any) -> CAVMAE:
    torch.manual_seed(0)
    return build_model("tiny", contrastive_input="kept", **overrides)


def _inputs(model: CAVMAE) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, g = model.config, torch.Generator().manual_seed(1)
    video = torch.randn(3, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(3, 1, cfg.audio_length, cfg.mel_bins, generator=g)
    return video, audio


def _step(model: CAVMAE, *, autocast: bool) -> dict[str, torch.Tensor]:
    """One pre-training forward + backward: the loss parts, embeddings and the flat gradient."""
    video, audio = _inputs(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(video, audio, generator=torch.Generator().manual_seed(2))
    out["loss"].backward()
    res = {k: out[k].detach() for k in ("loss", "loss_mae_audio", "loss_mae_video", "loss_nce", "z_audio", "z_video")}
    res["grad"] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return res


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_flag_off_is_the_plain_layer_norm_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off (the default), every norm is an ``nn.LayerNorm`` in effect, in fp32 and under bf16 autocast."""
    model = _model()
    assert model.config.bf16_stream is False
    norms = [m for m in model.modules() if isinstance(m, StreamLayerNorm)]
    assert len(norms) == 2 * len(model.transformer_blocks()) + 4 * len(model.blocks_u) + 4
    assert not any(n.keep_dtype for n in norms)
    new = {ac: _step(model, autocast=ac) for ac in (False, True)}
    monkeypatch.setattr(StreamLayerNorm, "forward", nn.LayerNorm.forward)
    for ac in (False, True):
        _assert_equal(new[ac], _step(model, autocast=ac))


def test_flag_on_without_bf16_autocast_is_bit_identical() -> None:
    off, on = _model(), _model(bf16_stream=True)
    assert all(n.keep_dtype for n in on.modules() if isinstance(n, StreamLayerNorm))
    _assert_equal(_step(off, autocast=False), _step(on, autocast=False))
    # an fp16 autocast is not a bf16 one: the stream stays as autocast leaves it
    video, audio = _inputs(on)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not on._stream_on(video)


def test_flag_on_under_bf16_autocast_keeps_the_residual_stream_bf16() -> None:
    def block_dtypes(model: CAVMAE) -> tuple[set, set]:
        blocks: set = set()
        norms: set = set()
        for blk in model.transformer_blocks():
            blk.register_forward_hook(lambda m, i, o: blocks.add(o.dtype))
        for n in (model.norm, model.norm_a, model.norm_v, model.decoder_norm):
            n.register_forward_hook(lambda m, i, o: norms.add(o.dtype))
        return blocks, norms

    ref = _step(_model(), autocast=False)
    plain = _model()
    plain_blocks, _ = block_dtypes(plain)
    _step(plain, autocast=True)
    assert plain_blocks == {torch.float32}  # what the flag changes (CPU autocast keeps a bf16 norm input bf16)
    model = _model(bf16_stream=True)
    blocks, norms = block_dtypes(model)
    got = _step(model, autocast=True)
    assert blocks == {torch.bfloat16} and norms == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())
    for k in ("loss", "loss_mae_audio", "loss_mae_video", "loss_nce"):
        assert got[k].dtype == torch.float32 and torch.isfinite(got[k])  # the losses stay fp32
        assert abs(got[k].item() - ref[k].item()) <= 2e-2 * abs(ref[k].item()), k
    assert not torch.equal(got["loss"], _step(plain, autocast=True)["loss"])  # a different computation
    # the retrieval embedding is still normalised in fp32
    video, audio = _inputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z_a, z_v = model.embed(video, audio)
    assert z_a.dtype == z_v.dtype == torch.float32 and torch.allclose(z_a.norm(dim=-1), torch.ones(3))


def test_runner_override_and_perf_variant_set_the_flag() -> None:
    from stella_avalanche import experiment as E
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.perf.strategy_builder import build_strategy

    cfg = E.load_config(benchmark="synthetic", overrides=["model.overrides.bf16_stream=true"])
    assert E._model_config(cfg, None).bf16_stream is True
    assert E._model_config(E.load_config(benchmark="synthetic"), None).bf16_stream is False
    tiny, cpu = model_config_for("tiny"), torch.device("cpu")
    for name, want in (("derpp:bf16_stream=1", True), ("derpp", False), ("stella:bf16_stream=1,head_chunk=3", True)):
        strategy = build_strategy(name, tiny, batch=2, device=cpu, mem_size=4)
        backbone = strategy.backbone
        assert backbone.config.bf16_stream is want
        assert all(n.keep_dtype is want for n in backbone.modules() if isinstance(n, StreamLayerNorm))
    assert build_strategy("derpp", tiny, batch=2, device=cpu, mem_size=4, bf16_stream=True).backbone.config.bf16_stream


def test_numerics_script_smoke_writes_every_part(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bf16_numerics", ROOT / "benchmarks" / "perf" / "bf16_numerics.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "n.json"
    assert script.main(["--smoke", "--out", str(out), "--strategies", "derpp"]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["smoke"] and res["meta"]["device"] == "cpu" and res["recall"] == {}
    fb = res["fixed_batch"]["derpp"]
    assert set(fb["modes"]) == {"fp32", "bf16", "bf16_stream"}
    assert {"total", "mae_audio", "mae_video", "nce", "der_penalty"} <= set(fb["modes"]["fp32"])
    assert fb["warmup_losses_equal"] is True and len(fb["warmup_losses"]["fp32"]) == 2
    assert set(fb["relative_to_fp32"]) == {"bf16", "bf16_stream"}
    assert 0 < fb["max_relative"]["bf16_stream"] < 1e-2  # autocast was on: not the fp32 numbers
    assert fb["modes"]["bf16_stream"] != fb["modes"]["bf16"]
    tr = res["train"]["derpp"]
    assert tr["steps"] == 4 and tr["all_finite"] is True and tr["error"] is None
    assert tr["terms"]["total"]["steps"] == 4 and 2 <= tr["terms"]["der_penalty"]["steps"] <= 4  # replay ran
