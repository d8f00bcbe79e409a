"""Generator presets: every size and difficulty knob of the synthetic benchmark, and the named presets."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SYNTHETIC_VERSION", "SyntheticPreset", "PRESETS", "get_preset"]

#: Bump when the rendering changes: part of the cache directory name, so old caches are not reused.
SYNTHETIC_VERSION = "v2"


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
    :param min_on_segments: the fewest segments in which the object sounds (default 1). With
        ``min_on_segments == max_on_segments`` every clip sounds in the same number of segments, so
        the on/off pattern says *when* the object sounds but not *how long*.
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
    min_on_segments: int = 1
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
    # probe of a class-led benchmark (issue 23)
    "classes": SyntheticPreset(name="classes", classes_per_task=6, train_per_class=100, test_per_class=5,
                               retrieval_per_class=20, min_on_segments=2, max_on_segments=2, tint=0.0,
                               max_pitch_shift=0.0, object_size=(24, 36)),
}


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    """Resolve a preset name (``default``, ``large``, ``tiny``) or pass a preset through."""
    if isinstance(preset, SyntheticPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}") from None
