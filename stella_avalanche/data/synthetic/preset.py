"""Generator presets: every size and difficulty knob of the synthetic benchmark, and the named presets."""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["SYNTHETIC_VERSION", "SyntheticPreset", "PRESETS", "get_preset"]

#: Bump when the rendering or the default preset changes: part of the cache directory name and of the
#: initialisation key, so old caches are not reused. v3: the class-led default (docs/synthetic.md);
#: v2's default is the preset ``instance_cues``, and the rendering of a given preset is unchanged.
SYNTHETIC_VERSION = "v3"


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
    :param max_on_segments: the sounding object is on in ``min_on_segments``..``max_on_segments``
        segments (``None``: up to ``num_segments - 1``). The default, 2 of 4, keeps at most half of the
        segments sounding, so a selector that keeps half of the audio chunks (κ = 0.5, one chunk per
        segment) can keep every sounding chunk (docs/synthetic.md, "geometry").
    :param min_on_segments: the fewest segments in which the object sounds. The default equals
        ``max_on_segments``: every clip sounds in 2 segments, so the on/off pattern says *when* the
        object sounds but not *how long*, and it cannot stand in for the class.
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
    :param tint: full-frame tint strength (x class colour) on sounding frames; 0 by default, since a
        full-frame class cue lets every background token say "on" and "which class".
    :param background_level: per-channel background level is uniform in [0, background_level].
    :param background_gradient: amplitude of the random linear background gradient (+/-).
    :param pixel_noise: standard deviation of Gaussian pixel noise.
    :param max_pitch_shift: pitch shift in mel bins of a clip whose object is at the top (0 by default:
        pitch-by-height is an instance cue the initialisation already knows).
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
    classes_per_task: int = 6
    twin_offset: int = 4
    train_per_class: int = 100
    test_per_class: int = 5
    retrieval_per_class: int = 20
    init_classes: int = 12
    init_retrieval_per_class: int = 10
    init_identity: str = "per_clip"
    max_on_segments: int | None = 2
    min_on_segments: int = 2
    init_tint: float | None = None
    init_p_distractor: float | None = None
    init_p_offscreen: float | None = None
    image_size: int = 64
    num_segments: int = 4
    segment_seconds: float = 0.64
    frames_fps: float = 25.0
    sample_rate: int = 16000
    mel_bins: int = 64
    object_size: tuple[int, int] = (24, 36)
    distractor_size: tuple[int, int] = (16, 24)
    p_distractor: float = 0.5
    max_speed: float = 2.0
    tint: float = 0.0
    background_level: float = 0.05
    background_gradient: float = 0.1
    pixel_noise: float = 0.02
    max_pitch_shift: float = 0.0
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
        if not 1 <= self.min_on_segments <= self.on_segments[1]:
            raise ValueError(f"min_on_segments={self.min_on_segments} must be in [1, max_on_segments="
                             f"{self.on_segments[1]}]")

    @property
    def on_segments(self) -> tuple[int, int]:
        """(min, max) number of sounding segments per clip."""
        return self.min_on_segments, (self.num_segments - 1 if self.max_on_segments is None else self.max_on_segments)

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


#: v2's default (generator v2, docs/results/synthetic_v3): retrieval decided by per-instance cues that
#: the initialisation already knows (how many segments sound, pitch by height, a full-frame class tint).
_INSTANCE_CUES = SyntheticPreset(name="instance_cues", classes_per_task=3, train_per_class=200, test_per_class=10,
                                 retrieval_per_class=40, min_on_segments=1, max_on_segments=None,
                                 object_size=(20, 32), tint=0.08, max_pitch_shift=8.0)

PRESETS: dict[str, SyntheticPreset] = {
    # The default (v3): 8 tasks x 6 classes x (100 + 5 + 20) clips. Class identity is the retrieval cue
    # (every clip sounds in 2 of 4 segments, no pitch-by-height, no full-frame tint), and it is local:
    # the class lives on the object's patches and in its sounding chunks only (docs/synthetic.md).
    "default": SyntheticPreset(name="default"),
    # GPU runs: 5x the training clips per class at the same resolution (the tiny/base model presets
    # assume 64 px synthetic frames).
    "large": SyntheticPreset(name="large", train_per_class=500, test_per_class=10),
    # Tests: the default's geometry with a handful of clips and 3 classes per task (test time).
    "tiny": SyntheticPreset(name="tiny", classes_per_task=3, train_per_class=4, test_per_class=2,
                            retrieval_per_class=3, init_retrieval_per_class=2),
    # History: v2's default; reproduce its runs with the overrides in docs/results/synthetic_v3/README.md.
    "instance_cues": _INSTANCE_CUES,
    # v2's default with at most half of the segments sounding (docs/synthetic.md, "geometry").
    "half_sounding": replace(_INSTANCE_CUES, name="half_sounding", max_on_segments=2),
    # The probe that became the default (docs/results/synthetic_classes_probe): the default's clips
    # under the probe's name, so the probe's recorded commands still run.
    "classes": SyntheticPreset(name="classes"),
}


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    """Resolve a preset name (``default``, ``large``, ``tiny``, ``instance_cues``, ...) or pass a preset through."""
    if isinstance(preset, SyntheticPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}") from None
