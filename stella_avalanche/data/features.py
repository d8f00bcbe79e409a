"""Feature extraction: preprocessing constants, Kaldi fbank, frame-time windows, augmentation.

Everything here follows ``docs/benchmarks.md`` §2. The functions are pure tensor code (no
file access except :func:`load_waveform`, a thin wrapper over :func:`media.read_audio`), so that the
cached and the uncached loading paths of :mod:`stella_avalanche.data.datasets` share them exactly.

Shapes: video frames come in as ``uint8 (T, h, w, 3)`` and leave as ``float32 (T, 3, S, S)``
ImageNet-normalised; audio is a mono ``float32 (N,)`` waveform turned into a normalised, time-major
``float32 (A, F)`` fbank (A = ``target_length`` frames, F = ``mel_bins``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "FeatureConfig",
    "compute_fbank",
    "augment_fbank",
    "video_from_frames",
    "frame_times",
    "window_starts",
    "cache_frame_times",
    "load_waveform",
    "time_key",
    "draw_crop",
]

# Bump when the meaning of a field or the output of a function changes, so that caches keyed by
# ``cache_key()`` are rebuilt.
_FEATURE_VERSION = 1


@dataclass(frozen=True)
class FeatureConfig:
    """Every preprocessing constant of the data path (``docs/benchmarks.md`` §2).

    The defaults are the paper's values (:meth:`paper`); :meth:`synthetic` is the small preset of
    the built-in synthetic benchmark.

    :param num_frames: T, frames per sample.
    :param frame_interval_s: seconds between consecutive sampled frames (1 frame per second of the
        window in the paper).
    :param clip_seconds: clip length; windows of ``num_frames * frame_interval_s`` seconds lie in it.
    :param frames_fps: frame rate of pre-extracted frame directories (``frame_{i}.jpg`` shows i/fps s).
    :param window_step_s: grid of training window starts (1/8 s: the paper's frame indices are
        ``int(8 s)``).
    :param source_size: side of the stored square frames (short-side resize + centre crop).
    :param frame_size: S, side of the model input frames.
    :param crop_scales: multi-scale crop sides relative to the short side of the source frame.
    :param max_scale_distort: width and height scale indices differ by at most this (7 pairs).
    :param mean: ImageNet mean per RGB channel (pixels scaled to [0, 1] first).
    :param std: ImageNet std per RGB channel.
    :param sample_rate: audio rate in Hz after resampling.
    :param audio_seconds: audio read from the start of the file (always the first seconds; audio is
        not aligned with the video window in the paper).
    :param mel_bins: F, mel bins of the fbank.
    :param target_length: A, fbank frames after zero-padding / truncation.
    :param frame_length_ms: fbank analysis window.
    :param frame_shift_ms: fbank hop.
    :param fbank_mean: normalisation mean (CAV-MAE AudioSet statistic).
    :param fbank_std: normalisation std (divide by the std, not by 2 std).
    :param noise: training-time additive U(0,1)·c/10 noise on the normalised fbank.
    :param roll: training-time circular roll of the fbank along time by r ~ U{-A, ..., A-1}.
    :param min_audio_seconds: shorter audio is rejected (:class:`~.media.ShortAudioError`);
        the default 0.175 s is one 16-frame fbank patch (25 ms + 15 x 10 ms).
    :param silence_threshold: peak |x| (after mean removal) below which audio counts as silent.
    """

    num_frames: int = 4
    frame_interval_s: float = 1.0
    clip_seconds: float = 10.0
    frames_fps: float = 8.0
    window_step_s: float = 0.125
    source_size: int = 256
    frame_size: int = 224
    crop_scales: tuple[float, ...] = (1.0, 0.875, 0.75)
    max_scale_distort: int = 1
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    sample_rate: int = 16000
    audio_seconds: float = 10.0
    mel_bins: int = 128
    target_length: int = 1024
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    fbank_mean: float = -5.081
    fbank_std: float = 4.4849
    noise: bool = True
    roll: bool = True
    min_audio_seconds: float = 0.175
    silence_threshold: float = 1e-4

    def __post_init__(self) -> None:
        problems = []
        if self.num_frames < 1:
            problems.append(f"num_frames={self.num_frames} must be >= 1")
        if self.frame_interval_s <= 0 or self.window_step_s <= 0 or self.frames_fps <= 0:
            problems.append("frame_interval_s, window_step_s and frames_fps must be > 0")
        if self.window_seconds > self.clip_seconds + 1e-6:
            problems.append(f"window {self.window_seconds} s is longer than the clip {self.clip_seconds} s")
        if self.source_size < 1 or self.frame_size < 1:
            problems.append("source_size and frame_size must be >= 1")
        if self.mel_bins < 1 or self.target_length < 1 or self.sample_rate < 1:
            problems.append("mel_bins, target_length and sample_rate must be >= 1")
        if self.fbank_std <= 0:
            problems.append("fbank_std must be > 0")
        if problems:
            raise ValueError("invalid FeatureConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides: Any) -> "FeatureConfig":
        """The paper's constants: 4 frames 1 s apart from a 4 s window of a 10 s clip, 224² frames,
        (1024, 128) fbank."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def synthetic(cls, **overrides: Any) -> "FeatureConfig":
        """Preset of the built-in synthetic benchmark: 4 x 64² frames, (256, 64) fbank.

        The window (4 x 0.64 s) is the whole 2.56 s clip, so the window start is always 0 in
        training and in evaluation, and the 2.56 s of audio cover exactly the same time span as the
        frames: in this preset audio and video **are** time-aligned (in the paper they are not).
        That alignment is the benchmark's instance cue (the sound is on exactly while the object is
        drawn), so the preset switches off the two augmentations that destroy it: the fbank time
        roll (it shifts the audio against the frames) and the multi-scale crop (it cuts objects
        near the border out of the frame while their sound stays).
        """
        base = cls(num_frames=4, frame_interval_s=0.64, clip_seconds=2.56, frames_fps=25.0,
                   source_size=64, frame_size=64, audio_seconds=2.56, mel_bins=64, target_length=256,
                   roll=False, crop_scales=(1.0,))
        return dataclasses.replace(base, **overrides)

    # ------------------------------------------------------------------ derived
    @property
    def window_seconds(self) -> float:
        """Length of the span the T frames are drawn from (T x interval)."""
        return self.num_frames * self.frame_interval_s

    @property
    def eval_window_start(self) -> float:
        """clip/2 - floor(window/2) (3.0 s in the paper), clamped into [0, clip - window]."""
        start = self.clip_seconds / 2 - math.floor(self.window_seconds / 2)
        return float(min(max(start, 0.0), max(self.clip_seconds - self.window_seconds, 0.0)))

    @property
    def num_window_starts(self) -> int:
        """Number of training window starts (48 in the paper, 1 when window == clip)."""
        n = math.floor((self.clip_seconds - self.window_seconds) / self.window_step_s + 1e-6)
        return max(n, 1)

    @property
    def audio_samples(self) -> int:
        """Samples read from the audio file (160 000 in the paper)."""
        return int(round(self.audio_seconds * self.sample_rate))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of all fields (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def cache_key(self) -> str:
        """Stable 16-hex-digit hash of every field (and of the feature code version)."""
        payload = json.dumps({"v": _FEATURE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- frame times
def time_key(t: float) -> int:
    """Integer key of a time in microseconds, used to match float frame times exactly."""
    return int(round(t * 1e6))


def window_starts(cfg: FeatureConfig) -> list[float]:
    """All training window starts ``k * window_step_s``, k < ``num_window_starts``."""
    return [k * cfg.window_step_s for k in range(cfg.num_window_starts)]


def frame_times(cfg: FeatureConfig, train: bool, generator: torch.Generator | None = None) -> list[float]:
    """The T frame times (seconds) of one sample.

    Training draws the window start uniformly from :func:`window_starts`; evaluation uses
    ``cfg.eval_window_start``. Frame k is at ``start + k * frame_interval_s``.
    """
    if train:
        k = int(torch.randint(cfg.num_window_starts, (1,), generator=generator).item())
        start = k * cfg.window_step_s
    else:
        start = cfg.eval_window_start
    return [start + j * cfg.frame_interval_s for j in range(cfg.num_frames)]


def cache_frame_times(cfg: FeatureConfig) -> list[float]:
    """Sorted union of the frame times any training or evaluation window can use.

    This is what a decode-once cache must hold: T times for the synthetic preset, the 72 frames of
    [0, 8.875] s at 8 fps for the paper preset.
    """
    starts = window_starts(cfg) + [cfg.eval_window_start]
    times = {time_key(s + j * cfg.frame_interval_s): s + j * cfg.frame_interval_s
             for s in starts for j in range(cfg.num_frames)}
    return [times[k] for k in sorted(times)]


# ---------------------------------------------------------------------- audio
def load_waveform(path: str | os.PathLike, cfg: FeatureConfig) -> torch.Tensor:
    """Mono float32 ``(N,)`` waveform of the first ``cfg.audio_seconds`` s at ``cfg.sample_rate``,
    mean removed (see :func:`stella_avalanche.data.media.read_audio` for the errors raised)."""
    from stella_avalanche.data.media import read_audio  # local: media imports nothing from here

    return read_audio(path, sample_rate=cfg.sample_rate, seconds=cfg.audio_seconds,
                      min_seconds=cfg.min_audio_seconds, silence_threshold=cfg.silence_threshold)


def compute_fbank(waveform: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Normalised Kaldi log-mel filterbank.

    :param waveform: float32 ``(N,)`` mono samples in [-1, 1] at ``cfg.sample_rate`` (mean removed).
    :returns: float32 ``(cfg.target_length, cfg.mel_bins)``, time-major: zero-padded at the end in
        the log-mel domain (before normalisation) or truncated, then ``(x - mean) / std``.
    """
    import torchaudio.compliance.kaldi as kaldi  # never torchaudio.load: it needs a system FFmpeg

    wav = torch.as_tensor(waveform, dtype=torch.float32).reshape(1, -1)
    fbank = kaldi.fbank(wav, htk_compat=True, sample_frequency=float(cfg.sample_rate), use_energy=False,
                        window_type="hanning", num_mel_bins=cfg.mel_bins, dither=0.0,
                        frame_length=cfg.frame_length_ms, frame_shift=cfg.frame_shift_ms)
    n = fbank.shape[0]
    if n < cfg.target_length:
        fbank = F.pad(fbank, (0, 0, 0, cfg.target_length - n))
    else:
        fbank = fbank[: cfg.target_length]
    return ((fbank - cfg.fbank_mean) / cfg.fbank_std).contiguous()


def augment_fbank(fbank: torch.Tensor, cfg: FeatureConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time fbank augmentation: noise, then circular time roll (one draw per clip).

    :param fbank: ``(A, F)`` for one clip or ``(B, A, F)`` for B clips (normalised values).
    :returns: a new tensor of the same shape: ``x + U(0,1) * c / 10`` with one ``c ~ U(0,1)`` per
        clip (if ``cfg.noise``), then rolled along time by ``r ~ U{-A, ..., A-1}`` (if ``cfg.roll``).
    """
    single = fbank.dim() == 2
    x = fbank.unsqueeze(0) if single else fbank
    if x.dim() != 3:
        raise ValueError(f"augment_fbank expects (A, F) or (B, A, F), got {tuple(fbank.shape)}")
    b, a, f = x.shape
    if cfg.noise:
        c = torch.rand(b, 1, 1, generator=generator, dtype=x.dtype)
        x = x + torch.rand(b, a, f, generator=generator, dtype=x.dtype) * (c / 10)
    if cfg.roll:
        r = torch.randint(-a, a, (b,), generator=generator)
        if b == 1:
            x = torch.roll(x, int(r.item()), dims=1)
        else:  # one gather instead of B rolls: out[b, t] = x[b, (t - r_b) mod A]
            src = (torch.arange(a).unsqueeze(0) - r.unsqueeze(1)) % a
            x = torch.gather(x, 1, src.unsqueeze(-1).expand(b, a, f))
    elif not cfg.noise:
        x = x.clone()
    return x[0] if single else x


# ---------------------------------------------------------------------- video
def _crop_pairs(base: int, cfg: FeatureConfig) -> list[tuple[int, int]]:
    """(crop_w, crop_h) pairs: sides from ``crop_scales`` x base, indices at most one step apart."""
    sides = [int(base * s) for s in cfg.crop_scales]
    return [(sides[j], sides[i]) for i in range(len(sides)) for j in range(len(sides))
            if abs(i - j) <= cfg.max_scale_distort]


def _crop_offsets(w: int, h: int, cw: int, ch: int) -> list[tuple[int, int]]:
    """The 13 fixed (x, y) offsets on a (side - crop) / 4 grid: corners, centre, edge midpoints,
    quarter points."""
    ws, hs = (w - cw) // 4, (h - ch) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2),                 # corners + centre
            (0, 2), (4, 2), (2, 4), (2, 0),                         # edge midpoints
            (1, 1), (3, 1), (1, 3), (3, 3)]                         # quarter points
    return [(gx * ws, gy * hs) for gx, gy in grid]


def draw_crop(h: int, w: int, cfg: FeatureConfig,
              generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """One multi-scale crop box ``(y0, x0, crop_h, crop_w)`` for an ``h x w`` frame (7 size pairs x
    13 offsets, uniform)."""
    pairs = _crop_pairs(min(h, w), cfg)
    cw, ch = pairs[int(torch.randint(len(pairs), (1,), generator=generator).item())]
    offsets = _crop_offsets(w, h, cw, ch)
    x0, y0 = offsets[int(torch.randint(len(offsets), (1,), generator=generator).item())]
    return y0, x0, ch, cw


def video_from_frames(frames: torch.Tensor, cfg: FeatureConfig, *, train: bool,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Model-ready frames from stored frames.

    :param frames: uint8 ``(T, h, w, 3)`` RGB (normally ``h == w == cfg.source_size``).
    :param train: multi-scale crop shared by all T frames + bilinear resize to S (training), or a
        resize of the whole frame to S (evaluation).
    :returns: float32 ``(T, 3, S, S)``, S = ``cfg.frame_size``, ImageNet-normalised.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video_from_frames expects uint8 (T, h, w, 3), got {tuple(frames.shape)}")
    _, h, w, _ = frames.shape
    if train:
        y0, x0, ch, cw = draw_crop(h, w, cfg, generator)
        frames = frames[:, y0:y0 + ch, x0:x0 + cw]
    x = frames.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    s = cfg.frame_size
    if tuple(x.shape[-2:]) != (s, s):
        # uint8 channels-last input takes torch's vectorised resize path (~4x faster than float);
        # antialias makes shrinking behave like PIL's bilinear resize used by the official code
        # and is the same as plain bilinear when enlarging
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    x = x.contiguous().float()
    scale, shift = _norm_constants(cfg.mean, cfg.std)
    # (x / 255 - mean) / std as one fused multiply-add
    return torch.addcmul(shift, x, scale)


@functools.lru_cache(maxsize=8)
def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return 1.0 / (255.0 * sd), -m / sd

