"""Decoding of frames and audio, with typed errors that name the offending path.

- Frames come either from a **frames directory** (``frame_{i}.jpg`` or ``.png``, frame i shows
  time i/fps, the official pre-extracted layout) or from a **video file** decoded with decord
  (the frame nearest each requested time). Both paths end with the same short-side resize +
  centre crop to the square source size (``docs/benchmarks.md`` §1.5), so they agree up to
  JPEG loss.
- Audio is decoded with ``decord.AudioReader`` (wav, flac, mp3 and a video file's own AAC track),
  mixed down to mono, resampled with torchaudio's sinc resampler, cut to the first seconds and
  mean-removed (§1.6).
  ``torchaudio.load`` is deliberately not used (it needs a system FFmpeg).

Every decoder object is deleted explicitly: a decord reader alive at interpreter exit prints a
spurious exception.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import wave
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MediaError",
    "MissingMediaError",
    "CorruptMediaError",
    "ShortVideoError",
    "SilentAudioError",
    "ShortAudioError",
    "read_frames",
    "read_audio",
    "frame_indices",
    "frames_dir_complete",
    "resize_crop_square",
    "is_frames_dir",
]

log = logging.getLogger(__name__)

_FRAME_EXTS = (".jpg", ".png")
_warned_resize = False  # the non-square / non-source-size frames warning is given once


# ---------------------------------------------------------------------- errors
class MediaError(RuntimeError):
    """A media file could not be used. ``kind`` is a short machine-readable reason (used as the key
    of skip counters); the message always contains the path.

    :param path: the offending file or directory.
    :param reason: human-readable explanation.
    """

    kind = "media"

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(str(path), reason)  # args stay picklable (DataLoader workers)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class MissingMediaError(MediaError):
    """The file or frames directory does not exist."""

    kind = "missing"


class CorruptMediaError(MediaError):
    """The file exists but cannot be decoded (or decodes to non-finite samples)."""

    kind = "corrupt"


class ShortVideoError(CorruptMediaError):
    """A frames directory or video lacks frames a window needs (incomplete extraction)."""

    kind = "incomplete_frames"


class SilentAudioError(MediaError):
    """The audio is all zeros or below the silence threshold."""

    kind = "silent_audio"


class ShortAudioError(MediaError):
    """The audio is empty or shorter than the configured minimum (one fbank patch by default)."""

    kind = "short_audio"


# ---------------------------------------------------------------------- helpers
def is_frames_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory (the pre-extracted frames layout)."""
    return os.path.isdir(path)


def frame_indices(times_s: Sequence[float], fps: float) -> list[int]:
    """Index of the frame nearest each time when frame i shows time i/fps (ties round up)."""
    return [int(math.floor(t * fps + 0.5 + 1e-6)) for t in times_s]


def _frame_file(directory: str, index: int) -> str | None:
    for ext in _FRAME_EXTS:
        p = os.path.join(directory, f"frame_{index}{ext}")
        if os.path.exists(p):
            return p
    return None


def frames_dir_complete(directory: str | os.PathLike, max_index: int) -> bool:
    """Cheap completeness check: the frame with the highest index a window needs exists."""
    return _frame_file(str(directory), max_index) is not None


def resize_crop_square(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the short side is ``size`` (bilinear, antialiased), then centre-crop ``size²``.

    :param frames: uint8 ``(T, 3, h, w)``.
    :returns: uint8 ``(T, size, size, 3)``.
    """
    _, _, h, w = frames.shape
    if (h, w) != (size, size):
        short = min(h, w)
        nh, nw = max(size, round(h * size / short)), max(size, round(w * size / short))
        x = F.interpolate(frames.float(), size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=True)
        y0, x0 = (nh - size) // 2, (nw - size) // 2
        frames = x[:, :, y0:y0 + size, x0:x0 + size].round_().clamp_(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous()


def _cfg_value(cfg: Any, name: str, value: Any) -> Any:
    if value is not None:
        return value
    if cfg is None:
        raise TypeError(f"read_frames needs cfg or an explicit {name}")
    return getattr(cfg, name if name != "size" else "source_size")


# ---------------------------------------------------------------------- frames
def read_frames(path: str | os.PathLike, times_s: Sequence[float], cfg: Any = None, *,
                fps: float | None = None, size: int | None = None) -> torch.Tensor:
    """Frames of a clip at the given times.

    :param path: frames directory (``frame_{i}.jpg`` / ``.png``) or a video file.
    :param times_s: T times in seconds from the clip start.
    :param cfg: a :class:`~.features.FeatureConfig` supplying ``frames_fps`` and ``source_size``
        (explicit ``fps`` / ``size`` take precedence).
    :param fps: frame rate of a frames directory (ignored for video files, which carry their own).
    :param size: side of the square output (short-side resize + centre crop when needed).
    :returns: uint8 ``(T, size, size, 3)`` RGB.
    :raises MissingMediaError: ``path`` does not exist.
    :raises ShortVideoError: a needed frame is absent (incomplete directory / too short video).
    :raises CorruptMediaError: an image or the video cannot be decoded.
    """
    global _warned_resize
    size = int(_cfg_value(cfg, "size", size))
    p = str(path)
    if not os.path.exists(p):
        raise MissingMediaError(p, "frames directory or video file not found")
    if os.path.isdir(p):
        frames = _read_frames_dir(p, times_s, float(_cfg_value(cfg, "frames_fps", fps)))
        if frames.shape[-2:] != (size, size) and not _warned_resize:
            _warned_resize = True
            log.warning("frames in %s are %dx%d, not %dx%d: applying resize + centre crop "
                        "(warned once; other clips are not reported)", p, frames.shape[-1],
                        frames.shape[-2], size, size)
    else:
        frames = _read_video_file(p, times_s)
    return resize_crop_square(frames, size)


def _read_frames_dir(directory: str, times_s: Sequence[float], fps: float) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    out = []
    for idx in frame_indices(times_s, fps):
        fp = _frame_file(directory, idx)
        if fp is None:
            raise ShortVideoError(directory, f"frame_{idx}.jpg/.png is missing (frames directory "
                                             f"incomplete: needed frame {idx} at {fps:g} fps)")
        try:
            data = torch.from_numpy(np.fromfile(fp, dtype=np.uint8))
            out.append(decode_image(data, mode=ImageReadMode.RGB))
        except (RuntimeError, ValueError) as e:
            raise CorruptMediaError(fp, f"cannot decode image ({e})") from None
    if len({tuple(f.shape) for f in out}) > 1:
        raise CorruptMediaError(directory, "frames have different sizes")
    return torch.stack(out)


def _read_video_file(path: str, times_s: Sequence[float]) -> torch.Tensor:
    import decord

    try:
        vr = decord.VideoReader(path, num_threads=1)
    except (decord.DECORDError, RuntimeError) as e:
        raise CorruptMediaError(path, f"cannot open video ({_short(e)})") from None
    try:
        n = len(vr)
        fps = float(vr.get_avg_fps())
        if n == 0 or not math.isfinite(fps) or fps <= 0:
            raise CorruptMediaError(path, f"video has {n} frames at {fps} fps")
        idx = frame_indices(times_s, fps)
        if max(idx) >= n:
            # tolerate a last frame rounding past the end (within one frame), not a short clip
            if max(times_s) > n / fps:
                raise ShortVideoError(path, f"video is {n / fps:.2f} s long, frame at "
                                            f"{max(times_s):.3f} s requested")
            idx = [min(i, n - 1) for i in idx]
        try:
            arr = vr.get_batch(idx).asnumpy()
        except (decord.DECORDError, RuntimeError) as e:
            raise CorruptMediaError(path, f"cannot decode frames {idx} ({_short(e)})") from None
    finally:
        del vr
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[-1] if msg else type(e).__name__)[:200]


# ---------------------------------------------------------------------- audio
def _wav_format(path: str) -> tuple[int, int] | None:
    """(channels, sample rate) from a plain PCM ``.wav`` header with the standard library, or None
    for anything else (other containers, a header ``wave`` cannot parse), which PyAV then reads."""
    if not path.lower().endswith(".wav"):
        return None
    try:
        with wave.open(path, "rb") as w:
            return int(w.getnchannels()), int(w.getframerate())
    except (wave.Error, EOFError, OSError):
        return None


def _read_pcm16_mono_wav(path: str, frames: int | None) -> np.ndarray | None:
    """The first ``frames`` samples (all when None) of a 16-bit mono PCM ``.wav`` as float32 in
    [-1, 1), read with the standard library; None for any other file, which decord then decodes.

    Why: decord opens an FFmpeg context per call and takes about 14 ms for a 10 s clip, 40 % of an
    uncached training sample on the paper's preprocessing; this reads the same samples in about
    0.1 ms. The values are decord's exactly (FFmpeg's s16 -> float conversion is x / 32768, a power of
    two; ``tests/test_media.py`` checks equality), so nothing downstream changes.
    """
    if not path.lower().endswith(".wav"):
        return None
    try:
        with wave.open(path, "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2 or w.getcomptype() != "NONE":
                return None
            n = w.getnframes() if frames is None else min(frames, w.getnframes())
            data = w.readframes(n)
    except (wave.Error, EOFError, OSError):
        return None
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / np.float32(32768.0)


def _source_format(path: str) -> tuple[int, int]:
    """(channels, sample rate) of the first audio stream (container header only, no decoding).

    WAV headers are read with the standard library (cheaper than opening an FFmpeg container, and
    what lets the synthetic benchmark run where PyAV is not installed); other files go to PyAV.
    """
    fmt = _wav_format(path)
    if fmt is not None:
        return fmt
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise CorruptMediaError(path, "no audio stream")
            stream = container.streams.audio[0]
            return int(stream.layout.nb_channels), int(stream.codec_context.sample_rate)
    except av.FFmpegError as e:
        raise CorruptMediaError(path, f"cannot open audio ({_short(e)})") from None


def _count_samples(path: str) -> int | None:
    """Samples PyAV decodes from the first audio stream, or None when decoding fails (only used to
    classify a file decord refused, so its cost does not matter)."""
    import av

    try:
        with av.open(path) as container:
            return sum(int(frame.samples) for frame in container.decode(audio=0))
    except (av.FFmpegError, IndexError):
        return None


@functools.lru_cache(maxsize=8)
def _resampler(orig: int, new: int) -> torch.nn.Module:
    """Cached sinc resampler (building the kernel costs far more than applying it)."""
    import torchaudio.transforms as T

    return T.Resample(orig, new)


def _decode_audio(p: str, keep: int | None) -> np.ndarray:
    """The first ``keep`` samples (all when None) of the file's first audio stream decoded by decord
    at the file's own rate, channels mixed by FFmpeg's mono downmix."""
    import decord

    try:
        reader = decord.AudioReader(p, sample_rate=-1, mono=True)
    except (decord.DECORDError, RuntimeError) as e:
        # decord also refuses a well-formed stream with no samples: report that as too short
        if _count_samples(p) == 0:
            raise ShortAudioError(p, "audio stream holds 0 samples") from None
        raise CorruptMediaError(p, f"cannot decode audio ({_short(e)})") from None
    try:
        total = int(reader.shape[1])
        n = total if keep is None else min(total, keep)
        decoded = getattr(reader, "_array", None)  # decord holds the decoded track as numpy (C, S)
        if isinstance(decoded, np.ndarray):
            return np.array(decoded[0, :n], dtype=np.float32)
        # public but slow path (indexes sample by sample)
        return reader[0:n].asnumpy()[0] if n > 0 else np.zeros(0, np.float32)
    except (decord.DECORDError, RuntimeError, IndexError) as e:
        raise CorruptMediaError(p, f"cannot decode audio ({_short(e)})") from None
    finally:
        del reader


def read_audio(path: str | os.PathLike, sample_rate: int = 16000, seconds: float | None = 10.0, *,
               min_seconds: float = 0.025, silence_threshold: float = 1e-4) -> torch.Tensor:
    """Mono waveform of the first ``seconds`` of an audio file or of a video file's audio track.

    decord decodes at the file's own rate; resampling is done by torchaudio's sinc resampler
    (decord's built-in resampling changes the gain by up to ~30 % depending on rate and frequency,
    and its multi-channel output is unreliable, so both are avoided). Channels are averaged:
    decord's mono downmix is (L+R)/sqrt 2 for stereo, which is rescaled to the exact average;
    layouts with more channels keep FFmpeg's standard downmix.

    :param path: wav / flac / mp3 / mp4 (AAC) ...
    :param sample_rate: output rate in Hz.
    :param seconds: keep samples ``[0, seconds * sample_rate)``; None keeps everything.
    :param min_seconds: shorter audio raises :class:`ShortAudioError` (default: one 25 ms window).
    :param silence_threshold: peak |x| after mean removal below which :class:`SilentAudioError`.
    :returns: float32 ``(N,)`` in about [-1, 1], mean removed.
    """
    p = str(path)
    if not os.path.isfile(p):
        raise MissingMediaError(p, "audio file not found" if not os.path.exists(p) else "not a file")
    if os.path.getsize(p) == 0:
        raise ShortAudioError(p, "empty file (0 bytes)")
    channels, rate = _source_format(p)
    if rate <= 0:
        raise CorruptMediaError(p, f"audio stream reports sample rate {rate}")
    # keep what is needed, plus 10 ms so the resampling filter sees real samples at the end
    keep = None if seconds is None else int(math.ceil(seconds * rate)) + rate // 100
    wav = _read_pcm16_mono_wav(p, keep)
    if wav is None:
        wav = _decode_audio(p, keep)
    elif wav.size == 0:  # the same report as decord's refusal of an empty stream
        raise ShortAudioError(p, "audio stream holds 0 samples")
    wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if channels == 2:
        wav = wav * (1.0 / math.sqrt(2.0))
    if not bool(torch.isfinite(wav).all()):
        raise CorruptMediaError(p, "audio contains non-finite samples")
    if rate != sample_rate and wav.numel() > 0:
        with torch.no_grad():
            wav = _resampler(rate, int(sample_rate))(wav)
    if seconds is not None:
        wav = wav[: int(round(seconds * sample_rate))]
    min_n = int(math.ceil(min_seconds * sample_rate))
    if wav.numel() < max(min_n, 1):
        raise ShortAudioError(p, f"audio has {wav.numel()} samples at {sample_rate} Hz, "
                                 f"fewer than the minimum {min_n} ({min_seconds:g} s)")
    wav = wav - wav.mean()
    peak = float(wav.abs().max())
    if peak < silence_threshold:
        raise SilentAudioError(p, f"audio is silent (peak {peak:.2e} < {silence_threshold:.0e})")
    return wav.contiguous()
