"""Shared pytest fixtures: tiny real media made with PyAV (and torchvision for still images).

Everything is small (1-3 s, 64 px) and session-scoped, so the media are written once per test run.
Frame ``i`` of every generated video has a uniform grey level ``frame_level(i)``, so tests can tell
which source frame a loader picked from the decoded pixel values.
"""
from __future__ import annotations

import importlib.util
import wave
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

SR = 16000          # audio rate of the generated files unless stated otherwise
FPS = 25            # frame rate of generated videos / frame directories (synthetic preset)
SECONDS = 2.56      # clip length of the synthetic preset
N_FRAMES = 64       # SECONDS * FPS


def load_experiment(name: str) -> ModuleType:
    """Import ``experiments/<name>.py`` (the scripts are not a package) as a fresh module."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def frame_level(i: int) -> int:
    """Grey level of frame i (distinct for i < 64, far from 0/255 to survive lossy codecs)."""
    return 30 + 3 * i


def sine(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sr: int) -> Path:
    """16-bit PCM wav; ``samples`` is (N,) or (N, C) float in [-1, 1]."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes())
    return path


def _encode_audio(container, stream, samples: np.ndarray, sr: int) -> None:
    import av

    step = stream.codec_context.frame_size or 1024
    for i in range(0, len(samples), step):
        frame = av.AudioFrame.from_ndarray(samples[None, i:i + step], format="fltp", layout="mono")
        frame.sample_rate = sr
        frame.pts = i
        for pkt in stream.encode(frame):
            container.mux(pkt)
    for pkt in stream.encode(None):
        container.mux(pkt)


def write_mp3(path: Path, samples: np.ndarray, sr: int = SR) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libmp3lame", rate=sr)
        s.layout = "mono"
        _encode_audio(c, s, samples, sr)
    return path


def video_frames(n: int = N_FRAMES, h: int = 64, w: int = 64) -> np.ndarray:
    """uint8 (n, h, w, 3): frame i is uniformly grey ``frame_level(i)``."""
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = frame_level(i)
    return out


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS, audio: np.ndarray | None = None,
              sr: int = SR) -> Path:
    """H.264 (+ AAC when ``audio`` is given) mp4."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"crf": "10"}
        astream = None
        if audio is not None:
            astream = c.add_stream("aac", rate=sr)
            astream.layout = "mono"
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode(None):
            c.mux(pkt)
        if astream is not None:
            _encode_audio(c, astream, audio, sr)
    return path


def write_frames_dir(path: Path, frames: np.ndarray, ext: str = "jpg") -> Path:
    """``frame_{i}.<ext>`` files (JPEG quality 95 or PNG)."""
    from torchvision.io import encode_jpeg, encode_png

    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        chw = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).contiguous()
        data = encode_jpeg(chw, quality=95) if ext == "jpg" else encode_png(chw)
        (path / f"frame_{i}.{ext}").write_bytes(data.numpy().tobytes())
    return path


@dataclass(frozen=True)
class Media:
    """Paths of the session's generated media."""

    root: Path
    frames_dir: Path          # 64 JPEG frames 64x64, 25 fps
    png_dir: Path             # 64 PNG frames 48x80 (not square: resize + crop)
    short_frames_dir: Path    # only 10 frames: incomplete
    bad_jpeg_dir: Path        # frame_0 is garbage
    wav: Path                 # 16 kHz mono sine, 2.56 s
    wav_b: Path               # a second, different clip (880 Hz)
    stereo44k: Path           # 44.1 kHz stereo: L = 0.4 sine, R = 0.2 sine (same phase)
    mp3: Path                 # 16 kHz mono 440 Hz
    mp4: Path                 # H.264 64x64 + AAC, frames identical to frames_dir
    mp4_wide: Path            # H.264 48x80, no audio
    silent: Path              # all-zero wav
    short_audio: Path         # 100 samples
    corrupt_audio: Path       # garbage with an mp3 extension
    corrupt_video: Path       # garbage with an mp4 extension


@pytest.fixture(scope="session")
def media_files(tmp_path_factory: pytest.TempPathFactory) -> Media:
    root = tmp_path_factory.mktemp("media")
    frames = video_frames()
    wide = video_frames(h=48, w=80)
    bad = root / "bad_jpeg"
    write_frames_dir(bad, frames[:N_FRAMES])
    (bad / "frame_0.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (root / "corrupt.mp3").write_bytes(garbage)
    (root / "corrupt.mp4").write_bytes(garbage)
    t = sine(SECONDS, 44100, amp=1.0)
    return Media(
        root=root,
        frames_dir=write_frames_dir(root / "clipA", frames),
        png_dir=write_frames_dir(root / "clipP", wide, ext="png"),
        short_frames_dir=write_frames_dir(root / "clipS", frames[:10]),
        bad_jpeg_dir=bad,
        wav=write_wav(root / "clipA.wav", sine(SECONDS, SR), SR),
        wav_b=write_wav(root / "clipB.wav", sine(SECONDS, SR, freq=880.0, amp=0.3), SR),
        stereo44k=write_wav(root / "stereo44k.wav", np.stack([0.4 * t, 0.2 * t], 1), 44100),
        mp3=write_mp3(root / "clipM.mp3", sine(SECONDS, SR)),
        mp4=write_mp4(root / "clipV.mp4", frames, audio=sine(SECONDS, SR)),
        mp4_wide=write_mp4(root / "clipW.mp4", wide),
        silent=write_wav(root / "silent.wav", np.zeros(int(SECONDS * SR)), SR),
        short_audio=write_wav(root / "short.wav", sine(100 / SR, SR), SR),
        corrupt_audio=root / "corrupt.mp3",
        corrupt_video=root / "corrupt.mp4",
    )
