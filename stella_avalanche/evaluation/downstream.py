"""Downstream evaluation of a (continually) pre-trained backbone, frozen throughout.

Four tasks, each usable on its own and bundled by :func:`run_downstream` (what ``run_stella.py
--downstream`` and ``experiments/downstream.py`` call); ``docs/downstream.md`` describes the protocol.

* **probe** - audio-visual classification by a linear probe: pooled audio, video and concatenated
  embeddings of the benchmark's train and test clips (evaluation transform), a scikit-learn logistic
  regression whose ``C`` is chosen on a held-out fifth of train, then refitted on all of train; top-1
  accuracy overall and per task (single-label) or one-vs-rest mAP (multi-label AudioSet).
* **transfer** - zero-shot A→V / V→A R@1/5/10 on clips outside the stream: the synthetic ``transfer``
  split (:mod:`stella_avalanche.data.synthetic.transfer`) or an MSR-VTT-style list
  (:mod:`stella_avalanche.benchmarks.msrvtt`).
* **localise** - sounding-object localisation: a small head (:class:`LocalisationHead`) on the frozen
  video patch tokens, conditioned on the clip's pooled audio embedding, is fitted on the masks of one
  split and scored on another as mIoU at patch and pixel level, next to the score of a mask prior
  (the per-position mask frequency of the fitting split: what a head that ignores the clip reaches).
* **gap** - the modality gap ``g[l, k]`` recorded after every task (``results["modality_gap"]``): its
  final value, the gap difference ``mean_{k<T} max_{l<T} (g[l,k] - g[T,k])`` and a figure, plus a PCA
  picture of one task's audio and video embeddings after the first and after the last task.

Percentages throughout (accuracy, mAP, recall, mIoU); the gap is a Euclidean distance.

Why one module of about 1,000 lines: the four tasks share the frozen-embedding extraction, the loaders
of the benchmark's clips and the one ``downstream`` block that :func:`run_downstream` writes, and they are
run and configured together (:class:`DownstreamConfig`); one module per task is the next split (left
whole by issue 26, which changed no number).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_avalanche.evaluation.plotting import new_figure, save_png
from stella_avalanche.utils import module_device

__all__ = ["DOWNSTREAM_TASKS", "DownstreamConfig", "GeometryMismatchError", "check_geometry",
           "check_state_geometry", "extract_embeddings", "extract_patch_tokens", "linear_probe",
           "transfer_retrieval", "LocalisationHead", "LocalisationSet", "fit_localisation_head",
           "score_localisation", "mean_iou", "gap_summary", "plot_gap", "plot_pca", "snapshot_embeddings",
           "run_downstream", "FIRST_TASK_EMBEDDINGS", "PICTURES", "downstream_enabled", "after_first_task",
           "at_end_of_stream", "localisation_set", "summary_lines", "patch_coverage", "pixel_score_of_patch_maps"]

log = logging.getLogger(__name__)

#: The task names, in the order :func:`run_downstream` runs them.
DOWNSTREAM_TASKS: tuple[str, ...] = ("probe", "transfer", "localise", "gap")
#: File (next to results.json) holding one task's retrieval embeddings after the first task.
FIRST_TASK_EMBEDDINGS = "downstream_first_task.pt"
#: Pictures written next to results.json.
PICTURES = {"gap": "downstream_gap.png", "pca": "downstream_pca.png"}


# =============================================================================================
# configuration and geometry
# =============================================================================================
@dataclass(frozen=True)
class DownstreamConfig:
    """Knobs of the downstream suite (``downstream.*`` keys of a run config).

    :param enabled: run the suite at the end of the stream (``run_stella.py``; default on for synthetic).
    :param tasks: which of :data:`DOWNSTREAM_TASKS` to run.
    :param batch_size: feature-extraction batch size.
    :param probe_cs: candidate inverse regularisation strengths of the logistic regression.
    :param probe_val_fraction: part of train held out to choose ``C``.
    :param probe_max_iter: lbfgs iterations per fit.
    :param probe_max_train_per_class: training clips per class the probe sees (a seeded subset; ``None``:
        all). 50 keeps the probe of the 4800-clip synthetic training set to 1200 clips (the feature
        extraction dominates the suite's CPU time) and is ample for a linear classifier of 24 classes.
    :param transfer_classes: synthetic transfer classes.
    :param transfer_per_class: synthetic transfer clips per class (retrieval and localisation scoring).
    :param localise_fit_per_class: synthetic clips per transfer class the localisation head is fitted on.
    :param localise_steps: Adam steps of the localisation head.
    :param localise_lr: its learning rate.
    :param localise_batch: frames per head step.
    :param msrvtt_json: MSR-VTT-style list for real-data transfer (None: transfer skipped on real data).
    :param msrvtt_root: base of its relative paths (default: the json's directory).
    :param avsbench_root: AVSBench-S4 root for real-data localisation (None: skipped on real data).
    :param avsbench_csv: its metadata csv (default ``<root>/s4_meta_data.csv``).
    :param avsbench_fit_split: split the head is fitted on.
    :param avsbench_eval_split: split it is scored on.
    :param avsbench_max_clips: cap on clips per split (None: all).
    :param pca_task: task whose embeddings the PCA picture shows.
    :param seed: seed of the probe's held-out split and of the head.
    """

    enabled: bool | None = None
    tasks: tuple[str, ...] = DOWNSTREAM_TASKS
    batch_size: int = 64
    probe_cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    probe_val_fraction: float = 0.2
    probe_max_iter: int = 300
    probe_max_train_per_class: int | None = 50
    transfer_classes: int = 12
    transfer_per_class: int = 10
    localise_fit_per_class: int = 10
    localise_steps: int = 300
    localise_lr: float = 1e-2
    localise_batch: int = 512
    msrvtt_json: str | None = None
    msrvtt_root: str | None = None
    avsbench_root: str | None = None
    avsbench_csv: str | None = None
    avsbench_fit_split: str = "train"
    avsbench_eval_split: str = "test"
    avsbench_max_clips: int | None = None
    pca_task: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in DOWNSTREAM_TASKS]
        if bad:
            raise ValueError(f"unknown downstream task(s) {bad}; choose from {list(DOWNSTREAM_TASKS)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DownstreamConfig":
        """From a config block; ``tasks`` may be a list or a comma-separated string. Unknown keys raise."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"downstream config: unknown key(s) {unknown}; known: {sorted(known)}")
        if isinstance(d.get("tasks"), str):
            d["tasks"] = tuple(t.strip() for t in d["tasks"].split(",") if t.strip())
        for k in ("tasks", "probe_cs"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


class GeometryMismatchError(ValueError):
    """A backbone whose input geometry differs from what the benchmark feeds it."""


def _geometry_text(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def check_geometry(model_cfg: Any, features: Any, *, model_name: str, benchmark_name: str) -> None:
    """Raise :class:`GeometryMismatchError` when ``model_cfg`` cannot take the benchmark's samples.

    :param model_cfg: a :class:`~stella_avalanche.models.cav.CAVConfig`.
    :param features: the benchmark's :class:`~stella_avalanche.data.features.FeatureConfig`.
    :param model_name: how to name the model in the message (a checkpoint path, a preset).
    :param benchmark_name: how to name the benchmark.
    """
    want = {"num_frames": features.num_frames, "img_size": features.frame_size,
            "audio_length": features.target_length, "mel_bins": features.mel_bins}
    have = {k: getattr(model_cfg, k) for k in want}
    if have != want:
        raise GeometryMismatchError(
            f"model config of {model_name} ({_geometry_text(have)}) does not match the input geometry of "
            f"benchmark {benchmark_name} ({_geometry_text(want)}); use a checkpoint trained on this "
            f"benchmark's preprocessing or the matching --model / --benchmark")


def check_state_geometry(state: Mapping[str, Tensor], model_cfg: Any, *, checkpoint: str,
                         benchmark_name: str) -> None:
    """Compare a state dict's token tables with the token counts the benchmark's geometry gives.

    :param state: backbone state dict (project parameter names: ``pos_embed_v``, ``pos_embed_a``).
    :param model_cfg: the config the benchmark's samples need (:func:`check_geometry` passed).
    :raises GeometryMismatchError: naming the checkpoint's and the benchmark's token counts and widths.
    """
    want = {"video_tokens": model_cfg.num_video_tokens, "audio_tokens": model_cfg.num_audio_tokens,
            "embed_dim": model_cfg.embed_dim}
    have: dict[str, Any] = {}
    if "pos_embed_v" in state:
        have["video_tokens"] = int(state["pos_embed_v"].shape[1])
        have["embed_dim"] = int(state["pos_embed_v"].shape[2])
    if "pos_embed_a" in state:
        have["audio_tokens"] = int(state["pos_embed_a"].shape[1])
    diff = {k for k in have if have[k] != want[k]}
    if diff:
        geo = {"num_frames": model_cfg.num_frames, "img_size": model_cfg.img_size,
               "patch_size": model_cfg.patch_size, "audio_length": model_cfg.audio_length,
               "mel_bins": model_cfg.mel_bins}
        raise GeometryMismatchError(
            f"checkpoint {checkpoint} ({_geometry_text(have)}) does not match benchmark {benchmark_name}, "
            f"whose input geometry ({_geometry_text(geo)}) needs {_geometry_text(want)}")


# =============================================================================================
# feature extraction
# =============================================================================================
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch on ``n`` intra-op threads (rendering many tiny clips is faster on one)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _collate(batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    from stella_avalanche.data.datasets import collate_av

    return collate_av(batch)


@torch.no_grad()
def extract_embeddings(model: nn.Module, dataset: Any, *, batch_size: int = 64, desc: str = "embedding",
                       progress: bool = True, collate_fn: Any = None) -> dict[str, Tensor]:
    """Pooled, L2-normalised retrieval embeddings of every clip of a dataset (frozen model).

    :param model: a :class:`~stella_avalanche.models.cav.CAVMAE` (its device is used).
    :param dataset: dict samples with ``video`` (T,3,S,S), ``audio`` (1,A,F), ``label``, ``category``.
    :returns: ``z_audio`` / ``z_video`` float32 (N, D) on CPU, ``label`` (N,) or (N, C), ``category`` (N,).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from stella_avalanche.utils import tqdm_options

    device = module_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or _collate)
    za, zv, lab, cat = [], [], [], []
    with _eval_mode(model):
        for batch in tqdm(loader, desc=desc, disable=not progress, **tqdm_options(), leave=False):
            with _autocast(device):
                a, v = model.embed(batch["video"].to(device), batch["audio"].to(device))
            za.append(a.float().cpu())
            zv.append(v.float().cpu())
            lab.append(batch["label"])
            cat.append(batch["category"])
    return {"z_audio": torch.cat(za), "z_video": torch.cat(zv), "label": torch.cat(lab),
            "category": torch.cat(cat)}


@torch.no_grad()
def extract_patch_tokens(model: nn.Module, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
    """Frozen localisation features of one batch.

    :param video: (B, T, 3, S, S); ``audio`` (B, 1, A, F).
    :returns: per-patch video latents (B, T, G*G, D) (unimodal fusion pass + final norm, token order
        ``t*G*G + r*G + c``) and the clip's pooled audio embedding (B, D), both L2-normalised float32.
    """
    cfg = model.config
    U_v = model.encode_modality(model.patchify_video(video), None, "video")
    lat = model.fuse_unimodal(U_v, None, "video", final_norm=True)
    b = lat.shape[0]
    tokens = F.normalize(lat.float(), dim=-1).reshape(b, cfg.num_frames, cfg.grid * cfg.grid, -1)
    z_a, _ = model.embed(None, audio)
    return tokens, z_a.float()


# =============================================================================================
# linear probe
# =============================================================================================
def _subsample_per_class(y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``cap`` rows per class (single-label), deterministic in ``seed``."""
    if cap is None or y.ndim != 1:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def _probe_model(c: float, *, multi: bool, max_iter: int) -> Any:
    """Unfitted standardise + logistic-regression pipeline (one-vs-rest when ``multi``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=c, max_iter=max_iter)
    return make_pipeline(StandardScaler(), OneVsRestClassifier(lr) if multi else lr)


def _probe_score(clf: Any, x: np.ndarray, y: np.ndarray, *, multi: bool) -> float:
    """Top-1 accuracy, or (``multi``) macro AP over the classes with a positive in ``y`` (NaN if none); percent."""
    if multi:
        from sklearn.metrics import average_precision_score

        cols = y.sum(0) > 0
        if not cols.any():
            return float("nan")
        p = clf.predict_proba(x)
        return 100.0 * float(average_precision_score(y[:, cols], p[:, cols], average="macro"))
    return 100.0 * float((clf.predict(x) == y).mean())


def _probe_holdout(train_y: np.ndarray, *, multi: bool, val_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of train; stratified by class when every class can be on both sides."""
    from sklearn.model_selection import train_test_split

    n = len(train_y)
    n_val = max(1, int(round(val_fraction * n)))
    strat = None
    if not multi:
        classes, counts = np.unique(train_y, return_counts=True)
        # a stratified hold-out needs one row of every class on both sides
        if counts.min() >= 2 and n - max(n_val, len(classes)) >= len(classes):
            strat, n_val = train_y, max(n_val, len(classes))
    return train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=strat)


def _probe_group_scores(clf: Any, test_x: np.ndarray, test_y: np.ndarray, test_groups: np.ndarray | None,
                        group_names: Sequence[str] | None, *, multi: bool) -> dict[str, float | None]:
    """Score per test group (name -> percent, None where the score is undefined); empty without groups."""
    per_task: dict[str, float | None] = {}
    if test_groups is not None:
        groups = np.asarray(test_groups)
        for g in np.unique(groups):
            name = group_names[int(g)] if group_names is not None else str(int(g))
            rows = groups == g
            s = _probe_score(clf, test_x[rows], test_y[rows], multi=multi)
            per_task[name] = None if math.isnan(s) else s
    return per_task


def _probe_chance(train_y: np.ndarray, test_y: np.ndarray, *, multi: bool) -> tuple[int, float]:
    """(number of classes, chance score in percent): 100 / C, or the positive rate for multi-label."""
    n_classes = int(train_y.shape[1]) if multi else int(len(np.unique(train_y)))
    if multi:
        chance = 100.0 * float(test_y[:, test_y.sum(0) > 0].mean()) if test_y.size else float("nan")
    else:
        chance = 100.0 / max(1, n_classes)
    return n_classes, chance


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 test_groups: np.ndarray | None = None, group_names: Sequence[str] | None = None,
                 cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 300) -> dict[str, Any]:
    """Logistic-regression probe with ``C`` chosen on a held-out part of train.

    Features are standardised with the training statistics. Single-label ``y`` (N,) int: multinomial
    regression, scored by top-1 accuracy; multi-label ``y`` (N, C) 0/1: one-vs-rest, scored by the
    mean over classes (with a positive in the scored rows) of the average precision.

    :param train_x: (N, D) features; ``test_x`` (M, D).
    :param test_groups: (M,) group (task) id of every test row, for per-group scores.
    :param group_names: names of the group ids.
    :returns: ``{"metric": "top1"|"mAP", "score", "per_task", "C", "val_score", "chance", "num_train",
        "num_test", "num_classes"}`` (percent).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    multi = train_y.ndim == 2
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("linear_probe: features and labels differ in length")
    fit_i, val_i = _probe_holdout(train_y, multi=multi, val_fraction=val_fraction, seed=seed)
    # one BLAS thread: these problems are small, and a multi-threaded BLAS on a busy CPU made the fits
    # ~20x slower (benchmarks/perf/downstream_cost.py); lbfgs may stop at max_iter for weak regularisation
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        val_scores = []
        for c in cs:
            clf = _probe_model(c, multi=multi, max_iter=max_iter).fit(train_x[fit_i], train_y[fit_i])
            val_scores.append(_probe_score(clf, train_x[val_i], train_y[val_i], multi=multi))
        best = int(np.nanargmax(val_scores))  # first best: the strongest regularisation among ties
        clf = _probe_model(cs[best], multi=multi, max_iter=max_iter).fit(train_x, train_y)
        per_task = _probe_group_scores(clf, test_x, test_y, test_groups, group_names, multi=multi)
        test_score = _probe_score(clf, test_x, test_y, multi=multi)
    n_classes, chance = _probe_chance(train_y, test_y, multi=multi)
    return {"metric": "mAP" if multi else "top1", "score": test_score, "per_task": per_task,
            "C": float(cs[best]), "val_score": float(val_scores[best]), "chance": chance,
            "num_train": int(len(train_y)), "num_test": int(len(test_y)), "num_classes": n_classes}


def _base_dataset(ds: Any) -> Any:
    """The AudioVideoDataset inside an AvalancheDataset (``exp.dataset``)."""
    from stella_avalanche.data.datasets import AudioVideoDataset

    d = ds
    while not isinstance(d, AudioVideoDataset):
        inner = getattr(d, "_datasets", None)
        if not inner or len(inner) != 1:
            raise TypeError(f"cannot find the AudioVideoDataset inside {type(ds).__name__}")
        d = inner[0]
    return d


def _eval_view(ds: Any) -> Any:
    """A shallow copy of an AudioVideoDataset that applies the evaluation transform."""
    view = copy.copy(_base_dataset(ds))
    view.train = False
    return view


def _probe_block(model: nn.Module, bm: Any, cfg: DownstreamConfig, progress: bool) -> dict[str, Any]:
    from torch.utils.data import ConcatDataset

    train = ConcatDataset([_eval_view(e.dataset) for e in bm.train_stream])
    test = ConcatDataset([_eval_view(e.dataset) for e in bm.test_stream])
    y_all = torch.cat([_base_dataset(e.dataset)._labels for e in bm.train_stream]).numpy()
    keep = _subsample_per_class(y_all, cfg.probe_max_train_per_class, cfg.seed)
    if len(keep) < len(train):
        train = torch.utils.data.Subset(train, keep.tolist())
    emb_tr = extract_embeddings(model, train, batch_size=cfg.batch_size, desc="probe: train features",
                                progress=progress)
    emb_te = extract_embeddings(model, test, batch_size=cfg.batch_size, desc="probe: test features",
                                progress=progress)
    out: dict[str, Any] = {}
    feats = {"audio": lambda e: e["z_audio"].numpy(), "video": lambda e: e["z_video"].numpy(),
             "concat": lambda e: np.concatenate([e["z_audio"].numpy(), e["z_video"].numpy()], axis=1)}
    for name, f in feats.items():
        out[name] = linear_probe(f(emb_tr), emb_tr["label"].numpy(), f(emb_te), emb_te["label"].numpy(),
                                 test_groups=emb_te["category"].numpy(), group_names=list(bm.task_names),
                                 cs=cfg.probe_cs, val_fraction=cfg.probe_val_fraction, seed=cfg.seed,
                                 max_iter=cfg.probe_max_iter)
    return out


# =============================================================================================
# transfer retrieval
# =============================================================================================
def transfer_retrieval(z_audio: Tensor, z_video: Tensor, *, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Zero-shot retrieval over one pooled gallery of clips outside the stream.

    :param z_audio: (N, D); ``z_video`` (N, D) (clip i's audio matches clip i's video).
    :returns: ``{"a2v"|"v2a": {"R@K": %}, "num_clips": N, "chance": {"R@K": %}, "ranks": {"a2v"|"v2a":
        [N ints]}}``; the per-query ranks let a comparison resample the clips (paired bootstrap).
    """
    from stella_avalanche.evaluation.retrieval import recall_report

    n = int(z_audio.shape[0])
    rep = recall_report(z_audio, z_video, torch.zeros(n, dtype=torch.int64), ks=ks, gallery="pooled",
                        return_ranks=True)
    return {**{d: {f"R@{k}": float(rep[d][f"R@{k}"]["overall"]) for k in ks} for d in ("a2v", "v2a")},
            "num_clips": n, "chance": {f"R@{k}": 100.0 * min(k, n) / n for k in ks},
            "ranks": {d: rep["ranks"][d].tolist() for d in ("a2v", "v2a")}}


# =============================================================================================
# localisation
# =============================================================================================
class LocalisationHead(nn.Module):
    """Audio-conditioned patch classifier on frozen video patch tokens.

    Per patch ``p`` with normalised token ``t_p`` and the clip's normalised audio embedding ``a``, one
    linear layer scores ``[cos(t_p, a), t_p * a, t_p]``: the audio-to-patch similarity map, its
    per-dimension terms (so the layer can re-weight the similarity) and an audio-independent saliency.

    :param dim: token width D.
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(2 * dim + 1, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Tensor, audio: Tensor) -> Tensor:
        """:param tokens: (M, P, D); :param audio: (M, D). :returns: logits (M, P)."""
        t = F.normalize(tokens.float(), dim=-1)
        a = F.normalize(audio.float(), dim=-1)[:, None, :]
        prod = t * a
        feats = torch.cat([prod.sum(-1, keepdim=True), prod, t], dim=-1)
        return self.linear(feats).squeeze(-1)


@dataclass
class LocalisationSet:
    """Frames with a ground-truth mask of the sounding object (one row per annotated frame).

    :param tokens: float32 (M, G*G, D) frozen patch tokens of the frame.
    :param audio: float32 (M, D) the clip's pooled audio embedding.
    :param patch_masks: bool (M, G, G): patches holding object pixels.
    :param pixel_masks: bool (M, H, W) at the model input resolution, or None.
    """

    tokens: Tensor
    audio: Tensor
    patch_masks: Tensor
    pixel_masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def shuffled(self, seed: int = 0) -> "LocalisationSet":
        """The same frames with their masks permuted across frames (breaks every feature-mask link)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return LocalisationSet(self.tokens, self.audio, self.patch_masks[perm],
                               None if self.pixel_masks is None else self.pixel_masks[perm])


def _any_pooled(pixel: Tensor, patch: int) -> Tensor:
    """bool (M, H, W) -> bool (M, H/p, W/p): a patch is foreground when it holds a foreground pixel."""
    return F.max_pool2d(pixel[:, None].float(), patch)[:, 0] > 0


def localisation_set(model: nn.Module, dataset: Any, *, masks: Tensor | None = None, valid: Tensor | None = None,
                     batch_size: int = 64, desc: str = "localisation features",
                     progress: bool = True) -> LocalisationSet:
    """Frozen tokens of every annotated frame of a dataset.

    :param dataset: dict samples (``video``, ``audio`` and, without ``masks``, ``mask`` bool (T, H, W) and
        ``mask_valid`` bool (T,) as :class:`~stella_avalanche.benchmarks.avsbench.AVSBenchS4Dataset` gives).
    :param masks: bool (N, T, H, W) pixel masks at the model input resolution, in dataset order.
    :param valid: bool (N, T) frames that carry an annotation (and an object).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from stella_avalanche.utils import tqdm_options

    device = module_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_any)
    toks, auds, ms, vs = [], [], [], []
    with _eval_mode(model), torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, **tqdm_options(), leave=False):
            with _autocast(device):
                t, a = extract_patch_tokens(model, batch["video"].to(device), batch["audio"].to(device))
            toks.append(t.float().cpu())
            auds.append(a.float().cpu())
            if masks is None:
                ms.append(batch["mask"])
                vs.append(batch["mask_valid"])
    tokens, audio = torch.cat(toks), torch.cat(auds)  # (N, T, P, D), (N, D)
    if masks is None:
        masks, valid = torch.cat(ms), torch.cat(vs)
    if valid is None:
        raise ValueError("masks given without valid")
    n, t_frames = valid.shape
    if tokens.shape[:2] != (n, t_frames) or masks.shape[:2] != (n, t_frames):
        raise ValueError(f"{tuple(tokens.shape[:2])} clips x frames of tokens vs {tuple(valid.shape)} masks")
    patch = model.config.patch_size
    px = masks[valid]
    return LocalisationSet(tokens=tokens[valid], audio=audio[:, None].expand(n, t_frames, -1)[valid],
                           patch_masks=_any_pooled(px, patch), pixel_masks=px)


def _collate_any(batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in ("video", "audio", "mask", "mask_valid") if k in batch[0]}


def fit_localisation_head(data: LocalisationSet, *, steps: int = 300, lr: float = 1e-2, batch: int = 512,
                          weight_decay: float = 1e-4, seed: int = 0, progress: bool = False) -> LocalisationHead:
    """Fit a :class:`LocalisationHead` on frozen features by class-balanced binary cross-entropy.

    :param data: fitting frames.
    :param steps: Adam steps (mini-batches of ``batch`` frames drawn with a seeded generator).
    :returns: the fitted head (CPU, eval mode).
    """
    from tqdm.auto import tqdm

    from stella_avalanche.utils import tqdm_options

    if len(data) == 0:
        raise ValueError("no annotated frames to fit the localisation head on")
    g = torch.Generator().manual_seed(seed)
    head = LocalisationHead(dim=int(data.tokens.shape[-1]))
    target = data.patch_masks.reshape(len(data), -1).float()
    pos = float(target.mean())
    pos_weight = torch.tensor((1.0 - pos) / max(pos, 1e-6)).clamp(0.1, 100.0)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    m = len(data)
    # the steps are tiny: on a busy CPU one thread is several times faster than many
    small = min(m, batch) * data.tokens.shape[1] * data.tokens.shape[2] < 4_000_000
    with _threads(1 if small else None):
        for _ in tqdm(range(steps), desc="localisation head", disable=not progress, **tqdm_options(),
                      leave=False):
            idx = torch.randperm(m, generator=g)[:batch] if m > batch else torch.arange(m)
            logits = head(data.tokens[idx], data.audio[idx])
            loss = F.binary_cross_entropy_with_logits(logits, target[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def mean_iou(pred: Tensor, gt: Tensor) -> float:
    """Mean over samples of |pred ∩ gt| / |pred ∪ gt| (an empty pair counts 1), in percent.

    :param pred: bool (M, ...); ``gt`` bool (M, ...).
    """
    return _percent_mean(_iou_per_sample(pred, gt))


def _percent_mean(iou: Tensor) -> float:
    """Mean of per-frame IoUs in percent (NaN for no frames)."""
    return 100.0 * float(iou.mean()) if len(iou) else float("nan")


def _iou_per_sample(pred: Tensor, gt: Tensor) -> Tensor:
    p, t = pred.reshape(len(pred), -1), gt.reshape(len(gt), -1)
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _iou_chunked(maps: Tensor, gt: Tensor, threshold: float, to_pixels: Any, chunk: int = 256) -> Tensor:
    """Per-frame IoU (float64) of ``to_pixels(maps[i:j]) > threshold`` against ``gt``, a chunk of frames at
    a time (large test sets at 224 px would not fit in memory as one float tensor)."""
    parts = [_iou_per_sample(to_pixels(maps[i:i + chunk]) > threshold, gt[i:i + chunk])
             for i in range(0, len(gt), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _miou_chunked(maps: Tensor, gt: Tensor, threshold: float, to_pixels: Any, chunk: int = 256) -> float:
    """mIoU (percent) of :func:`_iou_chunked`."""
    return _percent_of_sum(_iou_chunked(maps, gt, threshold, to_pixels, chunk))


def _percent_of_sum(iou: Tensor) -> float:
    """Sum / count of per-frame IoUs in percent: the chunked mIoU's arithmetic, kept as it was so that
    recorded means reproduce to the bit."""
    return 100.0 * float(iou.sum()) / len(iou) if len(iou) else float("nan")


def _iou_list(iou: Tensor) -> list[float]:
    """Per-frame IoU in percent, 4 decimals (results.json stays small; the mean moves by < 1e-4)."""
    return [round(100.0 * float(x), 4) for x in iou]


_THRESHOLDS = tuple(float(x) for x in np.round(np.linspace(0.05, 0.95, 19), 2))


def _best_threshold(prob: Tensor, gt: Tensor) -> float:
    scores = [mean_iou(prob > th, gt) for th in _THRESHOLDS]
    return _THRESHOLDS[int(np.argmax(scores))]


def _pixel_probs(logits: Tensor, grid: int, size: int) -> Tensor:
    """(M, G*G) patch logits -> (M, size, size) probabilities (bilinear upsampling of the logits)."""
    x = logits.reshape(-1, 1, grid, grid)
    return torch.sigmoid(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0])


def _similarity_map(tokens: Tensor, audio: Tensor) -> Tensor:
    """(M, P) cosine of every patch token with the clip's audio embedding, min-max scaled per frame."""
    sim = torch.einsum("mpd,md->mp", F.normalize(tokens.float(), dim=-1), F.normalize(audio.float(), dim=-1))
    lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
    return (sim - lo) / (hi - lo).clamp_min(1e-8)


@torch.no_grad()
def score_localisation(head: LocalisationHead, fit: LocalisationSet, test: LocalisationSet, *,
                       max_threshold_frames: int = 512) -> dict[str, Any]:
    """mIoU of a fitted head on ``test``, with the binarisation threshold chosen on ``fit``.

    The reference ``chance_*`` scores binarise the fitting split's per-position mask frequency (the
    best any clip-independent map does, chosen and scored the same way).

    ``similarity_*`` binarise the untrained audio-to-patch cosine map (min-max scaled per frame) instead of
    the head's output.

    :returns: ``{"miou_patch", "miou_pixel", "chance_patch", "chance_pixel", "similarity_patch",
        "similarity_pixel", "threshold_patch", "threshold_pixel", "num_fit_frames", "num_test_frames",
        "iou_patch", "iou_pixel"}`` (percent; pixel entries None without pixel masks). ``iou_*`` are the
        head's per-test-frame IoUs (their mean is ``miou_*``), so that a comparison can resample the frames.
    """
    grid = int(fit.patch_masks.shape[-1])
    sel = torch.arange(min(len(fit), max_threshold_frames))
    fit_logits = head(fit.tokens[sel], fit.audio[sel])
    test_logits = head(test.tokens, test.audio)
    fit_gt, test_gt = fit.patch_masks[sel], test.patch_masks
    th_p = _best_threshold(torch.sigmoid(fit_logits).reshape(fit_gt.shape), fit_gt)
    iou_patch = _iou_per_sample(torch.sigmoid(test_logits).reshape(test_gt.shape) > th_p, test_gt)
    out: dict[str, Any] = {"miou_patch": _percent_mean(iou_patch),
                           "threshold_patch": th_p, "iou_patch": _iou_list(iou_patch)}
    # the untrained audio-to-patch similarity map alone (min-max scaled per frame): how much of the
    # localisation comes from audio-visual correspondence rather than from the head's learned saliency
    sim_fit, sim_test = _similarity_map(fit.tokens[sel], fit.audio[sel]), _similarity_map(test.tokens, test.audio)
    th_s = _best_threshold(sim_fit.reshape(fit_gt.shape), fit_gt)
    out["similarity_patch"] = mean_iou(sim_test.reshape(test_gt.shape) > th_s, test_gt)
    prior = fit.patch_masks.float().mean(0)  # (G, G)
    th_c = _best_threshold(prior.expand_as(fit_gt), fit_gt)
    out["chance_patch"] = mean_iou(prior.expand_as(test_gt) > th_c, test_gt)
    if fit.pixel_masks is not None and test.pixel_masks is not None:
        size = int(fit.pixel_masks.shape[-1])
        fit_px = fit.pixel_masks[sel]
        th_x = _best_threshold(_pixel_probs(fit_logits, grid, size), fit_px)
        iou_pixel = _iou_chunked(test_logits, test.pixel_masks, th_x, lambda m: _pixel_probs(m, grid, size))
        out["miou_pixel"] = _percent_of_sum(iou_pixel)
        out["threshold_pixel"] = th_x
        out["iou_pixel"] = _iou_list(iou_pixel)

        def up(m: Tensor) -> Tensor:
            return F.interpolate(m.reshape(-1, 1, grid, grid), size=(size, size), mode="bilinear",
                                 align_corners=False)[:, 0]

        th_sx = _best_threshold(up(sim_fit), fit_px)
        out["similarity_pixel"] = _miou_chunked(sim_test, test.pixel_masks, th_sx, up)
        prior_px = fit.pixel_masks.float().mean(0)
        th_cx = _best_threshold(prior_px.expand_as(fit_px), fit_px)
        out["chance_pixel"] = _miou_chunked(prior_px.expand_as(test.pixel_masks), test.pixel_masks, th_cx,
                                            lambda m: m)
    else:
        out.update({"miou_pixel": None, "threshold_pixel": None, "chance_pixel": None, "similarity_pixel": None,
                    "iou_pixel": None})
    out.update({"num_fit_frames": len(fit), "num_test_frames": len(test)})
    return out


def patch_coverage(pixel: Tensor, patch: int) -> Tensor:
    """bool (M, H, W) pixel masks -> float (M, H/p, W/p): the fraction of each patch's pixels that are
    foreground. A patch of :func:`_any_pooled`'s target is foreground at any coverage above 0."""
    return F.avg_pool2d(pixel[:, None].float(), patch)[:, 0]


def pixel_score_of_patch_maps(fit_maps: Tensor, test_maps: Tensor, fit_px: Tensor, test_px: Tensor) -> dict[str, float]:
    """The pixel mIoU that :func:`score_localisation` would give a head whose patch logits were
    ``test_maps``: bilinear upsampling to the mask size, threshold chosen on ``fit_maps`` / ``fit_px``.

    Used with maps built from the ground truth, it bounds what the pixel column can show. The head is
    trained on :func:`_any_pooled` targets (a patch is positive if it holds any object pixel), so a head
    that learned that target perfectly (logits ±s on the any-pooled mask) still draws every boundary
    patch in full: its pixel mIoU is far below 100, and below a head whose logits grade each patch by
    how much of it is object (logit of :func:`patch_coverage`).

    :param fit_maps: (M_fit, G*G) logits; :param test_maps: (M, G*G) logits.
    :param fit_px: bool (M_fit, S, S); :param test_px: bool (M, S, S).
    :returns: ``{"threshold": ..., "miou_pixel": ...}`` (percent).
    """
    grid, size = math.isqrt(int(fit_maps.shape[-1])), int(fit_px.shape[-1])
    th = _best_threshold(_pixel_probs(fit_maps, grid, size), fit_px)
    return {"threshold": th, "miou_pixel": _miou_chunked(test_maps, test_px, th, lambda m: _pixel_probs(m, grid, size))}


def _synthetic_localisation_sets(model: nn.Module, fit_ds: Any, eval_ds: Any, batch_size: int,
                                 progress: bool) -> tuple[LocalisationSet, LocalisationSet]:
    sets = []
    size = model.config.img_size
    for ds, name in ((fit_ds, "fit"), (eval_ds, "eval")):
        masks = torch.from_numpy(ds.masks(patch_size=1, frame_size=size))  # (N, T, S, S)
        valid = torch.from_numpy(ds.sounding())
        sets.append(localisation_set(model, ds, masks=masks, valid=valid, batch_size=batch_size,
                                     desc=f"localise: {name} features", progress=progress))
    return sets[0], sets[1]


# =============================================================================================
# modality gap
# =============================================================================================
def gap_summary(gap: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """Final gap and gap difference from the (L, T) matrix ``g[l][k]`` (after task l, task k's clips).

    ``difference = mean_{k<T} max_{l<T} (g[l,k] - g[T,k])`` over the tasks before the last one and the
    rows before the last one (``None`` with a single row, e.g. multitask).

    :returns: ``{"final", "final_per_task", "difference", "difference_per_task"}``.
    """
    g = np.array([[np.nan if v is None else float(v) for v in row] for row in gap], dtype=np.float64)
    if g.ndim != 2 or g.size == 0:
        raise ValueError("modality gap must be a non-empty L x T matrix")
    last = g[-1]
    out: dict[str, Any] = {"final": float(np.nanmean(last)) if np.isfinite(last).any() else None,
                           "final_per_task": [None if np.isnan(v) else float(v) for v in last]}
    if g.shape[0] < 2 or g.shape[1] < 2:
        out.update({"difference": None, "difference_per_task": None})
        return out
    diffs = []
    for k in range(g.shape[1] - 1):
        col = g[:-1, k] - g[-1, k]
        diffs.append(float(np.nanmax(col)) if np.isfinite(col).any() else None)
    valid = [d for d in diffs if d is not None]
    out.update({"difference": float(np.mean(valid)) if valid else None, "difference_per_task": diffs})
    return out




def plot_gap(gap: Sequence[Sequence[float | None]], tasks: Sequence[str], path: str | os.PathLike, *,
             title: str = "") -> Path:
    """Two panels: ``g[l, k]`` of every task over training progress, and the per-task gap difference."""
    g = np.array([[np.nan if v is None else float(v) for v in row] for row in gap], dtype=np.float64)
    summ = gap_summary(gap)
    fig = new_figure(10, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    x = np.arange(1, g.shape[0] + 1)
    for k in range(g.shape[1]):
        ax.plot(x, g[:, k], marker="o", ms=3, label=str(tasks[k]) if k < len(tasks) else str(k))
    ax.set_xlabel("after training experience l")
    ax.set_ylabel("modality gap ‖mean â − mean v̂‖")
    ax.set_title(f"{title} modality gap per task".strip(), fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax2 = fig.add_subplot(1, 2, 2)
    d = summ["difference_per_task"]
    if d:
        vals = [np.nan if v is None else v for v in d]
        ax2.bar(range(len(vals)), vals, color="C0")
        ax2.axhline(summ["difference"] or 0.0, color="C3", ls="--", label=f"mean {summ['difference']:.4f}")
        ax2.set_xticks(range(len(vals)), [str(t) for t in tasks[:len(vals)]], rotation=45, ha="right", fontsize=7)
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "one evaluation row: no gap difference", ha="center", va="center")
    ax2.set_title("gap difference max_{l<T}(g[l,k] − g[T,k])", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def plot_pca(last: Mapping[str, Tensor], path: str | os.PathLike, *, first: Mapping[str, Tensor] | None = None,
             task_name: str = "") -> Path:
    """PCA (scikit-learn, fitted on all points shown) of one task's audio and video embeddings.

    :param last: ``z_audio`` / ``z_video`` (N, D) after the last task; ``first``: after the first task.
    """
    from sklearn.decomposition import PCA

    panels = [("after the first task", first), ("after the last task", last)] if first is not None else \
        [("after the last task", last)]
    pts = np.concatenate([np.concatenate([p["z_audio"].numpy(), p["z_video"].numpy()]) for _, p in panels])
    pca = PCA(n_components=2, random_state=0).fit(pts)
    proj = pca.transform(pts)
    pad = 0.05 * (proj.max(0) - proj.min(0) + 1e-9)
    lims = (proj.min(0) - pad, proj.max(0) + pad)  # the same axes in every panel
    fig = new_figure(4.4 * len(panels), 4.0)
    for i, (name, p) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_xlim(lims[0][0], lims[1][0])
        ax.set_ylim(lims[0][1], lims[1][1])
        a, v = pca.transform(p["z_audio"].numpy()), pca.transform(p["z_video"].numpy())
        for j in range(len(a)):  # thin lines join each clip's audio and video point
            ax.plot([a[j, 0], v[j, 0]], [a[j, 1], v[j, 1]], color="0.8", lw=0.5, zorder=1)
        ax.scatter(a[:, 0], a[:, 1], s=10, c="C0", label="audio", zorder=2)
        ax.scatter(v[:, 0], v[:, 1], s=10, c="C3", label="video", zorder=2)
        gap = float((p["z_audio"].mean(0) - p["z_video"].mean(0)).norm())
        ax.set_title(f"{task_name} {name}\ngap {gap:.3f}", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


@torch.no_grad()
def snapshot_embeddings(model: nn.Module, bm: Any, path: str | os.PathLike, *, task: int = 0,
                        batch_size: int = 64) -> Path:
    """Save the retrieval embeddings of one task's clips (the PCA picture's "after the first task")."""
    from stella_avalanche.utils import atomic_torch_save

    emb = extract_embeddings(model, bm.retrieval_stream[task].dataset, batch_size=batch_size,
                             desc="downstream: first-task embeddings", progress=False)
    atomic_torch_save({"task": int(task), "z_audio": emb["z_audio"], "z_video": emb["z_video"]}, path)
    return Path(path)


# =============================================================================================
# the suite
# =============================================================================================
def _is_synthetic(bm: Any) -> bool:
    return getattr(bm, "name", "") == "synthetic" and hasattr(bm, "preset")


class _TransferEvalSet:
    """The synthetic transfer ``eval`` part, built on first use and shared by the transfer and localise tasks.

    :param bm: the synthetic benchmark (``preset``, ``seed``, ``features``).
    :param cfg: the downstream config (``transfer_per_class``, ``transfer_classes``).
    :param progress: show a progress bar while rendering.
    """

    def __init__(self, *, bm: Any, cfg: DownstreamConfig, progress: bool) -> None:
        self._bm, self._cfg, self._progress = bm, cfg, progress
        self._ds: Any = None

    def get(self) -> Any:
        """The dataset (built once, with one thread)."""
        if self._ds is None:
            from stella_avalanche.data.synthetic.transfer import SyntheticTransferDataset

            bm, cfg = self._bm, self._cfg
            with _threads(1):
                self._ds = SyntheticTransferDataset(preset=bm.preset, seed=bm.seed, part="eval",
                                                    per_class=cfg.transfer_per_class,
                                                    num_classes=cfg.transfer_classes, features=bm.features,
                                                    progress=self._progress)
        return self._ds


def _transfer_block(model: nn.Module, bm: Any, cfg: DownstreamConfig, progress: bool,
                    eval_set: _TransferEvalSet) -> dict[str, Any]:
    """Zero-shot retrieval on the synthetic transfer split or an MSR-VTT-style list (else skipped)."""
    if _is_synthetic(bm):
        ds, name = eval_set.get(), "synthetic_transfer"
        extra: dict[str, Any] = {"classes": cfg.transfer_classes}
    elif cfg.msrvtt_json:
        from stella_avalanche.benchmarks.msrvtt import msrvtt_dataset

        ds, name = msrvtt_dataset(cfg.msrvtt_json, data_root=cfg.msrvtt_root, features=bm.features,
                                  progress=progress), "msrvtt"
        extra = {"list": str(cfg.msrvtt_json)}
    else:
        return {"skipped": "no transfer data: set downstream.msrvtt_json for a real benchmark"}
    emb = extract_embeddings(model, ds, batch_size=cfg.batch_size, desc="transfer: features", progress=progress)
    return {"dataset": name, **extra, **transfer_retrieval(emb["z_audio"], emb["z_video"])}


def _localise_block(model: nn.Module, bm: Any, cfg: DownstreamConfig, progress: bool,
                    eval_set: _TransferEvalSet) -> dict[str, Any]:
    """Fit the localisation head on one set and score it on another (synthetic transfer or AVSBench-S4)."""
    if _is_synthetic(bm):
        from stella_avalanche.data.synthetic.transfer import SyntheticTransferDataset

        with _threads(1):
            fit_ds = SyntheticTransferDataset(preset=bm.preset, seed=bm.seed, part="fit",
                                              per_class=cfg.localise_fit_per_class,
                                              num_classes=cfg.transfer_classes, features=bm.features,
                                              progress=progress)
        fit, test = _synthetic_localisation_sets(model, fit_ds, eval_set.get(), cfg.batch_size, progress)
        source = {"dataset": "synthetic_transfer", "fit": "fit part", "eval": "eval part"}
    elif cfg.avsbench_root:
        from stella_avalanche.benchmarks.avsbench import AVSBenchS4Dataset

        sets = []
        for split in (cfg.avsbench_fit_split, cfg.avsbench_eval_split):
            ds = AVSBenchS4Dataset(root=cfg.avsbench_root, split=split, features=bm.features,
                                   csv_path=cfg.avsbench_csv, max_clips=cfg.avsbench_max_clips)
            sets.append(localisation_set(model, ds, batch_size=cfg.batch_size, progress=progress,
                                         desc=f"localise: {split} features"))
        fit, test = sets
        source = {"dataset": "avsbench_s4", "fit": cfg.avsbench_fit_split, "eval": cfg.avsbench_eval_split}
    else:
        return {"skipped": "no localisation data: set downstream.avsbench_root for a real benchmark"}
    head = fit_localisation_head(fit, steps=cfg.localise_steps, lr=cfg.localise_lr,
                                 batch=cfg.localise_batch, seed=cfg.seed, progress=progress)
    return {**source, **score_localisation(head, fit, test)}


def _first_task_snapshot(out_path: Path, task: int) -> dict[str, Tensor] | None:
    """The embeddings saved after the first task (``FIRST_TASK_EMBEDDINGS``) if they are of ``task``."""
    snap = out_path / FIRST_TASK_EMBEDDINGS
    if snap.is_file():
        obj = torch.load(snap, map_location="cpu", weights_only=True)
        if int(obj.get("task", -1)) == task:
            return obj
    return None


def _gap_block(model: nn.Module, bm: Any, cfg: DownstreamConfig, results: Mapping[str, Any] | None,
               out_path: Path | None, progress: bool, pictures: list[str]) -> dict[str, Any]:
    """Modality-gap summary; with ``out_path`` also the gap and PCA pictures (their names appended to ``pictures``)."""
    gap = (results or {}).get("modality_gap")
    if not gap:
        return {"skipped": "results hold no modality_gap matrix"}
    block = gap_summary(gap)
    tasks = list((results or {}).get("tasks") or bm.task_names)
    if out_path is not None:
        pictures.append(plot_gap(gap, tasks, out_path / PICTURES["gap"],
                                 title=str((results or {}).get("strategy", ""))).name)
        k = min(cfg.pca_task, len(bm.retrieval_stream) - 1)
        last = extract_embeddings(model, bm.retrieval_stream[k].dataset, batch_size=cfg.batch_size,
                                  desc="gap: PCA features", progress=progress)
        first = _first_task_snapshot(out_path, k)
        block["pca_first_task"] = first is not None
        pictures.append(plot_pca(last, out_path / PICTURES["pca"], first=first,
                                 task_name=str(tasks[k]) if k < len(tasks) else str(k)).name)
    return block


def run_downstream(model: nn.Module, bm: Any, *, cfg: DownstreamConfig | Mapping[str, Any] | None = None,
                   results: Mapping[str, Any] | None = None, out_dir: str | os.PathLike | None = None,
                   progress: bool = True, model_name: str = "model") -> dict[str, Any]:
    """Run the selected downstream tasks with a frozen backbone and return the ``downstream`` block.

    :param model: the backbone (left unchanged; its device is used).
    :param bm: the benchmark scenario the backbone was trained on (``features``, ``task_names``, streams).
    :param cfg: :class:`DownstreamConfig` or its dict form.
    :param results: the run's results dict (``modality_gap`` for the gap task).
    :param out_dir: where the pictures go (None: no pictures); the first-task embeddings are read from
        ``out_dir / FIRST_TASK_EMBEDDINGS`` when present.
    :param model_name: how the geometry check names the model.
    :raises GeometryMismatchError: the model does not take the benchmark's input geometry.
    :returns: ``{"tasks", "probe", "transfer", "localise", "gap", "seconds", "pictures"}`` (tasks not run are
        absent; a task that cannot run on this benchmark holds ``{"skipped": reason}`` and has no seconds entry).
    """
    from stella_avalanche.utils import progress_enabled

    cfg = cfg if isinstance(cfg, DownstreamConfig) else DownstreamConfig.from_dict(cfg)
    progress = progress and progress_enabled()
    check_geometry(model.config, bm.features, model_name=model_name, benchmark_name=getattr(bm, "name", "?"))
    out: dict[str, Any] = {"tasks": list(cfg.tasks), "seconds": {}, "pictures": []}
    out_path = Path(out_dir) if out_dir is not None else None
    eval_set = _TransferEvalSet(bm=bm, cfg=cfg, progress=progress)
    for task in cfg.tasks:
        t0 = time.perf_counter()
        if task == "probe":
            out["probe"] = _probe_block(model, bm, cfg, progress)
        elif task == "transfer":
            out["transfer"] = _transfer_block(model, bm, cfg, progress, eval_set)
        elif task == "localise":
            out["localise"] = _localise_block(model, bm, cfg, progress, eval_set)
        elif task == "gap":
            out["gap"] = _gap_block(model, bm, cfg, results, out_path, progress, out["pictures"])
        if "skipped" in out.get(task, {}):
            continue  # skipped tasks get no time entry
        out["seconds"][task] = round(time.perf_counter() - t0, 2)
    out["seconds"]["total"] = round(sum(out["seconds"].values()), 2)
    return out


# =============================================================================================
# hooks for run_experiment (``downstream.*`` config block)
# =============================================================================================
def downstream_enabled(run_cfg: Mapping[str, Any]) -> bool:
    """``downstream.enabled`` of a run config; unset means on for the synthetic benchmark only."""
    flag = (run_cfg.get("downstream") or {}).get("enabled")
    if flag is None:
        return run_cfg.get("benchmark", {}).get("name") == "synthetic"
    return bool(flag)


def _jsonable(obj: Any) -> Any:
    """NaN / inf -> None (results.json holds plain JSON), recursively."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def after_first_task(model: nn.Module, bm: Any, run_cfg: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
    """Called by ``run_experiment`` after the first task's evaluation: keep the PCA task's embeddings."""
    cfg = DownstreamConfig.from_dict(run_cfg.get("downstream"))
    if "gap" in cfg.tasks:
        k = min(cfg.pca_task, len(bm.retrieval_stream) - 1)
        snapshot_embeddings(model, bm, Path(out_dir) / FIRST_TASK_EMBEDDINGS, task=k, batch_size=cfg.batch_size)


def at_end_of_stream(model: nn.Module, bm: Any, run_cfg: Mapping[str, Any], results: Mapping[str, Any],
                     out_dir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    """Called by ``run_experiment`` after the last task: the suite's ``downstream`` block (JSON-ready)."""
    cfg = DownstreamConfig.from_dict(run_cfg.get("downstream"))
    return _jsonable(run_downstream(model, bm, cfg=cfg, results=results, out_dir=out_dir, progress=progress,
                                    model_name=f"the {run_cfg.get('model', {}).get('preset', '?')} backbone"))


def summary_lines(block: Mapping[str, Any]) -> str:
    """A few readable lines of a ``downstream`` block (percent; gap as a distance)."""
    def f(x: Any, nd: int = 1) -> str:
        return "–" if x is None else f"{x:.{nd}f}"

    lines = []
    for feat, p in (block.get("probe") or {}).items():
        lines.append(f"probe [{feat:6s}] {p['metric']} {f(p['score'])} % (chance {f(p['chance'])}, C={p['C']:g}, "
                     f"{p['num_train']} train / {p['num_test']} test clips)")
    tr = block.get("transfer") or {}
    if "skipped" in tr:
        lines.append(f"transfer: skipped ({tr['skipped']})")
    elif tr:
        r = lambda d: "/".join(f(tr[d][k]) for k in ("R@1", "R@5", "R@10"))  # noqa: E731
        lines.append(f"transfer [{tr['dataset']}, {tr['num_clips']} clips] R@1/5/10 A→V {r('a2v')}  V→A {r('v2a')} "
                     f"(chance R@5 {f(tr['chance']['R@5'])})")
    lo = block.get("localise") or {}
    if "skipped" in lo:
        lines.append(f"localise: skipped ({lo['skipped']})")
    elif lo:
        lines.append(f"localise [{lo['dataset']}] mIoU patch {f(lo['miou_patch'])} (prior {f(lo['chance_patch'])}, "
                     f"similarity map {f(lo['similarity_patch'])}), pixel {f(lo['miou_pixel'])} "
                     f"(prior {f(lo['chance_pixel'])}, similarity map {f(lo['similarity_pixel'])}); "
                     f"{lo['num_fit_frames']} fit / {lo['num_test_frames']} scored frames")
    g = block.get("gap") or {}
    if "skipped" in g:
        lines.append(f"gap: skipped ({g['skipped']})")
    elif g:
        lines.append(f"gap: final {f(g['final'], 4)}, gap difference {f(g['difference'], 4)}")
    secs = block.get("seconds") or {}
    if secs:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    return "\n".join(lines)
