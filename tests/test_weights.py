"""Tests for pretrained-weight loading (stella_avalanche.models.weights)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stella_avalanche.models.cav import CAVConfig, build_model
from stella_avalanche.models.weights import (
    convert_cavmae_state_dict, load_cavmae_checkpoint, load_imagenet_mae, read_state_dict,
)

torch.set_num_threads(1)

# the published CAV-MAE parameter layout, committed with the repository (no fallback outside it)
TSV = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cavmae_pretrain_state_dict.tsv"

_BLOCK_LEAVES = ["norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"]


def _block_shapes(prefix: str, d: int, mlp: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for n in _BLOCK_LEAVES:
        out[f"{prefix}.{n}.weight"] = (d,)
        out[f"{prefix}.{n}.bias"] = (d,)
    out.update({f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (mlp * d, d), f"{prefix}.mlp.fc1.bias": (mlp * d,),
                f"{prefix}.mlp.fc2.weight": (d, mlp * d), f"{prefix}.mlp.fc2.bias": (d,)})
    return out


def cavmae_shapes(cfg: CAVConfig) -> dict[str, tuple[int, ...]]:
    """The CAV-MAE pre-training layout (one frame, freq-major audio, single mask token) for ``cfg``'s sizes."""
    d, dd, p = cfg.embed_dim, cfg.decoder_dim, cfg.patch_size
    g2, la = cfg.grid**2, cfg.num_audio_tokens
    s: dict[str, tuple[int, ...]] = {
        "modality_a": (1, 1, d), "modality_v": (1, 1, d), "pos_embed_a": (1, la, d), "pos_embed_v": (1, g2, d),
        "mask_token": (1, 1, dd), "decoder_modality_a": (1, 1, dd), "decoder_modality_v": (1, 1, dd),
        "decoder_pos_embed_a": (1, la, dd), "decoder_pos_embed_v": (1, g2, dd),
        "patch_embed_a.proj.weight": (d, 1, p, p), "patch_embed_a.proj.bias": (d,),
        "patch_embed_v.proj.weight": (d, 3, p, p), "patch_embed_v.proj.bias": (d,),
    }
    mlp = int(cfg.mlp_ratio)
    for i in range(cfg.depth_modality):
        s.update(_block_shapes(f"blocks_a.{i}", d, mlp))
        s.update(_block_shapes(f"blocks_v.{i}", d, mlp))
    for j in range(cfg.depth_fusion):
        s.update(_block_shapes(f"blocks_u.{j}", d, mlp))
    for n in ("norm_a", "norm_v", "norm"):
        s[f"{n}.weight"] = s[f"{n}.bias"] = (d,)
    s.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,)})
    for k in range(cfg.decoder_depth):
        s.update(_block_shapes(f"decoder_blocks.{k}", dd, mlp))
    s.update({"decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
              "decoder_pred_a.weight": (p * p, dd), "decoder_pred_a.bias": (p * p,),
              "decoder_pred_v.weight": (3 * p * p, dd), "decoder_pred_v.bias": (3 * p * p,)})
    return s


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


def _read_tsv() -> dict[str, tuple[int, ...]]:
    assert TSV.is_file(), f"the committed reference layout is missing: {TSV}"
    rows = TSV.read_text().strip().splitlines()
    assert rows[0].split("\t") == ["name", "shape"]
    return {n: tuple(int(x) for x in s.split("x")) for n, s in (r.split("\t") for r in rows[1:])}


# --------------------------------------------------------------------------------------------
# the real CAV-MAE layout, at full size on the meta device
# --------------------------------------------------------------------------------------------
def test_every_reference_key_is_mapped_or_dropped() -> None:
    ref = _read_tsv()
    assert len(ref) == 647
    with torch.device("meta"):
        model = build_model("base", depth_modality=11, depth_fusion=1, num_frames=1)
    # the fake layout used by the other tests is the real one at base size
    assert cavmae_shapes(model.config) == ref
    state = {f"module.{k}": torch.empty(s, device="meta") for k, s in ref.items()}
    new, report = convert_cavmae_state_dict(state, model)  # shapes are checked against the model
    assert report.unexpected == [] and report.missing == []
    assert set(report.filled) == {"inter_pos_embed_a", "inter_pos_embed_v"}
    assert len(report.skipped) == (11 * 2 + 8) * 8  # four unused _a/_v norms (w+b) per non-fusion block
    assert all("unused" in why for why in report.skipped.values())
    for name in ref:
        if name in report.skipped:
            assert not name.startswith("blocks_u.") and name.split(".")[2] in {"norm1_a", "norm1_v", "norm2_a",
                                                                                 "norm2_v"}
        elif name == "mask_token":
            assert {"mask_token_a", "mask_token_v"} <= set(new)
        else:
            assert name in new, name
    assert len(report.loaded) == len(model.state_dict()) - 2
    assert load_cavmae_checkpoint(model, state).missing == []  # in-place path works on meta too


def test_paper_split_reports_the_unmatched_blocks() -> None:
    ref = _read_tsv()
    with torch.device("meta"):
        model = build_model("base")  # d_mod 10 + d_fus 2, T = 4
    state = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    new, report = convert_cavmae_state_dict(state, model)
    assert new["pos_embed_v"].shape == (1, 784, 768) and new["decoder_pos_embed_v"].shape == (1, 784, 512)
    assert report.skipped["blocks_a.10.attn.qkv.weight"].startswith("no slot")
    assert "blocks_u.1.attn.qkv.weight" in report.missing and "blocks_u.1.norm1_a.weight" in report.missing
    assert not any(k.startswith("blocks_u.0") for k in report.missing)
    with pytest.raises(RuntimeError, match="missing"):
        load_cavmae_checkpoint(model, state, strict=True)


# --------------------------------------------------------------------------------------------
# function preservation on a tiny model (the paper's token-mean pooling, as in published checkpoints)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded():
    cfg_kw = dict(num_frames=1, depth_modality=2, depth_fusion=1)
    torch.manual_seed(0)
    model = build_model("tiny", embed_segments=1, **cfg_kw).eval()
    src = _random_state(cavmae_shapes(model.config), seed=1)
    report = load_cavmae_checkpoint(model, {f"module.{k}": v for k, v in src.items()})
    return model, src, report


def test_cavmae_load_report_and_copies(tiny_loaded) -> None:
    model, src, report = tiny_loaded
    assert report.unexpected == [] and report.missing == []
    sd = model.state_dict()
    for k in ("blocks_a.1.attn.qkv.weight", "blocks_u.0.norm2_v.bias", "norm_a.weight", "decoder_blocks.0.mlp.fc2.weight",
              "modality_v", "decoder_pred_v.weight"):
        assert torch.equal(sd[k], src[k]), k
    assert torch.equal(sd["mask_token_a"], src["mask_token"]) and torch.equal(sd["mask_token_v"], src["mask_token"])
    assert torch.all(sd["inter_pos_embed_a"] == 0) and torch.all(sd["inter_pos_embed_v"] == 0)


def _cavmae_audio_stream(model, src, fbank: torch.Tensor) -> torch.Tensor:
    """CAV-MAE's own audio path: transposed (F, A) fbank, [freq, time] kernel, freq-major tokens."""
    p = model.config.patch_size
    x = F.conv2d(fbank.transpose(2, 3), src["patch_embed_a.proj.weight"], src["patch_embed_a.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + src["pos_embed_a"] + src["modality_a"]
    for blk in model.blocks_a:
        x = blk(x)
    return x


def _to_time_major(x: torch.Tensor, cfg: CAVConfig) -> torch.Tensor:
    b, _, d = x.shape
    return x.view(b, cfg.audio_freq_tokens, cfg.audio_time_tokens, d).transpose(1, 2).reshape(b, -1, d)


def test_cavmae_load_preserves_the_function(tiny_loaded) -> None:
    model, src, _ = tiny_loaded
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    fbank = torch.randn(2, 1, cfg.audio_length, cfg.mel_bins, generator=g)
    video = torch.randn(2, 1, 3, cfg.img_size, cfg.img_size, generator=g)
    with torch.no_grad():
        # audio stream: our time-major tokens are CAV-MAE's freq-major tokens, reordered
        ref_a = _cavmae_audio_stream(model, src, fbank)
        U_a = model.encode_modality(model.patchify_audio(fbank), None, "audio")
        torch.testing.assert_close(U_a, _to_time_major(ref_a, cfg), atol=1e-5, rtol=1e-5)
        # video stream, one frame
        p = cfg.patch_size
        x = F.conv2d(video[:, 0], src["patch_embed_v.proj.weight"], src["patch_embed_v.proj.bias"], stride=p)
        ref_v = x.flatten(2).transpose(1, 2) + src["pos_embed_v"] + src["modality_v"]
        for blk in model.blocks_v:
            ref_v = blk(ref_v)
        U_v = model.encode_modality(model.patchify_video(video), None, "video")
        torch.testing.assert_close(U_v, ref_v, atol=1e-5, rtol=1e-5)
        # joint fusion + final norm (zero inter-pos tables keep CAV-MAE's function)
        j = torch.cat([ref_a, ref_v], dim=1)
        for blk in model.blocks_u:
            j = blk(j, "joint")
        j = model.norm(j)
        E_a, E_v = model.fuse_joint(U_a, None, U_v, None)
        ours = model.norm(torch.cat([E_a, E_v], dim=1))
        la = cfg.num_audio_tokens
        torch.testing.assert_close(ours[:, :la], _to_time_major(j[:, :la], cfg), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[:, la:], j[:, la:], atol=1e-4, rtol=1e-4)
        # audio prediction head: CAV-MAE predicts (freq, time)-in-patch vectors, we predict (time, freq)
        h = torch.randn(2, 5, cfg.decoder_dim, generator=g)
        theirs = F.linear(h, src["decoder_pred_a.weight"], src["decoder_pred_a.bias"]).view(2, 5, p, p)
        mine = model.decoder_pred_a(h).view(2, 5, p, p)
        torch.testing.assert_close(mine, theirs.transpose(-1, -2))
        # decoder audio table: row (t, f) of ours = row f*T_a + t of CAV-MAE's
        ta, fa = cfg.audio_time_tokens, cfg.audio_freq_tokens
        assert torch.equal(model.decoder_pos_embed_a[0, 3 * fa + 1], src["decoder_pos_embed_a"][0, 1 * ta + 3])


def test_pos_tables_are_tiled_over_frames() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", embed_segments=1, num_frames=3)
    src = _random_state(cavmae_shapes(model.config), seed=4)
    load_cavmae_checkpoint(model, src)
    g2 = model.config.grid**2
    for t in range(3):
        assert torch.equal(model.pos_embed_v[:, t * g2:(t + 1) * g2], src["pos_embed_v"])
        assert torch.equal(model.decoder_pos_embed_v[:, t * g2:(t + 1) * g2], src["decoder_pos_embed_v"])


def test_sincos_cavmae_table_lands_on_our_sincos_table() -> None:
    """CAV-MAE's freq-major sin-cos audio table, reordered, equals our time-major table (D3)."""
    from stella_avalanche.models.cav import sincos_2d
    torch.manual_seed(0)
    model = build_model("tiny", embed_segments=1)
    cfg = model.config
    ta, fa = cfg.audio_time_tokens, cfg.audio_freq_tokens
    ours = model.pos_embed_a.detach().clone()
    idx = torch.arange(fa * ta)
    freq_major = sincos_2d(cfg.embed_dim, idx % ta, idx // ta)[None]  # row f*T_a + t = [sc(t) | sc(f)]
    src = _random_state(cavmae_shapes(cfg), seed=5)
    src["pos_embed_a"] = freq_major
    load_cavmae_checkpoint(model, src)
    torch.testing.assert_close(model.pos_embed_a.detach(), ours)


def test_files_strictness_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", embed_segments=1, depth_modality=1)
    src = _random_state(cavmae_shapes(build_model("tiny", embed_segments=1).config), seed=6)  # source has 2 modality blocks
    pth = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.items()}, "epoch": 3}, pth)
    report = load_cavmae_checkpoint(model, pth, strict=True)
    assert report.source == str(pth) and report.missing == [] and report.unexpected == []
    assert report.skipped["blocks_a.1.attn.qkv.weight"].startswith("no slot")
    assert torch.equal(model.blocks_v[0].mlp.fc1.weight, src["blocks_v.0.mlp.fc1.weight"])
    from safetensors.torch import save_file
    st = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in src.items()}, str(st))
    state, source = read_state_dict(st)
    assert source == str(st) and torch.equal(state["norm.weight"], src["norm.weight"])
    assert load_cavmae_checkpoint(build_model("tiny", embed_segments=1), st).missing == []
    # unknown keys: reported, and fatal only when strict
    extra = dict(src, foo=torch.zeros(1))
    assert load_cavmae_checkpoint(model, extra).unexpected == ["foo"]
    with pytest.raises(RuntimeError, match="foo"):
        load_cavmae_checkpoint(model, extra, strict=True)
    # a deeper target than the source leaves named blocks missing
    assert "blocks_a.2.attn.qkv.weight" in load_cavmae_checkpoint(build_model("tiny", embed_segments=1, depth_modality=3), src).missing
    bad = dict(src, pos_embed_a=torch.zeros(1, 10, model.config.embed_dim))
    with pytest.raises(ValueError, match="pos_embed_a"):
        load_cavmae_checkpoint(model, bad)
    with pytest.raises(FileNotFoundError):
        load_cavmae_checkpoint(model, tmp_path / "absent.pth")


# --------------------------------------------------------------------------------------------
# ImageNet MAE (§10.2)
# --------------------------------------------------------------------------------------------
def _mae_shapes(cfg: CAVConfig, depth: int, full: bool) -> dict[str, tuple[int, ...]]:
    d, p, dd = cfg.embed_dim, cfg.patch_size, cfg.decoder_dim
    s: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, cfg.grid**2 + 1, d),
                                     "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
                                     "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        blk = _block_shapes(f"blocks.{i}", d, 4)
        s.update({k: v for k, v in blk.items() if k.split(".")[2] not in {"norm1_a", "norm1_v", "norm2_a", "norm2_v"}})
    if full:
        s.update({"mask_token": (1, 1, dd), "decoder_pos_embed": (1, cfg.grid**2 + 1, dd),
                  "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "decoder_norm.weight": (dd,),
                  "decoder_norm.bias": (dd,), "decoder_pred.weight": (3 * p * p, dd), "decoder_pred.bias": (3 * p * p,)})
        blk = _block_shapes("decoder_blocks.0", dd, 4)
        s.update({k: v for k, v in blk.items() if k.split(".")[2] not in {"norm1_a", "norm1_v", "norm2_a", "norm2_v"}})
    return s


def test_imagenet_mae_encoder_adaptation() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", embed_segments=1, num_frames=2)  # d_mod 2 + d_fus 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = _random_state(_mae_shapes(model.config, depth=4, full=False), seed=7)
    report = load_imagenet_mae(model, src)
    sd = model.state_dict()
    assert report.unexpected == [] and report.skipped["cls_token"] and report.skipped["blocks.3.norm1.weight"]
    for i in range(2):
        for leaf in ("attn.qkv.weight", "norm2.bias", "mlp.fc2.weight"):
            assert torch.equal(sd[f"blocks_a.{i}.{leaf}"], src[f"blocks.{i}.{leaf}"])
            assert torch.equal(sd[f"blocks_v.{i}.{leaf}"], src[f"blocks.{i}.{leaf}"])
    for n in ("norm1", "norm1_a", "norm1_v"):
        assert torch.equal(sd[f"blocks_u.0.{n}.weight"], src["blocks.2.norm1.weight"])
    for n in ("norm2", "norm2_a", "norm2_v"):
        assert torch.equal(sd[f"blocks_u.0.{n}.bias"], src["blocks.2.norm2.bias"])
    assert torch.equal(sd["blocks_u.0.attn.proj.weight"], src["blocks.2.attn.proj.weight"])
    for n in ("norm", "norm_a", "norm_v"):
        assert torch.equal(sd[f"{n}.weight"], src["norm.weight"])
    g2 = model.config.grid**2
    for key in ("pos_embed_v", "inter_pos_embed_v"):
        assert torch.equal(sd[key][:, :g2], src["pos_embed"][:, 1:]) and torch.equal(sd[key][:, g2:], src["pos_embed"][:, 1:])
    # untouched: audio tables keep their time-major sin-cos, decoder keeps its init (D4/D5 defaults)
    for key in ("pos_embed_a", "inter_pos_embed_a", "decoder_pos_embed_a", "modality_a", "decoder_pred_a.weight"):
        assert torch.equal(sd[key], before[key]), key
    assert "decoder_embed.weight" in report.missing and "pos_embed_a" in report.missing
    # a grey patch replicated to RGB gives the same response through both patch embeddings
    grey = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(F.conv2d(grey, sd["patch_embed_a.proj.weight"], sd["patch_embed_a.proj.bias"]),
                               F.conv2d(grey.expand(1, 3, 16, 16), sd["patch_embed_v.proj.weight"],
                                        sd["patch_embed_v.proj.bias"]), atol=1e-5, rtol=1e-5)


def test_imagenet_mae_full_checkpoint_and_parity_flags() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", embed_segments=1)
    src = _random_state(_mae_shapes(model.config, depth=3, full=True), seed=8)
    report = load_imagenet_mae(model, {"model": src}, legacy_audio_head=True, zero_unmapped=True)
    sd = model.state_dict()
    assert report.unexpected == []
    assert torch.equal(sd["decoder_blocks.0.attn.qkv.weight"], src["decoder_blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["mask_token_a"], src["mask_token"]) and torch.equal(sd["mask_token_v"], src["mask_token"])
    assert torch.equal(sd["decoder_pred_v.weight"], src["decoder_pred.weight"])
    assert torch.equal(sd["decoder_pred_a.weight"], src["decoder_pred.weight"][:256])
    assert torch.equal(sd["decoder_pos_embed_v"][:, 16:32], src["decoder_pos_embed"][:, 1:])
    for key in ("pos_embed_a", "modality_v", "decoder_modality_a"):
        assert torch.all(sd[key] == 0) and key in report.filled
    assert report.missing == []


def test_a_published_checkpoint_leaves_the_segment_map_at_the_token_mean() -> None:
    """Published CAV-MAE weights have no segment map: loading them into a segment-pooled model reports
    it as missing and leaves it at its start, the average of the segment means (= the token mean)."""
    model = build_model("tiny")
    assert model.config.embed_segments == 4
    src = _random_state(cavmae_shapes(build_model("tiny", embed_segments=1).config), seed=7)
    report = load_cavmae_checkpoint(model, src)
    assert sorted(k for k in report.missing) == ["segment_proj_a.bias", "segment_proj_a.weight",
                                                 "segment_proj_v.bias", "segment_proj_v.weight"]
    d = model.config.embed_dim
    torch.testing.assert_close(model.segment_proj_v.weight, torch.eye(d).repeat(1, 4) / 4)
