"""Retrieval oracles from the synthetic generator's ground truth: how much room a benchmark leaves.

Two rankers that never look at pixels or samples, only at what the generator drew for each retrieval
clip, scored with the runs' protocol (pooled gallery, split into ``gallery_pools`` class-balanced
sub-pools by clip index, R@1/5/10 averaged into one figure like Avg 𝒜):

* **instance-only**: knows the per-clip cues both modalities share (which segments are on; with
  ``cue_bins`` > 0 also the pitch shift and the loudness, each cut into that many equal-width bins of
  its range, a stand-in for what a model resolves of a continuous cue), and nothing about classes. It
  is the best an initialisation can do that learned the generic audio-visual cues but no class.
* **class-aware**: knows the same cues and also each clip's class, as a model would that has learned
  every pairing of appearance and sound the stream offers.

A query ties with every gallery clip that has the same key; the true partner's rank is uniform over
the tie, so the expected R@K of a query with ``m`` tied clips is ``min(K, m) / m``. The oracles are
symmetric (A→V equals V→A). The gap between them is the headroom the stream can teach; the
instance-only figure is the zero-shot level a good initialisation can reach (docs/synthetic.md).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["instance_keys", "oracle_recall", "retrieval_oracles", "split_truths"]


def split_truths(preset: Any = "default", seed: int = 0, split: str = "retrieval") -> dict[str, Any]:
    """Ground truth of an on-disk split, rendered in memory without feature extraction.

    :returns: ``truth`` (N dicts), ``label`` (N,) class ids and ``index`` (N,) clip index within its
        class, in the generator's order (class by class).
    """
    from stella_avalanche.data.synthetic import build_vocabulary, clip_rng, clutter_pools, get_preset, render_clip

    p = get_preset(preset)
    vocab = build_vocabulary(p, seed)
    truths, labels, index = [], [], []
    for spec in vocab.classes:
        d_pool, s_pool = clutter_pools(vocab, spec)
        for i in range(p.per_class(split)):
            truths.append(render_clip(spec, clip_rng(seed, split, spec.class_id, i), p, d_pool, s_pool).truth)
            labels.append(spec.class_id)
            index.append(i)
    return {"truth": truths, "label": torch.tensor(labels), "index": torch.tensor(index)}


def _bins(values: np.ndarray, n: int) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if n <= 0 or hi - lo < 1e-9:
        return np.zeros(len(values), dtype=np.int64)
    return np.minimum(((values - lo) / (hi - lo) * n).astype(np.int64), n - 1)


def instance_keys(truths: Sequence[Mapping[str, Any]], *, cue_bins: int = 0) -> torch.Tensor:
    """(N,) integer key of each clip's instance cues: the on/off pattern, and with ``cue_bins`` > 0 the
    binned pitch shift and loudness (clips with equal keys are indistinguishable to the oracle)."""
    pattern = np.array([t["pattern"] for t in truths], dtype=np.int64)
    key = (pattern * (1 << np.arange(pattern.shape[1]))).sum(axis=1)
    if cue_bins > 0:
        for field in ("pitch_shift", "loudness"):
            key = key * cue_bins + _bins(np.array([float(t[field]) for t in truths]), cue_bins)
    return torch.from_numpy(key)


def oracle_recall(keys: torch.Tensor, pools: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected R@K (in %) of a ranker that ties each query with every clip of its pool sharing its key.

    :param keys: (N,) key per clip (queries and gallery are the same clips, as in the runs).
    :param pools: (N,) sub-pool per clip; a query only meets its own pool.
    :returns: ``R@K`` for each K and ``avg`` (their mean, the Avg 𝒜 of a model that never changes).
    """
    tied = ((keys[:, None] == keys[None, :]) & (pools[:, None] == pools[None, :])).sum(dim=1).double()
    out = {f"R@{k}": float((torch.clamp(tied, max=k) / tied).mean() * 100.0) for k in ks}
    out["avg"] = float(np.mean([out[f"R@{k}"] for k in ks]))
    return out


def retrieval_oracles(truths: Sequence[Mapping[str, Any]], labels: torch.Tensor, index: torch.Tensor, *,
                      gallery_pools: int = 4, cue_bins: int = 0, ks: Sequence[int] = (1, 5, 10)
                      ) -> dict[str, dict[str, float]]:
    """The instance-only and the class-aware oracle on one retrieval split (see the module docstring).

    :param gallery_pools: the runs' ``eval.gallery_pools`` (sub-pool of a clip = its index modulo P).
    :returns: ``{"instance_only": {...}, "class_aware": {...}}`` as :func:`oracle_recall` gives them,
        plus ``gallery`` (clips per sub-pool).
    """
    keys = instance_keys(truths, cue_bins=cue_bins)
    pools = index % gallery_pools
    n_classes = int(labels.max()) + 1
    return {"instance_only": oracle_recall(keys, pools, ks),
            "class_aware": oracle_recall(keys * n_classes + labels, pools, ks),
            "gallery": {"clips_per_pool": float(len(truths) / gallery_pools)}}
