"""Tests for the audio-video matching module (stella_avalanche.models.avm)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stella_avalanche.models.avm import AVMatching, matching_pairs
from stella_avalanche.models.cav import build_model

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_base_parameter_count_and_names() -> None:
    with torch.device("meta"):
        avm = AVMatching(768, 12)
    assert sum(p.numel() for p in avm.parameters()) == 5_904_385
    names = {n for n, _ in avm.named_parameters()}
    assert {"norm_a.weight", "norm_v.bias", "to_a_q.weight", "to_v_v.weight",
            "matching_score.pooler.dense.weight", "matching_score.pooler.dense.bias",
            "matching_score.fc.weight", "matching_score.fc.bias"} <= names
    assert "to_a_q.bias" not in names  # bias-free projections


def _manual_logit(avm: AVMatching, E_a: torch.Tensor, E_v: torch.Tensor, legacy: bool) -> torch.Tensor:
    """Reference computation written out with explicit softmax (§3.1)."""
    b, H, dh = E_a.shape[0], avm.num_heads, avm.head_dim

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, x.shape[1], H, dh).permute(0, 2, 1, 3)

    xa, xv = avm.norm_a(E_a), avm.norm_v(E_v)
    qa, ka, va = heads(xa @ avm.to_a_q.weight.t()), heads(xa @ avm.to_a_k.weight.t()), heads(xa @ avm.to_a_v.weight.t())
    qv, kv, vv = heads(xv @ avm.to_v_q.weight.t()), heads(xv @ avm.to_v_k.weight.t()), heads(xv @ avm.to_v_v.weight.t())
    z_a = torch.softmax(qa @ kv.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ vv  # (B,H,L_A,dh)
    z_v = torch.softmax(qv @ ka.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ va

    def merge(z: torch.Tensor) -> torch.Tensor:
        n = z.shape[2]
        if legacy:
            return z.reshape(b, n, H * dh).mean(1)
        return z.permute(0, 2, 1, 3).reshape(b, n, H * dh).mean(1)

    h = torch.cat([merge(z_v), merge(z_a)], dim=-1)
    ms = avm.matching_score
    return ms.fc(torch.tanh(ms.pooler.dense(h))).squeeze(-1)


@pytest.mark.parametrize("legacy", [False, True])
def test_forward_matches_reference(legacy: bool) -> None:
    torch.manual_seed(0)
    avm = AVMatching(24, 4, legacy_pooling=legacy)
    with torch.no_grad():
        for ln in (avm.norm_a, avm.norm_v):
            ln.weight.normal_()
            ln.bias.normal_()
    E_a, E_v = torch.randn(3, 6, 24), torch.randn(3, 10, 24)
    with torch.no_grad():
        out = avm(E_a, E_v)
        ref = _manual_logit(avm, E_a, E_v, legacy)
        other = _manual_logit(avm, E_a, E_v, not legacy)
    assert out.shape == (3,)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the D1 bug changes the head input, so the two merges must disagree
    assert not torch.allclose(out, other, atol=1e-6)


def test_project_shapes_and_sources() -> None:
    torch.manual_seed(0)
    avm = AVMatching(24, 4)
    E_a, E_v = torch.randn(2, 6, 24), torch.randn(2, 10, 24)
    p = avm.project(E_a, E_v)
    assert {k: tuple(v.shape) for k, v in p.items()} == {
        "q_a": (2, 4, 6, 6), "k_a": (2, 4, 6, 6), "v_a": (2, 4, 6, 6),
        "q_v": (2, 4, 10, 6), "k_v": (2, 4, 10, 6), "v_v": (2, 4, 10, 6)}
    q_a = avm.to_a_q(avm.norm_a(E_a)).view(2, 6, 4, 6).transpose(1, 2)
    k_v = avm.to_v_k(avm.norm_v(E_v)).view(2, 10, 4, 6).transpose(1, 2)
    torch.testing.assert_close(p["q_a"], q_a)
    torch.testing.assert_close(p["k_v"], k_v)


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 8, 13])
def test_matching_pairs_labels_and_derangement(b: int) -> None:
    for seed in range(5):
        labels, vidx, neg = matching_pairs(b, generator=_gen(seed))
        idx = torch.arange(b)
        if b <= 2:
            assert torch.all(labels == 1) and torch.equal(vidx, idx) and neg.numel() == 0
            continue
        assert labels.sum().item() == b // 2
        assert torch.equal(torch.sort(neg).values, (labels == 0).nonzero().squeeze(1))
        pos = labels == 1
        assert torch.equal(vidx[pos], idx[pos])          # positives keep their own video
        assert torch.all(vidx[~pos] != idx[~pos])         # no negative keeps its own video
        assert torch.equal(torch.sort(vidx[~pos]).values, torch.sort(idx[~pos]).values)  # a permutation
    a = matching_pairs(9, generator=_gen(3))
    c = matching_pairs(9, generator=_gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert len({tuple(matching_pairs(9, generator=_gen(s))[0].tolist()) for s in range(10)}) > 1


@pytest.fixture(scope="module")
def backbone_and_codes():
    torch.manual_seed(0)
    model = build_model("tiny", depth_modality=1).train()
    cfg = model.config
    g = _gen(1)
    video = torch.randn(5, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(5, 1, cfg.audio_length, cfg.mel_bins, generator=g)
    return model, video, audio


def test_matching_loss_gradients_reach_only_the_avm(backbone_and_codes) -> None:
    model, video, audio = backbone_and_codes
    avm = AVMatching.from_config(model.config)
    # codes computed *with* grad on purpose: the loss must still not reach the backbone
    U_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
    U_v = model.encode_modality(model.patchify_video(video), None, "video")
    loss = avm.matching_loss(model, U_a, U_v, generator=_gen(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in avm.parameters())
    assert avm.matching_score.fc.weight.grad.abs().sum() > 0 and avm.to_a_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("source", ["joint", "unimodal"])
def test_matching_loss_value_and_feature_reuse(backbone_and_codes, source: str) -> None:
    """The loss equals BCE on the AVM logits of the paired features of the configured source, with or
    without the caller's features of the matched rows."""
    import dataclasses

    from stella_avalanche.models.avm import avm_inputs

    model, video, audio = backbone_and_codes
    model.config = dataclasses.replace(model.config, avm_features=source)
    torch.manual_seed(3)
    avm = AVMatching.from_config(model.config)
    with torch.no_grad():
        U_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
        U_v = model.encode_modality(model.patchify_video(video), None, "video")
        own = avm_inputs(model, U_a, U_v)
        plain = avm.matching_loss(model, U_a, U_v, generator=_gen(7))
        reused = avm.matching_loss(model, U_a, U_v, own=own, generator=_gen(7))
        labels, vidx, _ = matching_pairs(5, generator=_gen(7))
        if source == "joint":
            E_a, E_v = model.fuse_joint(U_a, None, U_v[vidx], None)
        else:
            E_a = model.fuse_unimodal(U_a, None, "audio", final_norm=False)
            E_v = model.fuse_unimodal(U_v[vidx], None, "video", final_norm=False)
        ref = F.binary_cross_entropy_with_logits(avm(E_a, E_v), labels)
    torch.testing.assert_close(plain, ref)
    torch.testing.assert_close(reused, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(vidx[labels == 1], torch.arange(5)[labels == 1]) and (labels == 0).sum() == 3


def test_avm_inputs_follow_the_config(backbone_and_codes) -> None:
    """Joint features of the video depend on the audio it is fused with; unimodal ones do not, and
    they are the pre-norm tokens the retrieval embedding pools."""
    import dataclasses

    from stella_avalanche.models.avm import avm_inputs
    from stella_avalanche.models.cav import CAVConfig, MODEL_PRESETS

    model, video, audio = backbone_and_codes
    with torch.no_grad():
        U_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
        U_v = model.encode_modality(model.patchify_video(video), None, "video")
        model.config = dataclasses.replace(model.config, avm_features="joint")
        _, Ev_joint = avm_inputs(model, U_a, U_v)
        _, Ev_joint_other = avm_inputs(model, U_a.roll(1, 0), U_v)
        model.config = dataclasses.replace(model.config, avm_features="unimodal")
        Ea_uni, Ev_uni = avm_inputs(model, U_a, U_v)
        _, Ev_uni_other = avm_inputs(model, U_a.roll(1, 0), U_v)
    assert not torch.allclose(Ev_joint, Ev_joint_other)
    assert torch.equal(Ev_uni, Ev_uni_other)
    torch.testing.assert_close(Ev_uni, model.fuse_unimodal(U_v, None, "video", final_norm=False))
    torch.testing.assert_close(Ea_uni, model.fuse_unimodal(U_a, None, "audio", final_norm=False))
    assert MODEL_PRESETS["tiny"].avm_features == "joint" and MODEL_PRESETS["base"].avm_features == "joint"
    with pytest.raises(ValueError, match="avm_features"):
        CAVConfig(avm_features="both")


def test_avm_learns_to_match(backbone_and_codes) -> None:
    """A few Adam steps on fixed codes lower the matching loss (the module is trainable end to end)."""
    model, video, audio = backbone_and_codes
    torch.manual_seed(0)
    avm = AVMatching.from_config(model.config)
    opt = torch.optim.Adam(avm.parameters(), lr=1e-3)
    with torch.no_grad():
        U_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
        U_v = model.encode_modality(model.patchify_video(video), None, "video")
    losses = []
    for _ in range(15):
        loss = avm.matching_loss(model, U_a, U_v, generator=_gen(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_product_pooling_same_parameters_different_head_input() -> None:
    """pooling='product' gates each token's cross-attended value by its own value: same parameters
    (checkpoints load in both modes), a different matching logit, and no mix with legacy pooling."""
    import pytest as _pytest

    from stella_avalanche.models.avm import AVMatching

    torch.manual_seed(0)
    mean = AVMatching(24, 3)
    prod = AVMatching(24, 3, pooling="product")
    prod.load_state_dict(mean.state_dict())
    E_a, E_v = torch.randn(4, 6, 24), torch.randn(4, 10, 24)
    assert not torch.allclose(mean(E_a, E_v), prod(E_a, E_v))
    # by hand: token mean of (own value) * (attended value), video half first
    p = prod.project(E_a, E_v)
    za = torch.nn.functional.scaled_dot_product_attention(p["q_a"], p["k_v"], p["v_v"]) * p["v_a"]
    zv = torch.nn.functional.scaled_dot_product_attention(p["q_v"], p["k_a"], p["v_a"]) * p["v_v"]
    h = torch.cat([zv.mean(dim=2).reshape(4, 24), za.mean(dim=2).reshape(4, 24)], dim=-1)
    assert torch.allclose(prod(E_a, E_v), prod.matching_score(h), atol=1e-6)
    with _pytest.raises(ValueError, match="legacy_pooling"):
        AVMatching(24, 3, pooling="product", legacy_pooling=True)
    with _pytest.raises(ValueError, match="pooling"):
        AVMatching(24, 3, pooling="max")


def _planted_synchrony(g: torch.Generator, b: int, dim: int = 24, frames: int = 4, per_frame: int = 4
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint features whose only audio-visual link is synchrony: every token carries a frame / time
    code; video tokens of the frames where the object shows add an "object" direction, audio tokens of
    those segments a "loud" direction. :returns: E_a (b, frames*per_frame, dim), E_v (same), pattern."""
    from stella_avalanche.models.cav import _sincos_1d

    pat = torch.rand(b, frames, generator=g) < 0.5
    pat[pat.sum(1) == 0, 0] = True
    code = _sincos_1d(dim, torch.arange(frames).float()).float()[None, :, None, :]
    obj, loud = torch.zeros(dim), torch.zeros(dim)
    obj[0], loud[1] = 3.0, 3.0
    on = pat[:, :, None, None].float()
    E_v = code + on * obj + 0.3 * torch.randn(b, frames, per_frame, dim, generator=g)
    E_a = code + on * loud + 0.3 * torch.randn(b, frames, per_frame, dim, generator=g)
    return E_a.flatten(1, 2), E_v.flatten(1, 2), pat


def _synchrony_auc(pooling: str, seed: int = 0, steps: int = 150) -> float:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    avm = AVMatching(24, 3, pooling=pooling)
    opt = torch.optim.Adam(avm.parameters(), lr=3e-3)
    idx = torch.arange(64)
    for _ in range(steps):
        E_a, E_v, pat = _planted_synchrony(g, 64)
        label = (torch.rand(64, generator=g) < 0.5).float()
        vidx = torch.where(label.bool(), idx, torch.randperm(64, generator=g))
        label = torch.where((pat[vidx] == pat).all(1), torch.ones_like(label), label)  # same pattern: a match
        loss = F.binary_cross_entropy_with_logits(avm(E_a, E_v[vidx]), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    E_a, E_v, pat = _planted_synchrony(torch.Generator().manual_seed(99), 256)
    other = torch.arange(256).roll(1)
    differ = ~(pat[other] == pat).all(1)
    with torch.no_grad():
        pos, neg = avm(E_a, E_v), avm(E_a, E_v[other])[differ]
    return float((pos[:, None] > neg[None]).float().mean())


def test_product_pooling_learns_synchrony_that_mean_pooling_cannot_express() -> None:
    """Why the tiny preset's AVM uses ``pooling="product"``: when audio and video belong together only
    by *when* things happen, the token mean of cross-attended values is (nearly) the same for matched
    and mismatched pairs, while the mean of own value x attended value scores the overlap directly."""
    mean_auc, product_auc = _synchrony_auc("mean"), _synchrony_auc("product")
    assert product_auc > 0.85, product_auc
    assert mean_auc < 0.65, mean_auc


def test_build_avm_takes_its_pooling_from_the_model_preset() -> None:
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import MODEL_PRESETS, CAVConfig

    assert MODEL_PRESETS["tiny"].avm_pooling == "product" and MODEL_PRESETS["base"].avm_pooling == "mean"
    assert build_avm(build_model("tiny")).pooling == "product"
    assert build_avm(build_model("tiny"), pooling="mean").pooling == "mean"
    with pytest.raises(ValueError, match="avm_pooling"):
        CAVConfig(avm_pooling="max")


def test_time_bias_aligns_attention_in_time_and_leaves_the_state_dict_alone() -> None:
    """``avm_time_bias``: with zero projections every key scores alike, so each audio query's
    attention mass on the video tokens of its own segment is e^β·n / (e^β·n + m) exactly; the bias is
    not a parameter (checkpoints of the paper's AVM load), and it needs full clips."""
    from stella_avalanche.models.avm import build_avm, token_time_segments
    from stella_avalanche.models.cav import MODEL_PRESETS, build_model

    cfg = MODEL_PRESETS["tiny"]
    assert cfg.avm_time_bias == 5.0
    seg_a, seg_v = token_time_segments(cfg)
    assert seg_a.tolist()[::cfg.audio_freq_tokens] == [t * cfg.num_frames // cfg.audio_time_tokens
                                                       for t in range(cfg.audio_time_tokens)]
    assert seg_v.tolist() == [j // cfg.grid**2 for j in range(cfg.num_video_tokens)]
    torch.manual_seed(0)
    avm = build_avm(build_model("tiny"))
    paper = build_avm(build_model("tiny", avm_time_bias=0.0))
    assert set(avm.state_dict()) == set(paper.state_dict())
    with torch.no_grad():
        for lin in (avm.to_a_q, avm.to_a_k, avm.to_v_q, avm.to_v_k):
            lin.weight.zero_()
        paper.load_state_dict(avm.state_dict())
        e_a = torch.randn(2, cfg.num_audio_tokens, cfg.embed_dim)
        e_v = torch.randn(2, cfg.num_video_tokens, cfg.embed_dim)
        p = avm.project(e_a, e_v)
        mask = avm._time_mask(cfg.num_audio_tokens, cfg.num_video_tokens, torch.float32)
        att = torch.softmax((p["q_a"] @ p["k_v"].transpose(-1, -2)) + mask, dim=-1)   # what SDPA computes
        same = (seg_a[:, None] == seg_v[None, :]).float()
        n = cfg.grid**2
        want = math.exp(5.0) * n / (math.exp(5.0) * n + cfg.num_video_tokens - n)
        torch.testing.assert_close((att * same).sum(-1), torch.full_like(att[..., 0], want))
        ref = torch.nn.functional.scaled_dot_product_attention(p["q_a"], p["k_v"], p["v_v"], attn_mask=mask)
        torch.testing.assert_close(ref, att @ p["v_v"])
        assert not torch.allclose(avm(e_a, e_v), paper(e_a, e_v))  # uniform vs time-aligned attention
    with pytest.raises(ValueError, match="needs full clips"):
        avm(e_a[:, :10], e_v)
    with pytest.raises(ValueError, match="avm_time_bias=-1"):
        build_model("tiny", avm_time_bias=-1.0)
