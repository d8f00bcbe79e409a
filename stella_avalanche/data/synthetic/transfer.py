"""The synthetic ``transfer`` split: classes that neither the continual stream nor the initialisation uses.

Downstream transfer (zero-shot retrieval on data outside the stream, sounding-object localisation)
needs classes the model never trained on. For a data seed, the transfer classes are drawn with their
own ``numpy`` seed stream (``SeedSequence([seed, 0x7A4F, ...])``, independent of every stream the
generator in :mod:`stella_avalanche.data.synthetic` uses) under two constraints:

* **visual identity**: a (shape, texture, colour) combination that no benchmark class and no init class
  of :func:`~stella_avalanche.data.synthetic.build_vocabulary` shows;
* **sound identity**: a harmonic sound that is distinct, by the generator's own rule (same harmonics and
  timbre with a fundamental fewer than 3 mel bins away counts as the same sound), from every benchmark
  and init sound.

The transfer identities depend only on the vocabulary's benchmark and init class tables, never on the
init *stream*; a generator that draws init identities per clip can therefore exclude
:func:`transfer_identities` without a circular dependency.

Clips are rendered in memory with :func:`~stella_avalanche.data.synthetic.render_clip` (same geometry,
clutter and audio as the benchmark's clips; distractors and off-screen sounds come from the other
transfer classes) and go through the benchmark's evaluation transform. Two disjoint parts exist:
``"eval"`` (transfer retrieval, localisation scoring) and ``"fit"`` (fitting the localisation head).
The ground truth of every clip is kept, so object masks can be rebuilt at patch and pixel level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from stella_avalanche.data.synthetic.preset import SyntheticPreset, get_preset
from stella_avalanche.data.synthetic.rendering import render_clip
from stella_avalanche.data.synthetic.samples import default_features, sample_from_clip
from stella_avalanche.data.synthetic.vocabulary import (PALETTE, SHAPES, TEXTURES, TIMBRES, ClassSpec, SoundIdentity,
                                                        VisualIdentity, build_vocabulary, hz_to_mel, mel_step,
                                                        mel_to_hz)
from stella_avalanche.data.synthetic.writer import truth_patch_mask

if TYPE_CHECKING:
    from stella_avalanche.data.features import FeatureConfig

__all__ = ["TRANSFER_SEED_TAG", "TRANSFER_PARTS", "DEFAULT_TRANSFER_CLASSES", "TransferIdentities",
           "transfer_classes", "transfer_identities", "transfer_clip_rng", "sounds_clash", "class_table",
           "SyntheticTransferDataset"]

#: Second entry of every transfer seed sequence (keeps the transfer streams apart from the generator's).
TRANSFER_SEED_TAG = 0x7A4F
#: The two disjoint clip parts of the transfer split and their seed codes.
TRANSFER_PARTS: dict[str, int] = {"eval": 0, "fit": 1}
#: Number of transfer classes unless stated otherwise.
DEFAULT_TRANSFER_CLASSES = 12
# The generator's fundamental grid (mel bins above 20 Hz) and its "same sound" distance.
_F0_BINS = (6, 40)
_MIN_BIN_DISTANCE = 3


@dataclass(frozen=True)
class TransferIdentities:
    """The identities the transfer classes use (what an init generator must leave out).

    :param visuals: (shape, texture, colour) index triples, one per transfer class.
    :param sounds: sound identities, one per transfer class.
    """

    visuals: tuple[tuple[int, int, int], ...]
    sounds: tuple[SoundIdentity, ...]


def _mel_grid(preset: SyntheticPreset) -> tuple[float, float]:
    """(mel of 20 Hz, width of one mel bin): the generator's grid (:func:`~.vocabulary.mel_step`)."""
    return float(hz_to_mel(20.0)), mel_step(preset)


def _f0_bin(sound: SoundIdentity, preset: SyntheticPreset) -> float:
    lo, step = _mel_grid(preset)
    return (float(hz_to_mel(sound.f0)) - lo) / step


def sounds_clash(a: SoundIdentity, b: SoundIdentity, preset: SyntheticPreset) -> bool:
    """True when two sounds count as one identity: same harmonics and timbre, fundamentals < 3 mel bins apart."""
    return (tuple(a.harmonics) == tuple(b.harmonics) and a.timbre == b.timbre
            and abs(_f0_bin(a, preset) - _f0_bin(b, preset)) < _MIN_BIN_DISTANCE - 1e-6)


def transfer_classes(preset: str | SyntheticPreset, seed: int, *,
                     num_classes: int = DEFAULT_TRANSFER_CLASSES) -> tuple[ClassSpec, ...]:
    """The transfer classes of a data seed (``task = -2``, ``mid = syn_transfer_c<i>``, class id ``i``).

    :param preset: synthetic preset (the same one as the benchmark's).
    :param seed: data seed.
    :param num_classes: number of transfer classes.
    :raises ValueError: when the preset leaves too few unused visual or sound identities.
    """
    p = get_preset(preset)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    vocab = build_vocabulary(p, seed)
    known = list(vocab.classes) + list(vocab.init_classes)
    rng = np.random.default_rng(np.random.SeedSequence([seed, TRANSFER_SEED_TAG, 1]))

    used = {(c.visual.shape, c.visual.texture, c.visual.colour) for c in known}
    combos = [(s, t, c) for s in range(len(SHAPES)) for t in range(len(TEXTURES)) for c in range(len(PALETTE))
              if (s, t, c) not in used]
    if len(combos) < num_classes:
        raise ValueError(f"only {len(combos)} unused visual identities for {num_classes} transfer classes")
    visuals = [VisualIdentity(*combos[int(i)]) for i in rng.permutation(len(combos))[:num_classes]]

    lo, step = _mel_grid(p)
    taken = [c.sound for c in known]
    sounds: list[SoundIdentity] = []
    for _ in range(100_000):
        if len(sounds) == num_classes:
            break
        n_bands = int(rng.integers(1, 4))
        harmonics = tuple(sorted(int(h) for h in rng.choice([1, 2, 3, 4], size=n_bands, replace=False)))
        f0_bin = float(rng.integers(_F0_BINS[0], _F0_BINS[1] + 1))
        f0 = float(mel_to_hz(lo + f0_bin * step))
        # the highest band, with the largest instance pitch shift, stays below 0.8 x Nyquist
        if float(mel_to_hz(lo + (f0_bin + p.max_pitch_shift) * step)) * max(harmonics) > 0.8 * p.sample_rate / 2:
            continue
        weights = tuple(float(w) for w in np.round(rng.uniform(0.5, 1.0, size=n_bands), 3))
        cand = SoundIdentity(f0=round(f0, 3), harmonics=harmonics, weights=weights,
                             timbre=int(rng.integers(len(TIMBRES))))
        if any(sounds_clash(cand, s, p) for s in taken + sounds):
            continue
        sounds.append(cand)
    if len(sounds) < num_classes:
        raise ValueError(f"could not draw {num_classes} unused sound identities")
    return tuple(ClassSpec(class_id=i, task=-2, mid=f"syn_transfer_c{i}", visual=visuals[i], sound=sounds[i])
                 for i in range(num_classes))


def transfer_identities(preset: str | SyntheticPreset, seed: int, *,
                        num_classes: int = DEFAULT_TRANSFER_CLASSES) -> TransferIdentities:
    """Visual combos and sound identities of the transfer classes (for excluding them elsewhere)."""
    specs = transfer_classes(preset, seed, num_classes=num_classes)
    return TransferIdentities(visuals=tuple((c.visual.shape, c.visual.texture, c.visual.colour) for c in specs),
                              sounds=tuple(c.sound for c in specs))


def transfer_clip_rng(seed: int, part: str, class_id: int, index: int) -> np.random.Generator:
    """The generator of one transfer clip (disjoint per part, class and clip index)."""
    if part not in TRANSFER_PARTS:
        raise ValueError(f"unknown transfer part {part!r}; known: {sorted(TRANSFER_PARTS)}")
    return np.random.default_rng(np.random.SeedSequence([seed, TRANSFER_SEED_TAG, 2, TRANSFER_PARTS[part],
                                                         class_id, index]))


class SyntheticTransferDataset(Dataset):
    """Clips of the transfer classes, rendered once in memory with their ground truth.

    Samples are the contract dicts: ``video`` float32 (T, 3, S, S), ``audio`` float32 (1, A, F),
    ``category`` int64 () = 0, ``label`` int64 () = transfer class id, ``index`` int64 ().

    :param preset: synthetic preset of the benchmark.
    :param seed: data seed of the benchmark.
    :param part: ``"eval"`` or ``"fit"`` (disjoint clip streams).
    :param per_class: clips per transfer class.
    :param num_classes: number of transfer classes.
    :param features: preprocessing config (default: the benchmark's, :func:`default_features`).
    :param jpeg: JPEG round trip of the frames, as stored benchmark frames have.
    :param progress: tqdm bar while rendering.
    """

    def __init__(self, *, preset: str | SyntheticPreset = "default", seed: int = 0, part: str = "eval",
                 per_class: int = 10, num_classes: int = DEFAULT_TRANSFER_CLASSES,
                 features: "FeatureConfig | None" = None, jpeg: bool = True, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        self.preset = get_preset(preset)
        self.seed = int(seed)
        self.part = part
        self.features = features if features is not None else default_features(self.preset)
        self.classes = transfer_classes(self.preset, self.seed, num_classes=num_classes)
        visuals = [c.visual for c in self.classes]
        videos, audios, labels, truths = [], [], [], []
        jobs = [(c, k) for c in range(len(self.classes)) for k in range(per_class)]
        for c, k in tqdm(jobs, desc=f"rendering transfer clips ({part})", disable=not progress,
                         dynamic_ncols=True):
            spec = self.classes[c]
            d_pool = [v for v in visuals if v != spec.visual]
            s_pool = [o.sound for o in self.classes if o.class_id != c]
            clip = render_clip(spec, transfer_clip_rng(self.seed, part, c, k), self.preset, d_pool, s_pool)
            v, a = sample_from_clip(clip, self.features, train=False,
                                     jpeg_quality=self.preset.jpeg_quality if jpeg else None, generator=None)
            videos.append(v)
            audios.append(a)
            labels.append(c)
            truths.append(clip.truth)
        self.video = torch.stack(videos)  # (N, T, 3, S, S)
        self.audio = torch.stack(audios)  # (N, 1, A, F)
        self.label = torch.tensor(labels, dtype=torch.int64)
        self.truth: list[dict[str, Any]] = truths

    def __len__(self) -> int:
        return int(self.label.numel())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.video[i], "audio": self.audio[i], "category": torch.tensor(0, dtype=torch.int64),
                "label": self.label[i], "index": torch.tensor(int(i), dtype=torch.int64)}

    def masks(self, *, patch_size: int, frame_size: int | None = None) -> np.ndarray:
        """Object masks of the sounding object, from the generator's ground truth.

        :param patch_size: cell side in model-input pixels (1 = pixel masks).
        :param frame_size: side of the model input (default: the features' ``frame_size``).
        :returns: bool (N, T, G, G), G = frame_size // patch_size; frames where the object is silent
            (hence not drawn) are all False (see :meth:`sounding`).
        """
        fs = frame_size or self.features.frame_size
        out = np.stack([truth_patch_mask(t, image_size=self.preset.image_size, patch_size=patch_size,
                                         frame_size=fs) for t in self.truth])
        if out.shape[1] != self.video.shape[1]:
            # the ground truth has one entry per stored segment frame; the model must read exactly those
            raise ValueError(f"ground truth has {out.shape[1]} frames per clip but the features read "
                             f"{self.video.shape[1]}: masks cannot be matched to frames")
        return out

    def sounding(self) -> np.ndarray:
        """bool (N, T): the frames in which the object is visible and its sound is on."""
        return np.asarray([t["pattern"] for t in self.truth], dtype=bool)


def class_table(specs: Sequence[ClassSpec]) -> list[dict[str, Any]]:
    """Plain rows (class id, mid, description) of class specs, e.g. for a report."""
    return [{"class_id": c.class_id, "mid": c.mid, "name": c.display_name} for c in specs]
