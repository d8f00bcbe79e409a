"""Tests for the two-stream backbone (stella_avalanche.models.cav)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from stella_avalanche.models.cav import (
    CAVMAE, MODEL_PRESETS, CAVConfig, build_model, floor_fraction, gather_tokens, num_visible,
)

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny() -> CAVMAE:
    torch.manual_seed(0)
    return build_model("tiny").eval()


def _batch(cfg: CAVConfig, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    video = torch.randn(b, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(b, 1, cfg.audio_length, cfg.mel_bins, generator=g)
    return video, audio


def _keep(b: int, L: int, k: int, seed: int) -> torch.Tensor:
    return torch.rand(b, L, generator=_gen(seed)).argsort(dim=1)[:, :k]


# --------------------------------------------------------------------------------------------
# configuration and sizes
# --------------------------------------------------------------------------------------------
def test_derived_sizes_of_presets() -> None:
    base, tiny = MODEL_PRESETS["base"], MODEL_PRESETS["tiny"]
    assert (base.grid, base.num_video_tokens, base.audio_freq_tokens, base.audio_time_tokens,
            base.num_audio_tokens, base.video_patch_dim, base.audio_patch_dim) == (14, 784, 8, 64, 512, 768, 256)
    assert (base.num_visible("video"), base.num_visible("audio")) == (156, 102)
    assert (base.mask_ratio, base.temperature, base.contrastive_weight, base.pool_order) == \
        (0.8, 0.05, 0.1, "norm_then_pool")
    assert (tiny.grid, tiny.num_video_tokens, tiny.audio_time_tokens, tiny.audio_freq_tokens,
            tiny.num_audio_tokens) == (4, 64, 16, 4, 64)
    assert (tiny.num_visible("video"), tiny.num_visible("audio")) == (16, 16)
    assert (tiny.temperature, tiny.pool_order) == (0.1, "pool_then_norm")
    assert CAVConfig.from_dict(tiny.to_dict()) == tiny


def test_exact_count_arithmetic() -> None:
    # the float formula loses a token here (D11); the exact one does not
    assert int(40 * (1 - 0.8)) == 7
    assert num_visible(40, 0.8) == 8
    assert num_visible(784, 0.8) == 156 and num_visible(512, 0.8) == 102
    assert floor_fraction(784, 0.5) == 392 and floor_fraction(512, 0.5) == 256
    assert floor_fraction(10, 0.3) == 3 and floor_fraction(7, 1 / 3) == 2
    assert CAVConfig(mask_ratio=0.8, img_size=80, num_frames=1, audio_length=80, mel_bins=64).num_visible(
        "audio", 0.8) == num_visible(20, 0.8) == 4


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="img_size"):
        build_model("tiny", img_size=60)
    with pytest.raises(ValueError, match="pool_order"):
        build_model("tiny", pool_order="max")
    with pytest.raises(ValueError, match="no_such_field"):
        build_model("tiny", no_such_field=1)
    with pytest.raises(ValueError, match="preset"):
        build_model("huge")


def test_base_parameter_counts_match_spec() -> None:
    with torch.device("meta"):
        model = build_model("base")
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("decoder", "mask_token")))
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    assert enc == 158_730_240
    assert dec == 26_804_736
    assert sum(p.numel() for p in model.blocks_a[0].parameters()) == 7_087_872
    assert sum(p.numel() for p in model.decoder_blocks[0].parameters()) == 3_152_384


# --------------------------------------------------------------------------------------------
# tokenisation and embeddings
# --------------------------------------------------------------------------------------------
def test_patchify_element_order(tiny: CAVMAE) -> None:
    cfg = tiny.config
    video, audio = _batch(cfg, b=2)
    pv, pa = tiny.patchify_video(video), tiny.patchify_audio(audio)
    assert pv.shape == (2, cfg.num_video_tokens, cfg.video_patch_dim)
    assert pa.shape == (2, cfg.num_audio_tokens, cfg.audio_patch_dim)
    p, g, fa = cfg.patch_size, cfg.grid, cfg.audio_freq_tokens
    for (b, t, ch, r, c, i, j) in [(0, 0, 0, 0, 0, 0, 0), (1, 3, 2, 1, 3, 5, 11), (0, 2, 1, 3, 2, 15, 0)]:
        assert pv[b, t * g * g + r * g + c, (i * p + j) * 3 + ch] == video[b, t, ch, r * p + i, c * p + j]
    for (b, t, f, i, j) in [(0, 0, 0, 0, 0), (1, 15, 3, 7, 2), (0, 4, 1, 0, 15)]:
        assert pa[b, t * fa + f, i * p + j] == audio[b, 0, t * p + i, f * p + j]


def test_patch_vector_embedding_equals_conv_on_full_frames() -> None:
    torch.manual_seed(1)
    model = build_model("tiny", depth_modality=0).eval()  # no blocks: encode_modality = embedding only
    with torch.no_grad():
        for name in ("modality_a", "modality_v", "pos_embed_a", "pos_embed_v"):
            getattr(model, name).zero_()
        model.patch_embed_a.proj.bias.normal_()
        model.patch_embed_v.proj.bias.normal_()
    cfg = model.config
    video, audio = _batch(cfg, b=2)
    with torch.no_grad():
        ours_v = model.encode_modality(model.patchify_video(video), None, "video")
        conv_v = model.patch_embed_v.proj(video.flatten(0, 1))  # (B*T, D, G, G)
        conv_v = conv_v.flatten(2).transpose(1, 2).reshape(2, cfg.num_video_tokens, cfg.embed_dim)
        ours_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
        conv_a = model.patch_embed_a.proj(audio).flatten(2).transpose(1, 2)  # kernel axes [time, freq]
    torch.testing.assert_close(ours_v, conv_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_a, conv_a, atol=1e-5, rtol=1e-5)


def test_positional_tables_follow_token_order() -> None:
    torch.manual_seed(0)
    tiny = CAVMAE(dataclasses.replace(MODEL_PRESETS["tiny"], video_time_code="none"))
    cfg = tiny.config
    d, g, fa = cfg.embed_dim, cfg.grid, cfg.audio_freq_tokens
    pv, pa = tiny.pos_embed_v[0].detach(), tiny.pos_embed_a[0].detach()
    # video: [sc(col) | sc(row)], repeated identically for every frame (no temporal code)
    for t, r, c in [(0, 1, 2), (3, 3, 0)]:
        row = pv[t * g * g + r * g + c]
        assert math.isclose(row[0].item(), math.sin(c), abs_tol=1e-6)
        assert math.isclose(row[d // 2].item(), math.sin(r), abs_tol=1e-6)
        assert math.isclose(row[d // 4].item(), math.cos(c), abs_tol=1e-6)
    torch.testing.assert_close(pv[: g * g], pv[g * g: 2 * g * g])
    # audio, time-major rows t*F_a + f: [sc(t) | sc(f)] (D3)
    for t, f in [(5, 1), (15, 3)]:
        row = pa[t * fa + f]
        assert math.isclose(row[0].item(), math.sin(t), abs_tol=1e-6)
        assert math.isclose(row[d // 2].item(), math.sin(f), abs_tol=1e-6)
    torch.testing.assert_close(tiny.inter_pos_embed_a, tiny.pos_embed_a)
    dd = cfg.decoder_dim
    assert math.isclose(tiny.decoder_pos_embed_a[0, 7 * fa + 2, dd // 2].item(), math.sin(2), abs_tol=1e-6)


def test_video_time_code_adds_a_frame_code() -> None:
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], video_time_code="sincos")
    none = CAVMAE(dataclasses.replace(cfg, video_time_code="none"))
    timed = CAVMAE(cfg)
    g, d = cfg.grid, cfg.embed_dim
    diff = (timed.pos_embed_v - none.pos_embed_v)[0].detach()          # (T*G*G, D)
    for t in range(cfg.num_frames):
        rows = diff[t * g * g:(t + 1) * g * g]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))     # one code per frame
        assert math.isclose(rows[0, 0].item(), math.sin(t), abs_tol=1e-6)
        assert math.isclose(rows[0, d // 2].item(), math.cos(t), abs_tol=1e-6)
    torch.testing.assert_close(timed.inter_pos_embed_v, timed.pos_embed_v)
    dd = cfg.decoder_dim
    assert math.isclose((timed.decoder_pos_embed_v - none.decoder_pos_embed_v)[0, 3 * g * g, dd // 2].item(),
                        math.cos(3), abs_tol=1e-6)
    with pytest.raises(ValueError, match="video_time_code"):
        dataclasses.replace(cfg, video_time_code="learned")


def test_without_a_time_code_the_video_embedding_ignores_frame_order() -> None:
    """The reason the synthetic preset uses a time code: with the paper's tables a fresh video encoder
    gives the same embedding for any order of the frames, so "the object shows when the sound is on"
    cannot be represented until a temporal code is learned from zero."""
    video, audio = _batch(MODEL_PRESETS["tiny"], b=2)
    reversed_video = video.flip(1)
    for code, same in (("none", True), ("sincos", False)):
        torch.manual_seed(0)
        m = CAVMAE(dataclasses.replace(MODEL_PRESETS["tiny"], video_time_code=code)).eval()
        _, z = m.embed(video, audio)
        _, z_rev = m.embed(reversed_video, audio)
        gap = (z - z_rev).abs().max().item()
        assert (gap < 1e-6) if same else (gap > 1e-4), (code, gap)


# --------------------------------------------------------------------------------------------
# method shapes and pooling
# --------------------------------------------------------------------------------------------
def test_method_shapes_on_tiny(tiny: CAVMAE) -> None:
    cfg = tiny.config
    b, d = 3, cfg.embed_dim
    video, audio = _batch(cfg, b=b)
    ids_v = _keep(b, cfg.num_video_tokens, 20, 1)
    ids_a = _keep(b, cfg.num_audio_tokens, 12, 2)
    with torch.no_grad():
        U_v = tiny.encode_modality(gather_tokens(tiny.patchify_video(video), ids_v), ids_v, "video")
        U_a = tiny.encode_modality(gather_tokens(tiny.patchify_audio(audio), ids_a), ids_a, "audio")
        assert U_v.shape == (b, 20, d) and U_a.shape == (b, 12, d)
        E_a, E_v = tiny.fuse_joint(U_a, ids_a, U_v, ids_v)
        assert E_a.shape == (b, 12, d) and E_v.shape == (b, 20, d)
        lat = tiny.fuse_unimodal(U_a, ids_a, "audio")
        assert lat.shape == (b, 12, d)
        pre = tiny.fuse_unimodal(U_a, ids_a, "audio", final_norm=False)
        z = tiny.pool(pre, "audio", normed=False, ids=ids_a)
        assert z.shape == (b, d)
        flat = build_model("tiny", embed_segments=1).eval()  # the paper's token mean, pool_then_norm
        flat.load_state_dict({k: v for k, v in tiny.state_dict().items() if "segment_proj" not in k})
        torch.testing.assert_close(flat.pool(pre, "audio", normed=False), tiny.norm_a(pre.mean(dim=1)))
        with pytest.raises(ValueError, match="pool_then_norm"):
            tiny.pool(lat, "audio")
        za, zv = tiny.embed(video, audio)
        assert za.shape == (b, d) and zv.shape == (b, d)


def test_norm_then_pool_is_mean_of_latent() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", pool_order="norm_then_pool").eval()
    _, audio = _batch(model.config, b=2)
    with torch.no_grad():
        U = model.encode_modality(model.patchify_audio(audio), None, "audio")
        lat = model.fuse_unimodal(U, None, "audio")
        torch.testing.assert_close(model.pool(lat, "audio"), lat.mean(dim=1))
        torch.testing.assert_close(
            model.pool(model.fuse_unimodal(U, None, "audio", final_norm=False), "audio", normed=False),
            lat.mean(dim=1))


def test_segment_pooling_starts_as_the_token_mean_and_averages_each_segment() -> None:
    """``embed_segments``: the learned map over the segment means starts as their average (the paper's
    mean on full clips); on a token subset each segment is averaged over the tokens it holds."""
    torch.manual_seed(0)
    seg = CAVMAE(dataclasses.replace(MODEL_PRESETS["tiny"], embed_segments=4)).eval()
    flat = CAVMAE(dataclasses.replace(MODEL_PRESETS["tiny"], embed_segments=1)).eval()
    assert not any("segment_proj" in k for k in flat.state_dict())  # paper checkpoints stay loadable
    flat.load_state_dict({k: v for k, v in seg.state_dict().items() if "segment_proj" not in k})
    video, audio = _batch(seg.config, b=3)
    with torch.no_grad():
        for a, b in zip(seg.embed(video, audio), flat.embed(video, audio)):
            torch.testing.assert_close(a, b)
        cfg = seg.config
        x = torch.randn(2, 5, cfg.embed_dim, generator=_gen(1))
        # video: frames 0, 0, 2, 3, 3 (16 tokens per frame); audio: time tokens 0, 1, 4, 8, 15 (4 per
        # time token), i.e. segments 0, 0, 1, 2, 3
        ids_v = torch.tensor([[0, 15, 33, 48, 63]] * 2)
        ids_a = torch.tensor([[0, 4, 16, 32, 60]] * 2)
        w = torch.randn(cfg.embed_dim, 4 * cfg.embed_dim, generator=_gen(2))
        for m, ids, groups in (("video", ids_v, [[0, 1], [], [2], [3, 4]]),
                               ("audio", ids_a, [[0, 1], [2], [3], [4]])):
            proj = seg.segment_proj_v if m == "video" else seg.segment_proj_a
            proj.weight.copy_(w)
            means = [x[:, g].mean(dim=1) if g else torch.zeros(2, cfg.embed_dim) for g in groups]
            want = (seg.norm_v if m == "video" else seg.norm_a)(proj(torch.cat(means, dim=1)))
            torch.testing.assert_close(seg.pool(x, m, normed=False, ids=ids), want)
        with pytest.raises(ValueError, match="pass the token positions"):
            seg.pool(x, "video", normed=False)


def test_segment_pooling_can_tell_which_frames_show_an_object() -> None:
    """The on/off pattern that a global mean loses: one frame of two lit, frame 0 or frame 1. The token
    mean of a time-blind encoder cannot tell the two clips apart; the segment means can, once the map
    weighs the segments differently (as training may learn)."""
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], video_time_code="none")
    video = torch.zeros(2, cfg.num_frames, 3, cfg.img_size, cfg.img_size)
    video[0, 0] = 1.0
    video[1, 1] = 1.0
    audio = torch.zeros(2, 1, cfg.audio_length, cfg.mel_bins)
    gaps = {}
    for s in (1, 4):
        torch.manual_seed(0)
        m = CAVMAE(dataclasses.replace(cfg, embed_segments=s)).eval()
        with torch.no_grad():
            if s > 1:
                m.segment_proj_v.weight[:, : cfg.embed_dim] *= 3.0  # segment 0 weighs more
            _, z = m.embed(video, audio)
        gaps[s] = (z[0] - z[1]).abs().max().item()
    assert gaps[1] < 1e-6 and gaps[4] > 1e-3, gaps


def test_embed_segments_must_divide_the_time_axes() -> None:
    with pytest.raises(ValueError, match="embed_segments=3 must divide num_frames=4"):
        dataclasses.replace(MODEL_PRESETS["tiny"], embed_segments=3)
    with pytest.raises(ValueError, match="embed_segments=0"):
        dataclasses.replace(MODEL_PRESETS["tiny"], embed_segments=0)


def test_embed_is_unit_norm_fp32_and_deterministic(tiny: CAVMAE) -> None:
    video, audio = _batch(tiny.config, b=4)
    with torch.no_grad():
        za, zv = tiny.embed(video, audio)
        za2, _ = tiny.embed(video, audio)
    assert za.dtype == torch.float32 and zv.dtype == torch.float32
    torch.testing.assert_close(za.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(zv.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(za, za2)
    assert not torch.allclose(za[0], za[1])


# --------------------------------------------------------------------------------------------
# pre-training forward
# --------------------------------------------------------------------------------------------
def test_pretrain_forward_outputs_and_loss_composition(tiny: CAVMAE) -> None:
    cfg = tiny.config
    video, audio = _batch(cfg, b=4)
    with torch.no_grad():
        out = tiny(video, audio, generator=_gen(0))
    assert set(out) == {"loss", "loss_mae_audio", "loss_mae_video", "loss_nce", "z_audio", "z_video",
                        "per_sample_loss"}
    assert out["z_audio"].shape == (4, cfg.embed_dim) and out["per_sample_loss"].shape == (4,)
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss_mae_audio", "loss_mae_video", "loss_nce"))
    torch.testing.assert_close(out["loss"], out["loss_mae_audio"] + out["loss_mae_video"] + out["loss_nce"])
    # equal target counts per sample: the batch-level mean equals the mean of the per-sample losses
    torch.testing.assert_close(out["per_sample_loss"].mean(), out["loss"])
    # contrastive term recomputed from the returned (un-normalised) embeddings
    a, v = F.normalize(out["z_audio"], dim=-1), F.normalize(out["z_video"], dim=-1)
    logits = v @ a.t() / cfg.temperature
    tgt = torch.arange(4)
    nce = cfg.contrastive_weight * 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt))
    torch.testing.assert_close(out["loss_nce"], nce)
    # same generator -> same masks; different generator -> different masks
    with torch.no_grad():
        again = tiny(video, audio, generator=_gen(0))
        other = tiny(video, audio, generator=_gen(1))
    torch.testing.assert_close(again["loss"], out["loss"])
    assert not torch.allclose(other["loss"], out["loss"])


def test_contrastive_input_kept_embeds_every_kept_token() -> None:
    """``contrastive_input="kept"``: the InfoNCE embeddings come from an unmasked pass over the kept
    tokens (all of them without keep ids, so they equal the retrieval embeddings), independent of
    the masking draw; ``"visible"`` embeddings depend on the draw and differ from ``embed``."""
    torch.manual_seed(0)
    kept = build_model("tiny", contrastive_input="kept").eval()
    visible = build_model("tiny", contrastive_input="visible").eval()
    visible.load_state_dict(kept.state_dict())
    video, audio = _batch(kept.config, b=4)
    with torch.no_grad():
        za, zv = kept.embed(video, audio)
        o1 = kept(video, audio, generator=_gen(0))
        o2 = kept(video, audio, generator=_gen(1))
        ov = visible(video, audio, generator=_gen(0))
        # with keep ids: the pooled embedding of exactly the kept tokens
        keep_v, keep_a = _keep(4, 64, 32, 3), _keep(4, 64, 20, 4)
        ok = kept(video, audio, video_keep=keep_v, audio_keep=keep_a, generator=_gen(0))
        u = kept.encode_modality(gather_tokens(kept.patchify_audio(audio), keep_a), keep_a, "audio")
        ref_a = kept.pool(kept.fuse_unimodal(u, keep_a, "audio", final_norm=False), "audio", normed=False,
                          ids=keep_a)
    torch.testing.assert_close(F.normalize(o1["z_audio"], dim=-1), za)
    torch.testing.assert_close(F.normalize(o1["z_video"], dim=-1), zv)
    torch.testing.assert_close(o1["loss_nce"], o2["loss_nce"])
    assert not torch.allclose(o1["loss_mae_video"], o2["loss_mae_video"])  # masking still random
    torch.testing.assert_close(ok["z_audio"], ref_a)
    assert not torch.allclose(F.normalize(ov["z_audio"], dim=-1), za, atol=1e-3)
    with pytest.raises(ValueError, match="contrastive_input"):
        CAVConfig(contrastive_input="all")


def test_norm_pix_loss_of_a_zero_predictor() -> None:
    """With a zero prediction head each target patch costs mean(ŷ*²) = (P-1)/P (unbiased var)."""
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        for head in (model.decoder_pred_a, model.decoder_pred_v):
            head.weight.zero_()
            head.bias.zero_()
        out = model(*_batch(model.config, b=2), generator=_gen(3))
    pa, pv = model.config.audio_patch_dim, model.config.video_patch_dim
    assert math.isclose(out["loss_mae_audio"].item(), (pa - 1) / pa, rel_tol=1e-4)
    assert math.isclose(out["loss_mae_video"].item(), (pv - 1) / pv, rel_tol=1e-4)


def test_visible_and_target_counts(tiny: CAVMAE) -> None:
    cfg = tiny.config
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        tiny.blocks_a[0].register_forward_hook(lambda m, i, o: seen.__setitem__("enc_a", tuple(i[0].shape))),
        tiny.blocks_v[0].register_forward_hook(lambda m, i, o: seen.__setitem__("enc_v", tuple(i[0].shape))),
        tiny.decoder_pred_a.register_forward_hook(lambda m, i, o: seen.__setitem__("pred_a", tuple(o.shape))),
        tiny.decoder_pred_v.register_forward_hook(lambda m, i, o: seen.__setitem__("pred_v", tuple(o.shape))),
        tiny.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("dec", []).append(i[0].shape[1])),
    ]
    try:
        video, audio = _batch(cfg, b=2)
        with torch.no_grad():
            tiny(video, audio, generator=_gen(0))  # random masking: L tokens, n visible
            assert seen["enc_a"] == (2, 16, cfg.embed_dim) and seen["enc_v"] == (2, 16, cfg.embed_dim)
            assert seen["pred_a"] == (2, 64 - 16, cfg.audio_patch_dim)
            assert seen["pred_v"] == (2, 64 - 16, cfg.video_patch_dim)
            assert seen["dec"] == [64, 64]
            seen.clear()
            tiny(video, audio, video_keep=_keep(2, 64, 32, 1), audio_keep=_keep(2, 64, 24, 2), generator=_gen(0))
            # encoder sees floor(L(1-ρ)) = 16 of the kept ids; decoder sees only the kept ids
            assert seen["enc_a"][1] == 16 and seen["enc_v"][1] == 16
            assert seen["pred_a"][1] == 24 - 16 and seen["pred_v"][1] == 32 - 16
            assert seen["dec"] == [24, 32]
            seen.clear()
            tiny(video, audio, mask_ratio=0.5, generator=_gen(0))
            assert seen["enc_a"][1] == 32 and seen["pred_v"][1] == 32
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="kept tokens"):
        tiny(video, audio, video_keep=_keep(2, 64, 16, 1), generator=_gen(0))


def test_guided_masking_touches_only_kept_patches(tiny: CAVMAE) -> None:
    cfg = tiny.config
    video, audio = _batch(cfg, b=2, seed=5)
    video.requires_grad_(True)
    audio.requires_grad_(True)
    keep_v, keep_a = _keep(2, 64, 32, 7), _keep(2, 64, 20, 8)
    out = tiny(video, audio, video_keep=keep_v, audio_keep=keep_a, generator=_gen(0))
    out["loss"].backward()
    for grad, keep, patchify in ((video.grad, keep_v, tiny.patchify_video), (audio.grad, keep_a, tiny.patchify_audio)):
        per_patch = patchify(grad).abs().sum(dim=-1)  # (B, L)
        kept = torch.zeros_like(per_patch, dtype=torch.bool).scatter_(1, keep, True)
        assert torch.all(per_patch[~kept] == 0)
        assert torch.all(per_patch[kept] > 0)  # visible via the encoder, targets via the loss
    tiny.zero_grad(set_to_none=True)


def test_patch_rows_equal_full_clip_rows(tiny: CAVMAE) -> None:
    """STELLA+ replay rows arrive as patches: same result as the full clip with the same keep ids."""
    video, audio = _batch(tiny.config, b=3)
    keep_v, keep_a = _keep(3, 64, 32, 1), _keep(3, 64, 32, 2)
    with torch.no_grad():
        full = tiny(video, audio, video_keep=keep_v, audio_keep=keep_a, generator=_gen(4))
        rows = tiny(video_patches=gather_tokens(tiny.patchify_video(video), keep_v),
                    audio_patches=gather_tokens(tiny.patchify_audio(audio), keep_a),
                    video_keep=keep_v, audio_keep=keep_a, generator=_gen(4))
        allp = tiny(video_patches=tiny.patchify_video(video), audio_patches=tiny.patchify_audio(audio),
                    generator=_gen(4))
        rnd = tiny(video, audio, generator=_gen(4))
    for k in ("loss", "z_audio", "z_video", "per_sample_loss"):
        torch.testing.assert_close(full[k], rows[k])
        torch.testing.assert_close(allp[k], rnd[k])
    with pytest.raises(ValueError, match="exactly one"):
        tiny(video, audio, video_patches=tiny.patchify_video(video))


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", depth_modality=1, decoder_dim=64, decoder_heads=2).train()
    opt = torch.optim.Adam(model.param_groups(0.0), lr=1e-3)
    video, audio = _batch(model.config, b=4, seed=2)
    losses = []
    for _ in range(8):
        out = model(video, audio, generator=_gen(0))  # same masks every step
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    # random-noise targets: the loss cannot go far, but it must go down steadily
    assert losses[-1] < 0.95 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 6, losses


def test_weight_decay_groups(tiny: CAVMAE) -> None:
    skip = tiny.no_weight_decay()
    for name in ("pos_embed_a", "inter_pos_embed_v", "decoder_pos_embed_v", "modality_a", "decoder_modality_v",
                 "mask_token_a", "blocks_a.0.norm1.weight", "blocks_u.0.norm1_v.bias", "patch_embed_v.proj.bias",
                 "decoder_pred_a.bias"):
        assert name in skip, name
    for name in ("blocks_a.0.attn.qkv.weight", "patch_embed_v.proj.weight", "decoder_embed.weight"):
        assert name not in skip, name
    groups = tiny.param_groups(5e-7)
    assert [g["weight_decay"] for g in groups] == [5e-7, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny.parameters()))
    assert len(groups[1]["params"]) == len(skip)


def test_initialisation_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    w = model.blocks_v[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and torch.all(model.blocks_v[0].mlp.fc1.bias == 0)
    assert torch.all(model.norm_a.weight == 1) and torch.all(model.norm_a.bias == 0)
    pe = model.patch_embed_v.proj.weight.view(model.config.embed_dim, -1)
    bound = math.sqrt(6.0 / (pe.shape[0] + pe.shape[1]))  # Xavier on the (D, in*p*p) view
    assert pe.abs().max().item() <= bound and pe.abs().max().item() > 0.9 * bound
    assert abs(model.mask_token_v.std().item() - 0.02) < 0.01


def test_compile_blocks_keeps_state_dict_and_outputs() -> None:
    """``train.compile`` compiles each block in place: the same parameter names (checkpoints load)
    and, with the graph-capturing ``eager`` backend, the same loss and gradients as the eager model."""
    torch.manual_seed(0)
    eager = build_model("tiny")
    compiled = build_model("tiny")
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile_blocks(backend="eager") == len(eager.transformer_blocks())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    video, audio = _batch(eager.config, b=2)
    out = [m.pretrain_forward(video, audio, generator=_gen(5)) for m in (eager, compiled)]
    for m, o in zip((eager, compiled), out):
        o["loss"].backward()
    assert torch.allclose(out[0]["loss"], out[1]["loss"], rtol=1e-5, atol=1e-6)
    g0 = eager.blocks_u[0].attn.qkv.weight.grad
    g1 = compiled.blocks_u[0].attn.qkv.weight.grad
    assert g0 is not None and torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.transformer_blocks())


def test_runner_compiles_the_blocks_when_train_compile_is_set(tmp_path, monkeypatch) -> None:
    """``train.compile: true`` reaches ``CAVMAE.compile_blocks`` in the runner; false leaves it alone."""
    import stella_avalanche.experiment as E

    class Stop(Exception):
        pass

    calls = []

    class Model:
        def compile_blocks(self):
            calls.append(1)
            return 0

    monkeypatch.setattr(E, "_build_benchmark", lambda cfg: None)
    monkeypatch.setattr(E, "_model_config", lambda cfg, features: None)
    monkeypatch.setattr(E, "_resolve_init", lambda *a, **k: {})
    monkeypatch.setattr(E, "_build_model", lambda *a, **k: (Model(), None))
    monkeypatch.setattr(E, "_build_evaluation", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    for flag, expected in ((False, 0), (True, 1)):
        cfg = E.load_config(benchmark="synthetic", overrides=[f"train.compile={str(flag).lower()}"])
        with pytest.raises(Stop):
            E._build(cfg, out_dir=tmp_path, seed=0, device="cpu", progress=False)
        assert len(calls) == expected


def test_pretrain_forward_composes_the_mae_methods_with_their_shapes(tiny: CAVMAE) -> None:
    """MAE's reading order: forward_encoder -> forward_decoder -> forward_loss is pretrain_forward,
    with the shapes the docstrings state."""
    cfg = tiny.config
    video, audio = _batch(cfg, b=3)
    keep_v = _keep(3, cfg.num_video_tokens, 40, seed=1)
    enc = tiny.forward_encoder(video, audio, video_keep=keep_v, generator=_gen(5))
    a, v = enc["audio"], enc["video"]
    n_a, n_v = cfg.num_visible("audio"), cfg.num_visible("video")
    assert a.patches.shape == (3, cfg.num_audio_tokens, cfg.audio_patch_dim) and v.ids.shape == (3, 40)
    assert a.visible_ids.shape == (3, n_a) and v.target_ids.shape == (3, 40 - n_v)
    assert a.codes.shape == a.fused.shape == (3, n_a, cfg.embed_dim)
    assert v.target_patches.shape == (3, 40 - n_v, cfg.video_patch_dim)
    # visible and target ids partition the kept ids
    assert torch.equal(torch.cat([v.visible_ids, v.target_ids], 1).sort(1).values, keep_v.sort(1).values)
    pred_a, pred_v = tiny.forward_decoder(enc)
    assert pred_a.shape == a.target_patches.shape and pred_v.shape == v.target_patches.shape
    composed = tiny.forward_loss(enc, pred_a, pred_v)
    direct = tiny.pretrain_forward(video, audio, video_keep=keep_v, generator=_gen(5))
    assert composed.keys() == direct.keys()
    for k in direct:
        assert torch.equal(composed[k], direct[k]), k
