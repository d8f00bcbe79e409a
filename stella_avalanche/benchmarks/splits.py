"""Task-split rules of Continual-VS and Continual-AS, and the "prepare" step that applies them.

The prepare step turns a user's upstream clip lists (CAV-MAE json datafiles, a label table and, for
AudioSet, the segment lists) plus the downloaded media under one data root into the STELLA split CSVs
(``docs/benchmarks.md`` §1.4). The split *rules* (§3) are small pure functions over tables so that
they can be tested without any media:

* :func:`parse_vggsound_video_id`, :func:`vggsound_clip_key`, :func:`audioset_clip_key` - clip keys;
* :func:`assign_vggsound_tasks` - label-table rows -> task names via ``vggsound_categories.csv``;
* :func:`select_vggsound_classes` - the first ``classes_per_task`` rows of each task in table order;
* :func:`cap_per_class` - the first ``max_per_class`` clips of each class in list order;
* :func:`audioset_clip_task` - the single-task rule on a clip's in-table labels.

:func:`prepare_vggsound_splits` and :func:`prepare_audioset_splits` do the I/O around them: parse the
json lists, rebuild media paths under the data root from the clip key, keep the entries whose video and
audio exist (dropped entries are counted per task and listed in a drop report), shuffle each output with
a seed and write the CSVs atomically.

Why one module above 700 lines: the VGGSound and AudioSet rules and prepare steps share the clip-key,
media-path, cap and report helpers and the split-CSV layout, and each rule is a small pure function;
a split per benchmark would import most of the other half.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from stella_avalanche.data.manifests import (ManifestError, normalise_display_name, read_cavmae_json,
                                             split_vggsound_video_id, write_split_csv)
from stella_avalanche.resources import as_path, split_table
from stella_avalanche.utils import atomic_write, atomic_write_json

__all__ = [
    "VGGSOUND_TASKS",
    "AUDIOSET_TASKS",
    "VGGSOUND_FILES",
    "AUDIOSET_FILES",
    "SPLITS_DATA_DIR",
    "SplitRow",
    "SplitReport",
    "normalise_display_name",
    "parse_vggsound_video_id",
    "vggsound_clip_key",
    "audioset_clip_key",
    "load_vggsound_categories",
    "load_audioset_tasks",
    "assign_vggsound_tasks",
    "select_vggsound_classes",
    "cap_per_class",
    "audioset_clip_task",
    "read_segments_csv",
    "prepare_vggsound_splits",
    "prepare_audioset_splits",
]

log = logging.getLogger(__name__)

#: Continual-VS task order (paper).
VGGSOUND_TASKS: tuple[str, ...] = (
    "sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2",
)
#: Continual-AS task order (paper).
AUDIOSET_TASKS: tuple[str, ...] = ("human", "vehicle", "nature", "animal", "others", "home", "music")

#: Output file names of the Continual-VS prepare step (role -> file name).
VGGSOUND_FILES: dict[str, str] = {
    "train": "vgg_train_cleaned_shrink8.csv",
    "test": "vgg_test_cleaned_shrink8.csv",
    "retrieval": "vgg_test_5_per_class_for_retrieval_cleaned_shrink8.csv",
    "labels": "class_labels_indices_shrink8.csv",
    "unused_train": "vgg_unused_cleaned_shrink8.csv",
    "unused_test": "vgg_unused_test_cleaned_shrink8.csv",
    "report": "vgg_prepare_report.json",
    "dropped": "vgg_dropped.csv",
}
#: Output file names of the Continual-AS prepare step (role -> file name).
AUDIOSET_FILES: dict[str, str] = {
    "train": "audioset_2m_cleaned.csv",
    "test": "audioset_2m_eval_cleaned.csv",
    "retrieval": "audioset_2m_eval_5_per_class_for_retrieval_cleaned.csv",
    "labels": "class_labels_indices_audioset.csv",
    "report": "audioset_prepare_report.json",
    "dropped": "audioset_dropped.csv",
}

#: the packaged split tables (category and class tables), a :mod:`importlib.resources` folder
#: (``stella_avalanche/benchmarks/split_tables``; see :mod:`stella_avalanche.resources`).
SPLITS_DATA_DIR = files("stella_avalanche") / "benchmarks" / "split_tables"

_VGG_PREFIX = "vggsound/data"
_AS_PREFIX = "AudioSet/data"
_AUDIO_EXTS = (".mp3", ".wav", ".flac")
_CLIP_SECONDS = 10
# Problems listed in one error message; the rest is summarised as a count.
_MAX_LISTED = 20


def _error(source: str | os.PathLike, message: str, problems: Sequence[str] = ()) -> ManifestError:
    """One error type for every manifest problem: ``ManifestError`` naming the file(s)."""
    return ManifestError(source, list(problems) or [message])


# --------------------------------------------------------------------------------------------------
# Pure rules
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitRow:
    """One row of a STELLA split CSV (paths relative to the data root).

    :param vid: bare YouTube id (not unique across segments).
    :param frames_path: frames directory, or a raw video file, relative to the data root.
    :param wav: audio file (or the raw video whose audio track is used), relative to the data root.
    :param label: one mid (VGGSound) or comma-joined mids (AudioSet).
    :param category: task name.
    :param key: unique clip key ``<ytid>_<start_ms>_<end_ms>``.
    """

    vid: str
    frames_path: str
    wav: str
    label: str
    category: str
    key: str


#: ``<ytid>_<start>`` -> (ytid, start second), split on the **last** underscore (YouTube ids may
#: contain ``_``; the start may be zero-padded). Same function as the manifest reader's.
parse_vggsound_video_id = split_vggsound_video_id


def vggsound_clip_key(ytid: str, start_s: int) -> str:
    """VGGSound clip key ``<ytid>_<start*1000>_<(start+10)*1000>`` (10 s segments)."""
    return f"{ytid}_{int(start_s) * 1000}_{(int(start_s) + _CLIP_SECONDS) * 1000}"


def audioset_clip_key(ytid: str, start_s: float, end_s: float) -> str:
    """AudioSet clip key ``<ytid>_<int(start*1000)>_<int(end*1000)>`` from the segment bounds."""
    return f"{ytid}_{int(float(start_s) * 1000)}_{int(float(end_s) * 1000)}"


def _read_table(path: Path) -> pd.DataFrame:
    """CSV -> str DataFrame; drops a leading unnamed pandas-index column."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise _error(path, f"{path}: cannot read table ({exc})") from exc
    drop = [c for c in df.columns if c == "" or str(c).startswith("Unnamed:")]
    return df.drop(columns=drop)


def _require_columns(df: pd.DataFrame, cols: Sequence[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise _error(path, f"{path}:1: missing column(s) {missing}; found {list(df.columns)}")


def load_vggsound_categories(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Read ``vggsound_categories.csv`` -> ``{normalised display name: task}``.

    :param path: the table (columns ``display_name, category, task, ...``); default
        the packaged ``vggsound_categories.csv``.
    """
    if path is None:  # the packaged table
        with as_path(split_table("vggsound_categories.csv")) as packaged:
            return load_vggsound_categories(packaged)
    path = Path(path)
    df = _read_table(path)
    _require_columns(df, ("display_name", "task"), path)
    bad = sorted(set(df["task"]) - set(VGGSOUND_TASKS))
    if bad:
        raise _error(path, f"{path}: unknown task name(s) {bad}; valid: {list(VGGSOUND_TASKS)}")
    return {normalise_display_name(n): t for n, t in zip(df["display_name"], df["task"])}


def load_audioset_tasks(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read ``audioset_tasks.csv`` (171 rows: ``task, display_name, mid, role``) as the label table.

    :returns: DataFrame with columns ``index`` (row position = class id), ``mid``, ``display_name``,
        ``category`` (task name), ``role``; rows in file order.
    """
    if path is None:  # the packaged table
        with as_path(split_table("audioset_tasks.csv")) as packaged:
            return load_audioset_tasks(packaged)
    path = Path(path)
    df = _read_table(path)
    _require_columns(df, ("task", "display_name", "mid"), path)
    bad = sorted(set(df["task"]) - set(AUDIOSET_TASKS))
    if bad:
        raise _error(path, f"{path}: unknown task name(s) {bad}; valid: {list(AUDIOSET_TASKS)}")
    dup = df["mid"][df["mid"].duplicated()].tolist()
    if dup:
        raise _error(path, f"{path}: duplicate mid(s) {dup[:_MAX_LISTED]}")
    out = pd.DataFrame({
        "index": np.arange(len(df)), "mid": df["mid"], "display_name": df["display_name"],
        "category": df["task"], "role": df["role"] if "role" in df.columns else "",
    })
    return out.reset_index(drop=True)


def assign_vggsound_tasks(display_names: Sequence[str], categories: Mapping[str, str], *,
                          source: str = "label table") -> list[str]:
    """Task of each label-table row, by display name (``_`` -> ``,`` normalised).

    :param display_names: the label table's ``display_name`` column, in row order.
    :param categories: :func:`load_vggsound_categories` output.
    :raises ManifestError: names absent from the category table (row numbers listed).
    """
    tasks, problems = [], []
    for row, name in enumerate(display_names):
        task = categories.get(normalise_display_name(name))
        if task is None:
            problems.append(f"{source}: row {row + 2}: display_name {name!r} not in vggsound_categories.csv")
        tasks.append(task)
    if problems:
        raise _error(source, "class(es) without a VGGSound category", problems)
    return tasks


def select_vggsound_classes(tasks_per_row: Sequence[str], *, task_names: Sequence[str] = VGGSOUND_TASKS,
                            classes_per_task: int = 20) -> dict[str, list[int]]:
    """Trained classes: for each task, the first ``classes_per_task`` label-table rows of that task.

    The rule scans the table **in its row order** (not random, not by size, not alphabetical unless the
    table is).

    :param tasks_per_row: task name of each label-table row, in row order.
    :returns: ``{task: [row position, ...]}`` for every task of ``task_names`` (possibly fewer rows).
    """
    if classes_per_task < 1:
        raise ValueError(f"classes_per_task must be >= 1, got {classes_per_task}")
    rows = np.asarray(tasks_per_row, dtype=object)
    return {t: np.flatnonzero(rows == t)[:classes_per_task].tolist() for t in task_names}


def cap_per_class(classes: Sequence[str], max_per_class: int) -> np.ndarray:
    """Boolean mask keeping the first ``max_per_class`` items of each class, in list order.

    Classes with fewer items keep all of them (there is no minimum).

    :param classes: class of each item, (N,).
    :returns: bool array (N,).
    """
    if max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0, got {max_per_class}")
    if len(classes) == 0:
        return np.zeros(0, dtype=bool)
    rank = pd.Series(np.asarray(classes, dtype=object)).groupby(np.asarray(classes, dtype=object),
                                                                 sort=False).cumcount()
    return rank.to_numpy() < max_per_class


def audioset_clip_task(labels: Iterable[str], mid_to_task: Mapping[str, str]) -> tuple[str | None, tuple[str, ...], str]:
    """Single-task rule of Continual-AS for one clip.

    Labels outside the table are ignored; the clip is kept only if its in-table labels all map to one
    task (the stricter "exactly one category" rule of the official retrieval builder).

    :returns: ``(task or None, in-table labels in input order, reason)`` with reason ``"ok"``,
        ``"no_in_table_label"`` or ``"multi_task"``.
    """
    kept = tuple(dict.fromkeys(m for m in (s.strip() for s in labels) if m in mid_to_task))
    if not kept:
        return None, kept, "no_in_table_label"
    tasks = {mid_to_task[m] for m in kept}
    if len(tasks) > 1:
        return None, kept, "multi_task"
    return tasks.pop(), kept, "ok"


def read_segments_csv(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, list[tuple[float, float, tuple[str, ...]]]]:
    """Read AudioSet ``*_segments.csv`` files -> ``{ytid: [(start_s, end_s, positive_labels), ...]}``.

    Format: ``#`` comment lines, then ``YTID, start_seconds, end_seconds, "mid,mid,..."`` (spaces after
    the commas; the label field is quoted). Identical segments listed twice are kept once.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: dict[str, list[tuple[float, float, tuple[str, ...]]]] = defaultdict(list)
    for p in paths:
        p = Path(p)
        try:
            fh = open(p, newline="", encoding="utf-8")
        except OSError as exc:
            raise _error(p, f"{p}: cannot read segments file ({exc})") from exc
        with fh:
            for lineno, fields in enumerate(csv.reader(fh, skipinitialspace=True), start=1):
                if not fields or fields[0].lstrip().startswith("#"):
                    continue
                if fields[0].strip() == "YTID":  # header without '#'
                    continue
                if len(fields) < 3:
                    raise _error(p, f"{p}:{lineno}: expected YTID, start_seconds, end_seconds[, labels]; "
                                 f"got {fields!r}")
                try:
                    start, end = float(fields[1]), float(fields[2])
                except ValueError as exc:
                    raise _error(p, f"{p}:{lineno}: bad segment bounds {fields[1:3]!r}") from exc
                labels = tuple(m.strip() for m in ",".join(fields[3:]).split(",") if m.strip())
                seg = (start, end, labels)
                segs = out[fields[0].strip()]
                if seg not in segs:
                    segs.append(seg)
    return dict(out)


# --------------------------------------------------------------------------------------------------
# I/O helpers
# --------------------------------------------------------------------------------------------------

def _entry_labels(entry: Mapping) -> list[str]:
    """Mids of a json entry (``labels`` is a comma-joined string or, from read_cavmae_json, a tuple)."""
    raw = entry.get("labels", "")
    if isinstance(raw, (list, tuple)):
        return [str(m).strip() for m in raw if str(m).strip()]
    return [m.strip() for m in str(raw).split(",") if m.strip()]


class _MediaIndex:
    """Names present in the media folders of one dataset, listed once (one ``scandir`` per folder).

    Existence checks over ~200k clips are then set look-ups instead of ~400k ``stat`` calls, which
    matters on network file systems.
    """

    def __init__(self, data_root: Path, prefix: str) -> None:
        self.root = data_root
        self.prefix = prefix
        base = data_root / prefix
        self.frames = self._names(base / "frames", dirs=True)
        self.audio = self._names(base / "audio", dirs=False)
        self._raw: dict[str, set[str]] = {}

    @staticmethod
    def _names(folder: Path, *, dirs: bool) -> set[str]:
        try:
            with os.scandir(folder) as it:
                return {e.name for e in it if (e.is_dir() if dirs else e.is_file())}
        except FileNotFoundError:
            return set()

    def raw_videos(self, sub: str) -> set[str]:
        """File names in ``<prefix>/<sub>/video`` (cached)."""
        if sub not in self._raw:
            self._raw[sub] = self._names(self.root / self.prefix / sub / "video", dirs=False)
        return self._raw[sub]

    def resolve(self, key: str, raw_subdirs: Sequence[str], allow_raw_video: bool) -> tuple[str | None, str | None, str]:
        """Relative (video, audio) paths of a clip, or ``None`` with the reason.

        Frames directory first; else, if allowed, the raw ``<key>.mp4`` (whose own audio track serves
        when no separate audio file exists).
        """
        video = f"{self.prefix}/frames/{key}" if key in self.frames else None
        audio = next((f"{self.prefix}/audio/{key}{ext}" for ext in _AUDIO_EXTS if key + ext in self.audio), None)
        if (video is None or audio is None) and allow_raw_video:
            raw = next((f"{self.prefix}/{sub}/video/{key}.mp4" for sub in raw_subdirs
                        if f"{key}.mp4" in self.raw_videos(sub)), None)
            video = video or raw
            audio = audio or raw
        if video is None and audio is None:
            return None, None, "missing_video_and_audio"
        if video is None:
            return None, audio, "missing_video"
        if audio is None:
            return video, None, "missing_audio"
        return video, audio, "ok"


def _write_split(path: Path, rows: Sequence[SplitRow], *, shuffle_seed: int | None) -> None:
    """Write a STELLA split CSV (no header; ``index, vid, frames_path, wav, label, category``).

    Rows are shuffled with ``np.random.default_rng(shuffle_seed)`` (the official script shuffles without a
    seed); the leading index is then 0..N-1 as in files written after a shuffle.
    """
    order = (np.random.default_rng(shuffle_seed).permutation(len(rows)) if shuffle_seed is not None
             else np.arange(len(rows)))
    write_split_csv(path, [{"vid": rows[j].vid, "frames_path": rows[j].frames_path, "wav": rows[j].wav,
                            "label": rows[j].label, "category": rows[j].category} for j in order])


def _write_dropped(path: Path, dropped: Sequence[tuple[str, str, str, str]]) -> None:
    with atomic_write(path, "w") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["split", "key", "task", "reason"])
        w.writerows(dropped)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

@dataclass
class SplitReport:
    """What a prepare step wrote and kept.

    :param benchmark: ``"continual_vs"`` or ``"continual_as"``.
    :param files: role -> written path (``train``, ``test``, ``retrieval``, ``labels``, ...).
    :param counts: task -> {column -> count}; columns depend on the benchmark (``classes``, ``trained``,
        ``train``, ``eval``, ``retrieval``, ``unused_train``, ``unused_test``, ``dropped_<split>``).
    :param selected_classes: task -> trained class display names (VGGSound) / table classes (AudioSet).
    :param dropped: split -> reason -> count.
    """

    benchmark: str
    task_names: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    selected_classes: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)

    def table(self) -> str:
        """Per-task counts as a fixed-width text table (with a total row)."""
        cols = sorted({c for v in self.counts.values() for c in v}, key=self._col_order)
        width = max([len("task"), len("total")] + [len(t) for t in self.task_names])
        head = "task".ljust(width) + "".join(f" {c:>14}" for c in cols)
        lines = [head, "-" * len(head)]
        for t in self.task_names:
            lines.append(t.ljust(width) + "".join(f" {self.counts[t].get(c, 0):>14}" for c in cols))
        lines.append("total".ljust(width)
                     + "".join(f" {sum(self.counts[t].get(c, 0) for t in self.task_names):>14}" for c in cols))
        return "\n".join(lines)

    @staticmethod
    def _col_order(c: str) -> tuple[int, str]:
        known = ["classes", "trained", "train", "eval", "retrieval", "unused_train", "unused_test"]
        return (known.index(c), c) if c in known else (len(known), c)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"benchmark": self.benchmark, "task_names": self.task_names,
                "files": {k: str(v) for k, v in self.files.items()}, "counts": self.counts,
                "selected_classes": self.selected_classes, "dropped": self.dropped}


# --------------------------------------------------------------------------------------------------
# Continual-VS
# --------------------------------------------------------------------------------------------------

@dataclass
class _Entries:
    """Resolved clips of one json list (parallel lists, list order preserved)."""

    rows: list[SplitRow] = field(default_factory=list)
    mids: list[str] = field(default_factory=list)


def _load_vggsound_json(path: Path, split: str, media: _MediaIndex, mid_to_task: Mapping[str, str],
                        raw_subdir: str, allow_raw_video: bool,
                        dropped: list[tuple[str, str, str, str]]) -> _Entries:
    out, problems, seen = _Entries(), [], set()
    for i, e in enumerate(read_cavmae_json(path)):
        where = f"{path}: entry {i}"
        try:
            ytid, start = parse_vggsound_video_id(e.get("video_id", ""))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        labels = _entry_labels(e)
        if len(labels) != 1:
            problems.append(f"{where}: VGGSound entry must carry exactly one mid, got {labels!r}")
            continue
        mid = labels[0]
        if mid not in mid_to_task:
            problems.append(f"{where}: mid {mid!r} is not in the label table")
            continue
        key = vggsound_clip_key(ytid, start)
        task = mid_to_task[mid]
        if key in seen:
            dropped.append((split, key, task, "duplicate_key"))
            continue
        seen.add(key)
        video, audio, reason = media.resolve(key, (raw_subdir,), allow_raw_video)
        if reason != "ok":
            dropped.append((split, key, task, reason))
            continue
        out.rows.append(SplitRow(ytid, video, audio, mid, task, key))
        out.mids.append(mid)
    if problems:
        raise _error(path, "malformed entries", problems)
    return out


def _check_disjoint(named: Mapping[str, Iterable[str]], pairs: Sequence[tuple[str, str]], source: str) -> None:
    keys = {k: set(v) for k, v in named.items()}
    problems = []
    for a, b in pairs:
        both = sorted(keys[a] & keys[b])
        problems += [f"clip key {k} is in both the {a} and the {b} list" for k in both]
    if problems:
        raise _error(source, "clips shared between splits that must be disjoint", problems)


@dataclass(frozen=True)
class _VggClasses:
    """The VGGSound label table with every row's task and the trained classes.

    :param table: the label CSV (``index, mid, display_name``), file order.
    :param tasks: task name of every table row.
    :param selected: task -> table rows of its trained classes.
    :param trained_rows: all trained table rows, ascending.
    """

    table: pd.DataFrame
    tasks: list[str]
    selected: dict[str, list[int]]
    trained_rows: list[int]

    @property
    def trained_mids(self) -> set[str]:
        """Mids of the trained classes."""
        return set(self.table["mid"].iloc[self.trained_rows])


def _vggsound_classes(label_csv: Path, categories_csv: str | os.PathLike | None,
                      classes_per_task: int) -> _VggClasses:
    """Read the label table, assign every class its task and select the trained classes."""
    categories = load_vggsound_categories(categories_csv)
    table = _read_table(label_csv)
    _require_columns(table, ("index", "mid", "display_name"), label_csv)
    if table["mid"].duplicated().any():
        raise _error(label_csv, f"{label_csv}: duplicate mid(s) {table['mid'][table['mid'].duplicated()].tolist()[:_MAX_LISTED]}")
    tasks = assign_vggsound_tasks(table["display_name"].tolist(), categories, source=str(label_csv))
    selected = select_vggsound_classes(tasks, classes_per_task=classes_per_task)
    trained_rows = sorted(r for rows in selected.values() for r in rows)
    return _VggClasses(table=table, tasks=tasks, selected=selected, trained_rows=trained_rows)


def _vggsound_roles(train: _Entries, test: _Entries, retr: _Entries, trained_mids: set[str],
                    max_per_class: int) -> dict[str, list[SplitRow]]:
    """Rows per output file role (``train, test, retrieval, unused_train, unused_test``, in that order)."""
    is_trained = np.fromiter((m in trained_mids for m in train.mids), bool, len(train.mids))
    keep = is_trained & cap_per_class(np.where(is_trained, np.asarray(train.mids, dtype=object), ""),
                                      max_per_class)
    return {"train": [r for r, k in zip(train.rows, keep) if k],
            "test": [r for r in test.rows if r.label in trained_mids],
            "retrieval": list(retr.rows),
            "unused_train": [r for r, k in zip(train.rows, keep) if not k],
            "unused_test": [r for r in test.rows if r.label not in trained_mids]}


def _write_vggsound_files(out_dir: Path, roles: Mapping[str, list[SplitRow]], classes: _VggClasses,
                          seed: int | None) -> dict[str, Path]:
    """Write the five split CSVs (shuffled) and the trained-class label table; role -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {role: out_dir / name for role, name in VGGSOUND_FILES.items()}
    # Distinct shuffle streams per file so that files of equal length are not permuted identically.
    for i, role in enumerate(("train", "test", "retrieval", "unused_train", "unused_test")):
        _write_split(files[role], roles[role], shuffle_seed=None if seed is None else seed * 101 + i)
    # Trained classes in the original row order, written with the pandas index (STELLA's layout):
    # the leading unnamed column, then the original 309-class ``index``; category = task name.
    lab = classes.table.iloc[classes.trained_rows][["index", "mid", "display_name"]].copy()
    lab["category"] = [classes.tasks[r] for r in classes.trained_rows]
    with atomic_write(files["labels"], "w") as fh:
        lab.to_csv(fh, index=True, lineterminator="\n")
    return files


def _vggsound_counts(classes: _VggClasses, roles: Mapping[str, list[SplitRow]],
                     dropped: Sequence[tuple[str, str, str, str]]) -> dict[str, dict[str, int]]:
    """Per task: classes, trained classes, rows per split (``test`` counted as ``eval``), dropped rows."""
    per = {t: Counter() for t in VGGSOUND_TASKS}
    for t in classes.tasks:
        per[t]["classes"] += 1
    for t, rows in classes.selected.items():
        per[t]["trained"] = len(rows)
    for role, name in (("train", "train"), ("test", "eval"), ("retrieval", "retrieval"),
                       ("unused_train", "unused_train"), ("unused_test", "unused_test")):
        for r in roles[role]:
            per[r.category][name] += 1
    for split, _, t, _ in dropped:
        per[t][f"dropped_{split}"] += 1
    return {t: {c: int(n) for c, n in per[t].items()} for t in VGGSOUND_TASKS}


def prepare_vggsound_splits(train_json: str | os.PathLike, test_json: str | os.PathLike,
                            retrieval_json: str | os.PathLike, label_csv: str | os.PathLike,
                            data_root: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
                            max_per_class: int = 400, classes_per_task: int = 20,
                            categories_csv: str | os.PathLike | None = None,
                            allow_raw_video: bool = True, verbose: bool = True) -> SplitReport:
    """Build the Continual-VS split CSVs (``docs/benchmarks.md`` §3.1) from CAV-MAE lists.

    Rules: trained classes = first ``classes_per_task`` label-table rows of each task (table row order);
    train = first ``max_per_class`` clips of each trained class in json order (after missing media are
    dropped), the rest -> unused train; eval = all test clips of trained classes, the others -> unused
    test; retrieval = the 5-per-class clips of **every** class of the task, tagged with the task name;
    label table = the trained classes only (original row order, original ``index`` kept). Media paths
    are rebuilt under ``data_root`` from the clip key: ``vggsound/data/frames/<key>/`` (or, if
    ``allow_raw_video``, ``vggsound/data/<train|test>/video/<key>.mp4``) and
    ``vggsound/data/audio/<key>.mp3`` (``.wav``/``.flac`` accepted; else the raw video's own track).

    :param train_json: ``vgg_train_cleaned.json``.
    :param test_json: ``vgg_test_cleaned.json``.
    :param retrieval_json: ``vgg_test_5_per_class_for_retrieval_cleaned.json``.
    :param label_csv: CAV-MAE's ``class_labels_indices_vgg.csv`` (``index,mid,display_name``).
    :param data_root: the root every written path is relative to.
    :param out_dir: where the CSVs (and ``vgg_prepare_report.json``, ``vgg_dropped.csv``) are written.
    :param seed: shuffle seed of the written splits.
    :param max_per_class: train clips kept per trained class.
    :param classes_per_task: trained classes per task.
    :param categories_csv: class -> task table; default: the packaged ``vggsound_categories.csv``.
    :param allow_raw_video: accept raw ``.mp4`` files when frames / audio are not extracted.
    :param verbose: print the per-task table and the selected classes.
    :returns: :class:`SplitReport`.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    label_csv = Path(label_csv)
    classes = _vggsound_classes(label_csv, categories_csv, classes_per_task)
    mid_to_task = dict(zip(classes.table["mid"], classes.tasks))
    media = _MediaIndex(data_root, _VGG_PREFIX)
    dropped: list[tuple[str, str, str, str]] = []
    train = _load_vggsound_json(Path(train_json), "train", media, mid_to_task, "train", allow_raw_video, dropped)
    test = _load_vggsound_json(Path(test_json), "test", media, mid_to_task, "test", allow_raw_video, dropped)
    retr = _load_vggsound_json(Path(retrieval_json), "retrieval", media, mid_to_task, "test", allow_raw_video,
                               dropped)
    # Retrieval clips come from the test split, so they may lie inside eval; never inside train.
    _check_disjoint({"train": [r.key for r in train.rows], "test": [r.key for r in test.rows],
                     "retrieval": [r.key for r in retr.rows]}, [("train", "test"), ("train", "retrieval")],
                    source=f"{train_json}, {test_json}, {retrieval_json}")
    roles = _vggsound_roles(train, test, retr, classes.trained_mids, max_per_class)
    files = _write_vggsound_files(out_dir, roles, classes, seed)
    report = SplitReport("continual_vs", list(VGGSOUND_TASKS), files=files)
    report.counts = _vggsound_counts(classes, roles, dropped)
    report.selected_classes = {t: [str(classes.table["display_name"].iloc[r]) for r in rows]
                               for t, rows in classes.selected.items()}
    report.dropped = _dropped_summary(dropped)
    _finish(report, files, dropped, verbose)
    return report


def _dropped_summary(dropped: Sequence[tuple[str, str, str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = defaultdict(Counter)
    for split, _, _, reason in dropped:
        out[split][reason] += 1
    return {s: dict(c) for s, c in out.items()}


def _finish(report: SplitReport, files: Mapping[str, Path], dropped: Sequence[tuple[str, str, str, str]],
            verbose: bool) -> None:
    _write_dropped(files["dropped"], dropped)
    atomic_write_json(files["report"], report.to_dict())
    lines = [f"{report.benchmark}: per-task counts", report.table()]
    if report.dropped:
        lines.append("dropped: " + json.dumps(report.dropped, sort_keys=True))
    lines.append("selected classes:")
    lines += [f"  {t} ({len(c)}): " + "; ".join(c) for t, c in report.selected_classes.items()]
    lines.append(f"written to {files['train'].parent}")
    text = "\n".join(lines)
    log.info(text)
    if verbose:
        print(text)


# --------------------------------------------------------------------------------------------------
# Continual-AS
# --------------------------------------------------------------------------------------------------

def _class_dir_task(name: str, by_norm_name: Mapping[str, str]) -> str | None:
    """Task of a per-class download folder ``<Class_Name>_<train|eval>`` (best effort, by name)."""
    base = re.sub(r"_(train|eval)$", "", name)
    return by_norm_name.get(re.sub(r"[^0-9a-z]+", "", base.lower()))


class _AudioSetRawIndex:
    """Raw videos of the per-class download folders ``AudioSet/data/<Class_Name>_<split>/video/``."""

    def __init__(self, data_root: Path, suffix: str, *, enabled: bool = True) -> None:
        self.where: dict[str, list[str]] = defaultdict(list)
        if not enabled:
            return
        base = data_root / _AS_PREFIX
        try:
            with os.scandir(base) as it:
                folders = sorted(e.name for e in it if e.is_dir() and e.name.endswith(f"_{suffix}"))
        except FileNotFoundError:
            folders = []
        for folder in folders:
            for name in _MediaIndex._names(base / folder / "video", dirs=False):
                if name.endswith(".mp4"):
                    self.where[name[:-4]].append(folder)


def _load_audioset_json(path: Path, split: str, segments: Mapping[str, list], media: _MediaIndex,
                        raw: _AudioSetRawIndex, mid_to_task: Mapping[str, str], class_dir_task: Mapping[str, str],
                        allow_raw_video: bool, dropped: list[tuple[str, str, str, str]],
                        mismatches: Counter) -> list[SplitRow]:
    rows, problems, seen = [], [], set()
    for i, e in enumerate(read_cavmae_json(path)):
        where = f"{path}: entry {i}"
        ytid = str(e.get("video_id", "")).strip()
        if not ytid:
            problems.append(f"{where}: empty video_id")
            continue
        segs = segments.get(ytid, [])
        if not segs:
            dropped.append((split, ytid, "", "no_segment"))
            continue
        # A ytid listed with several segments: keep the one whose media exist, if exactly one does.
        found = []
        for start, end, seg_labels in segs:
            key = audioset_clip_key(ytid, start, end)
            video, audio, reason = media.resolve(key, (), False)
            if reason != "ok" and allow_raw_video and raw.where.get(key):
                rel = f"{_AS_PREFIX}/{raw.where[key][0]}/video/{key}.mp4"
                video, audio = video or rel, audio or rel
                reason = "ok"
            found.append((key, video, audio, reason, seg_labels))
        ok = [f for f in found if f[3] == "ok"]
        labels = _entry_labels(e) or list(found[0][4])
        task, in_table, why = audioset_clip_task(labels, mid_to_task)
        key = (ok[0] if ok else found[0])[0]
        if why != "ok":
            dropped.append((split, key, "", why))
            continue
        if len(ok) > 1:
            dropped.append((split, key, task, "ambiguous_segment"))
            continue
        if key in seen:  # a segment collected under several classes is kept once
            dropped.append((split, key, task, "duplicate_key"))
            continue
        seen.add(key)
        if not ok:
            dropped.append((split, key, task, found[0][3]))
            continue
        _, video, audio, _, _ = ok[0]
        # The task recomputed from the labels should agree with a class folder it was downloaded for.
        folders = raw.where.get(key, [])
        dl_tasks = {class_dir_task.get(f) for f in folders} - {None}
        if dl_tasks and task not in dl_tasks:
            mismatches[split] += 1
        rows.append(SplitRow(ytid, video, audio, ",".join(in_table), task, key))
    if problems:
        raise _error(path, "malformed entries", problems)
    return rows


def prepare_audioset_splits(train_json: str | os.PathLike, eval_json: str | os.PathLike,
                            retrieval_json: str | os.PathLike,
                            segments_csv: str | os.PathLike | Sequence[str | os.PathLike],
                            data_root: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
                            tasks_csv: str | os.PathLike | None = None, allow_raw_video: bool = True,
                            verbose: bool = True) -> SplitReport:
    """Build the Continual-AS split CSVs (``docs/benchmarks.md`` §3.2) from CAV-MAE lists.

    Label table = the 171 rows of ``audioset_tasks.csv`` (row position = class id, category = task). A
    clip's ``label`` is its mids that appear in the table (others dropped); it is kept only if they all
    map to **one** task (no in-table label, or labels spanning >= 2 tasks -> excluded, counted in the
    drop report); its ``category`` is that task, recomputed from the labels. The same rule filters the
    retrieval list. Segment times come from AudioSet's segment lists: clip key
    ``<ytid>_<int(start*1000)>_<int(end*1000)>``, media ``AudioSet/data/frames/<key>/`` and
    ``AudioSet/data/audio/<key>.mp3`` (or, if ``allow_raw_video``, the per-class download
    ``AudioSet/data/<Class_Name>_<train|eval>/video/<key>.mp4``). Where the download folder is known,
    the recomputed task is compared with the folder's class and disagreements are counted.

    :param train_json: training list (e.g. ``audioset_2m_cleaned.json``), bare-ytid ``video_id``.
    :param eval_json: eval list (e.g. ``audioset_eval_cleaned.json``).
    :param retrieval_json: ``audioset_eval_5_per_class_for_retrieval_cleaned.json``.
    :param segments_csv: one or more ``*_segments.csv`` (unbalanced train, balanced train, eval).
    :param data_root: the root every written path is relative to.
    :param out_dir: output folder (also ``audioset_prepare_report.json``, ``audioset_dropped.csv``).
    :param seed: shuffle seed of the written splits.
    :param tasks_csv: the 171-row table; default: the packaged ``audioset_tasks.csv``.
    :param allow_raw_video: accept raw ``.mp4`` files when frames / audio are not extracted.
    :param verbose: print the per-task table.
    :returns: :class:`SplitReport`.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    table = load_audioset_tasks(tasks_csv)
    mid_to_task = dict(zip(table["mid"], table["category"]))
    by_norm = {re.sub(r"[^0-9a-z]+", "", n.lower()): t for n, t in zip(table["display_name"], table["category"])}
    segments = read_segments_csv(segments_csv)
    media = _MediaIndex(data_root, _AS_PREFIX)
    dropped: list[tuple[str, str, str, str]] = []
    mismatches: Counter = Counter()
    out: dict[str, list[SplitRow]] = {}
    for split, path, suffix in [("train", train_json, "train"), ("test", eval_json, "eval"),
                                ("retrieval", retrieval_json, "eval")]:
        raw = _AudioSetRawIndex(data_root, suffix, enabled=allow_raw_video)
        folder_task = {f: _class_dir_task(f, by_norm) for fs in raw.where.values() for f in fs}
        out[split] = _load_audioset_json(Path(path), split, segments, media, raw, mid_to_task,
                                         {k: v for k, v in folder_task.items() if v}, allow_raw_video,
                                         dropped, mismatches)
    _check_disjoint({s: [r.key for r in rows] for s, rows in out.items()},
                    [("train", "test"), ("train", "retrieval")],
                    source=f"{train_json}, {eval_json}, {retrieval_json}")

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {role: out_dir / name for role, name in AUDIOSET_FILES.items()}
    for i, split in enumerate(("train", "test", "retrieval")):
        _write_split(files[split], out[split], shuffle_seed=None if seed is None else seed * 101 + i)
    lab = table[["index", "mid", "display_name", "category"]]
    with atomic_write(files["labels"], "w") as fh:
        lab.to_csv(fh, index=False, lineterminator="\n")

    report = SplitReport("continual_as", list(AUDIOSET_TASKS), files=files)
    per = {t: Counter() for t in AUDIOSET_TASKS}
    for t in table["category"]:
        per[t]["classes"] += 1
    for split, name in [("train", "train"), ("test", "eval"), ("retrieval", "retrieval")]:
        for r in out[split]:
            per[r.category][name] += 1
    for split, _, t, _ in dropped:
        if t:
            per[t][f"dropped_{split}"] += 1
    report.counts = {t: {c: int(n) for c, n in per[t].items()} for t in AUDIOSET_TASKS}
    report.selected_classes = {t: table["display_name"][table["category"] == t].tolist() for t in AUDIOSET_TASKS}
    report.dropped = _dropped_summary(dropped)
    for split, n in mismatches.items():
        report.dropped.setdefault(split, {})["download_class_task_mismatch(kept)"] = int(n)
    _finish(report, files, dropped, verbose)
    return report
