#!/usr/bin/env python
"""A synthetic Continual-VS stream in the real input formats, for timing the data path end to end.

Writes, under ``--out`` (the data root), what a user with VGGSound has after frame extraction
(``docs/benchmarks.md`` §1):

- ``vggsound/data/frames/<key>/frame_0.jpg ...``: JPEG frames at 8 fps, square, at the paper's
  source size (``FeatureConfig.paper().source_size`` = 256: the short-side-256 centre crop of §1.5,
  from which training crops and resizes to 224), as many as a 10 s clip has (80; ``--smoke``: the 72
  the paper's windows can reach);
- ``vggsound/data/audio/<key>.wav``: 16 kHz mono 16-bit PCM, 10 s;
- CAV-MAE's upstream lists (``lists/``: the three json datafiles and ``class_labels_indices_vgg.csv``
  with all 309 VGGSound classes, display names written with ``_`` for ``,`` as CAV-MAE does);

then runs the project's own prepare step (:func:`stella_avalanche.benchmarks.splits.prepare_vggsound_splits`,
the code behind ``benchmarks/prepare_vggsound.py``), which writes the split CSVs that
:func:`stella_avalanche.benchmarks.vggsound.vggsound_benchmark` reads, into ``--out`` itself.

What the stream holds: per task, the first ``--classes-per-task`` classes of the packaged
``vggsound_categories.csv`` (the paper trains 20) get ``--train-per-class`` training clips and
``--test-per-class`` eval clips; every class of every task (309) gets ``--retrieval-per-class``
retrieval clips (the paper's 5, so the retrieval set has the paper's size, 1545 clips). Content is
procedural (a smooth colour field with a static texture and a disc moving across the frames; a tone
whose pitch depends on the class, in noise): decodable and of the right sizes, nothing more.
Deterministic from ``--seed`` whatever ``--workers`` is. Existing complete clips are kept, so an
interrupted run can be resumed. ``stream.json`` records the settings, counts, sizes and timings
(paths relative to ``--out``).

    python benchmarks/perf/make_media_stream.py --out runs/media              # 3840 train clips + 1705
    python benchmarks/perf/make_media_stream.py --out runs/media --smoke      # 8 x (2 + 1 + 1) clips
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: media folder of VGGSound under the data root (``docs/benchmarks.md`` §1.1)
PREFIX = "vggsound/data"
#: CAV-MAE's upstream file names (what ``stella-prepare vggsound`` is given)
LISTS = {"train": "vgg_train_cleaned.json", "test": "vgg_test_cleaned.json",
         "retrieval": "vgg_test_5_per_class_for_retrieval_cleaned.json", "labels": "class_labels_indices_vgg.csv"}
_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


@dataclass(frozen=True)
class StreamSpec:
    """What to write (defaults: a paper-format stream of 3840 training clips, 8 x 20 x 24).

    :param classes_per_task: trained classes per task (paper: 20).
    :param train_per_class: training clips per trained class.
    :param test_per_class: eval clips per trained class (the benchmark needs >= 1 per task).
    :param retrieval_per_class: retrieval clips per class (paper: 5).
    :param retrieval_classes: ``"all"`` (every class of a task, as the paper) or ``"trained"``.
    :param frames: JPEG frames per clip (frame i shows i / fps seconds).
    :param frame_px: side of the square frames.
    :param fps: frame rate of the frames directory.
    :param seconds: audio length.
    :param sample_rate: audio rate (Hz).
    :param jpeg_quality: PIL JPEG quality.
    :param seed: seeds the clip ids and every clip's content.
    """

    classes_per_task: int = 20
    train_per_class: int = 24
    test_per_class: int = 1
    retrieval_per_class: int = 5
    retrieval_classes: str = "all"
    frames: int = 80
    frame_px: int = 256
    fps: float = 8.0
    seconds: float = 10.0
    sample_rate: int = 16000
    jpeg_quality: int = 90
    seed: int = 0


@dataclass(frozen=True)
class ClipJob:
    """One clip to write: its key, split, class row in the label table and content seed."""

    key: str
    video_id: str
    split: str
    mid: str
    class_row: int
    seed: int


def paper_spec(**overrides: Any) -> StreamSpec:
    """The default spec with the paper's frame geometry (``FeatureConfig.paper()``: 256-pixel
    source frames, 8 fps over a 10 s clip, 16 kHz audio) and ``overrides`` applied."""
    from stella_avalanche.data.features import FeatureConfig

    f = FeatureConfig.paper()
    base = StreamSpec(frames=int(round(f.clip_seconds * f.frames_fps)), frame_px=f.source_size, fps=f.frames_fps,
                      seconds=f.audio_seconds, sample_rate=f.sample_rate)
    return dataclasses.replace(base, **overrides)


def smoke_spec(**overrides: Any) -> StreamSpec:
    """A handful of clips (8 tasks x 1 class x (2 train + 1 eval + 1 retrieval)) with only the frames
    the paper's windows can reach (72), for tests."""
    from stella_avalanche.data import media
    from stella_avalanche.data.features import FeatureConfig, cache_frame_times

    f = FeatureConfig.paper()
    need = max(media.frame_indices(cache_frame_times(f), f.frames_fps)) + 1
    return paper_spec(**{"classes_per_task": 1, "train_per_class": 2, "test_per_class": 1,
                         "retrieval_per_class": 1, "retrieval_classes": "trained", "frames": need, **overrides})


# ------------------------------------------------------------------------------------ the plan
def label_rows() -> list[dict[str, str]]:
    """The 309 VGGSound classes of the packaged category table, in its row order, with a made-up mid,
    CAV-MAE's ``_``-for-``,`` display name and the task."""
    from stella_avalanche.resources import as_path, split_table

    with as_path(split_table("vggsound_categories.csv")) as path, open(path, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    return [{"index": str(i), "mid": f"/m/vgg{i:03d}", "display_name": r["display_name"].replace(",", "_"),
             "task": r["task"]} for i, r in enumerate(table)]


def _unique_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 11-character YouTube-like ids (alphabet with ``-`` and ``_``, as real ids)."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        for row in rng.choice(_ID_ALPHABET, size=(n - len(out), 11)):
            vid = "".join(row)
            if vid not in seen:
                seen.add(vid)
                out.append(vid)
    return out


def plan_clips(spec: StreamSpec, rows: Sequence[dict[str, str]]) -> list[ClipJob]:
    """Every clip of the stream, in a fixed order (split, then label-table row), with its content seed."""
    from stella_avalanche.benchmarks.splits import VGGSOUND_TASKS, vggsound_clip_key

    # the prepare step's rule: the first classes_per_task rows of each task, in table order
    trained = [i for t in VGGSOUND_TASKS
               for i in [j for j, r in enumerate(rows) if r["task"] == t][:spec.classes_per_task]]
    retrieval = trained if spec.retrieval_classes == "trained" else list(range(len(rows)))
    per_split = [("train", sorted(trained), spec.train_per_class), ("test", sorted(trained), spec.test_per_class),
                 ("retrieval", sorted(retrieval), spec.retrieval_per_class)]
    n = sum(len(cls) * k for _, cls, k in per_split)
    rng = np.random.default_rng(spec.seed)
    ids = _unique_ids(rng, n)
    starts = rng.integers(0, 290, size=n)                 # segment start second in its YouTube video
    seeds = rng.integers(0, 2**62, size=n)
    jobs, k = [], 0
    for split, classes, per_class in per_split:
        for c in classes:
            for _ in range(per_class):
                start = int(starts[k])
                jobs.append(ClipJob(key=vggsound_clip_key(ids[k], start), video_id=f"{ids[k]}_{start}", split=split,
                                    mid=rows[c]["mid"], class_row=c, seed=int(seeds[k])))
                k += 1
    return jobs


# ------------------------------------------------------------------------------------ content
def clip_frames(spec: StreamSpec, class_row: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (frames, px, px, 3): a smooth colour field plus a static texture, and a disc that moves
    across the frames (the field by broadcasting; the disc pasted into a small box of each frame)."""
    px, n = spec.frame_px, spec.frames
    axis = np.linspace(0.0, 1.0, px, dtype=np.float32)
    fx, fy, phase = rng.uniform(0.5, 3.0, 3), rng.uniform(0.5, 3.0, 3), rng.uniform(0, 2 * np.pi, (2, 3))
    cx = np.cos(2 * np.pi * fx[None, :] * axis[:, None] + phase[0])    # (px, 3) over x
    cy = np.cos(2 * np.pi * fy[None, :] * axis[:, None] + phase[1])    # (px, 3) over y
    field = 128 + 60 * cy[:, None, :] * cx[None, :, :]                  # (y, x, 3)
    field += rng.normal(0.0, 6.0, size=field.shape).astype(np.float32)  # texture: JPEG sizes of real frames
    frames = np.repeat(np.clip(field, 0, 255).astype(np.uint8)[None], n, axis=0)
    # the disc: radius r pixels, centre moving linearly between two points kept r pixels off the border
    r = max(1, int(px * (0.06 + 0.01 * (class_row % 7))))
    start, end = rng.uniform(0.15, 0.85, 2), rng.uniform(0.15, 0.85, 2)
    t = np.linspace(0.0, 1.0, n)[:, None]
    centre = np.clip(np.rint((start + t * (end - start)) * (px - 1)).astype(int), r, px - 1 - r)  # (n, 2) x, y
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = yy ** 2 + xx ** 2 <= r * r
    colour = np.array([(37 * class_row) % 256, (91 * class_row) % 256, (173 * class_row) % 256], np.uint8)
    for frame, (x, y) in zip(frames, centre):
        frame[y - r:y + r + 1, x - r:x + r + 1][disc] = colour
    return frames


def clip_audio(spec: StreamSpec, class_row: int, rng: np.random.Generator) -> np.ndarray:
    """int16 mono PCM: a tone at a class-dependent pitch with a slow envelope, in noise."""
    n = int(round(spec.seconds * spec.sample_rate))
    t = np.arange(n, dtype=np.float32) / spec.sample_rate
    pitch = 150.0 + 9.0 * class_row
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 2 * np.pi))
    x = 0.3 * envelope * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.standard_normal(n).astype(np.float32)
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def write_clip(job: ClipJob, spec: StreamSpec, root: Path) -> int:
    """Write one clip's frames directory and wav (each appears complete or not at all: written under a
    temporary name, then renamed). Returns the bytes written (0 when the clip was already there)."""
    from PIL import Image

    frames_dir = root / PREFIX / "frames" / job.key
    wav = root / PREFIX / "audio" / f"{job.key}.wav"
    if frames_dir.is_dir() and wav.is_file():
        return 0
    written = 0
    rng = np.random.default_rng(job.seed)
    frames = clip_frames(spec, job.class_row, rng)  # drawn first: the audio's draws follow, whatever exists
    pcm = clip_audio(spec, job.class_row, rng)
    if not frames_dir.is_dir():
        tmp = frames_dir.with_name(f".{job.key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"frame_{i}.jpg", format="JPEG", quality=spec.jpeg_quality)
        written += sum(f.stat().st_size for f in tmp.iterdir())
        os.replace(tmp, frames_dir)
    if not wav.is_file():
        _write_wav(wav, pcm, spec.sample_rate)
        written += wav.stat().st_size
    return written


def _write_chunk(args: tuple[list[ClipJob], StreamSpec, str]) -> int:
    jobs, spec, root = args
    return sum(write_clip(j, spec, Path(root)) for j in jobs)


def write_media(jobs: Sequence[ClipJob], spec: StreamSpec, root: Path, *, workers: int) -> int:
    """Write every clip, in ``workers`` processes (chunks of a few clips); returns bytes written."""
    for sub in ("frames", "audio"):
        (root / PREFIX / sub).mkdir(parents=True, exist_ok=True)
    chunk = 8
    chunks = [(list(jobs[i:i + chunk]), spec, str(root)) for i in range(0, len(jobs), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        return sum(_write_chunk(c) for c in chunks)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        return sum(pool.imap_unordered(_write_chunk, chunks))


# ------------------------------------------------------------------------------------ lists + prepare
def write_lists(jobs: Iterable[ClipJob], rows: Sequence[dict[str, str]], root: Path) -> dict[str, Path]:
    """CAV-MAE's json datafiles (one per split) and label table under ``root/lists``."""
    from stella_avalanche.utils import atomic_write, atomic_write_json

    lists = root / "lists"
    out = {k: lists / v for k, v in LISTS.items()}
    by_split: dict[str, list[dict[str, str]]] = {"train": [], "test": [], "retrieval": []}
    for j in jobs:
        # the authors' own paths are ignored by the reader (docs/benchmarks.md §1.2); keep them short
        by_split[j.split].append({"video_id": j.video_id, "wav": f"audio/{j.key}.wav",
                                  "video_path": f"frames/{j.key}", "labels": j.mid})
    for split, entries in by_split.items():
        atomic_write_json(out[split], {"data": entries})
    with atomic_write(out["labels"], "w") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["index", "mid", "display_name"])
        w.writerows([r["index"], r["mid"], r["display_name"]] for r in rows)
    return out


def prepare(lists: dict[str, Path], root: Path, spec: StreamSpec) -> dict[str, Any]:
    """The project's prepare step over the written lists (split CSVs into ``root``); its per-task counts."""
    from stella_avalanche.benchmarks.splits import prepare_vggsound_splits

    report = prepare_vggsound_splits(lists["train"], lists["test"], lists["retrieval"], lists["labels"], root, root,
                                     seed=spec.seed, classes_per_task=spec.classes_per_task, verbose=False)
    return report.counts


def make_stream(root: str | os.PathLike, spec: StreamSpec, *, workers: int = 1) -> dict[str, Any]:
    """Write the media, the upstream lists and the prepared split CSVs; returns (and writes as
    ``stream.json``) the summary: settings, per-task counts, bytes and seconds."""
    from stella_avalanche.utils import atomic_write_json

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = label_rows()
    jobs = plan_clips(spec, rows)
    t1 = time.perf_counter()
    written = write_media(jobs, spec, root, workers=workers)
    t2 = time.perf_counter()
    counts = prepare(write_lists(jobs, rows, root), root, spec)
    t3 = time.perf_counter()
    per_split = {s: sum(j.split == s for j in jobs) for s in ("train", "test", "retrieval")}
    summary = {"spec": dataclasses.asdict(spec), "clips": len(jobs), "clips_per_split": per_split,
               "prepared_counts": counts, "bytes_written": written, "workers": workers,
               "seconds": {"plan": t1 - t0, "media": t2 - t1, "prepare": t3 - t2, "total": t3 - t0},
               "layout": {"frames": f"{PREFIX}/frames/<key>/frame_<i>.jpg", "audio": f"{PREFIX}/audio/<key>.wav",
                          "lists": {k: f"lists/{v}" for k, v in LISTS.items()},
                          "split_csvs": "vgg_*_shrink8.csv, class_labels_indices_shrink8.csv (this folder)"}}
    atomic_write_json(root / "stream.json", summary)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="data root to write (created; existing complete clips are kept)")
    p.add_argument("--smoke", action="store_true", help="a handful of clips (8 tasks x 1 class x 4 clips)")
    p.add_argument("--classes-per-task", type=int, default=None, help="trained classes per task (default 20)")
    p.add_argument("--train-per-class", type=int, default=None, help="training clips per trained class (default 24)")
    p.add_argument("--test-per-class", type=int, default=None, help="eval clips per trained class (default 1)")
    p.add_argument("--retrieval-per-class", type=int, default=None, help="retrieval clips per class (default 5)")
    p.add_argument("--retrieval-classes", choices=("all", "trained"), default=None,
                   help="classes with retrieval clips: all 309 (default, the paper) or the trained ones")
    p.add_argument("--frames", type=int, default=None, help="JPEG frames per clip (default 80: 10 s at 8 fps)")
    p.add_argument("--frame-px", type=int, default=None,
                   help="frame side in pixels (default 256, the paper's source size; training crops to 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes (default: all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    over = {k: v for k, v in {"classes_per_task": args.classes_per_task, "train_per_class": args.train_per_class,
                              "test_per_class": args.test_per_class, "retrieval_per_class": args.retrieval_per_class,
                              "retrieval_classes": args.retrieval_classes, "frames": args.frames,
                              "frame_px": args.frame_px, "seed": args.seed}.items() if v is not None}
    spec = smoke_spec(**over) if args.smoke else paper_spec(**over)
    s = make_stream(args.out, spec, workers=args.workers)
    print(f"{s['clips']} clips ({s['clips_per_split']}), {s['bytes_written'] / 2**20:.1f} MiB written in "
          f"{s['seconds']['media']:.1f} s by {args.workers} process(es); prepare {s['seconds']['prepare']:.1f} s")
    print("per task (prepared): " + json.dumps({t: {k: c[k] for k in ("train", "eval", "retrieval") if k in c}
                                               for t, c in s["prepared_counts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
