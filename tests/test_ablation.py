"""STELLA's component ablation: ``importance="uniform"`` / ``rca=False`` reduce to their documented special
cases, the method's path (``importance="avm", rca=True``) is the unchanged composition of the selection
steps, and the registry builds the named variants."""
from __future__ import annotations

import pytest
import torch

from stella_avalanche.training.selection import (
    PatchSelector,
    bernoulli_exclusion,
    candidate_ids,
    importance_from_projections,
    rca_probability,
    sample_video_ids,
    select_audio_chunks,
    summary_queries,
)

torch.set_num_threads(1)

L_V, T_A, F_A, C = 32, 8, 4, 2
L_A = T_A * F_A
K = 16
KC = T_A // C  # audio chunks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _proj(n: int, seed: int = 17, skew: float = 3.0) -> dict[str, torch.Tensor]:
    """Projections whose AVM importance is far from uniform (keys of low token ids are large)."""
    g = _gen(seed)
    q = {k: torch.randn(n, 2, L, 8, generator=g) for k, L in (("q_a", L_A), ("k_a", L_A), ("q_v", L_V),
                                                                ("k_v", L_V))}
    for k, L in (("k_a", L_A), ("k_v", L_V)):
        q[k] = q[k] + skew * torch.linspace(1, 0, L)[None, None, :, None] * q["q_a" if k == "k_v" else "q_v"].mean(2, keepdim=True)
    return q


def _selector(**kw) -> PatchSelector:
    return PatchSelector(video_tokens=L_V, audio_time_tokens=T_A, audio_freq_tokens=F_A, chunk=C, **kw)


def _replay(sel: PatchSelector, m: int) -> dict[str, torch.Tensor]:
    past = sel.select(proj=_proj(m, seed=99), generator=_gen(3))
    return {"qbar_a": past.qbar_a, "qbar_v": past.qbar_v, "I_v": past.I_v, "I_a": past.I_a,
            "C_v": torch.rand(m, L_V, generator=_gen(4)), "C_a": torch.rand(m, L_A, generator=_gen(5))}


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_random_variant_draws_patches_and_chunk_orders_uniformly() -> None:
    n = 3000
    proj = _proj(n)
    rand = _selector(importance="uniform", rca=False)
    out = rand.select(proj=proj, replay=_replay(rand, 4), generator=_gen(0))
    # every video token is kept with probability K / L_V: chi-square over the 32 tokens (31 dof, the
    # 99.9 % quantile is 61.1), while the AVM importance of the same clips is far from uniform
    counts = torch.bincount(out.video_ids[:n].reshape(-1), minlength=L_V).float()
    assert _chi2(counts) < 61.1
    lpis = _selector(importance="avm", rca=False).select(proj=proj, replay=_replay(rand, 4), generator=_gen(0))
    assert _chi2(torch.bincount(lpis.video_ids[:n].reshape(-1), minlength=L_V).float()) > 200
    # audio: whole chunks (no exclusion), each of the 4 chunks kept by half of the rows, and every
    # chunk pair equally often (uniform visiting order)
    kept = torch.zeros(n, L_A, dtype=torch.bool).scatter_(1, out.audio_ids[:n], True).view(n, KC, C * F_A)
    assert bool((kept.all(-1) | ~kept.any(-1)).all())                 # chunks are kept whole
    chunk_kept = kept.all(-1)
    pair_id = (chunk_kept.int() * (2 ** torch.arange(KC))).sum(1)     # which 2 of the 4 chunks
    pairs = torch.bincount(pair_id, minlength=2 ** KC)[[3, 5, 6, 9, 10, 12]].float()
    assert int(pairs.sum()) == n and _chi2(pairs) < 20.5              # 5 dof, 99.9 %: 20.5
    # importance is uniform and nothing is excluded
    assert torch.equal(out.I_v, torch.full((n, L_V), 1 / L_V)) and float(out.C_v.abs().sum()) == 0.0


def test_rca_false_is_selection_without_exclusion() -> None:
    sel = _selector(importance="avm", rca=False)
    proj, replay = _proj(5), _replay(sel, 3)
    g = _gen(7)
    ref = torch.Generator().set_state(g.get_state())
    out = sel.select(proj=proj, replay=replay, generator=g)
    I_v, I_a = importance_from_projections(proj["q_a"], proj["k_a"], proj["q_v"], proj["k_v"], 0.4)
    all_I_v, all_I_a = torch.cat([I_v, replay["I_v"]]), torch.cat([I_a, replay["I_a"]])
    v = sample_video_ids(all_I_v, torch.zeros_like(all_I_v, dtype=torch.bool), K, ref)
    a = select_audio_chunks(all_I_a, torch.zeros_like(all_I_a, dtype=torch.bool), K, time_tokens=T_A,
                            freq_tokens=F_A, chunk=C, generator=ref)
    assert torch.equal(out.video_ids, v) and torch.equal(out.audio_ids, a)
    assert float(out.C_v.abs().sum() + out.C_a.abs().sum()) == 0.0   # stored C = 0
    assert torch.equal(ref.get_state(), g.get_state())                # no exclusion coin was drawn


def test_method_path_is_the_unchanged_step_composition() -> None:
    """importance="avm", rca=True (the default) draws exactly as steps 4-9 composed by hand."""
    sel = _selector()
    assert (sel.importance, sel.rca) == ("avm", True)
    proj, replay = _proj(5), _replay(sel, 3)
    g = _gen(11)
    ref = torch.Generator().set_state(g.get_state())
    out = sel.select(proj=proj, replay=replay, generator=g)
    I_v, I_a = importance_from_projections(proj["q_a"], proj["k_a"], proj["q_v"], proj["k_v"], 0.4)
    cv, ca = candidate_ids(I_v, K), candidate_ids(I_a, K)
    C_v = rca_probability(proj["k_v"], replay["qbar_a"], summary_queries(proj["q_a"], I_a, ca), cv)
    C_a = rca_probability(proj["k_a"], replay["qbar_v"], summary_queries(proj["q_v"], I_v, cv), ca)
    X_v = bernoulli_exclusion(torch.cat([C_v, replay["C_v"]]), ref)
    X_a = bernoulli_exclusion(torch.cat([C_a, replay["C_a"]]), ref)
    v = sample_video_ids(torch.cat([I_v, replay["I_v"]]), X_v, K, ref)
    a = select_audio_chunks(torch.cat([I_a, replay["I_a"]]), X_a, K, time_tokens=T_A, freq_tokens=F_A, chunk=C,
                            generator=ref)
    assert torch.equal(out.video_ids, v) and torch.equal(out.audio_ids, a)
    assert torch.equal(out.C_v, C_v) and torch.equal(out.C_a, C_a)


def test_rca_variant_uses_uniform_random_candidates() -> None:
    sel = _selector(importance="uniform", rca=True)
    n = 2000
    out = sel.select(proj=_proj(n), replay=_replay(sel, 4), generator=_gen(2))
    # C lives on the K candidates only, and the candidates are a uniform K-subset
    support = (out.C_v > 0)
    assert bool((support.sum(1) <= K).all()) and float(out.C_v.max()) > 0
    inside = torch.zeros_like(support).scatter_(1, out.cand_v, True)
    assert not bool((support & ~inside).any())
    assert _chi2(torch.bincount(out.cand_v.reshape(-1), minlength=L_V).float()) < 61.1
    first = sel.select(proj=_proj(n), generator=_gen(2))               # first step: random top-K
    assert first.first_step and _chi2(torch.bincount(first.video_ids.reshape(-1), minlength=L_V).float()) < 61.1


def test_bad_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="importance"):
        _selector(importance="random")
    from stella_avalanche.models.avm import AVMatching
    from stella_avalanche.training.plugins.stella import STELLAPlugin

    avm = AVMatching(dim=16, num_heads=2)
    with pytest.raises(ValueError, match="importance"):
        STELLAPlugin(avm=avm, importance="lpis")
    with pytest.raises(ValueError, match="refresh_replay_stats"):
        STELLAPlugin(avm=avm, rca=False, refresh_replay_stats=True)


def test_registry_builds_the_named_variants() -> None:
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import build_model
    from stella_avalanche.training import strategies as S

    assert S.MAIN_STRATEGIES == ("finetune", "er", "mir", "derpp", "gmed", "clser", "lump", "esmer", "stella",
                                 "stella_plus", "multitask")
    assert S.ABLATION_STRATEGIES == ("stella_random", "stella_lpis", "stella_rca")
    assert S.display_name("stella_plus") == "STELLA+" and S.get_spec("multitask").joint
    model = build_model("tiny")
    avm = build_avm(model)
    for name, flags in (("stella", ("avm", True)), ("stella_random", ("uniform", False)),
                        ("stella_lpis", ("avm", False)), ("stella_rca", ("uniform", True))):
        st = S.make_strategy(name, model=model, avm=avm, plugin_kwargs={"mem_size": 4}, seed=3, rank=1,
                             world_size=2)
        p = st.stella_plugin
        assert (p.importance, p.rca, p.plus) == (*flags, False)
        assert (st.rank, st.world_size) == (1, 2) and p.seed == 3 + S.RANK_SEED_STRIDE
    der = S.make_strategy("derpp", model=model, seed=5)
    assert der.plugins[0].seed == 5 and type(der.plugins[0]).__name__ == "DERPPPlugin"
    with pytest.raises(ValueError, match="fixes"):
        S.make_strategy("stella_random", model=model, avm=avm, plugin_kwargs={"rca": True})
    with pytest.raises(ValueError, match="unknown strategy"):
        S.make_strategy("stella_foo", model=model)
    with pytest.raises(ValueError, match="needs an AVM"):
        S.make_strategy("stella_lpis", model=model)
