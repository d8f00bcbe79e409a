"""Analytic cost of one training step: model FLOPs and saved-activation bytes per strategy.

Counts what the *method* needs, from the backbone config, the batch and the keep ratios, so that
measured step ratios (``benchmarks/perf/step.py``) can be read against the ratio the method allows.

FLOPs are matrix-multiply FLOPs (2 per multiply-add) of every ``Linear``, attention score /
value product, the InfoNCE logits and the STELLA selection's einsums; element-wise work
(LayerNorm, softmax, GELU, losses, gathers) is ignored, as in MFU accounting. The backward pass
costs twice the forward for every product whose input needs a gradient and once (weight gradient
only) for the patch embeddings, whose inputs are data; attention backward is counted without
recomputation (model FLOPs, as ``torch.utils.flop_counter`` counts the math SDPA backend).
``tests/test_cost_model.py`` checks the totals against ``FlopCounterMode`` on the tiny model.

Per-step structure modelled (``stella_avalanche/training/plugins/stella.py`` and
``replay_base.py``):

- ``finetune``: one pre-training forward / backward on the N current clips (random masking over
  all L tokens, ``floor(L (1 - rho))`` encoder-visible, the rest decoded);
- ``derpp``: the same on R = N + M rows (M replayed clips), plus an MSE on the pooled z (no FLOPs);
- ``stella`` / ``stella_plus``: a no-grad full-clip pass on the N current clips (both encoders over
  all L tokens, the joint fusion pass, the AVM projections), the AVM's matching loss (one more
  joint fusion pass for the ceil(N/2) negatives, AVM forward and backward), the importance maps
  and RCA einsums, then the pre-training forward / backward on R = N + M rows whose candidates are
  only the K = floor(L kappa) kept tokens (same visible count, K - visible decoded targets).
  STELLA+ does the same arithmetic (its replay rows arrive as stored patches).

Saved activations: the bytes autograd keeps between forward and backward, counted per token and
block from what this repository's blocks save (``models/cav.py``: pre-LN ViT block with fused
SDPA). It is an estimate (allocator rounding, autocast copies and the optimizer are not included);
``tests/test_cost_model.py`` compares it with the bytes ``torch.autograd.graph.saved_tensors_hooks``
sees in fp32 on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from stella_avalanche.models.cav import CAVConfig, num_visible
from stella_avalanche.training.selection import keep_count

__all__ = ["StepCost", "block_flops", "pretrain_flops", "stella_prepass_flops", "step_cost",
           "block_saved_elements", "pretrain_saved_bytes", "COST_STRATEGIES"]

#: strategies the model covers (ER has DER++'s arithmetic without the z penalty)
COST_STRATEGIES = ("finetune", "er", "derpp", "stella", "stella_plus")


def block_flops(tokens: int, dim: int, hidden: int, *, kv_tokens: Optional[int] = None) -> int:
    """Forward matmul FLOPs of one pre-LN ViT block on one sample.

    ``qkv`` (6 L D²) + scores and values (4 L L' D) + ``proj`` (2 L D²) + MLP (4 L D H).

    :param tokens: L, tokens in the block.
    :param dim: D, width. :param hidden: H, MLP hidden width.
    :param kv_tokens: L' (default L).
    """
    lk = tokens if kv_tokens is None else kv_tokens
    return 8 * tokens * dim * dim + 4 * tokens * lk * dim + 4 * tokens * dim * hidden


def _hidden(cfg: CAVConfig, dim: int) -> int:
    return int(dim * cfg.mlp_ratio)


@dataclass(frozen=True)
class StepCost:
    """FLOPs and saved-activation bytes of one training step.

    :param strategy: the strategy name.
    :param current: N, current rows. :param replay: M, replayed rows.
    :param forward: FLOPs of the graph-building work (pre-training forward, AVM forward).
    :param backward: FLOPs of the backward pass.
    :param no_grad: FLOPs of work without a graph (STELLA's full-clip pass, fusion of the VAM
        negatives, importance and RCA).
    :param saved_bytes: activation bytes autograd holds at the start of the backward.
    :param parts: FLOPs per named part (sums to ``total``).
    """

    strategy: str
    current: int
    replay: int
    forward: int
    backward: int
    no_grad: int
    saved_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All FLOPs of the step."""
        return self.forward + self.backward + self.no_grad

    @property
    def per_sample(self) -> float:
        """FLOPs per *current* sample (what samples/s counts)."""
        return self.total / max(1, self.current)


def _tokens(cfg: CAVConfig, keep_audio: Optional[int], keep_video: Optional[int], mask_ratio: float
            ) -> tuple[int, int, int, int]:
    """(K_a, K_v, n_a, n_v): candidates and encoder-visible tokens per modality."""
    ka = cfg.num_audio_tokens if keep_audio is None else keep_audio
    kv = cfg.num_video_tokens if keep_video is None else keep_video
    return ka, kv, num_visible(cfg.num_audio_tokens, mask_ratio), num_visible(cfg.num_video_tokens, mask_ratio)


def pretrain_flops(cfg: CAVConfig, rows: int, *, keep_audio: Optional[int] = None,
                   keep_video: Optional[int] = None, mask_ratio: Optional[float] = None) -> dict[str, int]:
    """Forward and backward FLOPs of ``CAVMAE.pretrain_forward`` on ``rows`` samples.

    :param keep_audio: K_A candidate tokens (``None`` = all L_A, random masking); ``keep_video`` likewise.
    :returns: ``{"forward", "backward", "encoder", "fusion", "decoder", "nce"}`` (the last four are
        forward FLOPs).
    """
    rho = cfg.mask_ratio if mask_ratio is None else mask_ratio
    ka, kv, na, nv = _tokens(cfg, keep_audio, keep_video, rho)
    d, dd = cfg.embed_dim, cfg.decoder_dim
    h, hd = _hidden(cfg, d), _hidden(cfg, dd)
    patch = 2 * d * (na * cfg.audio_patch_dim + nv * cfg.video_patch_dim)
    enc = cfg.depth_modality * (block_flops(na, d, h) + block_flops(nv, d, h))
    # joint pass over [audio ; video] plus the two unimodal passes that feed the InfoNCE
    fus = cfg.depth_fusion * (block_flops(na + nv, d, h) + block_flops(na, d, h) + block_flops(nv, d, h))
    dec = (2 * (na + nv) * d * dd  # decoder_embed
           + cfg.decoder_depth * (block_flops(ka, dd, hd) + block_flops(kv, dd, hd))
           + 2 * dd * ((ka - na) * cfg.audio_patch_dim + (kv - nv) * cfg.video_patch_dim))  # heads
    per_row = enc + fus + dec
    nce = 2 * rows * rows * d  # one (R, D) x (D, R) logits product, read in both directions
    fwd = rows * (patch + per_row) + nce
    # patch embedding: weight gradient only (its input is data); everything else twice the forward
    bwd = rows * (patch + 2 * per_row) + 2 * nce
    return {"forward": fwd, "backward": bwd, "encoder": rows * (patch + enc), "fusion": rows * fus,
            "decoder": rows * dec, "nce": nce}


def stella_prepass_flops(cfg: CAVConfig, current: int, *, replay: int, keep_audio: int, keep_video: int,
                         avm_heads: Optional[int] = None) -> dict[str, int]:
    """FLOPs of STELLA's plugin work before the main forward (``STELLAPlugin.before_forward``).

    :param current: N current clips (the full-clip pass runs on these only).
    :param replay: M replayed items (RCA runs only when M > 0).
    :param keep_audio: K_A (the candidate count of the importance top-K); ``keep_video`` K_V.
    :param avm_heads: AVM heads (only splits the same FLOPs; kept for clarity).
    :returns: ``{"full_clip_pass", "avm_project", "vam_negatives", "vam_forward", "vam_backward",
        "importance", "rca", "no_grad", "forward", "backward"}``.
    """
    del avm_heads  # the FLOPs do not depend on the head split
    la, lv = cfg.num_audio_tokens, cfg.num_video_tokens
    d = cfg.embed_dim
    h = _hidden(cfg, d)
    n = current
    patch = 2 * d * (la * cfg.audio_patch_dim + lv * cfg.video_patch_dim)
    enc = cfg.depth_modality * (block_flops(la, d, h) + block_flops(lv, d, h))
    joint = cfg.depth_fusion * block_flops(la + lv, d, h)
    full = n * (patch + enc + joint)
    project = 2 * 3 * d * d * (la + lv)  # q, k, v of each modality (no bias)
    n_neg = n - n // 2 if n > 2 else 0  # avm.matching_pairs: floor(N/2) positives
    negatives = n_neg * joint
    # AVM forward with grad: projections again, two cross-attentions, the 2D -> 2D -> 1 head
    vam_fwd = n * (project + 8 * la * lv * d + 2 * (2 * d) * (2 * d) + 2 * 2 * d)
    importance = n * 4 * la * lv * d  # q_a k_v^T and q_v k_a^T over all heads
    summary = n * 2 * (la + lv) * d  # importance-weighted query means
    rca = n * 2 * (la + lv) * d if replay > 0 else 0
    no_grad = full + n * project + negatives + importance + summary + rca
    return {"full_clip_pass": full, "avm_project": n * project, "vam_negatives": negatives,
            "vam_forward": vam_fwd, "vam_backward": 2 * vam_fwd, "importance": importance + summary,
            "rca": rca, "no_grad": no_grad, "forward": vam_fwd, "backward": 2 * vam_fwd}


# ------------------------------------------------------------------------------------ activations
def block_saved_elements(tokens: int, dim: int, hidden: int, heads: int) -> int:
    """Elements one pre-LN ViT block (``models/cav.py``) saves for backward, per sample.

    Block input (LN1 and the residual), LN1 output (``qkv`` input), q/k/v (SDPA inputs), the SDPA
    output's log-sum-exp, the merged heads (``proj`` input; SDPA's output shares it),
    the residual sum (LN2 input), LN2 output (``fc1`` input), ``fc1`` output (GELU input) and the
    GELU output (``fc2`` input); LayerNorm's per-token mean and rstd.
    """
    return tokens * (8 * dim + 2 * hidden + heads + 4)


def pretrain_saved_bytes(cfg: CAVConfig, rows: int, *, keep_audio: Optional[int] = None,
                         keep_video: Optional[int] = None, mask_ratio: Optional[float] = None,
                         bytes_per_element: int = 2) -> int:
    """Saved-activation bytes of one ``pretrain_forward`` on ``rows`` samples.

    :param bytes_per_element: 2 under bf16/fp16 autocast, 4 in fp32.
    """
    rho = cfg.mask_ratio if mask_ratio is None else mask_ratio
    ka, kv, na, nv = _tokens(cfg, keep_audio, keep_video, rho)
    d, dd = cfg.embed_dim, cfg.decoder_dim
    h, hd = _hidden(cfg, d), _hidden(cfg, dd)
    hs, hds = cfg.num_heads, cfg.decoder_heads
    enc = cfg.depth_modality * (block_saved_elements(na, d, h, hs) + block_saved_elements(nv, d, h, hs))
    fus = cfg.depth_fusion * (block_saved_elements(na + nv, d, h, hs) + block_saved_elements(na, d, h, hs)
                              + block_saved_elements(nv, d, h, hs))
    dec = cfg.decoder_depth * (block_saved_elements(ka, dd, hd, hds) + block_saved_elements(kv, dd, hd, hds))
    # ``norm`` input and output (``decoder_embed`` input); ``decoder_norm`` keeps the whole last
    # decoder block output (it reads a slice of it) and its output (the prediction head's input);
    # the MSE keeps the prediction - target difference of the decoded tokens
    heads = (2 * (na + nv) * d + (ka + kv) * dd
             + ((ka - na) + (kv - nv)) * dd
             + ((ka - na) * cfg.audio_patch_dim + (kv - nv) * cfg.video_patch_dim))
    return rows * (enc + fus + dec + heads) * bytes_per_element


def step_cost(cfg: CAVConfig, strategy: str, *, batch: int, replay: Optional[int] = None,
              keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5,
              bytes_per_element: int = 2) -> StepCost:
    """Cost of one training step of ``strategy`` once the replay buffer holds at least M items.

    :param batch: N, current clips per step.
    :param replay: M, replayed items per step (default N for the replay strategies, 0 for finetune).
    :param keep_ratio_video: kappa_v (STELLA); ``keep_ratio_audio``: kappa_a.
    :param bytes_per_element: activation element size (2: bf16 autocast, 4: fp32).
    """
    s = strategy.lower()
    if s not in COST_STRATEGIES:
        raise ValueError(f"step_cost: no cost model for strategy {strategy!r}; choose one of {COST_STRATEGIES}")
    m = 0 if s == "finetune" else (batch if replay is None else int(replay))
    rows = batch + m
    if s in ("stella", "stella_plus"):
        kv = keep_count(cfg.num_video_tokens, keep_ratio_video)
        ka = keep_count(cfg.num_audio_tokens, keep_ratio_audio)
        main = pretrain_flops(cfg, rows, keep_audio=ka, keep_video=kv)
        pre = stella_prepass_flops(cfg, batch, replay=m, keep_audio=ka, keep_video=kv)
        saved = pretrain_saved_bytes(cfg, rows, keep_audio=ka, keep_video=kv,
                                     bytes_per_element=bytes_per_element)
        # the AVM's own graph over the N full clips (projections, cross-attention outputs)
        la, lv, d = cfg.num_audio_tokens, cfg.num_video_tokens, cfg.embed_dim
        saved += batch * (la + lv) * (2 * d + 3 * d + d + cfg.num_heads) * bytes_per_element
        parts = {"full_clip_pass": pre["full_clip_pass"], "avm_project": pre["avm_project"],
                 "vam_negatives": pre["vam_negatives"], "importance_rca": pre["importance"] + pre["rca"],
                 "vam_fwd_bwd": pre["forward"] + pre["backward"],
                 "main_forward": main["forward"], "main_backward": main["backward"]}
        return StepCost(s, batch, m, main["forward"] + pre["forward"], main["backward"] + pre["backward"],
                        pre["no_grad"], saved, parts)
    main = pretrain_flops(cfg, rows)
    saved = pretrain_saved_bytes(cfg, rows, bytes_per_element=bytes_per_element)
    return StepCost(s, batch, m, main["forward"], main["backward"], 0, saved,
                    {"main_forward": main["forward"], "main_backward": main["backward"]})
