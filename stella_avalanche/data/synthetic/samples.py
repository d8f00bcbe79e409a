"""In-memory samples: a rendered clip through the benchmark's dataset transform, the feature config that
fits a preset, and whole on-disk splits rendered without their files."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import torch

from stella_avalanche.data.synthetic.preset import SyntheticPreset, get_preset
from stella_avalanche.data.synthetic.rendering import (RenderedClip, clip_rng, frame_indices, jpeg_roundtrip,
                                                       render_clip)
from stella_avalanche.data.synthetic.vocabulary import build_vocabulary, clutter_pools
from stella_avalanche.data.synthetic.writer import clip_key

if TYPE_CHECKING:
    from stella_avalanche.data.features import FeatureConfig

__all__ = ["sample_from_clip", "check_features", "default_features", "render_split"]


def sample_from_clip(clip: RenderedClip, features: "FeatureConfig", *, train: bool, jpeg_quality: int | None,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset transform of a stored clip, applied to an in-memory one.

    Frames go through a JPEG round trip (as if stored) and :func:`video_from_frames`; the waveform
    (already at 16-bit levels) is mean-removed as :func:`load_waveform` does, then :func:`compute_fbank`
    and, in training, :func:`augment_fbank` - the same functions ``AudioVideoDataset`` applies.

    :returns: video float32 (T, 3, S, S), audio float32 (1, A, F).
    """
    from stella_avalanche.data.features import augment_fbank, compute_fbank, video_from_frames

    frames = jpeg_roundtrip(clip.frames, jpeg_quality) if jpeg_quality else clip.frames
    video = video_from_frames(torch.from_numpy(frames), features, train=train, generator=generator)
    wav = torch.from_numpy(clip.waveform)
    n = features.audio_samples
    wav = wav[:n] - wav[:n].mean()
    fbank = compute_fbank(wav, features)
    if train and (features.noise or features.roll):
        fbank = augment_fbank(fbank, features, generator)
    return video, fbank.unsqueeze(0)


def check_features(preset: SyntheticPreset, features: "FeatureConfig") -> None:
    """Raise if ``features`` would read frames / audio the generator does not produce."""
    from stella_avalanche.data.features import cache_frame_times
    from stella_avalanche.data.media import frame_indices as media_frame_indices

    problems = []
    needed = set(media_frame_indices(cache_frame_times(features), features.frames_fps))
    stored = set(frame_indices(preset))
    if features.frames_fps != preset.frames_fps:
        problems.append(f"features.frames_fps={features.frames_fps} != preset.frames_fps={preset.frames_fps}")
    elif not needed <= stored:
        problems.append(f"features read frames {sorted(needed)} but the preset stores {sorted(stored)} "
                        f"(use FeatureConfig.synthetic(): {preset.num_segments} frames "
                        f"{preset.segment_seconds} s apart, window == clip)")
    if features.sample_rate != preset.sample_rate:
        problems.append(f"features.sample_rate={features.sample_rate} != preset.sample_rate={preset.sample_rate}")
    if features.source_size != preset.image_size:
        problems.append(f"features.source_size={features.source_size} != preset.image_size={preset.image_size}")
    if problems:
        raise ValueError(f"FeatureConfig does not fit synthetic preset {preset.name!r}: " + "; ".join(problems))


def default_features(preset: str | SyntheticPreset = "default") -> "FeatureConfig":
    """``FeatureConfig.synthetic()`` adapted to the preset's image size."""
    from stella_avalanche.data.features import FeatureConfig

    p = get_preset(preset)
    cfg = FeatureConfig.synthetic()
    if cfg.source_size != p.image_size:
        cfg = dataclasses.replace(cfg, source_size=p.image_size, frame_size=p.image_size)
    return cfg


def render_split(preset: str | SyntheticPreset = "default", seed: int = 0, split: str = "retrieval", *,
                 per_class: int | None = None, features: "FeatureConfig | None" = None, jpeg: bool = True,
                 tasks: Sequence[int] | None = None) -> dict[str, Any]:
    """The clips of an on-disk split rendered in memory, with the evaluation transform.

    The clips are the ones :func:`generate_synthetic` writes for ``split`` (same seeds, same JPEG
    round trip), so diagnostics can run without the files.

    :param per_class: clips per class (default: the split's size in the preset).
    :param tasks: only the classes of these tasks (default all).
    :returns: ``video`` (N, T, 3, S, S), ``audio`` (N, 1, A, F) float32, ``label`` (N,) int64 class ids,
        ``task`` (N,) int64, ``truth`` list of N ground-truth dicts, ``keys`` list of N clip keys.
    """
    p = get_preset(preset)
    feats = features if features is not None else default_features(p)
    check_features(p, feats)
    vocab = build_vocabulary(p, seed)
    n = p.per_class(split) if per_class is None else int(per_class)
    videos, audios, labels, task_ids, truths, keys = [], [], [], [], [], []
    for spec in vocab.classes:
        if tasks is not None and spec.task not in tasks:
            continue
        d_pool, s_pool = clutter_pools(vocab, spec)
        for i in range(n):
            clip = render_clip(spec, clip_rng(seed, split, spec.class_id, i), p, d_pool, s_pool)
            v, a = sample_from_clip(clip, feats, train=False, jpeg_quality=p.jpeg_quality if jpeg else None,
                                     generator=None)
            videos.append(v)
            audios.append(a)
            labels.append(spec.class_id)
            task_ids.append(spec.task)
            truths.append(clip.truth)
            keys.append(clip_key(split, spec, i))
    return {"video": torch.stack(videos), "audio": torch.stack(audios),
            "label": torch.tensor(labels, dtype=torch.int64), "task": torch.tensor(task_ids, dtype=torch.int64),
            "truth": truths, "keys": keys}
