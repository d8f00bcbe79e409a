"""Procedural audio-visual benchmark: class vocabulary, clip rendering, media + manifest writer.

The generator makes the STELLA problem real at small scale (``docs/benchmarks.md`` §7, which also
names the settings calibration runs found necessary; ``docs/synthetic.md``):

* **Classes** = visual identity (shape x texture x palette colour) + sound identity (1-3 harmonic
  partial bands with an amplitude-modulation timbre), grouped into tasks. Class ``j`` of task ``t``
  shares its *visual* identity with class ``j`` of task ``t + twin_offset`` but has a different sound,
  so learning the later pairing overwrites the earlier one (multimodal correlation overwriting).
* **Clip** = ``num_segments`` segments of ``segment_seconds``; the sounding object (20-32 px, straight
  path) is visible in a random 1..S-1 of the segments, and its sound is on in exactly those segments.
  Instance cues shared by both modalities: the on/off pattern, pitch shift by the object's mean height,
  loudness by its size. A faint full-frame tint marks the sounding frames.
* **Clutter**: an optional static silent distractor (another class's visual), a dark gradient
  background, pixel noise; an audio noise floor with a random spectral tilt and occasional off-screen
  sounds (a band with no visual counterpart).

Media are written in the prepared-VGGSound layout (``frames/<key>/frame_<i>.jpg`` + ``audio/<key>.wav``
+ header-less 6-field split CSVs + a label CSV), so the real loading path runs end to end. Audio and
video are time-aligned: the loader's window starts at 0 and spans the whole clip (see
``FeatureConfig.synthetic()``). Only the frames the loader reads are stored: frame ``i`` shows time
``i / frames_fps``, and the loader samples the start of each segment.

Everything is deterministic in ``(seed, split, class, clip index)``: every clip draws from its own
``numpy.random.Generator`` seeded with a ``SeedSequence`` of those values (disjoint per split), JPEG (PIL)
and PCM wav are deterministic encoders, and the ground truth is written as sorted JSON, so the same seed
gives byte-identical files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time
import wave
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from stella_avalanche.utils import build_lock

if TYPE_CHECKING:
    from stella_avalanche.data.features import FeatureConfig

__all__ = [
    "SYNTHETIC_VERSION",
    "SyntheticPreset",
    "PRESETS",
    "get_preset",
    "VisualIdentity",
    "SoundIdentity",
    "ClassSpec",
    "Vocabulary",
    "build_vocabulary",
    "RenderedClip",
    "render_clip",
    "clip_rng",
    "frame_indices",
    "generate_synthetic",
    "synthetic_root",
    "is_complete",
    "load_ground_truth",
    "truth_patch_mask",
    "SPLITS",
    "SyntheticInitDataset",
    "SyntheticInitRetrievalDataset",
    "default_features",
    "clip_key",
    "random_identity",
    "render_init_clip",
    "init_exclusions",
    "sound_key",
    "render_split",
    "jpeg_roundtrip",
    "LABEL_CSV",
]

#: Bump when the rendering changes: part of the cache directory name, so old caches are not reused.
SYNTHETIC_VERSION = "v2"

#: On-disk splits: training clips, per-task validation clips, retrieval pool.
SPLITS: tuple[str, ...] = ("train", "test", "retrieval")
#: Split codes feed the per-clip seed; the init splits are never written to disk.
_SPLIT_CODES = {"train": 1, "test": 2, "retrieval": 3, "init": 4, "init_retrieval": 5}
_MARKER = "COMPLETE.json"
LABEL_CSV = "class_labels_indices.csv"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
TEXTURES: tuple[str, ...] = ("solid", "hstripes", "vstripes", "checker")
#: Saturated palette colours in [0, 1] RGB.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.15, 0.15),  # red
    (0.15, 0.9, 0.2),  # green
    (0.2, 0.35, 1.0),  # blue
    (1.0, 0.9, 0.1),  # yellow
    (0.95, 0.2, 0.95),  # magenta
    (0.1, 0.95, 0.95),  # cyan
    (1.0, 0.55, 0.05),  # orange
    (0.95, 0.95, 0.95),  # white
)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
#: Amplitude-modulation timbres: (rate Hz, depth). Rate 0 = steady tone.
TIMBRES: tuple[tuple[float, float], ...] = ((0.0, 0.0), (4.0, 0.8), (8.0, 0.6), (13.0, 0.9), (19.0, 0.7))


@dataclass(frozen=True)
class SyntheticPreset:
    """All sizes and difficulty knobs of the generator (pixel values in [0, 1] units).

    :param name: preset name (part of the cache directory).
    :param num_tasks: number of tasks (experiences), in a fixed order.
    :param classes_per_task: classes per task.
    :param twin_offset: class ``j`` of task ``t`` shares its visual identity with class ``j`` of task
        ``t + twin_offset`` (different sound); ``0`` disables the reuse.
    :param train_per_class: training clips per class.
    :param test_per_class: per-task validation clips per class.
    :param retrieval_per_class: retrieval-pool clips per class.
    :param init_classes: number of initialisation classes (distinct identities, same families). Used
        by the init stream only when ``init_identity == "class"``; it also sizes the fixed held-out
        init pool that stage 2 stops on.
    :param init_identity: how the initialisation stream draws a clip's appearance and sound:
        ``"per_clip"`` (default: a fresh visual and sound identity for every clip, from the same
        families but never one of the benchmark's or the transfer classes, so stage 1 cannot succeed by
        memorising which colour goes with which timbre and can only learn the instance cues that
        transfer: on/off synchrony, pitch by height, loudness by size) or ``"class"``
        (``init_classes`` fixed classes, generator v1's stream; docs/synthetic.md).
    :param max_on_segments: the sounding object is on in 1..``max_on_segments`` segments (``None``,
        the default: up to ``num_segments - 1``). ``2`` (preset ``half_sounding``) keeps at most half of
        the segments sounding, so a selector that keeps half of the audio chunks (κ = 0.5, one chunk per
        segment) can keep every sounding chunk and with it the clip's whole on/off pattern
        (docs/synthetic.md, "geometry").
    :param init_tint: ``tint`` of the init stream (``None``: the benchmark's). Stage 1 plays the part
        of large-scale pre-training, so its instance cues may be made stronger than the stream's (the
        per-clip recipe of docs/synthetic.md used 0.25).
    :param init_p_distractor: ``p_distractor`` of the init stream (``None``: the benchmark's; 0.25 in
        the per-clip recipe).
    :param init_p_offscreen: ``p_offscreen`` of the init stream (``None``: the benchmark's; 0 in the
        per-clip recipe).
    :param init_retrieval_per_class: clips per init class in the fixed held-out init retrieval pool.
    :param image_size: frame side in pixels (square frames).
    :param num_segments: segments per clip = frames read per clip.
    :param segment_seconds: length of one segment; the loader samples a frame at each segment start.
    :param frames_fps: frame rate of the stored frame numbering (frame ``i`` shows ``i / frames_fps`` s).
    :param sample_rate: audio sample rate in Hz.
    :param mel_bins: mel bins used to place the sound bands (Kaldi mel scale, 20 Hz to Nyquist).
    :param object_size: (min, max) side of the sounding object in pixels.
    :param distractor_size: (min, max) side of the silent distractor in pixels.
    :param p_distractor: probability of one static silent distractor.
    :param max_speed: maximum object speed in pixels per sampled frame (per axis).
    :param tint: full-frame tint strength (x class colour) on sounding frames.
    :param background_level: per-channel background level is uniform in [0, background_level].
    :param background_gradient: amplitude of the random linear background gradient (+/-).
    :param pixel_noise: standard deviation of Gaussian pixel noise.
    :param max_pitch_shift: pitch shift in mel bins of a clip whose object is at the top.
    :param loudness: (min, max) event amplitude, mapped linearly from the object size.
    :param event_level: peak amplitude of a full-loudness event in the waveform.
    :param ramp_seconds: raised-cosine on/off ramp of each audio event.
    :param noise_rms: (min, max) RMS of the tilted audio noise floor.
    :param p_offscreen: probability of an off-screen sound (a band with no visual counterpart).
    :param offscreen_level: (min, max) level of the off-screen sound relative to ``event_level``.
    :param jpeg_quality: JPEG quality of the stored frames.
    """

    name: str = "default"
    num_tasks: int = 8
    classes_per_task: int = 3
    twin_offset: int = 4
    train_per_class: int = 200
    test_per_class: int = 10
    retrieval_per_class: int = 40
    init_classes: int = 12
    init_retrieval_per_class: int = 10
    init_identity: str = "per_clip"
    max_on_segments: int | None = None
    init_tint: float | None = None
    init_p_distractor: float | None = None
    init_p_offscreen: float | None = None
    image_size: int = 64
    num_segments: int = 4
    segment_seconds: float = 0.64
    frames_fps: float = 25.0
    sample_rate: int = 16000
    mel_bins: int = 64
    object_size: tuple[int, int] = (20, 32)
    distractor_size: tuple[int, int] = (16, 24)
    p_distractor: float = 0.5
    max_speed: float = 2.0
    tint: float = 0.08
    background_level: float = 0.05
    background_gradient: float = 0.1
    pixel_noise: float = 0.02
    max_pitch_shift: float = 8.0
    loudness: tuple[float, float] = (0.6, 1.0)
    event_level: float = 0.3
    ramp_seconds: float = 0.03
    noise_rms: tuple[float, float] = (0.002, 0.006)
    p_offscreen: float = 0.3
    offscreen_level: tuple[float, float] = (0.15, 0.3)
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.num_segments < 2:
            raise ValueError("num_segments must be >= 2 (the object is on in 1..num_segments-1 segments)")
        if not 0 <= self.twin_offset < self.num_tasks:
            raise ValueError(f"twin_offset={self.twin_offset} must be in [0, num_tasks={self.num_tasks})")
        if self.object_size[1] + 3 * self.max_speed > self.image_size:
            raise ValueError("object_size/max_speed too large for image_size")
        if self.init_identity not in ("per_clip", "class"):
            raise ValueError(f"init_identity={self.init_identity!r} must be 'per_clip' or 'class'")
        if self.max_on_segments is not None and not 1 <= self.max_on_segments <= self.num_segments - 1:
            raise ValueError(f"max_on_segments={self.max_on_segments} must be in [1, num_segments-1="
                             f"{self.num_segments - 1}]")

    @property
    def on_segments(self) -> tuple[int, int]:
        """(min, max) number of sounding segments per clip."""
        return 1, (self.num_segments - 1 if self.max_on_segments is None else self.max_on_segments)

    @property
    def clip_seconds(self) -> float:
        """Clip length in seconds (= num_segments * segment_seconds)."""
        return self.num_segments * self.segment_seconds

    @property
    def num_samples(self) -> int:
        """Waveform length in samples."""
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def num_classes(self) -> int:
        """Number of benchmark (task) classes."""
        return self.num_tasks * self.classes_per_task

    @property
    def task_names(self) -> list[str]:
        """Task names in training order: ``task0``, ``task1``, ..."""
        return [f"task{t}" for t in range(self.num_tasks)]

    def per_class(self, split: str) -> int:
        """Clips per class of an on-disk split."""
        return {"train": self.train_per_class, "test": self.test_per_class,
                "retrieval": self.retrieval_per_class}[split]


PRESETS: dict[str, SyntheticPreset] = {
    # 24 classes x (200 + 10 + 10) clips: the CPU default (generation 40-65 s on 2 busy cores, ~540 MB).
    "default": SyntheticPreset(name="default"),
    # GPU runs: more training clips per class at the same resolution (the tiny/base model presets
    # assume 64 px synthetic frames).
    "large": SyntheticPreset(name="large", train_per_class=1000, test_per_class=20),
    # Tests: a handful of clips per class.
    "tiny": SyntheticPreset(name="tiny", train_per_class=4, test_per_class=2, retrieval_per_class=3,
                            init_retrieval_per_class=2),
    # At most half of the segments sound, so a selector keeping half of the audio chunks can keep every
    # sounding chunk (on the default, with one audio chunk per segment, it must drop a sounding chunk of
    # every 3-segment clip). Not the default: from it, multitask learned far less (docs/synthetic.md).
    "half_sounding": SyntheticPreset(name="half_sounding", max_on_segments=2),
}


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    """Resolve a preset name (``default``, ``large``, ``tiny``) or pass a preset through."""
    if isinstance(preset, SyntheticPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}") from None


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisualIdentity:
    """Shape x texture x palette colour (indices into SHAPES, TEXTURES, PALETTE)."""

    shape: int
    texture: int
    colour: int

    @property
    def description(self) -> str:
        return f"{COLOUR_NAMES[self.colour]} {TEXTURES[self.texture]} {SHAPES[self.shape]}"


@dataclass(frozen=True)
class SoundIdentity:
    """Harmonic partial bands: frequencies ``f0 * h`` for ``h`` in ``harmonics``, AM timbre.

    :param f0: fundamental in Hz (before the instance pitch shift).
    :param harmonics: harmonic numbers of the 1-3 bands.
    :param weights: relative amplitude of each band.
    :param timbre: index into TIMBRES (amplitude-modulation rate and depth).
    """

    f0: float
    harmonics: tuple[int, ...]
    weights: tuple[float, ...]
    timbre: int

    @property
    def description(self) -> str:
        rate, _ = TIMBRES[self.timbre]
        bands = "+".join(str(h) for h in self.harmonics)
        return f"{self.f0:.0f} Hz x{bands} am{rate:g}"


@dataclass(frozen=True)
class ClassSpec:
    """One class: identities plus its place in the benchmark (``task = -1`` for init classes)."""

    class_id: int
    task: int
    mid: str
    visual: VisualIdentity
    sound: SoundIdentity

    @property
    def display_name(self) -> str:
        return f"{self.visual.description} / {self.sound.description}"


@dataclass(frozen=True)
class Vocabulary:
    """The classes of one seed: benchmark classes (row order = class id) and init classes."""

    classes: tuple[ClassSpec, ...]
    init_classes: tuple[ClassSpec, ...]
    task_names: tuple[str, ...]


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * np.expm1(np.asarray(m, dtype=np.float64) / 1127.0)


def _mel_step(preset: SyntheticPreset) -> float:
    """Width of one mel bin (Kaldi layout: mel_bins + 2 equally spaced edges from 20 Hz to Nyquist)."""
    lo, hi = _hz_to_mel(20.0), _hz_to_mel(preset.sample_rate / 2)
    return float(hi - lo) / (preset.mel_bins + 1)


SoundKey = tuple[float, tuple[int, ...], int]


def _draw_sound(rng: np.random.Generator, preset: SyntheticPreset,
                taken: Sequence[SoundKey]) -> tuple[SoundIdentity, SoundKey] | None:
    """One attempt at a sound identity distinct from ``taken``; None when the draw is rejected.

    Fundamental bin between 6 and 40 (about 150 Hz to 2.4 kHz at 64 bins / 16 kHz); the top harmonic
    (plus the largest pitch shift) must stay below 0.8 * Nyquist; a sound with the same harmonics and
    timbre must sit at least 3 mel bins away from every taken one.
    """
    step = _mel_step(preset)
    mel_lo = float(_hz_to_mel(20.0))
    n_bands = int(rng.integers(1, 4))
    harmonics = tuple(sorted(int(h) for h in rng.choice([1, 2, 3, 4], size=n_bands, replace=False)))
    f0_bin = float(rng.integers(6, 41))
    f0 = float(_mel_to_hz(mel_lo + f0_bin * step))
    f0_max = float(_mel_to_hz(mel_lo + (f0_bin + preset.max_pitch_shift) * step))
    if f0_max * max(harmonics) > 0.8 * preset.sample_rate / 2:
        return None
    timbre = int(rng.integers(len(TIMBRES)))
    if any(h == harmonics and t == timbre and abs(b - f0_bin) < 3 for b, h, t in taken):
        return None
    weights = tuple(float(w) for w in np.round(rng.uniform(0.5, 1.0, size=n_bands), 3))
    return (SoundIdentity(f0=round(f0, 3), harmonics=harmonics, weights=weights, timbre=timbre),
            (f0_bin, harmonics, timbre))


def sound_key(sound: SoundIdentity, preset: SyntheticPreset) -> SoundKey:
    """(fundamental mel bin, harmonics, timbre) of a sound: what :func:`_draw_sound` keeps distinct."""
    f0_bin = round((float(_hz_to_mel(sound.f0)) - float(_hz_to_mel(20.0))) / _mel_step(preset))
    return float(f0_bin), tuple(sound.harmonics), int(sound.timbre)


def random_identity(rng: np.random.Generator, preset: SyntheticPreset, *,
                    exclude_visuals: Sequence[VisualIdentity] = (),
                    exclude_sounds: Sequence[SoundKey] = ()) -> tuple[VisualIdentity, SoundIdentity]:
    """A fresh (visual, sound) identity from the benchmark's families, avoiding the excluded ones.

    Used by the per-clip initialisation stream: appearance and timbre are unrelated draws, so the
    only audio-visual regularities left are the instance cues every clip shares.
    """
    banned = set(exclude_visuals)
    for _ in range(10_000):
        v = VisualIdentity(int(rng.integers(len(SHAPES))), int(rng.integers(len(TEXTURES))),
                           int(rng.integers(len(PALETTE))))
        if v not in banned:
            break
    else:  # pragma: no cover - the families hold 192 visuals, far more than any exclusion list
        raise ValueError("no visual identity left outside the excluded ones")
    for _ in range(10_000):
        drawn = _draw_sound(rng, preset, exclude_sounds)
        if drawn is not None:
            return v, drawn[0]
    raise ValueError("no sound identity left outside the excluded ones")  # pragma: no cover


def build_vocabulary(preset: SyntheticPreset, seed: int) -> Vocabulary:
    """Draw the class identities of a seed.

    Visual identities: ``num_tasks - twin_offset`` tasks' worth of distinct combinations (each reused
    by the twin task), colours distinct within a task; init classes get further distinct combinations.
    Sound identities: all distinct (fundamental on a mel grid at least 3 bins apart from any other class
    with the same harmonics and timbre).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC1A55, 1]))
    n_tasks, k = preset.num_tasks, preset.classes_per_task
    n_unique_tasks = n_tasks - preset.twin_offset if preset.twin_offset else n_tasks
    combos = [(s, t, c) for s in range(len(SHAPES)) for t in range(len(TEXTURES)) for c in range(len(PALETTE))]
    order = rng.permutation(len(combos))
    used: set[tuple[int, int, int]] = set()

    def draw_visuals(n: int, distinct_colours: bool) -> list[VisualIdentity]:
        out: list[VisualIdentity] = []
        colours: set[int] = set()
        for i in order:
            combo = combos[int(i)]
            if combo in used or (distinct_colours and combo[2] in colours and len(colours) < len(PALETTE)):
                continue
            used.add(combo)
            colours.add(combo[2])
            out.append(VisualIdentity(*combo))
            if len(out) == n:
                return out
        raise ValueError("not enough distinct visual identities for this preset")

    task_visuals = [draw_visuals(k, distinct_colours=True) for _ in range(n_unique_tasks)]
    init_visuals = draw_visuals(preset.init_classes, distinct_colours=False)

    # Sounds: fundamentals on a mel grid so that the highest band stays below ~6 kHz.
    sounds: list[SoundIdentity] = []
    taken: list[SoundKey] = []
    n_sounds = preset.num_classes + preset.init_classes
    attempts = 0
    while len(sounds) < n_sounds:
        attempts += 1
        if attempts > 100_000:
            raise ValueError("could not draw distinct sound identities")
        drawn = _draw_sound(rng, preset, taken)
        if drawn is not None:
            taken.append(drawn[1])
            sounds.append(drawn[0])

    classes: list[ClassSpec] = []
    for t in range(n_tasks):
        vis_task = t - preset.twin_offset if (preset.twin_offset and t >= n_unique_tasks) else t
        for j in range(k):
            cid = t * k + j
            classes.append(ClassSpec(class_id=cid, task=t, mid=f"syn_t{t}_c{j}",
                                     visual=task_visuals[vis_task][j], sound=sounds[cid]))
    init = tuple(
        ClassSpec(class_id=i, task=-1, mid=f"syn_init_c{i}", visual=init_visuals[i],
                  sound=sounds[preset.num_classes + i])
        for i in range(preset.init_classes)
    )
    return Vocabulary(classes=tuple(classes), init_classes=init, task_names=tuple(preset.task_names))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def clip_rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    """The generator of one clip: a SeedSequence of (seed, split code, class, clip index).

    Different splits use different codes, so their streams are disjoint by construction.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], class_id, index]))


def frame_indices(preset: SyntheticPreset) -> list[int]:
    """Stored frame numbers: the start of each segment at ``frames_fps`` (0, 16, 32, 48 by default)."""
    return [int(round(s * preset.segment_seconds * preset.frames_fps)) for s in range(preset.num_segments)]


@dataclass
class RenderedClip:
    """One rendered clip.

    :param frames: uint8 (S, H, W, 3), one frame per segment start.
    :param waveform: float32 (N,) in [-1, 1], already quantised to 16-bit levels (matches the wav).
    :param pcm: int16 (N,) the exact samples of the wav file (``waveform == pcm / 32768``).
    :param truth: ground truth (JSON-serialisable): pattern, boxes, size, pitch shift, loudness, ...
    """

    frames: np.ndarray
    waveform: np.ndarray
    pcm: np.ndarray
    truth: dict[str, Any] = field(default_factory=dict)


def _shape_mask(shape: int, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred in its square."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = (yy - c) / (size / 2.0), (xx - c) / (size / 2.0)
    r = np.sqrt(dx * dx + dy * dy)
    name = SHAPES[shape]
    if name == "circle":
        m = r <= 1.0
    elif name == "square":
        m = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    elif name == "triangle":
        # apex at the top, base at the bottom
        m = (dy <= 0.9) & (np.abs(dx) <= (dy + 1.0) / 2.0)
    elif name == "diamond":
        m = np.abs(dx) + np.abs(dy) <= 1.0
    elif name == "cross":
        m = ((np.abs(dx) <= 0.3) | (np.abs(dy) <= 0.3)) & (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    elif name == "ring":
        m = (r <= 1.0) & (r >= 0.5)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(name)
    return m


def _sprite(visual: VisualIdentity, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask (s,s) bool, rgb (s,s,3) float32) of a textured coloured shape."""
    mask = _shape_mask(visual.shape, size)
    yy, xx = np.mgrid[0:size, 0:size]
    tex = TEXTURES[visual.texture]
    if tex == "solid":
        level = np.ones((size, size), np.float32)
    elif tex == "hstripes":
        level = np.where((yy // 3) % 2 == 0, 1.0, 0.45).astype(np.float32)
    elif tex == "vstripes":
        level = np.where((xx // 3) % 2 == 0, 1.0, 0.45).astype(np.float32)
    else:  # checker
        level = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 1.0, 0.45).astype(np.float32)
    rgb = level[..., None] * np.asarray(PALETTE[visual.colour], np.float32)
    return mask, rgb


def _box_of(mask: np.ndarray, x: int, y: int) -> list[int]:
    """[x0, y0, x1, y1) pixel box of the mask's True pixels placed at top-left (x, y)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return [int(x + cols[0]), int(y + rows[0]), int(x + cols[-1] + 1), int(y + rows[-1] + 1)]


def _paste(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray, x: int, y: int) -> None:
    s = mask.shape[0]
    region = canvas[y:y + s, x:x + s]
    region[mask] = rgb[mask]


def _band_waveform(t: np.ndarray, freqs: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sum of narrow partial clusters (3 partials +/-1.5 % around each band frequency), random phases.

    :param t: (N,) time in seconds. :param freqs: (B,) band frequencies. :param weights: (B,).
    :returns: (N,) float64 with unit peak-ish scale (sum of weights / sqrt(3) per band).
    """
    detune = np.array([0.985, 1.0, 1.015])
    partials = (freqs[:, None] * detune[None, :]).reshape(-1)  # (3B,)
    amps = np.repeat(weights, 3) / math.sqrt(3.0)
    phases = rng.uniform(0, 2 * math.pi, size=partials.shape[0])
    # sin(a + b) = sin a cos b + cos a sin b with t = block start + offset: two small matrix products
    # instead of one sine per sample and partial (the init stream renders every clip afresh)
    n = t.shape[0]
    dt = float(t[1] - t[0]) if n > 1 else 1.0
    block = 1024
    nb = -(-n // block)
    w = 2 * math.pi * partials                                     # (P,) rad/s
    start = t[0] + np.arange(nb) * block * dt                      # (nb,)
    alpha = start[:, None] * w[None, :] + phases[None, :]          # (nb, P)
    beta = (np.arange(block) * dt)[:, None] * w[None, :]           # (block, P)
    out = (amps * np.sin(alpha)) @ np.cos(beta).T + (amps * np.cos(alpha)) @ np.sin(beta).T
    return out.reshape(-1)[:n]


def _segment_envelope(preset: SyntheticPreset, pattern: np.ndarray) -> np.ndarray:
    """(N,) envelope: 1 inside active segments, raised-cosine ramps inside each segment's edges."""
    n = preset.num_samples
    seg_len = n // preset.num_segments
    ramp = max(1, int(round(preset.ramp_seconds * preset.sample_rate)))
    one = np.ones(seg_len)
    r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
    one[:ramp] = r
    one[-ramp:] = r[::-1]
    env = np.zeros(n)
    for s in np.nonzero(pattern)[0]:
        env[s * seg_len:(s + 1) * seg_len] = one
    # Merge adjacent active segments into one event (no dip at the shared boundary).
    for s in range(preset.num_segments - 1):
        if pattern[s] and pattern[s + 1]:
            a = (s + 1) * seg_len
            env[a - ramp:a + ramp] = 1.0
    return env


def _tilted_noise(n: int, rms: float, tilt: float, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """White noise reshaped by a spectral tilt ``(f / 1 kHz) ** tilt`` and scaled to ``rms``."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, d=1.0 / sample_rate)
    spec *= np.power(np.maximum(f, 50.0) / 1000.0, tilt)
    x = np.fft.irfft(spec, n=n)
    return x * (rms / (x.std() + 1e-12))


@dataclass(frozen=True)
class _Motion:
    """Instance parameters of a clip's sounding object (drawn by :func:`_draw_motion`).

    :param pattern: bool (S,) segments in which the object is visible and sounding.
    :param size: sprite side in pixels.
    :param vx: horizontal speed in pixels per segment; ``vy`` vertical.
    :param xs: int (S,) top-left column per segment; ``ys`` row.
    """

    pattern: np.ndarray
    size: int
    vx: float
    vy: float
    xs: np.ndarray
    ys: np.ndarray


def _draw_motion(rng: np.random.Generator, preset: SyntheticPreset) -> _Motion:
    """Draw the on/off pattern, size and straight path of the object (first draws of a clip)."""
    H = W = preset.image_size
    S = preset.num_segments
    lo_on, hi_on = preset.on_segments
    n_on = int(rng.integers(lo_on, hi_on + 1))
    pattern = np.zeros(S, dtype=bool)
    pattern[rng.choice(S, size=n_on, replace=False)] = True
    size = int(rng.integers(preset.object_size[0], preset.object_size[1] + 1))
    vx, vy = (float(v) for v in rng.uniform(-preset.max_speed, preset.max_speed, size=2))
    span = S - 1

    def start_range(v: float) -> tuple[float, float]:
        # start positions that keep the whole path inside the frame
        return max(0.0, -v * span), (W - size) - max(0.0, v * span)

    x0 = float(rng.uniform(*start_range(vx)))
    y0 = float(rng.uniform(*start_range(vy)))
    xs = np.clip(np.round(x0 + vx * np.arange(S)).astype(int), 0, W - size)
    ys = np.clip(np.round(y0 + vy * np.arange(S)).astype(int), 0, H - size)
    return _Motion(pattern=pattern, size=size, vx=vx, vy=vy, xs=xs, ys=ys)


def _draw_background(rng: np.random.Generator, preset: SyntheticPreset) -> np.ndarray:
    """float32 (S, H, W, 3) frames holding a dark linear-gradient background (base, angle, amplitude)."""
    H = W = preset.image_size
    base = rng.uniform(0.0, preset.background_level, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    proj = ((xx / (W - 1) - 0.5) * math.cos(angle) + (yy / (H - 1) - 0.5) * math.sin(angle)) * 2.0  # [-1.4, 1.4]
    grad_amp = rng.uniform(-preset.background_gradient, preset.background_gradient, size=3)
    background = base[None, None, :] + np.clip(proj, -1, 1)[..., None] * grad_amp[None, None, :]
    return np.broadcast_to(background, (preset.num_segments, H, W, 3)).astype(np.float32).copy()


def _add_distractor(frames: np.ndarray, rng: np.random.Generator, preset: SyntheticPreset,
                    pool: Sequence[VisualIdentity], motion: _Motion) -> dict[str, Any] | None:
    """Maybe paste a static silent distractor into every frame (in place); its ground truth or None."""
    if not (pool and rng.random() < preset.p_distractor):
        return None
    W = preset.image_size
    d_vis = pool[int(rng.integers(len(pool)))]
    d_size = int(rng.integers(preset.distractor_size[0], preset.distractor_size[1] + 1))
    d_mask, d_rgb = _sprite(d_vis, d_size)
    # Prefer a place that does not overlap the object's path (a few tries, then accept).
    xs, ys, size = motion.xs, motion.ys, motion.size
    obj_box = (int(xs.min()), int(ys.min()), int(xs.max()) + size, int(ys.max()) + size)
    for _ in range(8):
        dx, dy = (int(v) for v in rng.integers(0, W - d_size + 1, size=2))
        if dx + d_size <= obj_box[0] or dx >= obj_box[2] or dy + d_size <= obj_box[1] or dy >= obj_box[3]:
            break
    for s in range(frames.shape[0]):
        _paste(frames[s], d_mask, d_rgb, dx, dy)
    return {"box": _box_of(d_mask, dx, dy), "shape": d_vis.shape, "texture": d_vis.texture,
            "colour": d_vis.colour}


def _add_object(frames: np.ndarray, spec: ClassSpec, preset: SyntheticPreset,
                motion: _Motion) -> list[list[int] | None]:
    """Paste the class's sprite and the tint into the sounding frames (in place); per-frame boxes."""
    mask, rgb = _sprite(spec.visual, motion.size)
    boxes: list[list[int] | None] = []
    colour = np.asarray(PALETTE[spec.visual.colour], np.float32)
    for s in range(frames.shape[0]):
        if motion.pattern[s]:
            x, y = int(motion.xs[s]), int(motion.ys[s])
            _paste(frames[s], mask, rgb, x, y)
            frames[s] += preset.tint * colour  # faint full-frame tint marks sounding frames
            boxes.append(_box_of(mask, x, y))
        else:
            boxes.append(None)
    return boxes


def _finish_frames(frames: np.ndarray, rng: np.random.Generator, preset: SyntheticPreset) -> np.ndarray:
    """Add pixel noise (in place) and quantise to uint8 (S, H, W, 3)."""
    frames += rng.normal(0.0, preset.pixel_noise, size=frames.shape).astype(np.float32)
    return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


def _object_cues(preset: SyntheticPreset, motion: _Motion) -> tuple[float, float, float]:
    """(mean centre row, pitch shift in mel bins, loudness) of the object: the shared instance cues."""
    H = preset.image_size
    on_rows = (motion.ys + motion.size / 2.0)[motion.pattern]
    mean_cy = float(on_rows.mean())
    # Higher on screen (small y) -> higher pitch: 0 .. max_pitch_shift mel bins.
    lo_c, hi_c = preset.object_size[0] / 2.0, H - preset.object_size[0] / 2.0
    height = 1.0 - float(np.clip((mean_cy - lo_c) / (hi_c - lo_c), 0.0, 1.0))
    pitch_shift = preset.max_pitch_shift * height
    lo_s, hi_s = preset.object_size
    loud = preset.loudness[0] + (preset.loudness[1] - preset.loudness[0]) * (motion.size - lo_s) / max(1, hi_s - lo_s)
    return mean_cy, pitch_shift, loud


def _object_sound(snd: SoundIdentity, t: np.ndarray, rng: np.random.Generator, preset: SyntheticPreset,
                  pattern: np.ndarray, pitch_shift: float, loud: float) -> tuple[np.ndarray, float]:
    """(N,) waveform of the object's sound, on in the ``pattern`` segments, and its pitched f0 in Hz."""
    f0 = float(_mel_to_hz(_hz_to_mel(snd.f0) + pitch_shift * _mel_step(preset)))
    freqs = f0 * np.asarray(snd.harmonics, np.float64)
    tone = _band_waveform(t, freqs, np.asarray(snd.weights), rng)
    rate, depth = TIMBRES[snd.timbre]
    if rate > 0:
        am_phase = rng.uniform(0, 2 * math.pi)
        tone *= 1.0 - depth * (0.5 - 0.5 * np.cos(2 * math.pi * rate * t + am_phase))
    tone /= np.abs(tone).max() + 1e-9
    return preset.event_level * loud * tone * _segment_envelope(preset, pattern), f0


def _noise_floor(rng: np.random.Generator, preset: SyntheticPreset) -> np.ndarray:
    """(N,) background noise with a random level and spectral tilt."""
    noise_rms = float(rng.uniform(*preset.noise_rms))
    tilt = float(rng.uniform(-1.0, 0.3))
    return _tilted_noise(preset.num_samples, noise_rms, tilt, rng, preset.sample_rate)


def _offscreen_sound(t: np.ndarray, rng: np.random.Generator, preset: SyntheticPreset,
                     pool: Sequence[SoundIdentity]) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """Maybe an off-screen sound: ((N,) waveform, ground truth), or (None, None)."""
    if not (pool and rng.random() < preset.p_offscreen):
        return None, None
    o_snd = pool[int(rng.integers(len(pool)))]
    h = int(rng.choice(o_snd.harmonics))
    o_shift = float(rng.uniform(0, preset.max_pitch_shift))
    o_f = float(_mel_to_hz(_hz_to_mel(o_snd.f0) + o_shift * _mel_step(preset))) * h
    o_pattern = np.zeros(preset.num_segments, dtype=bool)
    o_pattern[rng.choice(preset.num_segments, size=int(rng.integers(1, 3)), replace=False)] = True
    o_tone = _band_waveform(t, np.array([o_f]), np.array([1.0]), rng)
    o_tone /= np.abs(o_tone).max() + 1e-9
    level = float(rng.uniform(*preset.offscreen_level))
    wav = preset.event_level * level * o_tone * _segment_envelope(preset, o_pattern)
    return wav, {"frequency": round(o_f, 3), "pattern": [bool(v) for v in o_pattern], "level": round(level, 4)}


def _quantise_audio(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int16 pcm, float32 waveform = pcm / 32768) of a float waveform clipped to [-1, 1]."""
    wav = np.clip(wav, -1.0, 1.0)
    # Quantise to the 16-bit levels of the stored wav, so in-memory clips equal decoded files.
    pcm = np.round(wav * 32767.0).astype(np.int16)
    return pcm, (pcm.astype(np.float32) / 32768.0)


def render_clip(spec: ClassSpec, rng: np.random.Generator, preset: SyntheticPreset,
                distractor_pool: Sequence[VisualIdentity], sound_pool: Sequence[SoundIdentity]) -> RenderedClip:
    """Render one clip of class ``spec`` from its own generator.

    The helpers draw from ``rng`` in a fixed order (motion, background, distractor, pixel noise, object
    sound, noise floor, off-screen sound); changing that order changes every generated data set.

    :param spec: the clip's class.
    :param rng: the clip's generator (see :func:`clip_rng`).
    :param preset: sizes and difficulty knobs.
    :param distractor_pool: visual identities a silent distractor is drawn from (own visual excluded here).
    :param sound_pool: sound identities an off-screen sound is drawn from (own sound excluded here).
    :returns: frames uint8 (S, H, W, 3), waveform float32 (N,), JSON-able ground truth.
    """
    motion = _draw_motion(rng, preset)
    # --- video -----------------------------------------------------------------------------------
    frames = _draw_background(rng, preset)
    distractor = _add_distractor(frames, rng, preset, distractor_pool, motion)
    boxes = _add_object(frames, spec, preset, motion)
    frames_u8 = _finish_frames(frames, rng, preset)
    # --- audio -----------------------------------------------------------------------------------
    t = np.arange(preset.num_samples) / preset.sample_rate
    mean_cy, pitch_shift, loud = _object_cues(preset, motion)
    wav, f0 = _object_sound(spec.sound, t, rng, preset, motion.pattern, pitch_shift, loud)
    wav = wav + _noise_floor(rng, preset)
    o_wav, offscreen = _offscreen_sound(t, rng, preset, sound_pool)
    if o_wav is not None:
        wav = wav + o_wav
    pcm, waveform = _quantise_audio(wav)

    pattern, xs, ys = motion.pattern, motion.xs, motion.ys
    truth = {
        "class_id": spec.class_id,
        "task": spec.task,
        "pattern": [bool(v) for v in pattern],
        "boxes": boxes,
        "positions": [[int(xs[s]), int(ys[s])] if pattern[s] else None for s in range(len(pattern))],
        "shape": spec.visual.shape,
        "size": motion.size,
        "velocity": [round(motion.vx, 4), round(motion.vy, 4)],
        "mean_center_y": round(mean_cy, 4),
        "pitch_shift": round(pitch_shift, 4),
        "loudness": round(loud, 4),
        "f0": round(f0, 3),
        "distractor": distractor,
        "offscreen": offscreen,
    }
    return RenderedClip(frames=frames_u8, waveform=waveform, pcm=pcm, truth=truth)


def _jpeg_bytes(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def jpeg_roundtrip(frames: np.ndarray, quality: int) -> np.ndarray:
    """Encode + decode uint8 frames (S, H, W, 3) as JPEG, so in-memory clips match stored ones."""
    out = np.empty_like(frames)
    for i, f in enumerate(frames):
        out[i] = np.asarray(Image.open(io.BytesIO(_jpeg_bytes(f, quality))).convert("RGB"))
    return out


# ----------------------------------------------------------------------------------------------
# Writing the data set
# ----------------------------------------------------------------------------------------------
def synthetic_root(seed: int, preset: str | SyntheticPreset, root: str | os.PathLike | None = None) -> Path:
    """Where a generated data set lives: ``root`` if given, else the user cache directory."""
    if root is not None:
        return Path(root)
    from stella_avalanche.utils import default_cache_dir

    p = get_preset(preset)
    return default_cache_dir() / "synthetic" / f"{SYNTHETIC_VERSION}-{p.name}-seed{seed}"


#: Preset fields that only shape the initialisation stream (rendered on the fly, never written), so
#: changing them must not regenerate the on-disk splits and their feature cache.
INIT_ONLY_FIELDS = ("init_classes", "init_retrieval_per_class", "init_identity", "init_tint",
                    "init_p_distractor", "init_p_offscreen")


def _marker_payload(preset: SyntheticPreset, seed: int) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(preset).items() if k not in INIT_ONLY_FIELDS}
    return {"version": SYNTHETIC_VERSION, "seed": seed, "preset": fields}


def is_complete(root: str | os.PathLike, *, seed: int, preset: str | SyntheticPreset) -> bool:
    """True when ``root`` holds a finished generation of exactly this (version, preset, seed)."""
    marker = Path(root) / _MARKER
    if not marker.is_file():
        return False
    try:
        got = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = json.loads(json.dumps(_marker_payload(get_preset(preset), seed)))
    if isinstance(got.get("preset"), dict):  # markers written before INIT_ONLY_FIELDS held them all
        got["preset"] = {k: v for k, v in got["preset"].items() if k not in INIT_ONLY_FIELDS}
    return {k: got.get(k) for k in want} == want


def clip_key(split: str, spec: ClassSpec, index: int) -> str:
    """Unique clip key (= frames directory and wav stem): ``syn_<split>_<mid>_<index>``."""
    return f"syn_{split}_{spec.mid.removeprefix('syn_')}_{index:05d}"


def _job(args: tuple[str, SyntheticPreset, int, str, int, int, int]) -> list[tuple[str, int, dict[str, Any]]]:
    """Worker: render and write clips [start, stop) of one class; return (key, class, truth) rows."""
    out_dir, preset, seed, split, class_id, start, stop = args
    vocab = build_vocabulary(preset, seed)
    spec = vocab.classes[class_id]
    d_pool = [c.visual for c in vocab.classes if c.visual != spec.visual]
    d_pool = list(dict.fromkeys(d_pool))  # unique, order-preserving
    s_pool = [c.sound for c in vocab.classes if c.class_id != class_id]
    idx = frame_indices(preset)
    rows = []
    root = Path(out_dir)
    for i in range(start, stop):
        clip = render_clip(spec, clip_rng(seed, split, class_id, i), preset, d_pool, s_pool)
        key = clip_key(split, spec, i)
        fdir = root / "frames" / key
        fdir.mkdir(parents=True, exist_ok=True)
        for k, f in zip(idx, clip.frames):
            (fdir / f"frame_{k}.jpg").write_bytes(_jpeg_bytes(f, preset.jpeg_quality))
        (root / "audio" / f"{key}.wav").write_bytes(_wav_bytes(clip.pcm, preset.sample_rate))
        rows.append((key, class_id, clip.truth))
    return rows


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)


def generate_synthetic(root: str | os.PathLike | None = None, *, seed: int = 0,
                       preset: str | SyntheticPreset = "default", workers: int = 2,
                       force: bool = False, verbose: bool = False) -> Path:
    """Generate (or reuse) the synthetic data set and return its root.

    Layout under the root (all CSV paths relative to it):
    ``frames/<key>/frame_<i>.jpg``, ``audio/<key>.wav``, ``train.csv``, ``test.csv``, ``retrieval.csv``
    (6 fields, no header: index, vid, frames_path, wav, label mid, task name),
    ``class_labels_indices.csv`` (``index,mid,display_name,category``), ``ground_truth/<split>.json``
    (per clip: on/off pattern, object box per frame, size, pitch shift, loudness, distractor, off-screen
    sound) and ``COMPLETE.json`` written last. Generation happens in a temporary sibling directory that
    is renamed into place, so a killed run never leaves a half-written data set behind.

    :param root: target directory; default ``default_cache_dir()/synthetic/<version>-<preset>-seed<seed>``.
    :param seed: data seed (vocabulary and every clip).
    :param preset: preset name or object.
    :param workers: worker processes (1 = in-process).
    :param force: regenerate even if a complete data set exists.
    :param verbose: print the generation time.
    """
    p = get_preset(preset)
    target = synthetic_root(seed, p, root)
    if not force and is_complete(target, seed=seed, preset=p):
        return target
    # parallel runs wait for one generator, then reuse its data set
    with build_lock(target):
        if not force and is_complete(target, seed=seed, preset=p):
            return target
        return _generate(target, p, seed=seed, workers=workers, force=force, verbose=verbose)


def _generate(target: Path, p: SyntheticPreset, *, seed: int, workers: int, force: bool, verbose: bool) -> Path:
    """Write the data set into a temporary sibling of ``target`` and rename it into place."""
    if target.exists() and any(target.iterdir()) and not (target / _MARKER).exists():
        # A directory we did not write (or an interrupted non-atomic copy): refuse to clobber it.
        raise FileExistsError(f"{target} exists, is not empty and holds no synthetic {_MARKER}; "
                              f"remove it or pass another root")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    t_start = time.perf_counter()
    try:
        (tmp / "frames").mkdir()
        (tmp / "audio").mkdir()
        (tmp / "ground_truth").mkdir()
        vocab = build_vocabulary(p, seed)
        jobs = []
        chunk = 50
        for split in SPLITS:
            for spec in vocab.classes:
                n = p.per_class(split)
                for a in range(0, n, chunk):
                    jobs.append((str(tmp), p, seed, split, spec.class_id, a, min(n, a + chunk)))
        if workers > 1 and len(jobs) > 1:
            with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
                results = pool.map(_job, jobs, chunksize=1)
        else:
            results = [_job(j) for j in jobs]
        by_split: dict[str, list[tuple[str, int, dict[str, Any]]]] = {s: [] for s in SPLITS}
        for job, rows in zip(jobs, results):
            by_split[job[3]].extend(rows)
        for split, rows in by_split.items():
            csv_rows = []
            truth: dict[str, Any] = {}
            for i, (key, cid, tr) in enumerate(rows):
                spec = vocab.classes[cid]
                csv_rows.append([str(i), key, f"frames/{key}", f"audio/{key}.wav", spec.mid,
                                 vocab.task_names[spec.task]])
                truth[key] = tr
            _write_csv(tmp / f"{split}.csv", csv_rows)
            (tmp / "ground_truth" / f"{split}.json").write_text(json.dumps(truth, sort_keys=True))
        _write_csv(tmp / LABEL_CSV,
                   [[str(c.class_id), c.mid, c.display_name, vocab.task_names[c.task]] for c in vocab.classes],
                   header=["index", "mid", "display_name", "category"])
        info = {"image_size": p.image_size, "frame_indices": frame_indices(p), "task_names": list(vocab.task_names),
                "twins": [[c.class_id, c.class_id + p.twin_offset * p.classes_per_task]
                          for c in vocab.classes if p.twin_offset and c.task < p.num_tasks - p.twin_offset]}
        (tmp / "info.json").write_text(json.dumps(info, sort_keys=True, indent=1))
        (tmp / _MARKER).write_text(json.dumps(_marker_payload(p, seed), sort_keys=True, indent=1))
        if target.exists():
            if is_complete(target, seed=seed, preset=p) and not force:
                shutil.rmtree(tmp)  # a concurrent generator finished first
                return target
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if is_complete(target, seed=seed, preset=p):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"synthetic[{p.name}, seed {seed}]: generated in {time.perf_counter() - t_start:.1f} s -> {target}")
    return target


def load_ground_truth(root: str | os.PathLike, split: str) -> dict[str, dict[str, Any]]:
    """Per-clip ground truth of a split: ``{clip key: truth dict}`` (see :func:`render_clip`).

    Boxes are ``[x0, y0, x1, y1)`` in stored-frame pixels and ``positions`` the sprite's top-left
    ``[x, y]``, both ``None`` where the object is not visible; ``shape`` indexes :data:`SHAPES`.
    """
    path = Path(root) / "ground_truth" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no ground truth for split {split!r}: {path}")
    return json.loads(path.read_text())


def truth_patch_mask(truth: dict[str, Any], *, image_size: int, patch_size: int = 16,
                     frame_size: int | None = None) -> np.ndarray:
    """Patches covered by the sounding object, for checking patch-importance maps.

    :param truth: one clip's ground truth (:func:`load_ground_truth`).
    :param image_size: side of the stored frames the boxes refer to.
    :param patch_size: model patch size in model-input pixels.
    :param frame_size: side of the model input (default ``image_size``; boxes are rescaled, which is
        exact for the evaluation transform - a plain resize).
    :returns: bool (S, G, G), G = frame_size // patch_size; True where a patch contains pixels of the
        object's shape in a sounding frame (rebuilt exactly from shape, size and position). Flattened, this is the backbone's video token order t*G*G + r*G + c.
    """
    fs = frame_size or image_size
    g = fs // patch_size
    out = np.zeros((len(truth["boxes"]), g, g), dtype=bool)
    size = int(truth["size"])
    mask = _shape_mask(int(truth["shape"]), size)
    canvas = np.zeros((image_size, image_size), dtype=bool)
    # pixel -> patch row/col in model-input coordinates (the eval transform is a plain resize)
    cell = (np.arange(image_size) * fs // image_size) // patch_size
    for s, pos in enumerate(truth["positions"]):
        if pos is None:
            continue
        canvas[:] = False
        canvas[pos[1]:pos[1] + size, pos[0]:pos[0] + size] = mask
        ys, xs = np.nonzero(canvas)
        out[s, np.minimum(cell[ys], g - 1), np.minimum(cell[xs], g - 1)] = True
    return out


# ----------------------------------------------------------------------------------------------
# Initialisation data (rendered in memory, never written)
# ----------------------------------------------------------------------------------------------
def _sample_from_clip(clip: RenderedClip, features: "FeatureConfig", *, train: bool, jpeg_quality: int | None,
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


def _check_features(preset: SyntheticPreset, features: "FeatureConfig") -> None:
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


def _init_pools(vocab: Vocabulary, class_id: int) -> tuple[list[VisualIdentity], list[SoundIdentity]]:
    spec = vocab.init_classes[class_id]
    visuals = list(dict.fromkeys(c.visual for c in vocab.init_classes if c.visual != spec.visual))
    sounds = [c.sound for c in vocab.init_classes if c.class_id != class_id]
    return visuals, sounds


#: class id used in the clip seed of per-clip-identity init clips (no real class has it)
_PER_CLIP_CLASS = 0xFFFF


def init_exclusions(vocab: Vocabulary, preset: SyntheticPreset, seed: int | None = None
                    ) -> tuple[list[VisualIdentity], list[SoundKey]]:
    """Identities the per-clip init stream never draws: every benchmark class's visual and sound and,
    given the data ``seed``, those of the transfer classes (so transfer retrieval measures classes
    stage 1 never saw; see ``data/synthetic_transfer.py``)."""
    visuals = list(dict.fromkeys(c.visual for c in vocab.classes))
    sounds = [sound_key(c.sound, preset) for c in vocab.classes]
    if seed is not None:
        from stella_avalanche.data.synthetic_transfer import transfer_identities

        t = transfer_identities(preset, seed)
        visuals += [VisualIdentity(*v) for v in t.visuals]
        sounds += [sound_key(snd, preset) for snd in t.sounds]
    return visuals, sounds


def init_render_preset(preset: SyntheticPreset) -> SyntheticPreset:
    """The preset the per-clip init stream renders with (its ``init_*`` cue settings applied)."""
    changes = {k: v for k, v in (("tint", preset.init_tint), ("p_distractor", preset.init_p_distractor),
                                 ("p_offscreen", preset.init_p_offscreen)) if v is not None}
    return dataclasses.replace(preset, **changes) if changes else preset


def render_init_clip(vocab: Vocabulary, preset: SyntheticPreset, seed: int, split: str, i: int,
                     exclusions: tuple[list[VisualIdentity], list[SoundKey]] | None = None
                     ) -> tuple[RenderedClip, int]:
    """Clip number ``i`` of an init split (``"init"`` or ``"init_retrieval"``) and its label.

    ``init_identity == "class"``: clip ``i`` belongs to init class ``i % C`` and the label is that
    class. ``"per_clip"``: a fresh identity per clip (outside ``exclusions``, default
    :func:`init_exclusions`), a fresh silent distractor and off-screen sound; the label is ``i``.
    """
    preset = init_render_preset(preset)
    if preset.init_identity == "class":
        c = i % len(vocab.init_classes)
        visuals, sounds = _init_pools(vocab, c)
        return render_clip(vocab.init_classes[c], clip_rng(seed, split, c, i // len(vocab.init_classes)),
                           preset, visuals, sounds), c
    ex_v, ex_s = exclusions if exclusions is not None else init_exclusions(vocab, preset, seed)
    rng = clip_rng(seed, split, _PER_CLIP_CLASS, i)
    visual, sound = random_identity(rng, preset, exclude_visuals=ex_v, exclude_sounds=ex_s)
    d_visual, o_sound = random_identity(rng, preset, exclude_visuals=[*ex_v, visual], exclude_sounds=ex_s)
    spec = ClassSpec(class_id=-1, task=-1, mid="syn_init_clip", visual=visual, sound=sound)
    return render_clip(spec, rng, preset, [d_visual], [o_sound]), i


class SyntheticInitDataset(IterableDataset):
    """Endless, non-repeating stream of initialisation clips (the ``init`` split), rendered in memory.

    Clip ``i`` is :func:`render_init_clip` ``(..., "init", i)``: by default a fresh identity per clip
    (``preset.init_identity``), so the stream is deterministic and identical for any number of
    DataLoader workers (worker ``w`` of ``W`` yields clips ``w, w + W, ...``). Samples are the dicts of
    ``AudioVideoDataset``: ``video`` float32 (T, 3, S, S), ``audio`` float32 (1, A, F), ``category``
    int64 () = 0, ``label`` int64 () = init class id (per-clip identities: the clip number),
    ``index`` int64 () = clip number ``i``.

    :param preset: synthetic preset (sizes, difficulty, number of init classes).
    :param seed: data seed (the vocabulary is the benchmark's vocabulary of this seed).
    :param features: preprocessing config (default: :func:`default_features`).
    :param train: training transform (random crop, fbank noise + roll) or evaluation transform.
    :param start: first clip number (resume a stream).
    :param length: stop after this many clips (``None``: endless).
    :param jpeg: JPEG round trip of the frames, so init frames carry the same artefacts as stored ones.
    """

    def __init__(self, *, preset: str | SyntheticPreset = "default", seed: int = 0,
                 features: "FeatureConfig | None" = None, train: bool = True, start: int = 0,
                 length: int | None = None, jpeg: bool = True) -> None:
        super().__init__()
        self.preset = get_preset(preset)
        self.seed = int(seed)
        self.features = features if features is not None else default_features(self.preset)
        _check_features(self.preset, self.features)
        self.train = train
        self.start = int(start)
        self.length = length
        self.jpeg = jpeg
        self.vocab = build_vocabulary(self.preset, self.seed)
        self.num_classes = len(self.vocab.init_classes)
        self._exclusions = init_exclusions(self.vocab, self.preset, self.seed)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("endless SyntheticInitDataset has no length (pass length=...)")
        return self.length

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Clip number ``i`` as a dict sample (deterministic in ``(seed, i)``)."""
        clip, c = render_init_clip(self.vocab, self.preset, self.seed, "init", i, self._exclusions)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 0x1A17, i]).generate_state(1)[0]))
        video, audio = _sample_from_clip(clip, self.features, train=self.train,
                                         jpeg_quality=self.preset.jpeg_quality if self.jpeg else None, generator=g)
        return {"video": video, "audio": audio, "category": torch.tensor(0, dtype=torch.int64),
                "label": torch.tensor(c, dtype=torch.int64), "index": torch.tensor(i, dtype=torch.int64)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stop = None if self.length is None else self.start + self.length
        i = self.start + wid
        while stop is None or i < stop:
            yield self.sample(i)
            i += nw


class SyntheticInitRetrievalDataset(Dataset):
    """Fixed held-out retrieval pool of the init classes (monitoring the initialisation).

    ``init_retrieval_per_class`` clips per init class from the ``init_retrieval`` seed stream (disjoint
    from the init training stream), evaluation transform, rendered once in the constructor.
    Samples as :class:`SyntheticInitDataset` (``category`` 0, ``label`` = init class, ``index``).

    :param preset: synthetic preset.
    :param seed: data seed.
    :param features: preprocessing config (default: :func:`default_features`).
    :param jpeg: JPEG round trip of the frames.
    """

    def __init__(self, *, preset: str | SyntheticPreset = "default", seed: int = 0,
                 features: "FeatureConfig | None" = None, jpeg: bool = True) -> None:
        self.preset = get_preset(preset)
        self.features = features if features is not None else default_features(self.preset)
        _check_features(self.preset, self.features)
        vocab = build_vocabulary(self.preset, seed)
        exclusions = init_exclusions(vocab, self.preset, seed)
        videos, audios, labels = [], [], []
        n = len(vocab.init_classes) * self.preset.init_retrieval_per_class
        for i in range(n):
            clip, c = render_init_clip(vocab, self.preset, seed, "init_retrieval", i, exclusions)
            v, a = _sample_from_clip(clip, self.features, train=False,
                                     jpeg_quality=self.preset.jpeg_quality if jpeg else None, generator=None)
            videos.append(v)
            audios.append(a)
            labels.append(c)
        self.video = torch.stack(videos)  # (N, T, 3, S, S)
        self.audio = torch.stack(audios)  # (N, 1, A, F)
        self.label = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.label.numel())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.video[i], "audio": self.audio[i], "category": torch.tensor(0, dtype=torch.int64),
                "label": self.label[i], "index": torch.tensor(int(i), dtype=torch.int64)}


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
    _check_features(p, feats)
    vocab = build_vocabulary(p, seed)
    n = p.per_class(split) if per_class is None else int(per_class)
    videos, audios, labels, task_ids, truths, keys = [], [], [], [], [], []
    for spec in vocab.classes:
        if tasks is not None and spec.task not in tasks:
            continue
        d_pool = list(dict.fromkeys(c.visual for c in vocab.classes if c.visual != spec.visual))
        s_pool = [c.sound for c in vocab.classes if c.class_id != spec.class_id]
        for i in range(n):
            clip = render_clip(spec, clip_rng(seed, split, spec.class_id, i), p, d_pool, s_pool)
            v, a = _sample_from_clip(clip, feats, train=False, jpeg_quality=p.jpeg_quality if jpeg else None,
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
