"""Decoding (media.py) and feature extraction (features.py) on tiny generated media."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import SECONDS, SR, frame_level
from stella_avalanche.data import media
from stella_avalanche.data.features import (FeatureConfig, _crop_offsets, _crop_pairs, augment_fbank,
                                             cache_frame_times, compute_fbank, draw_crop, frame_times,
                                             video_from_frames, window_starts)

torch.set_num_threads(1)
# the synthetic geometry with the paper's augmentations switched back on (the synthetic preset turns
# the fbank roll and the multi-scale crop off), so the transforms below are exercised at a small size
SYN = FeatureConfig.synthetic(roll=True, crop_scales=(1.0, 0.875, 0.75))


def _dominant_hz(x: torch.Tensor, sr: int) -> float:
    spec = torch.fft.rfft(x.double()).abs()
    return float(spec.argmax()) * sr / x.numel()


# ---------------------------------------------------------------------- audio
@pytest.mark.parametrize("name", ["wav", "mp3", "mp4"])
def test_read_audio_formats(media_files, name):
    wav = media.read_audio(getattr(media_files, name), sample_rate=SR, seconds=SECONDS)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert wav.numel() == int(SECONDS * SR)
    assert abs(float(wav.mean())) < 1e-5                       # mean removed
    assert 0.4 < float(wav.abs().max()) <= 1.0                 # float scale, not int16
    assert abs(_dominant_hz(wav, SR) - 440.0) < 5.0


def test_read_audio_resamples_and_averages_stereo(media_files):
    wav = media.read_audio(media_files.stereo44k, sample_rate=SR, seconds=2.0)
    assert wav.numel() == 2 * SR                               # 44.1 kHz -> 16 kHz
    assert abs(_dominant_hz(wav, SR) - 440.0) < 5.0
    # L = 0.4 sin, R = 0.2 sin -> the channel average is a 0.3 sine (not (L+R)/sqrt 2 = 0.42)
    assert float(wav[100:-100].abs().max()) == pytest.approx(0.3, abs=0.01)


def test_wav_header_read_without_pyav_matches_pyav(media_files, monkeypatch):
    """WAV headers come from the standard library (same answer as PyAV), so a machine without PyAV
    reads WAV audio; other containers still go to PyAV."""
    import sys

    for name, expect in [("wav", (1, SR)), ("stereo44k", (2, 44100))]:
        path = str(getattr(media_files, name))
        assert media._wav_format(path) == expect
        import av
        with av.open(path) as c:
            s = c.streams.audio[0]
            assert (s.layout.nb_channels, s.codec_context.sample_rate) == expect
    assert media._wav_format(str(media_files.mp3)) is None           # not a wav: PyAV's job
    assert media._wav_format(str(media_files.corrupt_audio)) is None  # unparsable header: PyAV reports it
    monkeypatch.setitem(sys.modules, "av", None)                      # import av now raises
    wav = media.read_audio(media_files.stereo44k, sample_rate=SR, seconds=2.0)
    assert float(wav[100:-100].abs().max()) == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ImportError):
        media.read_audio(media_files.mp3, sample_rate=SR, seconds=SECONDS)


def test_pcm16_mono_wav_read_equals_decord(tmp_path, media_files):
    """The standard-library WAV path returns decord's samples bit for bit (full scale included), and
    leaves every other file to decord: fails if a scale, offset or sample count differs."""
    import wave

    rng = np.random.default_rng(0)
    x = np.concatenate([[-32768, 32767, 0, 1, -1], rng.integers(-32768, 32768, 40000)]).astype("<i2")
    path = tmp_path / "full_scale.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(SR); w.writeframes(x.tobytes())
    for keep in (None, 16160, 10):
        fast = media._read_pcm16_mono_wav(str(path), keep)
        ref = media._decode_audio(str(path), keep)
        assert fast is not None and fast.dtype == np.float32
        np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(media._read_pcm16_mono_wav(str(media_files.wav), None),
                                  media._decode_audio(str(media_files.wav), None))
    assert media._read_pcm16_mono_wav(str(media_files.stereo44k), None) is None   # stereo: decord
    assert media._read_pcm16_mono_wav(str(media_files.mp3), None) is None         # not a wav
    assert media._read_pcm16_mono_wav(str(media_files.corrupt_audio), None) is None


def test_read_audio_first_seconds_only(media_files):
    wav = media.read_audio(media_files.wav, sample_rate=SR, seconds=1.0)
    assert wav.numel() == SR
    full = media.read_audio(media_files.wav, sample_rate=SR, seconds=None)
    assert full.numel() == int(SECONDS * SR)


@pytest.mark.parametrize("name, err", [("silent", media.SilentAudioError),
                                       ("short_audio", media.ShortAudioError),
                                       ("corrupt_audio", media.CorruptMediaError)])
def test_read_audio_errors(media_files, name, err):
    path = getattr(media_files, name)
    with pytest.raises(err) as info:
        media.read_audio(path, sample_rate=SR, seconds=SECONDS, min_seconds=0.175)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_read_audio_missing(media_files):
    path = media_files.root / "nope.wav"
    with pytest.raises(media.MissingMediaError, match="nope.wav"):
        media.read_audio(path)


def test_media_errors_pickle():
    import pickle

    e = pickle.loads(pickle.dumps(media.SilentAudioError("/x/a.wav", "silent")))
    assert isinstance(e, media.SilentAudioError) and str(e) == "/x/a.wav: silent" and e.kind == "silent_audio"


# ---------------------------------------------------------------------- frames
EVAL_TIMES = [0.0, 0.64, 1.28, 1.92]        # 25 fps -> frames 0, 16, 32, 48
EXPECTED = [frame_level(i) for i in (0, 16, 32, 48)]


@pytest.mark.parametrize("name", ["frames_dir", "mp4", "png_dir", "mp4_wide"])
def test_read_frames_picks_the_right_frames(media_files, name):
    frames = media.read_frames(getattr(media_files, name), EVAL_TIMES, SYN)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 64, 64, 3)
    levels = frames.float().mean(dim=(1, 2, 3))
    assert torch.allclose(levels, torch.tensor(EXPECTED, dtype=torch.float32), atol=2.5)


def test_frames_dir_and_video_agree(media_files):
    a = media.read_frames(media_files.frames_dir, [0.3, 1.0, 2.5], SYN).float()
    b = media.read_frames(media_files.mp4, [0.3, 1.0, 2.5], SYN).float()
    assert (a - b).abs().mean() < 2.0    # JPEG vs H.264 loss only


def test_read_frames_errors(media_files):
    with pytest.raises(media.ShortVideoError, match=str(media_files.short_frames_dir)):
        media.read_frames(media_files.short_frames_dir, EVAL_TIMES, SYN)
    with pytest.raises(media.CorruptMediaError, match="frame_0.jpg"):
        media.read_frames(media_files.bad_jpeg_dir, EVAL_TIMES, SYN)
    with pytest.raises(media.CorruptMediaError, match="corrupt.mp4"):
        media.read_frames(media_files.corrupt_video, EVAL_TIMES, SYN)
    with pytest.raises(media.MissingMediaError, match="gone"):
        media.read_frames(media_files.root / "gone", EVAL_TIMES, SYN)
    with pytest.raises(media.ShortVideoError, match="clipV.mp4"):
        media.read_frames(media_files.mp4, [5.0], SYN)           # past the 2.56 s video


# ---------------------------------------------------------------------- config / times
def test_feature_config_presets_and_key():
    paper = FeatureConfig.paper()
    assert (paper.num_frames, paper.frame_size, paper.mel_bins, paper.target_length) == (4, 224, 128, 1024)
    assert paper.eval_window_start == 3.0 and paper.num_window_starts == 48
    assert SYN.window_seconds == pytest.approx(SYN.clip_seconds) and SYN.eval_window_start == 0.0
    assert SYN.num_window_starts == 1
    assert paper.cache_key() == FeatureConfig.paper().cache_key()
    assert paper.cache_key() != FeatureConfig.paper(noise=False).cache_key()
    assert SYN.cache_key() != paper.cache_key()
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.mel_bins = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="longer than the clip"):
        FeatureConfig(num_frames=20)


def test_frame_times_eval_vs_train():
    paper = FeatureConfig.paper()
    assert frame_times(paper, train=False) == [3.0, 4.0, 5.0, 6.0]     # frames 24, 32, 40, 48
    g = torch.Generator().manual_seed(0)
    starts = {frame_times(paper, train=True, generator=g)[0] for _ in range(300)}
    assert starts <= set(window_starts(paper)) and len(starts) > 30
    assert min(window_starts(paper)) == 0.0 and max(window_starts(paper)) == 5.875
    t = frame_times(paper, train=True, generator=torch.Generator().manual_seed(3))
    assert np.allclose(np.diff(t), 1.0)
    # synthetic: window == clip -> training and eval use the same, time-aligned frames
    assert frame_times(SYN, train=True, generator=g) == frame_times(SYN, train=False) == EVAL_TIMES
    assert len(cache_frame_times(paper)) == 72 and cache_frame_times(SYN) == EVAL_TIMES


# ---------------------------------------------------------------------- fbank
def test_compute_fbank_shape_and_normalisation(media_files):
    import torchaudio.compliance.kaldi as kaldi

    wav = media.read_audio(media_files.wav, sample_rate=SR, seconds=SECONDS)
    fb = compute_fbank(wav, SYN)
    assert fb.shape == (256, 64) and fb.dtype == torch.float32
    raw = kaldi.fbank(wav[None], htk_compat=True, sample_frequency=SR, use_energy=False,
                      window_type="hanning", num_mel_bins=64, dither=0.0, frame_shift=10)
    n = raw.shape[0]                                            # 254 frames for 2.56 s
    assert n == 254
    assert torch.allclose(fb[:n], (raw + 5.081) / 4.4849, atol=1e-5)
    # zero padding happens in the log-mel domain, before normalisation
    assert torch.allclose(fb[n:], torch.full_like(fb[n:], 5.081 / 4.4849))
    paper = compute_fbank(wav, FeatureConfig.paper())
    assert paper.shape == (1024, 128)
    short = compute_fbank(wav, dataclasses.replace(SYN, target_length=100))
    assert torch.allclose(short, fb[:100])                      # truncation


def test_augment_fbank_noise_and_roll():
    fb = torch.randn(256, 64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = augment_fbank(fb, SYN, g1), augment_fbank(fb, SYN, g2)
    assert torch.equal(a, b) and not torch.equal(a, fb)

    roll_only = dataclasses.replace(SYN, noise=False)
    out = augment_fbank(fb, roll_only, torch.Generator().manual_seed(1))
    assert any(torch.equal(out, torch.roll(fb, r, 0)) for r in range(-256, 256))

    noise_only = dataclasses.replace(SYN, roll=False)
    d = augment_fbank(fb, noise_only, torch.Generator().manual_seed(2)) - fb
    assert float(d.min()) >= 0 and float(d.max()) <= 0.1 and float(d.max()) > 0

    batch = torch.randn(6, 256, 64)
    rolled = augment_fbank(batch, roll_only, torch.Generator().manual_seed(4))
    shifts = []
    for i in range(6):   # each clip rolled by its own r
        r = [r for r in range(256) if torch.equal(rolled[i], torch.roll(batch[i], r, 0))]
        assert len(r) == 1
        shifts.append(r[0])
    assert len(set(shifts)) > 1


def test_synthetic_preset_keeps_audio_and_frames_aligned():
    """No time roll and no crop in the synthetic preset: training audio stays on the frames' clock
    (noise only, never a shift) and training frames are the whole stored frame."""
    cfg = FeatureConfig.synthetic()
    assert cfg.roll is False and cfg.crop_scales == (1.0,)
    fb = torch.randn(4, 256, 64)
    d = augment_fbank(fb, cfg, torch.Generator().manual_seed(0)) - fb
    assert float(d.min()) >= 0 and float(d.max()) <= 0.1      # additive noise, no roll
    for seed in range(5):
        assert draw_crop(64, 64, cfg, torch.Generator().manual_seed(seed)) == (0, 0, 64, 64)


# ---------------------------------------------------------------------- video transforms
def test_crop_grid_sizes():
    assert sorted(_crop_pairs(256, FeatureConfig.paper())) == sorted(
        [(256, 256), (224, 256), (256, 224), (224, 224), (192, 224), (224, 192), (192, 192)])
    assert len(set(_crop_offsets(256, 256, 192, 224))) == 13
    assert _crop_pairs(64, SYN)[0] == (64, 64) and {p[0] for p in _crop_pairs(64, SYN)} == {64, 56, 48}


def test_video_from_frames_eval_and_train():
    cfg = dataclasses.replace(SYN, frame_size=32)
    frames = torch.full((4, 64, 64, 3), 128, dtype=torch.uint8)
    out = video_from_frames(frames, cfg, train=False)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    expect = (128 / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(out[0, :, 5, 5], expect, atol=1e-5)

    # a horizontal ramp reveals the crop; all T frames share one crop
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).view(1, 1, 64, 1).expand(4, 64, 64, 3).contiguous()
    ev = video_from_frames(ramp, cfg, train=False)
    crops = [video_from_frames(ramp, cfg, train=True, generator=torch.Generator().manual_seed(s))
             for s in range(12)]
    for c in crops:
        assert c.shape == (4, 3, 32, 32)
        assert torch.equal(c[0], c[3])
    assert any(not torch.allclose(c, ev) for c in crops)
    assert len({round(float(c.mean()), 4) for c in crops}) > 2
