"""Reading and validating clip lists: CAV-MAE json datafiles, STELLA split CSVs, label CSVs.

Formats are specified in ``docs/benchmarks.md`` §1.2-§1.4 and the loader contract in §1.7.
Validation collects **every** problem of a file before failing, and raises one
:class:`ManifestError` whose message lists them as ``file:line: problem``, so a user fixes a
broken manifest in one pass instead of one error per run.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from stella_avalanche.utils import atomic_write

__all__ = [
    "ClipRecord",
    "LabelTable",
    "ManifestError",
    "read_json_data_list",
    "SPLIT_COLUMNS",
    "read_split_csv",
    "read_csv_records",
    "read_cavmae_json",
    "read_label_csv",
    "write_split_csv",
    "clip_key",
    "split_vggsound_video_id",
    "normalise_display_name",
    "check_disjoint_keys",
]

#: Columns of a STELLA split CSV (after the optional leading pandas index).
SPLIT_COLUMNS: tuple[str, ...] = ("vid", "frames_path", "wav", "label", "category")
_LABEL_REQUIRED = ("index", "mid", "display_name")
_LABEL_OPTIONAL = ("category",)
_VIDEO_EXTS = {".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".flv"}
_MAX_SHOWN = 50  # problems printed in the message; ``.problems`` keeps all of them
# Column names of other clip lists (CAV-MAE json keys, AudioSet csvs, pandas dumps). A first row
# holding one of them is a header with renamed columns, not data: paths, mids and task names never
# equal these words, and without this check a fully renamed header would be read as a clip.
_HEADER_WORDS = frozenset({"index", "unnamed: 0", "video_id", "ytid", "youtube_id", "video", "video_path",
                           "frames", "frames_dir", "audio", "audio_path", "wav_path", "labels", "mid",
                           "mids", "task", "tasks", "class", "display_name"})


class ManifestError(ValueError):
    """One or more problems in a manifest. ``problems`` lists each as ``"file:line: text"``.

    :param source: the file (or a description of the set of files) that failed.
    :param problems: every problem found.
    """

    def __init__(self, source: str | os.PathLike, problems: Sequence[str]) -> None:
        self.source = str(source)
        self.problems = list(problems)
        shown = self.problems[:_MAX_SHOWN]
        more = len(self.problems) - len(shown)
        text = f"{len(self.problems)} problem(s) in {self.source}:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ManifestError, (self.source, self.problems))


@dataclass(frozen=True)
class ClipRecord:
    """One clip of a split.

    :param key: unique clip key, the stem ``<ytid>_<start_ms>_<end_ms>`` of the frames path.
    :param vid: the bare YouTube id (not unique across segments).
    :param video: absolute path of the frames directory or of a video file.
    :param audio: absolute path of the audio file (or of a video file with an audio track).
    :param labels: class mids (one for VGGSound, one or more for AudioSet).
    :param category: task name (or raw VGGSound category in the 309-class files).
    :param source: the manifest file the record came from.
    :param row: 1-based line number in ``source`` (entry number for json).
    """

    key: str
    vid: str
    video: str
    audio: str
    labels: tuple[str, ...]
    category: str
    source: str = ""
    row: int = 0



def read_json_data_list(src: str) -> list:
    """The non-empty ``data`` list of a CAV-MAE-style json file, or a :class:`ManifestError` naming the
    file (and the line of a JSON syntax error)."""
    try:
        with open(src, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise ManifestError(src, [f"{src}: file not found"]) from None
    except json.JSONDecodeError as e:
        raise ManifestError(src, [f"{src}:{e.lineno}: invalid JSON ({e.msg})"]) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise ManifestError(src, [f"{src}: expected an object with a list under 'data'"])
    if not obj["data"]:
        raise ManifestError(src, [f"{src}: 'data' is empty"])
    return obj["data"]

def normalise_display_name(name: str) -> str:
    """Lookup form of a display name: CAV-MAE's VGGSound table writes commas as ``_``."""
    return " ".join(name.replace("_", ",").split()).lower()


@dataclass(frozen=True)
class LabelTable:
    """A label CSV. The class id of a mid is its **row position** (``index`` is kept as metadata).

    :param mids: class mids, in row order.
    :param display_names: display names as written in the file.
    :param categories: ``category`` column per row, or None where the file has no such column.
    :param original_index: the file's ``index`` column.
    :param source: the file it was read from.
    """

    mids: tuple[str, ...]
    display_names: tuple[str, ...]
    categories: tuple[str | None, ...]
    original_index: tuple[int, ...]
    source: str = ""
    mid_to_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mid_to_id", {m: i for i, m in enumerate(self.mids)})

    def __len__(self) -> int:
        return len(self.mids)

    def __contains__(self, mid: object) -> bool:
        return mid in self.mid_to_id

    def class_id(self, mid: str) -> int:
        """Row position of ``mid`` (KeyError naming the table if absent)."""
        try:
            return self.mid_to_id[mid]
        except KeyError:
            raise KeyError(f"mid {mid!r} is not in label table {self.source or '<memory>'}") from None

    @property
    def has_categories(self) -> bool:
        return any(c is not None for c in self.categories)

    def category_of(self, mid: str) -> str | None:
        return self.categories[self.class_id(mid)]

    def id_of_name(self, name: str) -> int:
        """Row position of a display name (``_`` and ``,`` spellings are equivalent)."""
        target = normalise_display_name(name)
        for i, n in enumerate(self.display_names):
            if normalise_display_name(n) == target:
                return i
        raise KeyError(f"display name {name!r} is not in label table {self.source or '<memory>'}")


# ---------------------------------------------------------------------- helpers
def clip_key(frames_path: str) -> str:
    """Clip key = basename of the frames directory, or the stem of a video file path."""
    name = os.path.basename(frames_path.rstrip("/\\"))
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in _VIDEO_EXTS else name


def split_vggsound_video_id(video_id: str) -> tuple[str, int]:
    """``<ytid>_<start>`` -> (ytid, start second). Splits on the **last** underscore because
    YouTube ids may contain ``_``; the start may be zero-padded."""
    ytid, sep, start = video_id.rpartition("_")
    if not sep or not ytid or not start.isdigit():
        raise ValueError(f"VGGSound video_id {video_id!r} is not '<ytid>_<start seconds>'")
    return ytid, int(start)


def _resolve(p: str, root: Path) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _split_mids(cell: str) -> tuple[str, ...]:
    # csv already removed the quoting; strip stray quotes some writers leave inside the cell
    return tuple(m.strip().strip("'\"").strip() for m in cell.split(",") if m.strip().strip("'\""))


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _category_problem(where: str, cat: str, task_names: Sequence[str]) -> str:
    hint = "recompute it from the labels (docs/benchmarks.md §3.2)"
    if "\n" in cat or "dtype:" in cat or "Name:" in cat:
        return (f"{where}: category cell holds a printed pandas Series ({cat[:60]!r}...), a known "
                f"defect of the official AudioSet retrieval builder; {hint}")
    return f"{where}: category {cat!r} is not one of the task names {list(task_names)}; {hint}"


# ---------------------------------------------------------------------- split csv
@dataclass(frozen=True)
class _SplitLayout:
    """Where a split CSV's columns are.

    :param columns: column name -> field index.
    :param n_fields: fields every data row must have.
    :param is_header: the first line was a header.
    :param data: the data rows ``(line, fields)``.
    """

    columns: dict[str, int]
    n_fields: int
    is_header: bool
    data: list[tuple[int, list[str]]]


def read_csv_records(src: str | os.PathLike, *, expected: str) -> list[tuple[int, list[str]]]:
    """The non-blank records of a CSV file with the line where each starts.

    :param expected: what the file should hold, for the error on an empty file.
    :raises ManifestError: naming the file when it is missing, unreadable or empty.
    """
    try:
        with open(src, newline="", encoding="utf-8") as fh:
            rows = _read_csv_rows(fh)
    except FileNotFoundError:
        raise ManifestError(src, [f"{src}: file not found"]) from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ManifestError(src, [f"{src}: not a readable CSV ({e})"]) from None
    if not rows:
        raise ManifestError(src, [f"{src}:1: empty file (expected {expected})"])
    return rows


def _header_error(src: str | os.PathLike, msg: str, missing: list[str], unknown: list[str]) -> ManifestError:
    """A header error: ``msg`` plus the missing and the unexpected column names."""
    if missing:
        msg += f"; missing column(s) {missing}"
    if unknown:
        msg += f"; unexpected column(s) {unknown}"
    return ManifestError(src, [msg])


def _load_split_rows(src: str) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a split CSV; :class:`ManifestError` if missing, unreadable or empty."""
    return read_csv_records(src, expected=f"rows {', '.join(SPLIT_COLUMNS)}")


def _split_layout(src: str, rows: list[tuple[int, list[str]]]) -> _SplitLayout:
    """Layout from the first row: a header line (any order, optional leading unnamed column) or
    positional 5/6 fields; :class:`ManifestError` naming the line when it fits neither."""
    first_line, first = rows[0]
    is_header = any(c.strip().lower() in SPLIT_COLUMNS or c.strip().lower() in _HEADER_WORDS for c in first)
    if not is_header:
        n_fields = len(first)
        if n_fields not in (5, 6):
            raise ManifestError(src, [f"{src}:{first_line}: expected 5 fields ({', '.join(SPLIT_COLUMNS)}) "
                                      f"or 6 (leading index + those), found {n_fields}: {first}"])
        lead = n_fields - 5
        return _SplitLayout({c: lead + i for i, c in enumerate(SPLIT_COLUMNS)}, n_fields, False, rows)
    names = [c.strip().lower() for c in first]
    lead = 1 if names and names[0] in ("", "unnamed: 0", "index") else 0
    names_body = names[lead:]
    missing = [c for c in SPLIT_COLUMNS if c not in names_body]
    unknown = [c for c in names_body if c not in SPLIT_COLUMNS]
    if missing or unknown or len(set(names_body)) != len(names_body):
        raise _header_error(src, f"{src}:{first_line}: header {first} does not match the columns "
                                 f"{list(SPLIT_COLUMNS)}", missing, unknown)
    if not rows[1:]:
        raise ManifestError(src, [f"{src}:{first_line}: file has a header but no rows"])
    return _SplitLayout({c: lead + names_body.index(c) for c in SPLIT_COLUMNS}, len(names), True, rows[1:])


def _check_row_labels(where: str, mids: tuple[str, ...], cat: str, *, task_names: Sequence[str] | None,
                      label_table: LabelTable | None, multi_label: bool, problems: list[str]) -> tuple[str, ...]:
    """Check a row's mids against the label table (problems appended); the mids the record keeps."""
    if not multi_label and len(mids) != 1:
        problems.append(f"{where}: single-label row must have exactly 1 mid, found {len(mids)}: {list(mids)}")
    if label_table is None:
        return mids
    in_table = tuple(m for m in mids if m in label_table)
    if not multi_label:
        bad = [m for m in mids if m not in label_table]
        if bad:
            problems.append(f"{where}: mid(s) {bad} not in label table {label_table.source}")
        return in_table or mids
    if not in_table:
        problems.append(f"{where}: none of the mids {list(mids)} is in label table {label_table.source}")
    elif label_table.has_categories:
        tasks = sorted({str(label_table.category_of(m)) for m in in_table})
        if len(tasks) > 1:
            problems.append(f"{where}: in-table labels span {len(tasks)} tasks {tasks}")
        elif task_names is not None and cat in task_names and tasks[0] != cat:
            problems.append(f"{where}: category {cat!r} disagrees with the labels' task {tasks[0]!r}")
    return in_table or mids


def _split_record(src: str, line: int, fields: list[str], layout: _SplitLayout, *, root: Path,
                  seen: dict[str, int], task_names: Sequence[str] | None, label_table: LabelTable | None,
                  multi_label: bool, problems: list[str]) -> ClipRecord | None:
    """One data row as a record, its problems appended to ``problems`` (None when it cannot be read)."""
    where = f"{src}:{line}"
    if len(fields) != layout.n_fields:
        problems.append(f"{where}: expected {layout.n_fields} fields, found {len(fields)}")
        return None
    if layout.n_fields - 5 and not layout.is_header and not _is_int(fields[0].strip()):
        problems.append(f"{where}: leading index field {fields[0]!r} is not an integer")
    vals = {c: fields[i].strip() for c, i in layout.columns.items()}
    empty = [c for c, v in vals.items() if not v]
    if empty:
        problems.append(f"{where}: empty field(s) {empty}")
        return None
    key = clip_key(vals["frames_path"])
    if key in seen:
        problems.append(f"{where}: duplicate clip key {key!r} (first at line {seen[key]})")
    else:
        seen[key] = line
    cat = vals["category"]
    if task_names is not None and cat not in task_names:
        problems.append(_category_problem(where, cat, task_names))
    mids = _split_mids(vals["label"])
    if not mids:
        problems.append(f"{where}: label field {vals['label']!r} holds no mid")
        return None
    mids = _check_row_labels(where, mids, cat, task_names=task_names, label_table=label_table,
                             multi_label=multi_label, problems=problems)
    return ClipRecord(key=key, vid=vals["vid"], video=_resolve(vals["frames_path"], root),
                      audio=_resolve(vals["wav"], root), labels=mids, category=cat, source=src, row=line)


def read_split_csv(path: str | os.PathLike, *, data_root: str | os.PathLike | None,
                   task_names: Sequence[str] | None = None, label_table: LabelTable | None = None,
                   multi_label: bool = False) -> list[ClipRecord]:
    """Read and validate a STELLA split CSV.

    Accepted layouts: 6 fields (leading pandas index, ignored), 5 fields
    ``vid, frames_path, wav, label, category``, or either with a header line naming the columns.
    The ``label`` cell holds one mid or comma-joined (quoted) mids.

    :param path: the CSV file.
    :param data_root: relative paths are joined to it (None: the CSV's own directory).
    :param task_names: allowed categories (None: any).
    :param label_table: if given, every mid must be in it (single-label) / at least one in-table mid
        is required and all in-table mids must share one task (multi-label; out-of-table mids are
        dropped from the record).
    :param multi_label: AudioSet semantics (one or more mids); otherwise exactly one mid per row.
    :returns: the records, in file order.
    :raises ManifestError: listing every problem with file and line.
    """
    src = str(path)
    root = Path(data_root) if data_root is not None else Path(src).resolve().parent
    layout = _split_layout(src, _load_split_rows(src))
    problems: list[str] = []
    seen: dict[str, int] = {}
    records = [_split_record(src, line, fields, layout, root=root, seen=seen, task_names=task_names,
                             label_table=label_table, multi_label=multi_label, problems=problems)
               for line, fields in layout.data]
    if problems:
        raise ManifestError(src, problems)
    return [r for r in records if r is not None]


def _read_csv_rows(fh: Iterable[str]) -> list[tuple[int, list[str]]]:
    """Non-blank CSV records with the 1-based line number where each starts."""
    reader = csv.reader(fh)
    out: list[tuple[int, list[str]]] = []
    prev_end = 0
    for fields in reader:
        start = prev_end + 1
        prev_end = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        out.append((start, fields))
    return out


def write_split_csv(path: str | os.PathLike, rows: Iterable[ClipRecord | Mapping[str, Any] | Sequence[Any]],
                    *, data_root: str | os.PathLike | None = None) -> None:
    """Write a split CSV in the official 6-field, header-less layout, atomically.

    :param rows: :class:`ClipRecord` objects, mappings with the keys of :data:`SPLIT_COLUMNS`
        (``label`` may be a string or a sequence of mids; ``labels`` is accepted too), or 5-field
        sequences in column order.
    :param data_root: write paths relative to it (paths outside it stay absolute).
    """
    root = Path(data_root).resolve() if data_root is not None else None

    def rel(p: str) -> str:
        if root is None:
            return str(p)
        try:
            return str(Path(p).resolve().relative_to(root))
        except ValueError:
            return str(p)

    out: list[list[str]] = []
    for i, row in enumerate(rows):
        if isinstance(row, ClipRecord):
            vals = [row.vid, row.video, row.audio, row.labels, row.category]
        elif isinstance(row, Mapping):
            label = row["label"] if "label" in row else row["labels"]
            vals = [row["vid"], row["frames_path"], row["wav"], label, row["category"]]
        else:
            vals = list(row)
            if len(vals) != 5:
                raise ValueError(f"write_split_csv: row {i} has {len(vals)} fields, expected 5 {SPLIT_COLUMNS}")
        label = vals[3] if isinstance(vals[3], str) else ",".join(vals[3])
        out.append([str(i), str(vals[0]), rel(str(vals[1])), rel(str(vals[2])), label, str(vals[4])])
    with atomic_write(path, "w") as fh:
        csv.writer(fh, lineterminator="\n").writerows(out)


def check_disjoint_keys(splits: Mapping[str, Sequence[ClipRecord]]) -> None:
    """Raise :class:`ManifestError` when a clip key occurs in two of the given splits (e.g. train and
    eval of one benchmark). Retrieval vs eval overlap is expected: do not pass both."""
    owner: dict[str, tuple[str, ClipRecord]] = {}
    problems = []
    for name, recs in splits.items():
        for r in recs:
            if r.key in owner and owner[r.key][0] != name:
                other_name, other = owner[r.key]
                problems.append(f"{r.source}:{r.row}: clip key {r.key!r} of split {name!r} is also in "
                                f"split {other_name!r} ({other.source}:{other.row})")
            else:
                owner.setdefault(r.key, (name, r))
    if problems:
        raise ManifestError(", ".join(splits), problems)


# ---------------------------------------------------------------------- label csv
def read_label_csv(path: str | os.PathLike, *,
                   category_lookup: Mapping[str, str] | None = None) -> LabelTable:
    """Read a label CSV ``index,mid,display_name[,category]`` (header required), with or without a
    leading unnamed pandas-index column.

    :param category_lookup: normalised display name (:func:`normalise_display_name`) -> category,
        used when the file has no ``category`` column (e.g. from the reference tables).
    :raises ManifestError: missing columns, wrong field counts, non-integer index, duplicate mids.
    """
    src = str(path)
    try:
        with open(src, newline="", encoding="utf-8") as fh:
            rows = _read_csv_rows(fh)
    except FileNotFoundError:
        raise ManifestError(src, [f"{src}: file not found"]) from None
    if not rows:
        raise ManifestError(src, [f"{src}:1: empty file (expected a header {','.join(_LABEL_REQUIRED)})"])
    hline, header = rows[0]
    names = [c.strip().lower() for c in header]
    lead = 1 if names and names[0] in ("", "unnamed: 0") else 0
    body = names[lead:]
    missing = [c for c in _LABEL_REQUIRED if c not in body]
    unknown = [c for c in body if c not in _LABEL_REQUIRED + _LABEL_OPTIONAL]
    if missing or unknown:
        raise _header_error(src, f"{src}:{hline}: header {header} must name the columns "
                                 "index,mid,display_name[,category]", missing, unknown)
    col = {c: lead + body.index(c) for c in body}
    problems: list[str] = []
    mids: list[str] = []
    disp: list[str] = []
    cats: list[str | None] = []
    idx: list[int] = []
    first_line: dict[str, int] = {}
    for line, fields in rows[1:]:
        where = f"{src}:{line}"
        if len(fields) != len(names):
            problems.append(f"{where}: expected {len(names)} fields, found {len(fields)}")
            continue
        mid = fields[col["mid"]].strip()
        name = fields[col["display_name"]].strip()
        index = fields[col["index"]].strip()
        if not _is_int(index):
            problems.append(f"{where}: index {index!r} is not an integer")
            continue
        if not mid:
            problems.append(f"{where}: empty mid")
            continue
        if mid in first_line:
            problems.append(f"{where}: duplicate mid {mid!r} (first at line {first_line[mid]})")
            continue
        first_line[mid] = line
        cat: str | None = fields[col["category"]].strip() if "category" in col else None
        if cat is None and category_lookup is not None:
            cat = category_lookup.get(normalise_display_name(name))
        mids.append(mid)
        disp.append(name)
        cats.append(cat or None)
        idx.append(int(index))
    if not mids and not problems:
        problems.append(f"{src}:{hline}: file has a header but no rows")
    if problems:
        raise ManifestError(src, problems)
    return LabelTable(tuple(mids), tuple(disp), tuple(cats), tuple(idx), source=src)


# ---------------------------------------------------------------------- CAV-MAE json
def read_cavmae_json(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a CAV-MAE datafile ``{"data": [{video_id, wav, video_path, labels}, ...]}``.

    :returns: one dict per entry with ``video_id`` (str), ``labels`` (tuple of mids), ``wav`` and
        ``video_path`` (the authors' paths, kept only as metadata: rebuild paths under the data
        root) and ``entry`` (0-based position).
    :raises ManifestError: listing every malformed entry.
    """
    src = str(path)
    obj = {"data": read_json_data_list(src)}
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(obj["data"]):
        where = f"{src}: entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        missing = [k for k in ("video_id", "wav", "video_path", "labels") if k not in entry]
        if missing:
            problems.append(f"{where}: missing key(s) {missing}")
            continue
        vid = str(entry["video_id"]).strip()
        mids = _split_mids(str(entry["labels"]))
        if not vid:
            problems.append(f"{where}: empty video_id")
        if not mids:
            problems.append(f"{where} (video_id={vid!r}): no label")
        out.append({"video_id": vid, "labels": mids, "wav": str(entry["wav"]),
                    "video_path": str(entry["video_path"]), "entry": i})
    if problems:
        raise ManifestError(src, problems)
    return out
