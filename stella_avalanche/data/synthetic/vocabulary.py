"""Class vocabulary: the identity families, visual and sound identities, and the per-seed class draw.

The mel helpers here (Kaldi mel scale, the generator's fundamental grid) are the only copy; the transfer
split (:mod:`.transfer`) uses them too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from stella_avalanche.data.synthetic.preset import SyntheticPreset

__all__ = ["SHAPES", "TEXTURES", "PALETTE", "COLOUR_NAMES", "TIMBRES", "VisualIdentity", "SoundIdentity",
           "ClassSpec", "Vocabulary", "SoundKey", "hz_to_mel", "mel_to_hz", "mel_step", "sound_key",
           "random_identity", "build_vocabulary", "clutter_pools"]

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


def hz_to_mel(f: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * np.expm1(np.asarray(m, dtype=np.float64) / 1127.0)


def mel_step(preset: SyntheticPreset) -> float:
    """Width of one mel bin (Kaldi layout: mel_bins + 2 equally spaced edges from 20 Hz to Nyquist)."""
    lo, hi = hz_to_mel(20.0), hz_to_mel(preset.sample_rate / 2)
    return float(hi - lo) / (preset.mel_bins + 1)


SoundKey = tuple[float, tuple[int, ...], int]


def _draw_sound(rng: np.random.Generator, preset: SyntheticPreset,
                taken: Sequence[SoundKey]) -> tuple[SoundIdentity, SoundKey] | None:
    """One attempt at a sound identity distinct from ``taken``; None when the draw is rejected.

    Fundamental bin between 6 and 40 (about 150 Hz to 2.4 kHz at 64 bins / 16 kHz); the top harmonic
    (plus the largest pitch shift) must stay below 0.8 * Nyquist; a sound with the same harmonics and
    timbre must sit at least 3 mel bins away from every taken one.
    """
    step = mel_step(preset)
    mel_lo = float(hz_to_mel(20.0))
    n_bands = int(rng.integers(1, 4))
    harmonics = tuple(sorted(int(h) for h in rng.choice([1, 2, 3, 4], size=n_bands, replace=False)))
    f0_bin = float(rng.integers(6, 41))
    f0 = float(mel_to_hz(mel_lo + f0_bin * step))
    f0_max = float(mel_to_hz(mel_lo + (f0_bin + preset.max_pitch_shift) * step))
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
    f0_bin = round((float(hz_to_mel(sound.f0)) - float(hz_to_mel(20.0))) / mel_step(preset))
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


def clutter_pools(vocab: Vocabulary, spec: ClassSpec) -> tuple[list[VisualIdentity], list[SoundIdentity]]:
    """What a clip of ``spec`` draws its clutter from: the silent distractor from the other visual
    identities (unique, in class order; a twin's shared look is excluded) and the off-screen sound from
    the other classes' sounds. One rule for the writer, the in-memory splits and the oracles."""
    visuals = list(dict.fromkeys(c.visual for c in vocab.classes if c.visual != spec.visual))
    return visuals, [c.sound for c in vocab.classes if c.class_id != spec.class_id]
