"""Does STELLA's selection see what it selects? Measurements against the synthetic ground truth.

Everything here scores a backbone + AVM on clips whose answer is known (the generator's ground truth of
the retrieval split, never training clips), see ``docs/diagnostics.md``:

* **pair AUC** of the backbone: how often the cosine of a clip's own audio and video embeddings beats
  that of its audio with another clip's video, against same-class and other-class clips (0.5 = the
  backbone carries no audio-visual correspondence beyond class, 1.0 = every clip finds its partner);
* **AVM matching** accuracy and ROC AUC on matched vs deranged pairs (chance 0.5);
* **video localisation**: importance mass on the sounding object's patches divided by their share of
  the patches ("lift", 1 = blind), object-patch recall among the K_V candidates and in the final
  selection, map entropy relative to its maximum;
* **audio localisation**: lift on the time tokens where the object sounds, and their recall in the kept
  chunks;
* **RCA**: mean exclusion probability C when a clip is paired with a replayed clip of its visual twin
  class (the correlation STELLA should detect) and with an unrelated clip.

All functions are batched (no per-clip Python loops in the scoring) and take plain tensors, so the same
code runs on the cached initialisation (``experiments/diagnose_selection.py``) and inside every
STELLA run after each task.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from stella_avalanche.models.avm import avm_inputs
from stella_avalanche.utils import module_device

__all__ = [
    "pair_auc",
    "roc_auc",
    "truth_masks",
    "importance_lift",
    "recall_in",
    "embed_clips",
    "avm_projections",
    "avm_matching",
    "same_pattern_partners",
    "avm_class_auc",
    "selection_diagnostics",
    "oracle_pattern_retrieval",
    "twin_pairs",
    "visual_group",
    "public",
    "geometry_oracle",
    "diagnose",
    "run_diagnostics",
    "save_selection_pictures",
    "RunDiagnostics",
]


# ---------------------------------------------------------------------------------------------
# generic scores
# ---------------------------------------------------------------------------------------------
def roc_auc(pos: Tensor, neg: Tensor) -> float:
    """ROC AUC of scores ``pos`` (label 1) against ``neg`` (label 0), ties counted half.

    Computed from ranks (Mann-Whitney U), O(n log n).
    """
    pos, neg = pos.double().flatten(), neg.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return math.nan
    allv = torch.cat([pos, neg])
    order = torch.argsort(allv, stable=True)
    sorted_v = allv[order]
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def pair_auc(z_a: Tensor, z_v: Tensor, labels: Tensor) -> dict[str, float]:
    """Backbone pair AUC: own partner vs another clip's video, split by same / other class.

    :param z_a: (N, D) audio embeddings; ``z_v`` (N, D) video embeddings (any scale; cosine is used).
    :param labels: (N,) class ids.
    :returns: ``same_class`` and ``other_class`` AUC (probability that ``cos(a_i, v_i) > cos(a_i, v_j)``,
        ties half, averaged over all ordered pairs i != j of the kind) and ``all``.
    """
    a = torch.nn.functional.normalize(z_a.double(), dim=-1)
    v = torch.nn.functional.normalize(z_v.double(), dim=-1)
    sim = a @ v.t()                                             # (N, N) rows: audio queries
    own = sim.diagonal()[:, None]
    win = (own > sim).double() + 0.5 * (own == sim).double()   # (N, N)
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(labels.numel(), dtype=torch.bool)
    out = {}
    for name, m in (("same_class", same & off), ("other_class", ~same), ("all", off)):
        out[name] = float(win[m].mean()) if m.any() else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# ground truth in token space
# ---------------------------------------------------------------------------------------------
def truth_masks(truths: Sequence[Mapping[str, Any]], *, image_size: int, patch_size: int,
                frame_size: int, audio_time_tokens: int, audio_freq_tokens: int) -> dict[str, Tensor]:
    """Ground-truth token masks of a list of clips, in the backbone's token orders.

    :returns: ``video`` bool (N, L_V) True on the sounding object's patches (frame-major);
        ``audio`` bool (N, L_A) True on the time tokens inside a sounding segment (time-major, all
        frequency rows of that time); ``audio_time`` bool (N, T_a); ``pattern`` bool (N, S).
    """
    from stella_avalanche.data.synthetic import truth_patch_mask

    video = np.stack([truth_patch_mask(t, image_size=image_size, patch_size=patch_size, frame_size=frame_size)
                      .reshape(-1) for t in truths])
    pattern = np.array([t["pattern"] for t in truths], dtype=bool)              # (N, S)
    s = pattern.shape[1]
    # time token k covers fbank frames [k p, (k+1) p); segment of a token = its centre's segment
    centres = (np.arange(audio_time_tokens) + 0.5) / audio_time_tokens
    seg_of_token = np.minimum((centres * s).astype(int), s - 1)
    audio_time = pattern[:, seg_of_token]                                        # (N, T_a)
    audio = np.repeat(audio_time, audio_freq_tokens, axis=1)                     # time-major
    return {"video": torch.from_numpy(video), "audio": torch.from_numpy(audio),
            "audio_time": torch.from_numpy(audio_time), "pattern": torch.from_numpy(pattern)}


def importance_lift(I: Tensor, mask: Tensor) -> float:
    """Mean over clips of (importance mass on ``mask``) / (share of tokens in ``mask``).

    1.0 = the map ignores the ground truth; clips with an empty or full mask are skipped.

    :param I: (N, L) non-negative maps (rows need not sum to 1). :param mask: (N, L) bool.
    """
    I = I.double()
    share = mask.double().mean(dim=1)
    ok = (share > 0) & (share < 1)
    mass = (I * mask).sum(dim=1) / I.sum(dim=1).clamp_min(1e-30)
    return float((mass[ok] / share[ok]).mean()) if ok.any() else math.nan


def recall_in(ids: Tensor, mask: Tensor) -> float:
    """Fraction of ground-truth tokens that appear in ``ids``, pooled over clips.

    :param ids: (N, K) selected token ids. :param mask: (N, L) bool ground truth.
    """
    hit = torch.zeros_like(mask).scatter_(1, ids.long(), True) & mask
    total = mask.sum()
    return float(hit.sum() / total) if total > 0 else math.nan


def _entropy_ratio(I: Tensor) -> float:
    p = I.double() / I.double().sum(dim=1, keepdim=True).clamp_min(1e-30)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
    return float((h / math.log(I.shape[1])).mean())


# ---------------------------------------------------------------------------------------------
# model passes
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_clips(model: torch.nn.Module, video: Tensor, audio: Tensor, *, batch_size: int = 120
                ) -> tuple[Tensor, Tensor]:
    """Retrieval embeddings (``model.embed``) of clips, in batches. The clips may stay on the host:
    each batch goes to the model's device and the embeddings come back. :returns: z_a, z_v (N, D) on
    the host."""
    was = model.training
    model.eval()
    dev = module_device(model)
    za, zv = [], []
    for i in range(0, video.shape[0], batch_size):
        a, v = model.embed(video[i:i + batch_size].to(dev), audio[i:i + batch_size].to(dev))
        za.append(a.float().cpu())
        zv.append(v.float().cpu())
    model.train(was)
    return torch.cat(za), torch.cat(zv)


@torch.no_grad()
def _codes(model: torch.nn.Module, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
    U_a = model.encode_modality(model.patchify_audio(audio), None, "audio")
    U_v = model.encode_modality(model.patchify_video(video), None, "video")
    return U_a, U_v


@torch.no_grad()
def avm_projections(model: torch.nn.Module, avm: torch.nn.Module, video: Tensor, audio: Tensor, *,
                    video_partner: Optional[Tensor] = None, batch_size: int = 60) -> dict[str, Tensor]:
    """AVM projections and matching logits of clips (unmasked, the AVM inputs the plugin uses).

    :param video_partner: (N,) row of the video paired with each audio (default: its own video).
    :returns: ``q_a``, ``k_a`` (N, H, L_A, d), ``q_v``, ``k_v`` (N, H, L_V, d) and ``logit`` (N,), on
        the host (each batch runs on the model's device).
    """
    was_m, was_a = model.training, avm.training
    model.eval()
    avm.eval()
    dev, dev_avm = module_device(model), module_device(avm)
    n = video.shape[0]
    partner = torch.arange(n) if video_partner is None else video_partner
    out: dict[str, list[Tensor]] = {k: [] for k in ("q_a", "k_a", "q_v", "k_v", "logit")}
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        U_a, U_v = _codes(model, video[partner[sl]].to(dev), audio[sl].to(dev))
        E_a, E_v = avm_inputs(model, U_a, U_v)
        # the AVM may still sit on the host (a run's "init" entry is measured before the plugin
        # moves it), so its inputs go where its weights are
        E_a, E_v = E_a.to(dev_avm), E_v.to(dev_avm)
        p = avm.project(E_a, E_v)
        for k in ("q_a", "k_a", "q_v", "k_v"):
            out[k].append(p[k].float().cpu())
        out["logit"].append(avm(E_a, E_v).float().cpu())
    model.train(was_m)
    avm.train(was_a)
    return {k: torch.cat(v) for k, v in out.items()}


def _derangement(labels: Tensor, generator: torch.Generator) -> Tensor:
    """A partner for every row: a random other row (a single random cycle, never itself)."""
    n = labels.numel()
    perm = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.long)
    partner[perm] = perm.roll(-1)
    return partner


@torch.no_grad()
def avm_matching(model: torch.nn.Module, avm: torch.nn.Module, video: Tensor, audio: Tensor,
                 labels: Tensor, *, seed: int = 0) -> dict[str, float]:
    """AVM matching accuracy (threshold 0 on the logit) and ROC AUC, matched vs deranged pairs.

    Every clip contributes one matched pair (own audio and video) and one mismatched pair (its
    audio with the video of a random other clip), so chance is 0.5 for both numbers.
    """
    g = torch.Generator().manual_seed(seed)
    partner = _derangement(labels, g)
    pos = avm_projections(model, avm, video, audio)["logit"]
    neg = avm_projections(model, avm, video, audio, video_partner=partner)["logit"]
    same = (labels[partner] == labels).double()
    acc = 0.5 * (float((pos > 0).double().mean()) + float((neg <= 0).double().mean()))
    return {"avm_accuracy": acc, "avm_auc": roc_auc(pos, neg),
            "avm_logit_matched": float(pos.mean()), "avm_logit_mismatched": float(neg.mean()),
            "avm_mismatch_same_class_fraction": float(same.mean())}


def same_pattern_partners(labels: Tensor, patterns: Tensor, generator: torch.Generator
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """For each clip that has both, a random other clip with the same on/off pattern and the same class,
    and one with the same pattern and another class (vectorised: random scores, masked argmax).

    :param labels: (N,) class ids. :param patterns: (N, S) bool on/off pattern per segment.
    :returns: (rows, same_class_partner, other_class_partner), int64.
    """
    n = labels.numel()
    same_pat = (patterns[:, None, :] == patterns[None, :, :]).all(dim=-1)
    same_pat &= ~torch.eye(n, dtype=torch.bool)
    same_cls = labels[:, None] == labels[None, :]
    noise = torch.rand(n, n, generator=generator)

    def draw(mask: Tensor) -> tuple[Tensor, Tensor]:
        return mask.any(dim=1), torch.where(mask, noise, -1.0).argmax(dim=1)

    has_s, pick_s = draw(same_pat & same_cls)
    has_o, pick_o = draw(same_pat & ~same_cls)
    rows = torch.nonzero(has_s & has_o).flatten()
    return rows, pick_s[rows], pick_o[rows]


@torch.no_grad()
def avm_class_auc(model: torch.nn.Module, avm: torch.nn.Module, video: Tensor, audio: Tensor, labels: Tensor,
                  patterns: Tensor, *, seed: int = 0) -> dict[str, float]:
    """Does the AVM read the class? AUC of its logit on mismatched pairs that share the on/off pattern,
    same class (label 1) against another class (label 0): with the timing identical, only what the
    clips' classes share can raise the logit of the same-class pair (0.5: the AVM carries no class).

    :returns: ``avm_class_auc`` (NaN when no clip has both partners) and ``avm_class_pairs``.
    """
    rows, same, other = same_pattern_partners(labels, patterns, torch.Generator().manual_seed(seed + 7))
    if not rows.numel():
        return {"avm_class_auc": math.nan, "avm_class_pairs": 0}
    a = audio[rows]
    pos = avm_projections(model, avm, video[same], a)["logit"]
    neg = avm_projections(model, avm, video[other], a)["logit"]
    return {"avm_class_auc": roc_auc(pos, neg), "avm_class_pairs": int(rows.numel())}


# ---------------------------------------------------------------------------------------------
# localisation and RCA
# ---------------------------------------------------------------------------------------------
def twin_pairs(labels: Tensor, clip_index: Tensor, *, classes_per_task: int, twin_offset: int,
               num_tasks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of twin and unrelated partners for the RCA measurement.

    For each clip of a task ``t >= twin_offset`` (class ``c``), the *twin* is the clip with the same
    clip index of class ``c - twin_offset * classes_per_task`` (same visual identity, other sound); the
    *unrelated* partner is the same-index clip of a class from a task that is neither ``t`` nor its twin
    task (a different visual and sound).

    :returns: (rows, twin_rows, unrelated_rows), int64; empty when the layout has no twins.
    """
    lut = {(int(c), int(k)): i for i, (c, k) in enumerate(zip(labels.tolist(), clip_index.tolist()))}
    rows, twins, unrel = [], [], []
    k_cls = classes_per_task
    n_unique = num_tasks - twin_offset
    for i, (c, k) in enumerate(zip(labels.tolist(), clip_index.tolist())):
        t, j = divmod(int(c), k_cls)
        if twin_offset == 0 or t < num_tasks - twin_offset:  # only the last tasks reuse a look
            continue
        twin = lut.get((c - twin_offset * k_cls, k))
        u_task = (t - twin_offset + 1) % n_unique  # another visual group, never t's twin task
        unrelated = lut.get((u_task * k_cls + (j + 1) % k_cls, k))
        if twin is None or unrelated is None:
            continue
        rows.append(i)
        twins.append(twin)
        unrel.append(unrelated)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_t(rows), as_t(twins), as_t(unrel)


def visual_group(labels: Tensor, *, classes_per_task: int, twin_offset: int, num_tasks: int) -> Tensor:
    """(N,) id of each class's visual identity: a class of task ``t >= num_tasks - twin_offset`` reuses
    the look of class ``c - twin_offset * classes_per_task`` (its twin), every other class has its own."""
    if twin_offset == 0:
        return labels.clone()
    task = labels // classes_per_task
    return torch.where(task >= num_tasks - twin_offset, labels - twin_offset * classes_per_task, labels)


def _rca_twins(proj: Mapping[str, Tensor], qbar_a: Tensor, qbar_v: Tensor, cand_v: Tensor, cand_a: Tensor,
               pairs: tuple[Tensor, Tensor, Tensor]) -> dict[str, Any]:
    """Mean C over the candidates for clips paired (as the replayed item) with their visual twin and
    with an unrelated clip; empty when the layout has no twins."""
    from stella_avalanche.training.selection import rca_probability

    rows, twins, unrel = pairs
    if not rows.numel():
        return {}

    def pair_c(partners: Tensor) -> tuple[Tensor, Tensor]:
        """(P,) mean C over each pair's video candidates and over its audio candidates."""
        C_v = rca_probability(proj["k_v"][rows], qbar_a[partners], qbar_a[rows], cand_v[rows])
        C_a = rca_probability(proj["k_a"][rows], qbar_v[partners], qbar_v[rows], cand_a[rows])
        return C_v.sum(dim=1) / cand_v.shape[1], C_a.sum(dim=1) / cand_a.shape[1]

    tv, ta = pair_c(twins)
    uv, ua = pair_c(unrel)
    return {"rca_twin_c": float(0.5 * (tv.mean() + ta.mean())), "rca_unrelated_c": float(0.5 * (uv.mean() + ua.mean())),
            "rca_twin_c_video": float(tv.mean()), "rca_twin_c_audio": float(ta.mean()),
            "rca_unrelated_c_video": float(uv.mean()), "rca_unrelated_c_audio": float(ua.mean()),
            # can C tell a twin from an unrelated clip at all? (0.5: no, whatever its level)
            "rca_twin_auc": roc_auc(0.5 * (tv + ta), 0.5 * (uv + ua)),
            "rca_twin_auc_video": roc_auc(tv, uv), "rca_twin_auc_audio": roc_auc(ta, ua),
            "rca_pairs": int(rows.numel())}


@torch.no_grad()
def selection_diagnostics(model: torch.nn.Module, avm: torch.nn.Module, clips: Mapping[str, Any], *,
                          keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5, chunk: int = 4,
                          tau_att: float = 0.4, classes_per_task: int = 3, twin_offset: int = 4,
                          num_tasks: int = 8, seed: int = 0) -> dict[str, Any]:
    """All selection diagnostics of one backbone + AVM on ground-truth clips.

    :param clips: ``video`` (N, T, 3, S, S), ``audio`` (N, 1, A, F), ``label`` (N,), ``truth`` (N dicts)
        and optionally ``clip_index`` (N,) (default: running index within each class), e.g. the output
        of :func:`stella_avalanche.data.synthetic.render_split`.
    :returns: a flat dict of floats (keys documented in ``docs/diagnostics.md``).
    """
    from stella_avalanche.training.selection import (PatchSelector, candidate_ids, importance_from_projections,
                                                     summary_queries)

    cfg = model.config
    video, audio, labels = clips["video"], clips["audio"], clips["label"]
    if "clip_index" in clips:
        clip_index = clips["clip_index"]
    else:  # running index within each class, in row order
        seen: dict[int, int] = {}
        idx = []
        for c in labels.tolist():
            idx.append(seen.get(c, 0))
            seen[c] = idx[-1] + 1
        clip_index = torch.tensor(idx)
    gt = truth_masks(clips["truth"], image_size=int(clips.get("image_size", cfg.img_size)),
                     patch_size=cfg.patch_size, frame_size=cfg.img_size,
                     audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens)
    out: dict[str, Any] = {}
    za, zv = embed_clips(model, video, audio)
    pa = pair_auc(za, zv, labels)
    out["init_pair_auc_same_class"] = pa["same_class"]
    out["init_pair_auc_other_class"] = pa["other_class"]
    out.update(avm_matching(model, avm, video, audio, labels, seed=seed))

    proj = avm_projections(model, avm, video, audio)
    I_v, I_a = importance_from_projections(proj["q_a"], proj["k_a"], proj["q_v"], proj["k_v"], tau_att)
    selector = PatchSelector(keep_ratio_video=keep_ratio_video, keep_ratio_audio=keep_ratio_audio, chunk=chunk,
                             tau=tau_att, video_tokens=cfg.num_video_tokens,
                             audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens)
    cand_v = candidate_ids(I_v, selector.keep_video)
    cand_a = candidate_ids(I_a, selector.keep_audio)
    # the final selection as in a training step after the first: exclusion against a replayed clip
    # (a random other clip) and probabilistic sampling
    g = torch.Generator().manual_seed(seed + 1)
    partner = _derangement(labels, g)
    qbar_a = summary_queries(proj["q_a"], I_a, cand_a)
    qbar_v = summary_queries(proj["q_v"], I_v, cand_v)
    sel = selector.select(proj={k: proj[k] for k in ("q_a", "k_a", "q_v", "k_v")},
                          replay={"qbar_a": qbar_a[partner], "qbar_v": qbar_v[partner]},
                          select_replay=False, generator=g)
    # the same selection where RCA has nothing to exclude: the replayed clip is never a visual twin
    vis = visual_group(labels, classes_per_task=classes_per_task, twin_offset=twin_offset, num_tasks=num_tasks)
    other_look = (vis[:, None] != vis[None, :])
    far = torch.where(other_look, torch.rand(other_look.shape, generator=g), -1.0).argmax(dim=1)
    sel_far = selector.select(proj={k: proj[k] for k in ("q_a", "k_a", "q_v", "k_v")},
                              replay={"qbar_a": qbar_a[far], "qbar_v": qbar_v[far]},
                              select_replay=False, generator=g)
    out["video_object_recall_selected_no_twin"] = recall_in(sel_far.video_ids, gt["video"])
    out["audio_sounding_recall_kept_no_twin"] = recall_in(sel_far.audio_ids, gt["audio"])
    # the same draw without RCA's exclusion (C = 0): what the importance sampling alone keeps, so that
    # the cost of an exclusion coin near 0.5 on every candidate can be read off against the above
    no_rca = PatchSelector(keep_ratio_video=keep_ratio_video, keep_ratio_audio=keep_ratio_audio, chunk=chunk,
                           tau=tau_att, video_tokens=cfg.num_video_tokens, audio_time_tokens=cfg.audio_time_tokens,
                           audio_freq_tokens=cfg.audio_freq_tokens, rca=False)
    sel_no_rca = no_rca.select(proj={k: proj[k] for k in ("q_a", "k_a", "q_v", "k_v")},
                               replay={"qbar_a": qbar_a[far], "qbar_v": qbar_v[far]},
                               select_replay=False, generator=g)
    out["video_object_recall_selected_no_rca"] = recall_in(sel_no_rca.video_ids, gt["video"])
    out["audio_sounding_recall_kept_no_rca"] = recall_in(sel_no_rca.audio_ids, gt["audio"])
    out["video_object_lift"] = importance_lift(I_v, gt["video"])
    out["video_object_recall_candidates"] = recall_in(cand_v, gt["video"])
    out["video_object_recall_selected"] = recall_in(sel.video_ids, gt["video"])
    out["video_entropy_ratio"] = _entropy_ratio(I_v)
    out["audio_sounding_lift"] = importance_lift(I_a, gt["audio"])
    out["audio_sounding_recall_candidates"] = recall_in(cand_a, gt["audio"])
    out["audio_sounding_recall_kept"] = recall_in(sel.audio_ids, gt["audio"])
    out["audio_entropy_ratio"] = _entropy_ratio(I_a)
    # share of the sounding tokens a random chunk selection keeps, for reference
    out["audio_sounding_share"] = float(gt["audio"].double().mean())
    out["video_object_share"] = float(gt["video"].double().mean())

    out.update(avm_class_auc(model, avm, video, audio, labels, gt["pattern"], seed=seed))
    out.update(_rca_twins(proj, qbar_a, qbar_v, cand_v, cand_a,
                          twin_pairs(labels, clip_index, classes_per_task=classes_per_task,
                                     twin_offset=twin_offset, num_tasks=num_tasks)))
    out["num_clips"] = int(labels.numel())
    # maps for the pictures (not JSON): the caller drops keys starting with "_"
    out["_maps"] = {"I_v": I_v, "I_a": I_a, "video_ids": sel.video_ids, "audio_ids": sel.audio_ids,
                    "gt_video": gt["video"], "gt_audio": gt["audio"]}
    return out


# ---------------------------------------------------------------------------------------------
# benchmark geometry: what a perfect selector keeps
# ---------------------------------------------------------------------------------------------
def oracle_pattern_retrieval(truths: Sequence[Mapping[str, Any]], *, audio_time_tokens: int, audio_freq_tokens: int,
                             chunk: int, keep_ratio_audio: float = 0.5, video_tokens: int,
                             keep_ratio_video: float = 0.5, image_size: int, patch_size: int,
                             frame_size: int) -> dict[str, float]:
    """Does the on/off pattern (the instance cue both modalities share) survive a perfect selection?

    A perfect selector keeps, at the given keep ratios, the object's patches first and the sounding
    audio chunks first (whole chunks on the plugin's chunk grid). From the kept audio tokens the
    sounding state of each kept time token is known; a dropped token is known to be silent only when
    some kept chunk is silent (a perfect selector would have kept a sounding chunk before it). The
    video pattern is known wherever the object's patches fit the video budget. An audio query is then
    matched to every gallery video whose pattern agrees with all it knows.

    :returns: ``identified`` (fraction of clips whose kept audio determines the pattern among the
        gallery's patterns), ``r1_kept`` (expected A->V R@1 by pattern alone from the kept tokens,
        ties broken at random), ``r1_full`` (the same from full clips), and ``sounding_chunks_dropped``
        (fraction of clips that lose a sounding chunk).
    """
    from stella_avalanche.training.selection import keep_count

    gt = truth_masks(truths, image_size=image_size, patch_size=patch_size, frame_size=frame_size,
                     audio_time_tokens=audio_time_tokens, audio_freq_tokens=audio_freq_tokens)
    n = len(truths)
    t_on = gt["audio_time"]                                           # (N, T_a) bool
    kc = audio_time_tokens // chunk
    chunk_on = t_on.view(n, kc, chunk).any(dim=-1)                    # (N, Kc)
    k_a = keep_count(audio_time_tokens * audio_freq_tokens, keep_ratio_audio)
    n_chunks = k_a // (chunk * audio_freq_tokens)
    # sounding chunks first, then by position (stable): the first n_chunks are kept
    order = torch.argsort((~chunk_on).int(), dim=1, stable=True)
    kept_chunk = torch.zeros_like(chunk_on).scatter_(1, order[:, :n_chunks], True)
    any_silent_kept = (kept_chunk & ~chunk_on).any(dim=1)            # dropped chunks are then silent
    known_tok = kept_chunk.repeat_interleave(chunk, dim=1) | any_silent_kept[:, None]
    # video: all object patches kept when they fit; otherwise visible frames with kept patches are known
    k_v = keep_count(video_tokens, keep_ratio_video)
    fits = gt["video"].sum(dim=1) <= k_v
    pattern = gt["pattern"]                                           # (N, S)
    s = pattern.shape[1]
    seg_of_token = torch.minimum(((torch.arange(audio_time_tokens) + 0.5) / audio_time_tokens * s).long(),
                                 torch.tensor(s - 1))
    vid_tok = pattern[:, seg_of_token]                                # (N, T_a) each gallery video's state
    # consistent[i, j]: every token query i knows agrees with video j's state
    disagree = (t_on[:, None, :] != vid_tok[None, :, :]) & known_tok[:, None, :]
    consistent = ~disagree.any(dim=-1) & fits[None, :]
    consistent |= torch.eye(n, dtype=torch.bool)
    same_pattern = (pattern[:, None, :] == pattern[None, :, :]).all(dim=-1)
    identified = (~consistent | same_pattern).all(dim=1)
    full = same_pattern
    return {"identified": float(identified.double().mean()),
            "r1_kept": float((1.0 / consistent.sum(dim=1).double()).mean()),
            "r1_full": float((1.0 / full.sum(dim=1).double()).mean()),
            "sounding_chunks_dropped": float((chunk_on & ~kept_chunk).any(dim=1).double().mean()),
            "num_clips": n}


# ---------------------------------------------------------------------------------------------
# running it: models, clips, pictures
# ---------------------------------------------------------------------------------------------
def public(result: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a diagnostics dict (drops the maps kept for pictures)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def geometry_oracle(truths: Sequence[Mapping[str, Any]], config: Any, *, chunk: int = 4,
                    keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5, image_size: int = 64
                    ) -> dict[str, float]:
    """:func:`oracle_pattern_retrieval` at the given keep ratios, with the full-clip reference."""
    kw = dict(audio_time_tokens=config.audio_time_tokens, audio_freq_tokens=config.audio_freq_tokens, chunk=chunk,
              video_tokens=config.num_video_tokens, image_size=image_size, patch_size=config.patch_size,
              frame_size=config.img_size)
    kept = oracle_pattern_retrieval(truths, keep_ratio_audio=keep_ratio_audio, keep_ratio_video=keep_ratio_video, **kw)
    return {"oracle_pattern_identified": kept["identified"], "oracle_r1_kept": kept["r1_kept"],
            "oracle_r1_full": kept["r1_full"], "oracle_sounding_chunks_dropped": kept["sounding_chunks_dropped"]}


def diagnose(model: torch.nn.Module, avm: torch.nn.Module, clips: Mapping[str, Any], *, preset: Any,
             chunk: int = 4, keep_ratio_video: float = 0.5, keep_ratio_audio: float = 0.5, tau_att: float = 0.4,
             seed: int = 0) -> dict[str, Any]:
    """:func:`selection_diagnostics` with the layout of a synthetic preset, plus the geometry oracle."""
    from stella_avalanche.data.synthetic import get_preset

    p = get_preset(preset)
    res = selection_diagnostics(model, avm, {**clips, "image_size": p.image_size},
                                keep_ratio_video=keep_ratio_video, keep_ratio_audio=keep_ratio_audio, chunk=chunk,
                                tau_att=tau_att, classes_per_task=p.classes_per_task, twin_offset=p.twin_offset,
                                num_tasks=p.num_tasks, seed=seed)
    res.update(geometry_oracle(clips["truth"], model.config, chunk=chunk, keep_ratio_video=keep_ratio_video,
                               keep_ratio_audio=keep_ratio_audio, image_size=p.image_size))
    return res


def run_diagnostics(model: torch.nn.Module, avm: torch.nn.Module, *, preset: str = "default", data_seed: int = 0,
                    per_class: Optional[int] = None, out_dir: Optional[str] = None, clips: Optional[Mapping] = None,
                    **kwargs: Any) -> dict[str, Any]:
    """Render the retrieval split, run :func:`diagnose`, and optionally write JSON and pictures."""
    from stella_avalanche.data.synthetic import render_split

    if clips is None:
        clips = render_split(preset, data_seed, "retrieval", per_class=per_class)
    res = diagnose(model, avm, clips, preset=preset, **kwargs)
    out = public(res)
    if out_dir:
        from pathlib import Path

        from stella_avalanche.utils import atomic_write_json

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "diagnostics.json", out)
        save_selection_pictures(clips, res["_maps"], d, config=model.config, chunk=kwargs.get("chunk", 4))
    return out


def _draw_frames(axes: Any, clips: Mapping[str, Any], maps: Mapping[str, Tensor], r: int, config: Any) -> None:
    """Frames of clip ``r`` with the video importance heat map, the selected patches (cyan) and the
    object's patches (dashed green)."""
    from matplotlib.patches import Rectangle

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    g, p, T = config.grid, config.patch_size, config.num_frames
    I_v = maps["I_v"][r].view(T, g, g)
    sel = torch.zeros(T * g * g, dtype=torch.bool)
    sel[maps["video_ids"][r]] = True
    sel = sel.view(T, g, g)
    gt_v = maps["gt_video"][r].view(T, g, g)
    vmax = float(I_v.max())
    for t in range(T):
        ax = axes[t]
        ax.imshow((clips["video"][r, t] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        ax.imshow(I_v[t].numpy(), cmap="inferno", alpha=0.55, vmin=0, vmax=vmax, extent=(0, g * p, g * p, 0),
                  interpolation="nearest")
        for i, j in sel[t].nonzero().tolist():
            ax.add_patch(Rectangle((j * p, i * p), p, p, fill=False, ec="cyan", lw=1.2))
        for i, j in gt_v[t].nonzero().tolist():
            ax.add_patch(Rectangle((j * p + 2, i * p + 2), p - 4, p - 4, fill=False, ec="lime", lw=1.0, ls="--"))
        ax.set_title(f"frame {t}" + (" (sounding)" if clips["truth"][r]["pattern"][t] else ""), fontsize=8)
        ax.axis("off")


def _draw_spectrogram(ax: Any, clips: Mapping[str, Any], maps: Mapping[str, Tensor], r: int, config: Any,
                      chunk: int) -> None:
    """Fbank of clip ``r``: kept time tokens shaded, sounding tokens marked, chunk grid, importance curve."""
    ta, fa = config.audio_time_tokens, config.audio_freq_tokens
    spec = clips["audio"][r, 0].t().numpy()   # (F, A)
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma")
    tok_w = spec.shape[1] / ta
    kept = torch.zeros(ta * fa, dtype=torch.bool)
    kept[maps["audio_ids"][r]] = True
    for k in kept.view(ta, fa).any(dim=1).nonzero().flatten().tolist():
        ax.axvspan(k * tok_w, (k + 1) * tok_w, color="cyan", alpha=0.18, lw=0)
    for k in maps["gt_audio"][r].view(ta, fa)[:, 0].nonzero().flatten().tolist():
        ax.plot([k * tok_w, (k + 1) * tok_w], [spec.shape[0] - 1.5] * 2, color="lime", lw=4)
    for c in range(0, ta + 1, chunk):
        ax.axvline(c * tok_w, color="white", lw=0.6, ls=":")
    ax2 = ax.twinx()
    ax2.plot((torch.arange(ta) + 0.5).numpy() * tok_w, maps["I_a"][r].view(ta, fa).sum(dim=1).numpy(),
             color="yellow", lw=1.5)
    ax2.set_ylabel("audio importance per time token", fontsize=7)
    ax.set_title("fbank: kept tokens shaded, sounding segments marked (green), chunk grid dotted", fontsize=8)
    ax.set_xlabel("fbank frame")


def save_selection_pictures(clips: Mapping[str, Any], maps: Mapping[str, Tensor], out_dir: Any, *, config: Any,
                            chunk: int = 4, rows: Sequence[int] = (0, 1, 2, 3), name: str = "selection") -> list[Any]:
    """One picture per clip: the frames with the video importance heat map and the selected patches
    outlined (object patches of the ground truth in green), and the spectrogram with the audio
    importance per time token, the kept chunks shaded and the sounding segments marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    from stella_avalanche.utils import atomic_write

    T = config.num_frames
    paths = []
    for r in rows:
        if r >= clips["video"].shape[0]:
            break
        fig, axes = plt.subplots(2, T, figsize=(2.2 * T, 4.6), gridspec_kw={"height_ratios": [1, 0.9]})
        _draw_frames(axes[0], clips, maps, r, config)
        for ax in axes[1]:
            ax.remove()
        _draw_spectrogram(fig.add_subplot(2, 1, 2), clips, maps, r, config, chunk)
        fig.tight_layout()
        path = Path(out_dir) / f"{name}_clip{r}.png"
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


class RunDiagnostics:
    """Selection diagnostics inside a STELLA / STELLA+ run on the synthetic benchmark.

    Measured once before the stream (the stage-1 backbone with the stage-2 AVM, ``after: "init"``) and
    after every task; :attr:`entries` goes into results.json as ``diagnostics``. The first entry warns
    loudly when the AVM matches at chance (``avm_at_chance``).

    :param preset: the synthetic preset of the benchmark. :param data_seed: its data seed.
    :param per_class: retrieval clips per class scored (fewer than the split is faster).
    :param plugin_params: the STELLA plugin's parameters (keep ratios, chunk, tau_att).
    :param chance_margin: accuracy below ``0.5 + chance_margin`` counts as chance.
    """

    def __init__(self, *, preset: str, data_seed: int, per_class: int = 5,
                 plugin_params: Optional[Mapping[str, Any]] = None, chance_margin: float = 0.1) -> None:
        from stella_avalanche.data.synthetic import render_split

        self.preset = preset
        self.clips = render_split(preset, data_seed, "retrieval", per_class=per_class)
        params = dict(plugin_params or {})
        self.kwargs = {k: params[k] for k in ("keep_ratio_video", "keep_ratio_audio", "chunk", "tau_att")
                       if k in params}
        self.chance_margin = chance_margin
        self.entries: list[dict[str, Any]] = []

    def measure(self, model: torch.nn.Module, avm: torch.nn.Module, after: str) -> dict[str, Any]:
        """Diagnose ``model`` + ``avm`` now and append the entry (``after``: "init" or a task name)."""
        import logging

        res = public(diagnose(model, avm, self.clips, preset=self.preset, **self.kwargs))
        res = {"after": after, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}}
        res["avm_at_chance"] = bool(res["avm_accuracy"] < 0.5 + self.chance_margin)
        if after == "init" and res["avm_at_chance"]:
            logging.getLogger("stella_avalanche").warning(
                "THE AVM MATCHES AT CHANCE (held-out accuracy %.3f, AUC %.3f): STELLA's patch importance "
                "carries no audio-visual correspondence in this run (docs/diagnostics.md)",
                res["avm_accuracy"], res["avm_auc"])
        self.entries.append(res)
        return res

    def state_dict(self) -> dict[str, Any]:
        return {"entries": list(self.entries)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.entries = list(state.get("entries", []))
