"""AVSBench-S4 (single sounding source segmentation) in its released layout, for localisation.

Layout under ``root`` (the released AVSBench S4 tree)::

    s4_meta_data.csv                                     header row; columns used: name, category, split
    visual_frames/<split>/<category>/<name>/<name>_<i>.png   i = 1..5 (one frame per second)
    gt_masks/<split>/<category>/<name>/<name>_<i>.png        train: i = 1 only; val / test: i = 1..5
    audio_wav/<split>/<category>/<name>.wav                  the 5 s of audio

Other columns of the csv (e.g. the clip start) are ignored. A sample holds the model's ``T`` frames picked
evenly from the five (the first one always, so the single annotated training frame is seen), the
evaluation transform of the benchmark's :class:`~stella_avalanche.data.features.FeatureConfig` (short-side
resize + centre crop to ``source_size``, then resize to ``frame_size``), the same geometry applied to the
masks (threshold at one half), and the fbank of the wav.

Errors follow the other loaders: a malformed csv raises :class:`~stella_avalanche.data.manifests.ManifestError`
listing every problem as ``file:line: ...``; a missing frame / mask / wav raises
:class:`~stella_avalanche.data.media.MissingMediaError` naming the path (or, under ``on_error="skip"``,
drops and counts the clip); an undecodable image raises :class:`~stella_avalanche.data.media.CorruptMediaError`.
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stella_avalanche.data import media
from stella_avalanche.data.manifests import ManifestError, read_csv_records

if TYPE_CHECKING:
    from stella_avalanche.data.features import FeatureConfig

__all__ = ["S4_CSV", "S4_SPLITS", "S4_FRAMES", "S4Record", "read_s4_csv", "AVSBenchS4Dataset", "pick_frames", "collate_s4"]

log = logging.getLogger(__name__)

#: Default name of the metadata csv inside the root.
S4_CSV = "s4_meta_data.csv"
#: The splits of the release.
S4_SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Frames (and, outside train, masks) per clip.
S4_FRAMES = 5
_REQUIRED = ("name", "category", "split")


@dataclass(frozen=True)
class S4Record:
    """One AVSBench-S4 clip.

    :param name: clip name (unique).
    :param category: sounding-object category (folder name).
    :param split: ``train``, ``val`` or ``test``.
    :param frames: the five frame paths, in time order.
    :param masks: the five mask paths; ``None`` where the release has no annotation (train: frames 2-5).
    :param audio: the wav path.
    :param source: the csv the record came from.
    :param row: 1-based line number in ``source``.
    """

    name: str
    category: str
    split: str
    frames: tuple[str, ...]
    masks: tuple[str | None, ...]
    audio: str
    source: str
    row: int


def read_s4_csv(path: str | os.PathLike, *, root: str | os.PathLike, split: str | None = None) -> list[S4Record]:
    """Read and validate the S4 metadata csv.

    :param path: the csv (header row with at least ``name``, ``category``, ``split``).
    :param root: the dataset root the media paths are built under.
    :param split: keep only this split (``None``: all).
    :raises ManifestError: unreadable file, a header without the required columns, rows with a wrong
        field count, empty fields, unknown splits or repeated names (each as ``file:line: ...``).
    """
    src = str(path)
    if split is not None and split not in S4_SPLITS:
        raise ValueError(f"unknown AVSBench-S4 split {split!r}; known: {list(S4_SPLITS)}")
    root = Path(root)
    rows = read_csv_records(src, expected=f"a header with {', '.join(_REQUIRED)}")
    line0, header = rows[0]
    names = [c.strip().lower() for c in header]
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise ManifestError(src, [f"{src}:{line0}: header lacks column(s) {missing} (found {names})"])
    col = {c: names.index(c) for c in _REQUIRED}
    problems: list[str] = []
    out: list[S4Record] = []
    seen: dict[str, int] = {}
    for line, r in rows[1:]:
        where = f"{src}:{line}"
        if len(r) != len(names):
            problems.append(f"{where}: {len(r)} field(s), the header has {len(names)}")
            continue
        name, category, sp = (r[col[c]].strip() for c in _REQUIRED)
        empty = [c for c, v in zip(_REQUIRED, (name, category, sp)) if not v]
        if empty:
            problems.append(f"{where}: empty field(s) {empty}")
            continue
        if sp not in S4_SPLITS:
            problems.append(f"{where}: split {sp!r} is not one of {list(S4_SPLITS)}")
            continue
        if name in seen:
            problems.append(f"{where}: clip {name!r} repeats line {seen[name]}")
            continue
        seen[name] = line
        if split is not None and sp != split:
            continue
        fdir = root / "visual_frames" / sp / category / name
        mdir = root / "gt_masks" / sp / category / name
        annotated = 1 if sp == "train" else S4_FRAMES
        out.append(S4Record(
            name=name, category=category, split=sp,
            frames=tuple(str(fdir / f"{name}_{i}.png") for i in range(1, S4_FRAMES + 1)),
            masks=tuple(str(mdir / f"{name}_{i}.png") if i <= annotated else None for i in range(1, S4_FRAMES + 1)),
            audio=str(root / "audio_wav" / sp / category / f"{name}.wav"), source=src, row=line))
    if problems:
        raise ManifestError(src, problems)
    return out


def pick_frames(num_frames: int, available: int = S4_FRAMES) -> list[int]:
    """``num_frames`` indices spread evenly over ``available`` frames, the first one always included."""
    return [int(i) for i in np.round(np.linspace(0, available - 1, num_frames)).astype(int)]


def _load_png(path: str, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise media.MissingMediaError(path, "image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise media.CorruptMediaError(path, f"cannot decode image ({e})") from None


class AVSBenchS4Dataset(Dataset):
    """AVSBench-S4 clips with their masks, in the benchmark's evaluation transform.

    Samples: ``video`` float32 (T, 3, S, S), ``audio`` float32 (1, A, F), ``mask`` bool (T, S, S) (the
    sounding object), ``mask_valid`` bool (T,) (frames with an annotation), ``category`` int64 () = index
    of the clip's category in :attr:`categories`, ``label`` int64 () = same, ``index`` int64 ().

    :param root: dataset root (layout in the module docstring).
    :param split: ``train``, ``val`` or ``test``.
    :param features: preprocessing config of the benchmark the backbone was trained on.
    :param csv_path: metadata csv (default ``root/s4_meta_data.csv``).
    :param on_error: ``"raise"`` (default) or ``"skip"`` clips with missing media (counted in :attr:`skipped`).
    :param max_clips: keep only the first clips of the split (cheap checks), ``None`` = all.
    """

    def __init__(self, *, root: str | os.PathLike, split: str, features: "FeatureConfig",
                 csv_path: str | os.PathLike | None = None, on_error: str = "raise",
                 max_clips: int | None = None) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.split = split
        self.features = features
        self.on_error = on_error
        records = read_s4_csv(csv_path if csv_path is not None else self.root / S4_CSV, root=self.root, split=split)
        if max_clips is not None:
            records = records[:max_clips]
        if not records:
            raise ValueError(f"AVSBench-S4: no clips of split {split!r} in {csv_path or self.root / S4_CSV}")
        self.skipped: collections.Counter[str] = collections.Counter()
        self.picked = pick_frames(features.num_frames)
        self.records: list[S4Record] = [r for r in records if self._check_files(r)]
        if self.skipped:
            log.warning("AVSBench-S4 %s: skipped %d clip(s) %s", split, sum(self.skipped.values()),
                        dict(self.skipped))
        self.categories = sorted({r.category for r in records})

    def _check_files(self, r: S4Record) -> bool:
        needed = [r.frames[i] for i in self.picked] + [r.masks[i] for i in self.picked if r.masks[i]] + [r.audio]
        for p in needed:
            if not os.path.isfile(p):  # type: ignore[arg-type]
                err = media.MissingMediaError(p, f"file of AVSBench-S4 clip {r.name} ({r.source}:{r.row}) not found")
                if self.on_error == "raise":
                    raise err
                self.skipped[err.kind] += 1
                return False
        return True

    def __len__(self) -> int:
        return len(self.records)

    def _square(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (T, C, h, w) -> float (T, C, S, S): the eval geometry (centre square, then resize)."""
        sq = media.resize_crop_square(x, self.features.source_size).permute(0, 3, 1, 2)  # (T, C, s, s) uint8
        s = self.features.frame_size
        if sq.shape[-1] != s:
            return F.interpolate(sq.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return sq.float()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from stella_avalanche.data.features import compute_fbank, load_waveform, video_from_frames

        r = self.records[index]
        frames = np.stack([_load_png(r.frames[i], "RGB") for i in self.picked])  # (T, h, w, 3)
        square = media.resize_crop_square(torch.from_numpy(frames).permute(0, 3, 1, 2), self.features.source_size)
        video = video_from_frames(square, self.features, train=False)
        h, w = frames.shape[1:3]
        masks = np.zeros((len(self.picked), h, w), dtype=np.uint8)
        valid = torch.zeros(len(self.picked), dtype=torch.bool)
        for j, i in enumerate(self.picked):
            mp = r.masks[i]
            if mp is None:
                continue
            m = _load_png(mp, "L")
            if m.shape != (h, w):
                raise media.CorruptMediaError(mp, f"mask is {m.shape[1]}x{m.shape[0]}, the frame {w}x{h}")
            masks[j] = np.where(m > 0, 255, 0)
            valid[j] = True
        mask = self._square(torch.from_numpy(masks)[:, None])[:, 0] > 127.5  # (T, S, S)
        fbank = compute_fbank(load_waveform(r.audio, self.features), self.features)
        cat = torch.tensor(self.categories.index(r.category), dtype=torch.int64)
        return {"video": video, "audio": fbank.unsqueeze(0), "mask": mask, "mask_valid": valid,
                "category": cat, "label": cat, "index": torch.tensor(index, dtype=torch.int64)}


def collate_s4(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the sample dicts of :class:`AVSBenchS4Dataset`."""
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
