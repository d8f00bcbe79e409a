"""Clip rendering: per-clip generators, sprites, motion, clutter, the object's and the off-screen sounds,
and the deterministic JPEG / wav encoders."""
from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from stella_avalanche.data.synthetic.preset import SyntheticPreset
from stella_avalanche.data.synthetic.vocabulary import (PALETTE, SHAPES, TEXTURES, TIMBRES, ClassSpec, SoundIdentity,
                                                        VisualIdentity, hz_to_mel, mel_step, mel_to_hz)

__all__ = ["clip_rng", "frame_indices", "RenderedClip", "render_clip", "shape_mask", "jpeg_bytes", "wav_bytes",
           "jpeg_roundtrip"]

#: Split codes feed the per-clip seed; the init splits are never written to disk.
_SPLIT_CODES = {"train": 1, "test": 2, "retrieval": 3, "init": 4, "init_retrieval": 5}


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


def shape_mask(shape: int, size: int) -> np.ndarray:
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
    mask = shape_mask(visual.shape, size)
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
    f0 = float(mel_to_hz(hz_to_mel(snd.f0) + pitch_shift * mel_step(preset)))
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
    o_f = float(mel_to_hz(hz_to_mel(o_snd.f0) + o_shift * mel_step(preset))) * h
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


def jpeg_bytes(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
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
        out[i] = np.asarray(Image.open(io.BytesIO(jpeg_bytes(f, quality))).convert("RGB"))
    return out
