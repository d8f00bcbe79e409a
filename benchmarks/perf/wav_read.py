"""An uncached training sample on the paper's preprocessing: WAV read by the standard library vs decord.

Writes a small Continual-VS stream in the real formats (``make_media_stream.py``: 256-pixel JPEG frame
directories, 10 s 16 kHz mono WAV) unless ``--data`` names one, builds the training set as the runner
does (``vggsound_paper`` config, the runner's benchmark factory), then times, side by side in rotated
rounds on the same clips:

- the audio read alone (``media.read_audio``) with the standard-library path for 16-bit mono PCM WAV
  and with decord (``media._read_pcm16_mono_wav`` disabled), and
- a whole training sample (``dataset[i]``: audio, fbank, frames, crop, augmentation) both ways,

prints the medians and the ratios, and checks that both ways give the same fbank bit for bit.

Usage::

    python benchmarks/perf/wav_read.py [--data DIR] [--clips 48] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@contextmanager
def decord_only() -> Iterator[None]:
    """Every audio file goes through decord, as before the standard-library path existed."""
    from stella_avalanche.data import media

    saved = media._read_pcm16_mono_wav
    media._read_pcm16_mono_wav = lambda path, frames: None
    try:
        yield
    finally:
        media._read_pcm16_mono_wav = saved


def per_clip_ms(fn, items) -> float:
    """Median milliseconds of ``fn(item)`` over ``items``."""
    times = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a stream written by make_media_stream.py (default: write one)")
    p.add_argument("--clips", type=int, default=48, help="training clips timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from stella_avalanche.benchmarks.common import multitask_train_dataset
    from stella_avalanche.config import load_config
    from stella_avalanche.data import media
    from stella_avalanche.experiment import _build_benchmark

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        data = str(Path(tmp.name) / "media")
        subprocess.run([sys.executable, str(ROOT / "benchmarks/perf/make_media_stream.py"), "--out", data,
                        "--classes-per-task", "1", "--train-per-class", str(max(1, -(-args.clips // 8))),
                        "--retrieval-classes", "trained", "--retrieval-per-class", "1", "--workers", "2"],
                       check=True, stdout=subprocess.DEVNULL)
    cfg = load_config("vggsound_paper", overrides=[f"benchmark.root={Path(data).resolve()}"])
    train = multitask_train_dataset(_build_benchmark(cfg))
    idx = list(range(min(args.clips, len(train))))
    audio = sorted(Path(data).rglob("*.wav"))[: len(idx)]
    from stella_avalanche.data.features import FeatureConfig

    fc = FeatureConfig.paper()
    sr, secs = fc.sample_rate, fc.audio_seconds

    # equality first: the same fbank both ways (the sample's augmentation is seeded per index)
    torch.manual_seed(0)
    a = train[idx[0]]
    with decord_only():
        torch.manual_seed(0)
        b = train[idx[0]]
    same = all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))

    rows: dict[str, list[float]] = {"read fast": [], "read decord": [], "sample fast": [], "sample decord": []}
    for r in range(args.rounds):
        order = ["fast", "decord"] if r % 2 == 0 else ["decord", "fast"]
        for way in order:
            ctx = decord_only() if way == "decord" else nullcontext()
            with ctx:
                if audio:
                    rows[f"read {way}"].append(per_clip_ms(
                        lambda f: media.read_audio(f, sample_rate=sr, seconds=secs), audio))
                rows[f"sample {way}"].append(per_clip_ms(lambda i: train[i], idx))
    print(f"{len(idx)} clips x {args.rounds} rounds, {torch.get_num_threads()} thread(s); same sample both ways: {same}")
    print("| per clip (median ms) | standard library | decord | decord / standard library |")
    print("|---|---|---|---|")
    for part in ("read", "sample"):
        f, d = rows[f"{part} fast"], rows[f"{part} decord"]
        if f and d:
            mf, md = statistics.median(f), statistics.median(d)
            print(f"| {'audio read' if part == 'read' else 'training sample'} | {mf:.2f} | {md:.2f} | {md / mf:.2f} |")
    if tmp is not None:
        tmp.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
