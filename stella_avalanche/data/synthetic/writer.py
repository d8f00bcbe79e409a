"""Writing the data set: the prepared-VGGSound layout on disk, its completion marker, and its ground truth."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from stella_avalanche.data.synthetic.preset import SYNTHETIC_VERSION, SyntheticPreset, get_preset
from stella_avalanche.data.synthetic.rendering import (clip_rng, frame_indices, jpeg_bytes, render_clip, shape_mask,
                                                       wav_bytes)
from stella_avalanche.data.synthetic.vocabulary import ClassSpec, build_vocabulary, clutter_pools
from stella_avalanche.utils import build_lock

__all__ = ["SPLITS", "LABEL_CSV", "INIT_ONLY_FIELDS", "synthetic_root", "is_complete", "clip_key",
           "generate_synthetic", "load_ground_truth", "truth_patch_mask"]

#: On-disk splits: training clips, per-task validation clips, retrieval pool.
SPLITS: tuple[str, ...] = ("train", "test", "retrieval")
_MARKER = "COMPLETE.json"
LABEL_CSV = "class_labels_indices.csv"


def synthetic_root(seed: int, preset: str | SyntheticPreset, root: str | os.PathLike | None = None) -> Path:
    """Where a generated data set lives: ``root`` if given, else the user cache directory."""
    if root is not None:
        return Path(root)
    from stella_avalanche.utils import default_cache_dir

    p = get_preset(preset)
    return default_cache_dir() / "synthetic" / f"{SYNTHETIC_VERSION}-{p.name}-seed{seed}"


#: Preset fields that only shape the initialisation stream (rendered on the fly, never written), so
#: changing them must not regenerate the on-disk splits and their feature cache.
INIT_ONLY_FIELDS = ("init_classes", "init_retrieval_per_class", "init_identity", "init_tint",
                    "init_p_distractor", "init_p_offscreen")


def _marker_payload(preset: SyntheticPreset, seed: int) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(preset).items() if k not in INIT_ONLY_FIELDS}
    return {"version": SYNTHETIC_VERSION, "seed": seed, "preset": fields}


def is_complete(root: str | os.PathLike, *, seed: int, preset: str | SyntheticPreset) -> bool:
    """True when ``root`` holds a finished generation of exactly this (version, preset, seed)."""
    marker = Path(root) / _MARKER
    if not marker.is_file():
        return False
    try:
        got = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = json.loads(json.dumps(_marker_payload(get_preset(preset), seed)))
    if isinstance(got.get("preset"), dict):  # markers written before INIT_ONLY_FIELDS held them all
        got["preset"] = {k: v for k, v in got["preset"].items() if k not in INIT_ONLY_FIELDS}
    return {k: got.get(k) for k in want} == want


def clip_key(split: str, spec: ClassSpec, index: int) -> str:
    """Unique clip key (= frames directory and wav stem): ``syn_<split>_<mid>_<index>``."""
    return f"syn_{split}_{spec.mid.removeprefix('syn_')}_{index:05d}"


def _job(args: tuple[str, SyntheticPreset, int, str, int, int, int]) -> list[tuple[str, int, dict[str, Any]]]:
    """Worker: render and write clips [start, stop) of one class; return (key, class, truth) rows."""
    out_dir, preset, seed, split, class_id, start, stop = args
    vocab = build_vocabulary(preset, seed)
    spec = vocab.classes[class_id]
    d_pool, s_pool = clutter_pools(vocab, spec)
    idx = frame_indices(preset)
    rows = []
    root = Path(out_dir)
    for i in range(start, stop):
        clip = render_clip(spec, clip_rng(seed, split, class_id, i), preset, d_pool, s_pool)
        key = clip_key(split, spec, i)
        fdir = root / "frames" / key
        fdir.mkdir(parents=True, exist_ok=True)
        for k, f in zip(idx, clip.frames):
            (fdir / f"frame_{k}.jpg").write_bytes(jpeg_bytes(f, preset.jpeg_quality))
        (root / "audio" / f"{key}.wav").write_bytes(wav_bytes(clip.pcm, preset.sample_rate))
        rows.append((key, class_id, clip.truth))
    return rows


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)


def generate_synthetic(root: str | os.PathLike | None = None, *, seed: int = 0,
                       preset: str | SyntheticPreset = "default", workers: int = 2,
                       force: bool = False, verbose: bool = False) -> Path:
    """Generate (or reuse) the synthetic data set and return its root.

    Layout under the root (all CSV paths relative to it):
    ``frames/<key>/frame_<i>.jpg``, ``audio/<key>.wav``, ``train.csv``, ``test.csv``, ``retrieval.csv``
    (6 fields, no header: index, vid, frames_path, wav, label mid, task name),
    ``class_labels_indices.csv`` (``index,mid,display_name,category``), ``ground_truth/<split>.json``
    (per clip: on/off pattern, object box per frame, size, pitch shift, loudness, distractor, off-screen
    sound) and ``COMPLETE.json`` written last. Generation happens in a temporary sibling directory that
    is renamed into place, so a killed run never leaves a half-written data set behind.

    :param root: target directory; default ``default_cache_dir()/synthetic/<version>-<preset>-seed<seed>``.
    :param seed: data seed (vocabulary and every clip).
    :param preset: preset name or object.
    :param workers: worker processes (1 = in-process).
    :param force: regenerate even if a complete data set exists.
    :param verbose: print the generation time.
    """
    p = get_preset(preset)
    target = synthetic_root(seed, p, root)
    if not force and is_complete(target, seed=seed, preset=p):
        return target
    # parallel runs wait for one generator, then reuse its data set
    with build_lock(target):
        if not force and is_complete(target, seed=seed, preset=p):
            return target
        return _generate(target, p, seed=seed, workers=workers, force=force, verbose=verbose)


def _generate(target: Path, p: SyntheticPreset, *, seed: int, workers: int, force: bool, verbose: bool) -> Path:
    """Write the data set into a temporary sibling of ``target`` and rename it into place."""
    if target.exists() and any(target.iterdir()) and not (target / _MARKER).exists():
        # A directory we did not write (or an interrupted non-atomic copy): refuse to clobber it.
        raise FileExistsError(f"{target} exists, is not empty and holds no synthetic {_MARKER}; "
                              f"remove it or pass another root")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    t_start = time.perf_counter()
    try:
        (tmp / "frames").mkdir()
        (tmp / "audio").mkdir()
        (tmp / "ground_truth").mkdir()
        vocab = build_vocabulary(p, seed)
        jobs = []
        chunk = 50
        for split in SPLITS:
            for spec in vocab.classes:
                n = p.per_class(split)
                for a in range(0, n, chunk):
                    jobs.append((str(tmp), p, seed, split, spec.class_id, a, min(n, a + chunk)))
        if workers > 1 and len(jobs) > 1:
            with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
                results = pool.map(_job, jobs, chunksize=1)
        else:
            results = [_job(j) for j in jobs]
        by_split: dict[str, list[tuple[str, int, dict[str, Any]]]] = {s: [] for s in SPLITS}
        for job, rows in zip(jobs, results):
            by_split[job[3]].extend(rows)
        for split, rows in by_split.items():
            csv_rows = []
            truth: dict[str, Any] = {}
            for i, (key, cid, tr) in enumerate(rows):
                spec = vocab.classes[cid]
                csv_rows.append([str(i), key, f"frames/{key}", f"audio/{key}.wav", spec.mid,
                                 vocab.task_names[spec.task]])
                truth[key] = tr
            _write_csv(tmp / f"{split}.csv", csv_rows)
            (tmp / "ground_truth" / f"{split}.json").write_text(json.dumps(truth, sort_keys=True))
        _write_csv(tmp / LABEL_CSV,
                   [[str(c.class_id), c.mid, c.display_name, vocab.task_names[c.task]] for c in vocab.classes],
                   header=["index", "mid", "display_name", "category"])
        info = {"image_size": p.image_size, "frame_indices": frame_indices(p), "task_names": list(vocab.task_names),
                "twins": [[c.class_id, c.class_id + p.twin_offset * p.classes_per_task]
                          for c in vocab.classes if p.twin_offset and c.task < p.num_tasks - p.twin_offset]}
        (tmp / "info.json").write_text(json.dumps(info, sort_keys=True, indent=1))
        (tmp / _MARKER).write_text(json.dumps(_marker_payload(p, seed), sort_keys=True, indent=1))
        if target.exists():
            if is_complete(target, seed=seed, preset=p) and not force:
                shutil.rmtree(tmp)  # a concurrent generator finished first
                return target
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if is_complete(target, seed=seed, preset=p):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"synthetic[{p.name}, seed {seed}]: generated in {time.perf_counter() - t_start:.1f} s -> {target}")
    return target


def load_ground_truth(root: str | os.PathLike, split: str) -> dict[str, dict[str, Any]]:
    """Per-clip ground truth of a split: ``{clip key: truth dict}`` (see :func:`render_clip`).

    Boxes are ``[x0, y0, x1, y1)`` in stored-frame pixels and ``positions`` the sprite's top-left
    ``[x, y]``, both ``None`` where the object is not visible; ``shape`` indexes :data:`SHAPES`.
    """
    path = Path(root) / "ground_truth" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no ground truth for split {split!r}: {path}")
    return json.loads(path.read_text())


def truth_patch_mask(truth: dict[str, Any], *, image_size: int, patch_size: int = 16,
                     frame_size: int | None = None) -> np.ndarray:
    """Patches covered by the sounding object, for checking patch-importance maps.

    :param truth: one clip's ground truth (:func:`load_ground_truth`).
    :param image_size: side of the stored frames the boxes refer to.
    :param patch_size: model patch size in model-input pixels.
    :param frame_size: side of the model input (default ``image_size``; boxes are rescaled, which is
        exact for the evaluation transform - a plain resize).
    :returns: bool (S, G, G), G = frame_size // patch_size; True where a patch contains pixels of the
        object's shape in a sounding frame (rebuilt exactly from shape, size and position). Flattened, this is the backbone's video token order t*G*G + r*G + c.
    """
    fs = frame_size or image_size
    g = fs // patch_size
    out = np.zeros((len(truth["boxes"]), g, g), dtype=bool)
    size = int(truth["size"])
    mask = shape_mask(int(truth["shape"]), size)
    canvas = np.zeros((image_size, image_size), dtype=bool)
    # pixel -> patch row/col in model-input coordinates (the eval transform is a plain resize)
    cell = (np.arange(image_size) * fs // image_size) // patch_size
    for s, pos in enumerate(truth["positions"]):
        if pos is None:
            continue
        canvas[:] = False
        canvas[pos[1]:pos[1] + size, pos[0]:pos[0] + size] = mask
        ys, xs = np.nonzero(canvas)
        out[s, np.minimum(cell[ys], g - 1), np.minimum(cell[xs], g - 1)] = True
    return out
