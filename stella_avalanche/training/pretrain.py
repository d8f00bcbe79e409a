"""Stages 1 and 2 of the paper's pipeline, outside the continual stream.

- Stage 1, :func:`pretrain_backbone`: MAE + contrastive pre-training of the backbone on
  initialisation data (the paper starts every continual run from such a model).
- Stage 2, :func:`pretrain_avm`: train the AVM with the backbone frozen (matching loss only).
- :func:`synthetic_initialisation`: both stages on the synthetic benchmark's ``init`` split
  (fresh clips every step, never repeated), cached under the user cache dir and keyed by the
  generator version, the feature preset, the model configuration and the schedule, so
  ``run_stella.py`` builds it once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stella_avalanche.utils import tqdm_options

from stella_avalanche.models.loading import load_backbone_weights
from stella_avalanche.training.template import make_adam
from stella_avalanche.utils import atomic_torch_save, build_lock, default_cache_dir

__all__ = ["pretrain_backbone", "pretrain_avm", "synthetic_initialisation", "InitSchedule",
           "load_avm_checkpoint"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InitSchedule:
    """Recipe of the synthetic initialisation (stage 1 and stage 2).

    Stage 1 stands in for the published CAV-MAE checkpoint, so its recipe is free as long as the
    continual phase keeps the paper's recipe for every strategy alike (docs/synthetic.md). It should
    learn the audio-visual correspondence that transfers to unseen classes (the pair AUC of
    ``experiments/diagnose_selection.py``). The default trains the InfoNCE alone on unmasked clips for
    ``contrastive_only_steps`` (with 75 % masking the encoder often sees none of the object's patches)
    and then MAE + InfoNCE with the encoder trainable, the objective the continual phase goes on with,
    so that the decoder it needs is trained too. The preset's init stream draws a fresh appearance
    and sound per clip, so only the instance cues (on/off synchrony, loudness by size) can be learned.
    On the default preset the InfoNCE-only phase reaches the on/off pattern's ceiling after 100-150
    steps (docs/results/synthetic_v4/stage1_curve.json), so 250 leave a margin (docs/synthetic.md,
    "The default (generator v3)"). Stage 2 trains the AVM until its held-out matching accuracy
    reaches ``avm_target_accuracy`` or ``avm_steps`` are spent.

    :param backbone_steps: stage-1 optimizer steps.
    :param contrastive_only_steps: the first stage-1 steps train the InfoNCE alone on unmasked clips
        (cheaper, and where the correspondence is learned); the rest train MAE + contrastive.
    :param avm_steps: stage-2 step budget.
    :param batch_size: clips per step (both stages).
    :param lr: stage-1 peak learning rate (linear warm-up over ``warmup_steps``).
    :param warmup_steps: stage-1 warm-up.
    :param avm_lr: stage-2 learning rate.
    :param contrastive_input: the model's ``contrastive_input`` during stage 1 only.
    :param decoder_only_after_contrastive: the MAE + InfoNCE steps that follow the contrastive-only
        ones train the decoder alone (encoder frozen). The recipe of v2's default (preset
        ``instance_cues``), where 200 steps with the encoder trainable took the InfoNCE from 3.12 back to
        3.43 and the pair AUC from about 0.70 to 0.58 / 0.60; on the v3 default, with the encoder
        trainable, the pair AUC stays at 0.89 (docs/synthetic.md).
    :param avm_target_accuracy: held-out matching accuracy at which stage 2 stops.
    :param avm_eval_every: stage-2 steps between held-out evaluations.
    :param train_seed: seed of both stages' weights, masks and AVM pairings (``None``: the data seed).
        The init stream's clips stay those of the data seed, so builds with several train seeds differ
        only in training, like repeated pre-trainings of one model on one data set.
    """

    backbone_steps: int = 500
    contrastive_only_steps: int = 250
    avm_steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    avm_lr: float = 1e-3
    contrastive_input: str = "visible"
    decoder_only_after_contrastive: bool = False
    avm_target_accuracy: float = 0.85
    avm_eval_every: int = 50
    train_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not 0 <= self.contrastive_only_steps <= self.backbone_steps:
            raise ValueError(f"InitSchedule: contrastive_only_steps={self.contrastive_only_steps} must lie in "
                             f"[0, backbone_steps={self.backbone_steps}]")

    @classmethod
    def from_config(cls, overrides: Optional[dict]) -> "InitSchedule":
        """The default recipe with the fields of a config's ``init.schedule`` mapping replaced.

        :raises ValueError: naming unknown fields.
        """
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"init.schedule: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**overrides)


def _batches(loader: Iterable[dict], device: torch.device) -> Iterator[dict]:
    while True:  # an IterableDataset of fresh clips never ends; a map-style one is cycled
        for b in loader:
            yield {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}


#: parameter-name prefixes of the MAE decoder (what ``decoder_only_after_contrastive`` trains)
_DECODER_PREFIXES = ("decoder_", "mask_token_")


def contrastive_forward(model: nn.Module, video: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
    """InfoNCE alone on unmasked clips, pooled exactly as the retrieval embeddings (no decoder).

    :param video: (B, T, 3, S, S); ``audio`` (B, 1, A, F). :returns: ``loss`` = ``loss_nce`` (scalar).
    """
    from stella_avalanche.models.contrastive import info_nce

    z_a, z_v = model.embed(video, audio)  # the retrieval embeddings, with gradient
    nce = info_nce(z_a, z_v, temperature=model.config.temperature, gather=False)[0]
    return {"loss": nce, "loss_nce": nce}


def pretrain_backbone(model: nn.Module, loader: Iterable[dict], *, steps: int, lr: float = 1e-4,
                      warmup_steps: int = 0, device: str | torch.device = "cpu",
                      progress: bool = True, contrastive_only_steps: int = 0,
                      decoder_only_after_contrastive: bool = False,
                      on_step: Optional[Callable[[int, list[dict]], None]] = None) -> list[dict]:
    """Stage 1: MAE + contrastive pre-training with random masking.

    :param model: the backbone (``pretrain_forward``).
    :param loader: yields dict batches with ``video`` and ``audio``.
    :param steps: optimizer steps (all phases).
    :param lr: peak learning rate (linear warm-up over ``warmup_steps``, then constant).
    :param contrastive_only_steps: the first steps train the InfoNCE alone on unmasked clips
        (:func:`contrastive_forward`: about half the cost of a masked MAE + contrastive step, and the
        audio-visual correspondence is learned there); the remaining steps train the full objective,
        which also trains the decoder the continual phase needs.
    :param decoder_only_after_contrastive: in those remaining steps only the decoder (``decoder_*``,
        ``mask_token_*``) learns; the encoder keeps what the contrastive steps taught it.
    :param on_step: called after each optimizer step with the number of steps done and the history
        (e.g. to measure the backbone during training: ``experiments/stage1_curve.py``); the model is
        put back in training mode afterwards.
    :returns: a loss history (one dict per step).
    """
    device = torch.device(device)
    model.to(device).train()
    opt = make_adam(model, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    history: list[dict] = []
    it = _batches(loader, device)
    bar = tqdm(range(steps), desc="stage 1: backbone init", disable=not progress, **tqdm_options())
    frozen: list[nn.Parameter] = []
    try:
        for step in bar:
            batch = next(it)
            if step == contrastive_only_steps and decoder_only_after_contrastive:
                frozen = [p for n, p in model.named_parameters()
                          if p.requires_grad and not n.startswith(_DECODER_PREFIXES)]
                for p in frozen:  # Adam skips parameters without a gradient
                    p.requires_grad_(False)
            if step < contrastive_only_steps:
                out = contrastive_forward(model, batch["video"], batch["audio"])
            else:
                out = model(video=batch["video"], audio=batch["audio"])
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at initialisation step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            rec = {k: float(out[k].detach())
                   for k in ("loss", "loss_mae_audio", "loss_mae_video", "loss_nce") if k in out}
            history.append(rec)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", nce=f"{rec.get('loss_nce', math.nan):.3f}")
            if on_step is not None:
                on_step(step + 1, history)
                model.train()
    finally:  # the caller (and the continual phase) trains the whole model
        for p in frozen:
            p.requires_grad_(True)
    return history


#: a stage-1 InfoNCE that ends within this many nats of its chance value ln(batch) counts as "not
#: aligned": on synthetic_v5 the builds that aligned ended 0.27-0.42 below chance, the two that did
#: not 0.009-0.014 below (docs/results/synthetic_v5/init_builds.md)
STAGE1_ALIGNED_MARGIN = 0.05


def stage1_summary(history: list[dict], *, batch_size: int, contrastive_only_steps: int = 0,
                   window: int = 50) -> dict:
    """The InfoNCE figures of a stage-1 loss history, against its chance value ln(batch).

    ``nce_contrastive_end``: mean over the last ``window`` steps of the InfoNCE-only phase (None
    without one); ``nce_end``: mean over the last ``window`` steps of the phase after it (of the whole
    history when there is none); ``aligned``: whether ``nce_end``
    is more than :data:`STAGE1_ALIGNED_MARGIN` below chance (None without a chance value or a loss).
    The phase-end figure is kept because the masked phase can undo what the InfoNCE-only phase aligned.
    """
    def mean(part: list[dict]) -> Optional[float]:
        vals = [float(h["loss_nce"]) for h in part[-window:] if "loss_nce" in h]
        return sum(vals) / len(vals) if vals else None

    chance = math.log(batch_size) if batch_size > 1 else None
    end = mean(history[contrastive_only_steps:] or history)
    return {"nce_chance": chance, "nce_end": end,
            "nce_contrastive_end": mean(history[:contrastive_only_steps]) if contrastive_only_steps > 0 else None,
            "aligned": None if chance is None or end is None else end < chance - STAGE1_ALIGNED_MARGIN}


def avm_training_step(model: nn.Module, avm: nn.Module, batch: dict, opt: torch.optim.Optimizer, *,
                      generator: Optional[torch.Generator] = None) -> float:
    """One stage-2 step: codes of the unmasked clips (frozen backbone), the matching loss, an optimizer
    step on the AVM. ``batch``: ``video`` (B, T, 3, S, S), ``audio`` (B, 1, A, F). :returns: the loss."""
    with torch.no_grad():
        u_a = model.encode_modality(model.patchify_audio(batch["audio"]), None, "audio")
        u_v = model.encode_modality(model.patchify_video(batch["video"]), None, "video")
    loss = avm.matching_loss(model, u_a, u_v, generator=generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def pretrain_avm(model: nn.Module, avm: nn.Module, loader: Iterable[dict], *, steps: int,
                 lr: float = 1e-4, device: str | torch.device = "cpu", progress: bool = True,
                 generator: Optional[torch.Generator] = None, heldout: Optional[dict] = None,
                 target_accuracy: Optional[float] = None, eval_every: int = 50, min_steps: int = 0,
                 record: Optional[dict] = None) -> list[float]:
    """Stage 2: train the AVM on matched / mismatched pairs with the backbone frozen.

    With ``heldout`` (``video``, ``audio``, ``label`` tensors of clips never trained on), the matching
    accuracy on held-out matched vs mismatched pairs is measured every ``eval_every`` steps and
    training stops once it reaches ``target_accuracy`` (after ``min_steps``); ``steps`` is then the
    budget. ``record`` (a dict, filled in place) receives ``heldout`` (one entry per evaluation:
    step, accuracy, AUC, mean training loss since the last evaluation), ``steps_run`` and
    ``criterion_met``, for the checkpoint metadata.

    :returns: the matching-loss history.
    """
    from stella_avalanche.evaluation.diagnostics import avm_matching

    device = torch.device(device)
    model.to(device).eval()
    avm.to(device).train()
    opt = make_adam(avm, lr=lr)
    it = _batches(loader, device)
    history: list[float] = []
    evals: list[dict] = []
    met = False

    def evaluate(step: int) -> float:
        res = avm_matching(model, avm, heldout["video"].to(device), heldout["audio"].to(device),
                           heldout["label"], seed=0)
        recent = history[-eval_every:] or [math.nan]
        evals.append({"step": step, "accuracy": round(res["avm_accuracy"], 4), "auc": round(res["avm_auc"], 4),
                      "train_loss": round(sum(recent) / len(recent), 4)})
        avm.train()
        return res["avm_accuracy"]

    bar = tqdm(range(steps), desc="stage 2: AVM", disable=not progress, **tqdm_options())
    step = 0
    for step in bar:
        history.append(avm_training_step(model, avm, next(it), opt, generator=generator))
        if step % 10 == 0:
            bar.set_postfix(vam=f"{history[-1]:.3f}", heldout=f"{evals[-1]['accuracy']:.2f}" if evals else "-")
        if heldout is not None and (step + 1) % eval_every == 0:
            acc = evaluate(step + 1)
            if target_accuracy is not None and acc >= target_accuracy and step + 1 >= min_steps:
                met = True
                break
    if heldout is not None and (not evals or evals[-1]["step"] != step + 1):
        acc = evaluate(step + 1)
        met = met or (target_accuracy is not None and acc >= target_accuracy)
    if record is not None:
        record.update({"heldout": evals, "steps_run": step + 1, "criterion_met": met,
                       "target_accuracy": target_accuracy})
    return history


def load_avm_checkpoint(avm: nn.Module, path: str | Path) -> dict:
    """Load an AVM checkpoint (``{"avm": state, "meta": ...}`` or a bare state dict)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.get("avm", obj) if isinstance(obj, dict) else obj
    avm.load_state_dict(state, strict=True)
    return obj.get("meta", {}) if isinstance(obj, dict) else {}


#: fields that only stage 2 (the AVM) reads: changing them keeps the cached stage-1 backbone
_STAGE2_MODEL_FIELDS = ("avm_pooling", "avm_features", "avm_time_bias")
_STAGE2_SCHEDULE_FIELDS = ("avm_steps", "avm_lr", "avm_target_accuracy", "avm_eval_every")
#: model fields added after initialisations were cached, with the value those were built with: at that
#: value a field is left out of the key, so existing caches (and the published runs that used them)
#: are found again
_MODEL_FIELDS_ADDED_LATER = {"embed_segments": 1, "avm_time_bias": 0.0, "bf16_stream": False}
#: model fields that only the continual phase reads (stage 1 takes its ``contrastive_input`` from the
#: schedule, stage 2 never runs the pre-training forward): left out of both keys
_CONTINUAL_ONLY_MODEL_FIELDS = ("contrastive_input",)
#: how many stream clips each split holds: neither stage reads the stream's splits
_STREAM_COUNT_FIELDS = ("train_per_class", "test_per_class", "retrieval_per_class")


def _init_keys(model_cfg: object, preset: str, seed: int, schedule: InitSchedule) -> tuple[str, str]:
    """(stage-1 key, stage-2 key). The stage-1 key leaves out what only the AVM depends on, so a new
    AVM pooling, AVM input or stage-2 budget rebuilds the AVM (about 2 min) and not the backbone (10).
    Neither key holds the stream's clip counts, which no stage reads."""
    from stella_avalanche.data import synthetic

    # the preset's fields (init stream, geometry) are part of the key
    fields = {k: v for k, v in dataclasses.asdict(synthetic.get_preset(preset)).items()
              if k not in _STREAM_COUNT_FIELDS}
    payload = {"generator": synthetic.SYNTHETIC_VERSION, "preset": preset, "preset_fields": fields,
               "features": dataclasses.asdict(synthetic.default_features(preset)),
               "seed": seed,
               # a train seed equal to the data seed is the default build: one key, one cache
               "schedule": dataclasses.asdict(schedule if schedule.train_seed != seed
                                              else dataclasses.replace(schedule, train_seed=None)),
               "model": {k: v for k, v in dataclasses.asdict(model_cfg).items()
                         if not (k in _MODEL_FIELDS_ADDED_LATER and v == _MODEL_FIELDS_ADDED_LATER[k])
                         and k not in _CONTINUAL_ONLY_MODEL_FIELDS}}
    stage1 = {**payload, "model": {k: v for k, v in payload["model"].items() if k not in _STAGE2_MODEL_FIELDS},
              "schedule": {k: v for k, v in payload["schedule"].items() if k not in _STAGE2_SCHEDULE_FIELDS}}

    def digest(obj: dict) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return digest(stage1), digest(payload)


def synthetic_initialisation(model_cfg: object, *, preset: str = "default", seed: int = 0,
                             schedule: InitSchedule = InitSchedule(), cache_dir: Optional[Path] = None,
                             device: str | torch.device = "cpu", force: bool = False,
                             num_workers: int = 1, progress: bool = True) -> dict[str, Path]:
    """Build (once) and return the cached stage-1 backbone and stage-2 AVM for the synthetic benchmark.

    :returns: ``{"backbone": path, "avm": path}``.
    """
    key, avm_key = _init_keys(model_cfg, preset, seed, schedule)
    root = Path(cache_dir or default_cache_dir() / "init") / f"synthetic-{preset}-{key}"
    paths = {"backbone": root / "backbone.pt", "avm": root / f"avm-{avm_key}.pt"}
    if not force and all(p.exists() for p in paths.values()):
        return paths
    # One builder at a time: parallel runs (compare.py --jobs) wait here and then reuse the cache.
    with build_lock(root):
        if not force and all(p.exists() for p in paths.values()):
            return paths
        _build_initialisation(model_cfg, preset=preset, seed=seed, schedule=schedule, key=key, paths=paths,
                              device=device, force=force, num_workers=num_workers, progress=progress)
    return paths


def _build_initialisation(model_cfg: object, *, preset: str, seed: int, schedule: InitSchedule, key: str,
                          paths: dict[str, Path], device: str | torch.device, force: bool, num_workers: int,
                          progress: bool) -> None:
    from stella_avalanche.data.synthetic import SyntheticInitDataset, SyntheticInitRetrievalDataset
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE

    log.info("building the synthetic initialisation in %s (cached for later runs)", paths["backbone"].parent)
    train_seed = seed if schedule.train_seed is None else schedule.train_seed
    torch.manual_seed(train_seed)
    # the stage-1 objective may differ from the run's (e.g. the InfoNCE on an unmasked pass); the
    # weights are the same either way
    model = CAVMAE(dataclasses.replace(model_cfg, contrastive_input=schedule.contrastive_input))
    data = SyntheticInitDataset(preset=preset, seed=seed)
    loader = DataLoader(data, batch_size=schedule.batch_size, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    meta = {"key": key, "preset": preset, "seed": seed, "schedule": dataclasses.asdict(schedule)}
    if force or not paths["backbone"].exists():
        # stage 1 leaves the global RNG as it found it, so the AVM below starts from the same weights
        # (and stage 2 ends in the same AVM) whether stage 1 ran in this process or was loaded
        with torch.random.fork_rng(devices=[]):
            hist = pretrain_backbone(model, loader, steps=schedule.backbone_steps, lr=schedule.lr,
                                     warmup_steps=schedule.warmup_steps, device=device, progress=progress,
                                     contrastive_only_steps=schedule.contrastive_only_steps,
                                     decoder_only_after_contrastive=schedule.decoder_only_after_contrastive)
        stage1 = stage1_summary(hist, batch_size=schedule.batch_size,
                                contrastive_only_steps=schedule.contrastive_only_steps)
        if stage1["aligned"] is False:
            phase = stage1["nce_contrastive_end"]
            log.warning("stage 1: the InfoNCE ended at %.3f, at its chance value ln(%d) = %.3f, so audio and "
                        "video are not aligned%s; zero-shot retrieval from this build will be near chance "
                        "(train seed %d; docs/synthetic.md, \"When stage 1 does not align\")", stage1["nce_end"],
                        schedule.batch_size, stage1["nce_chance"],
                        "" if phase is None else f" (the InfoNCE-only phase had ended at {phase:.3f})", train_seed)
        atomic_torch_save({"model": model.state_dict(),
                           "meta": {**meta, "history": hist[-50:], "stage1": stage1}}, paths["backbone"])
    else:
        load_backbone_weights(model, paths["backbone"])
    # stage 2 stops on the matching accuracy of held-out init clips (never the benchmark's clips)
    held = SyntheticInitRetrievalDataset(preset=preset, seed=seed)
    heldout = {"video": held.video, "audio": held.audio, "label": held.label}
    avm = build_avm(model)
    record: dict = {}
    hist = pretrain_avm(model, avm, loader, steps=schedule.avm_steps, lr=schedule.avm_lr, device=device,
                        progress=progress, generator=torch.Generator().manual_seed(train_seed), heldout=heldout,
                        target_accuracy=schedule.avm_target_accuracy, eval_every=schedule.avm_eval_every,
                        record=record)
    last = record["heldout"][-1]["accuracy"] if record.get("heldout") else float("nan")
    if not record.get("criterion_met"):
        log.warning("stage 2: the AVM reached held-out matching accuracy %.3f after %d steps, below the "
                    "target %.2f: STELLA's patch importance will be weak (docs/diagnostics.md)", last,
                    record.get("steps_run", 0), schedule.avm_target_accuracy)
    atomic_torch_save({"avm": avm.state_dict(), "meta": {**meta, "history": hist[-50:], "stage2": record}},
                      paths["avm"])
