"""MSR-VTT-style transfer retrieval list: a CAV-MAE json of video files with their audio track.

The file is the CAV-MAE datafile layout ``{"data": [{"video_id", "video_path", "wav", "labels"}, ...]}``:

* ``video_id`` (required): unique clip key;
* ``video_path`` (required): a video file (or a frames directory), absolute or relative to the data root;
* ``wav`` (optional): an audio file; absent or empty means the video file's own audio track;
* ``labels`` (optional): ignored by retrieval, kept on the record.

The clips are read by :class:`~stella_avalanche.data.datasets.AudioVideoDataset` with the evaluation
transform, so media problems follow the same rules as every other loader (``on_error="raise"`` stops at
the first bad clip naming its file; ``"skip"`` drops and counts it). A malformed list raises
:class:`~stella_avalanche.data.manifests.ManifestError` listing every bad entry as ``file: entry i``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stella_avalanche.data.manifests import ClipRecord, ManifestError, read_json_data_list

if TYPE_CHECKING:
    from stella_avalanche.data.datasets import AudioVideoDataset, FeatureCache
    from stella_avalanche.data.features import FeatureConfig

__all__ = ["MSRVTT_TASK", "read_msrvtt_json", "msrvtt_dataset"]

#: The single task (category) name every MSR-VTT clip gets.
MSRVTT_TASK = "msrvtt"


def _resolve(p: str, root: Path) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else root / path)


def read_msrvtt_json(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None) -> list[ClipRecord]:
    """Read and validate an MSR-VTT-style list.

    :param path: the json file.
    :param data_root: directory relative paths are resolved against (default: the json's directory).
    :returns: one :class:`ClipRecord` per entry (``key = vid = video_id``, ``category = "msrvtt"``,
        ``row`` = 0-based entry number, ``audio`` = ``wav`` or the video file itself).
    :raises ManifestError: unreadable / invalid JSON, no ``data`` list, an empty list, or entries that are
        not objects, lack ``video_id`` / ``video_path``, hold non-string or empty values, or repeat a
        ``video_id`` (every problem listed as ``file: entry i (...)``).
    """
    src = str(path)
    root = Path(data_root) if data_root is not None else Path(src).resolve().parent
    obj = {"data": read_json_data_list(src)}
    problems: list[str] = []
    records: list[ClipRecord] = []
    first_seen: dict[str, int] = {}
    for i, entry in enumerate(obj["data"]):
        where = f"{src}: entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        bad = False
        values: dict[str, str] = {}
        for key in ("video_id", "video_path", "wav"):
            v: Any = entry.get(key)
            if v is None:
                if key != "wav":
                    problems.append(f"{where}: missing key {key!r}")
                    bad = True
                continue
            if not isinstance(v, str):
                problems.append(f"{where}: {key!r} must be a string, got {type(v).__name__}")
                bad = True
                continue
            values[key] = v.strip()
        if bad:
            continue
        vid = values["video_id"]
        if not vid:
            problems.append(f"{where}: empty video_id")
            continue
        if not values["video_path"]:
            problems.append(f"{where} (video_id={vid!r}): empty video_path")
            continue
        if vid in first_seen:
            problems.append(f"{where}: video_id {vid!r} repeats entry {first_seen[vid]}")
            continue
        first_seen[vid] = i
        labels_raw = entry.get("labels", "")
        labels = tuple(m for m in str(labels_raw).split(",") if m.strip()) if labels_raw else ()
        video = _resolve(values["video_path"], root)
        audio = _resolve(values["wav"], root) if values.get("wav") else video
        records.append(ClipRecord(key=vid, vid=vid, video=video, audio=audio, labels=labels,
                                  category=MSRVTT_TASK, source=src, row=i))
    if problems:
        raise ManifestError(src, problems)
    return records


def msrvtt_dataset(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                   features: "FeatureConfig | None" = None, cache: "FeatureCache | str | os.PathLike | None" = None,
                   on_error: str = "raise", progress: bool = True) -> "AudioVideoDataset":
    """The clips of an MSR-VTT-style list as an evaluation-mode :class:`AudioVideoDataset`.

    :param path: the json list (:func:`read_msrvtt_json`).
    :param data_root: base of relative paths (default: the json's directory).
    :param features: preprocessing config (default ``FeatureConfig.paper()``); use the benchmark's.
    :param cache: decode-once feature cache (directory or ``FeatureCache``), or None.
    :param on_error: ``"raise"`` or ``"skip"`` (media problems).
    :param progress: progress bar while a cache is built.
    :returns: dataset with ``category`` 0 and ``label`` -1 for every clip.
    """
    from stella_avalanche.data.datasets import AudioVideoDataset
    from stella_avalanche.data.features import FeatureConfig

    records = read_msrvtt_json(path, data_root=data_root)
    return AudioVideoDataset(records, features=features if features is not None else FeatureConfig.paper(),
                             train=False, task_names=[MSRVTT_TASK], cache=cache, on_error=on_error,  # type: ignore[arg-type]
                             progress=progress)
