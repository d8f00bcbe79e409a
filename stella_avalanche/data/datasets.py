"""The audio-video dataset (dict samples) and its optional decode-once feature cache.

:class:`AudioVideoDataset` turns :class:`~.manifests.ClipRecord` objects into the sample dict of
``docs/contracts.md``::

    {"video": float32 (T, 3, S, S), "audio": float32 (1, A, F), "category": int64 (),
     "label": int64 () or float32 (C,), "index": int64 ()}

Bad clips are found when the dataset is built (missing files, incomplete frame directories, and
with a cache every decode failure) and either raise or, with ``on_error="skip"``, are dropped and
counted. Without a cache a clip can also fail later, when it is read: under ``on_error="raise"``
that raises; under ``on_error="skip"`` the sample comes back as a :class:`SkippedClip` marker,
:func:`collate_av` drops it from its batch (listing it under ``batch_keys.SKIPPED``) and the strategy
counts it (:func:`record_runtime_skips`: the dataset's :meth:`~AudioVideoDataset.skip_report` and
the run log). Another sample is **never** substituted (that would silently break the audio/video
pairing of retrieval sets).

:class:`FeatureCache` stores, per clip, the uint8 source-size frames at every time any window can
use and the *un-augmented* normalised fbank (float16) in memory-mapped ``.npy`` files, so that a
cached sample costs a slice, a crop/resize of T small frames and the fbank noise/roll.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from stella_avalanche.batch_keys import SKIPPED
from stella_avalanche.data import media
from stella_avalanche.data.features import (FeatureConfig, augment_fbank, cache_frame_times,
                                             compute_fbank, frame_times, load_waveform, time_key,
                                             video_from_frames)
from stella_avalanche.data.manifests import ClipRecord, LabelTable
from stella_avalanche.utils import atomic_write, atomic_write_json, build_lock, progress_enabled

__all__ = ["AudioVideoDataset", "FeatureCache", "collate_av", "manifest_hash", "SkippedClip",
           "record_runtime_skips"]

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_CACHE_FORMAT = 1
_COMPLETE = "COMPLETE"
_ERRORS: dict[str, type[media.MediaError]] = {
    cls.kind: cls for cls in (media.MediaError, media.MissingMediaError, media.CorruptMediaError,
                              media.ShortVideoError, media.SilentAudioError, media.ShortAudioError)}


@dataclass(frozen=True)
class SkippedClip:
    """What ``AudioVideoDataset[i]`` returns, under ``on_error="skip"`` and without a cache, for a
    clip that fails to decode: no sample, only what went wrong (picklable, so it crosses
    DataLoader worker processes).

    :param dataset: token of the dataset it came from (:func:`record_runtime_skips` finds it).
    :param index: position in that dataset. :param key: clip key. :param kind: ``MediaError.kind``.
    :param path: the file that failed. :param reason: the decoder's complaint.
    """

    dataset: str
    index: int
    key: str
    kind: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} (clip {self.key}, {self.kind})"


def collate_av(batch: list[dict[str, torch.Tensor] | SkippedClip]) -> dict[str, Any]:
    """Stack a list of sample dicts into a batch dict (``torch.utils.data.default_collate``).

    Clips that failed to decode (:class:`SkippedClip`) are dropped from the batch; they are listed,
    as a tuple, under ``batch_keys.SKIPPED`` for the strategy to count.

    :raises media.MediaError: when every clip of the batch failed (a batch of none cannot be
        trained on), naming them.
    """
    skipped = tuple(b for b in batch if isinstance(b, SkippedClip))
    if not skipped:
        return default_collate(batch)
    kept = [b for b in batch if not isinstance(b, SkippedClip)]
    if not kept:
        raise media.MediaError(skipped[0].path, f"every clip of a batch of {len(batch)} failed to decode "
                               "(on_error='skip' drops bad clips from a batch, it cannot make a batch of "
                               "none): " + "; ".join(str(s) for s in skipped[:5]))
    out = default_collate(kept)
    out[SKIPPED] = skipped
    return out


#: token -> dataset, so skips reported from DataLoader workers reach the dataset of the main process
_DATASETS: "weakref.WeakValueDictionary[str, AudioVideoDataset]" = weakref.WeakValueDictionary()


def record_runtime_skips(skips: Sequence[SkippedClip]) -> list[SkippedClip]:
    """Count clips dropped from batches in their datasets (skip report); returns the clips not
    reported before (each failing clip is counted once, however often it is drawn)."""
    new = []
    for s in skips:
        ds = _DATASETS.get(s.dataset)
        if ds is None or ds._note_runtime_skip(s):
            new.append(s)
    return new


def manifest_hash(records: Sequence[ClipRecord]) -> str:
    """Hash of what determines the decoded features of a record list: keys and media paths, in
    order. (Labels and categories do not change features.)"""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\0{r.video}\0{r.audio}\n".encode())
    return h.hexdigest()[:16]


def _mix_seed(*parts: int) -> int:
    """SplitMix64-style combination of integers into one 63-bit seed (stable across processes)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def _required_frame_index(cfg: FeatureConfig) -> int:
    """Highest frame index of a frames directory that some window needs."""
    return max(media.frame_indices(cache_frame_times(cfg), cfg.frames_fps))


def _check_unique_keys(records: Sequence[ClipRecord], what: str = "AudioVideoDataset") -> None:
    """Raise ValueError naming ``source:row`` of both occurrences of every repeated clip key (a
    repeated clip would be counted twice in retrieval and map two rows to one cache entry)."""
    first: dict[str, ClipRecord] = {}
    dup: list[str] = []
    for r in records:
        if r.key in first:
            f = first[r.key]
            dup.append(f"{r.source}:{r.row}: clip key {r.key!r} repeats {f.source}:{f.row}")
        else:
            first[r.key] = r
    if dup:
        raise ValueError(f"{what} needs unique clip keys; {len(dup)} duplicate(s): " + "; ".join(dup[:10]))


def _decode_clip(record: ClipRecord, times: Sequence[float], cfg: FeatureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one clip: uint8 (len(times), s, s, 3) frames and the un-augmented (A, F) fbank."""
    frames = media.read_frames(record.video, times, cfg)
    fbank = compute_fbank(load_waveform(record.audio, cfg), cfg)
    return frames, fbank


# ====================================================================== cache
class FeatureCache:
    """Decode-once cache of frames and fbanks for one record list and one :class:`FeatureConfig`.

    Layout under ``root/<name>/`` (``name`` = manifest hash + ``cfg.cache_key()``):
    ``video.npy`` uint8 (N, Tc, s, s, 3) with ``times.npy`` (Tc,) seconds, ``audio.npy`` float16
    (N, A, F), ``meta.json`` (keys, failures) and an empty ``COMPLETE`` marker. The build writes a
    temporary sibling directory, writes the marker last and renames the directory into place, so
    an interrupted build is never used; a directory without the marker or with mismatching
    metadata is rebuilt.

    :param root: directory holding caches (several keyed caches may live side by side).
    :param records: the clips, in dataset order.
    :param features: the preprocessing constants.
    :param on_error: ``"raise"``: the first decode failure aborts the build (nothing is kept);
        ``"skip"``: failures are recorded in ``failures`` and their rows left zero.
    :param progress: show a tqdm bar while building; None = the package-wide switch
        (:func:`stella_avalanche.utils.progress_enabled`, off under ``run_stella.py --quiet`` and on
        DDP ranks other than 0).
    """

    def __init__(self, root: str | os.PathLike, *, records: Sequence[ClipRecord], features: FeatureConfig,
                 on_error: OnError = "raise", progress: bool | None = None) -> None:
        self.root = Path(root)
        self.features = features
        self.keys = [r.key for r in records]
        _check_unique_keys(records, what="FeatureCache")
        self.name = f"av-{manifest_hash(records)}-{features.cache_key()}"
        self.path = self.root / self.name
        self.times = np.asarray(cache_frame_times(features), dtype=np.float64)
        self._time_pos = {time_key(t): i for i, t in enumerate(self.times.tolist())}
        self.built = False
        if not self._valid():
            # parallel runs wait for one builder, then reuse its cache (checked again under the lock)
            with build_lock(self.path):
                if not self._valid():
                    if self.path.exists():
                        log.warning("feature cache %s is incomplete or stale: rebuilding", self.path)
                        shutil.rmtree(self.path, ignore_errors=True)
                    self._build(list(records), on_error, progress_enabled() if progress is None else progress)
                    self.built = True
        meta = json.loads((self.path / "meta.json").read_text())
        #: key -> (error kind, path, reason) of clips that could not be decoded
        self.failures: dict[str, tuple[str, str, str]] = {k: (v[0], v[1], v[2])
                                                           for k, v in meta["failures"].items()}
        self._row = {k: i for i, k in enumerate(self.keys)}
        self._video: np.ndarray | None = None
        self._audio: np.ndarray | None = None

    # -- state ---------------------------------------------------------------
    def _valid(self) -> bool:
        if not (self.path / _COMPLETE).is_file():
            return False
        try:
            meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return (meta.get("format") == _CACHE_FORMAT and meta.get("keys") == self.keys
                and meta.get("features") == self.features.to_dict())

    def __getstate__(self) -> dict[str, Any]:
        # memmaps are re-opened lazily in each DataLoader worker instead of being pickled as copies
        state = self.__dict__.copy()
        state["_video"] = state["_audio"] = None
        return state

    @property
    def video(self) -> np.ndarray:
        """Memory-mapped uint8 (N, Tc, s, s, 3)."""
        if self._video is None:
            self._video = np.load(self.path / "video.npy", mmap_mode="r")
        return self._video

    @property
    def audio(self) -> np.ndarray:
        """Memory-mapped float16 (N, A, F) un-augmented normalised fbanks."""
        if self._audio is None:
            self._audio = np.load(self.path / "audio.npy", mmap_mode="r")
        return self._audio

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str) -> int:
        """Row of a clip key in the arrays."""
        return self._row[key]

    def time_positions(self, times: Sequence[float]) -> np.ndarray:
        """Positions of frame times in ``times`` (KeyError if a time was not cached)."""
        return np.fromiter((self._time_pos[time_key(t)] for t in times), dtype=np.int64, count=len(times))

    def nbytes(self) -> int:
        """Size of the arrays on disk."""
        return sum((self.path / f).stat().st_size for f in ("video.npy", "audio.npy"))

    # -- build -----------------------------------------------------------------
    def _build(self, records: list[ClipRecord], on_error: OnError, progress: bool) -> None:
        from tqdm.auto import tqdm

        from stella_avalanche.utils import tqdm_options

        cfg = self.features
        s = cfg.source_size
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        failures: dict[str, list[str]] = {}
        try:
            video = np.lib.format.open_memmap(tmp / "video.npy", mode="w+", dtype=np.uint8,
                                              shape=(len(records), len(self.times), s, s, 3))
            audio = np.lib.format.open_memmap(tmp / "audio.npy", mode="w+", dtype=np.float16,
                                              shape=(len(records), cfg.target_length, cfg.mel_bins))
            times = self.times.tolist()
            for i, rec in enumerate(tqdm(records, desc=f"caching features ({len(records)} clips)",
                                         disable=not progress, leave=False, **tqdm_options())):
                try:
                    frames, fbank = _decode_clip(rec, times, cfg)
                except media.MediaError as e:
                    if on_error == "raise":
                        raise
                    failures[rec.key] = [e.kind, e.path, e.reason]
                    continue
                video[i] = frames.numpy()
                audio[i] = fbank.numpy().astype(np.float16)
            video.flush()
            audio.flush()
            del video, audio
            np.save(tmp / "times.npy", self.times)
            atomic_write_json(tmp / "meta.json", {"format": _CACHE_FORMAT, "keys": self.keys,
                                                  "features": cfg.to_dict(), "failures": failures})
            with atomic_write(tmp / _COMPLETE) as fh:  # marker last: its presence means complete
                fh.write("ok\n")
            try:
                os.replace(tmp, self.path)
            except OSError:
                # another process finished the same cache first: keep theirs if it is valid
                if not self._valid():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ====================================================================== dataset
class AudioVideoDataset(Dataset):
    """Map-style dataset of audio-video clips returning the contract's sample dicts.

    Augmentation randomness: after :meth:`set_epoch` has been called, sample ``i`` uses a
    generator seeded from ``(seed, epoch, i)``, so a run is reproducible regardless of worker
    count; before that, each sample draws its generator seed from torch's global RNG (which the
    DataLoader reseeds per worker and per epoch), so augmentations still differ between epochs.

    :param records: the clips (e.g. from :func:`~.manifests.read_split_csv`).
    :param features: preprocessing constants.
    :param train: training transforms (random window, multi-scale crop, fbank noise + roll) or the
        deterministic eval transforms.
    :param task_names: the benchmark's task list; ``category`` = index of the record's category.
    :param label_table: maps mids to class ids; without it ``label`` is -1.
    :param multi_label: ``label`` is a float multi-hot (C,) over ``label_table`` (AudioSet).
    :param cache: a :class:`FeatureCache`, or a directory in which one is built / reused, or None
        (decode every sample).
    :param on_error: ``"raise"`` the first :class:`~.media.MediaError` found while building, or
        ``"skip"``: drop bad clips and count them in :attr:`skipped`. Manifest problems (a
        category outside ``task_names``, a repeated clip key) always raise ``ValueError``.
    :param seed: base seed of the per-sample augmentation generators.
    :param progress: tqdm bar while building a cache (None: the package-wide switch).
    """

    def __init__(self, records: Sequence[ClipRecord], *, features: FeatureConfig, train: bool,
                 task_names: Sequence[str], label_table: LabelTable | None = None,
                 multi_label: bool = False, cache: FeatureCache | str | os.PathLike | None = None,
                 on_error: OnError = "raise", seed: int = 0, progress: bool | None = None) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if multi_label and label_table is None:
            raise ValueError("multi_label=True needs a label_table (the multi-hot length)")
        self.features = features
        self.train = bool(train)
        self.task_names = list(task_names)
        self.label_table = label_table
        self.multi_label = multi_label
        self.on_error = on_error
        self.seed = int(seed)
        self.epoch: int | None = None
        self.num_records = len(records)
        self.skipped: collections.Counter[str] = collections.Counter()
        self._skip_examples: dict[str, list[str]] = collections.defaultdict(list)
        #: indices of clips that failed when read (no cache, on_error="skip"); see SkippedClip
        self.failed_at_run_time: set[int] = set()
        self._token = uuid.uuid4().hex
        _DATASETS[self._token] = self

        self._check_categories(records)
        _check_unique_keys(records)
        kept = [r for r in records if self._check_files(r)]
        if isinstance(cache, (str, os.PathLike)):
            cache = FeatureCache(cache, records=kept, features=features, on_error=on_error, progress=progress)
        if cache is not None:
            if cache.features != features:
                raise ValueError(f"cache {cache.path} was built with other features")
            kept = [r for r in kept if self._check_cached(cache, r)]
        self.cache: FeatureCache | None = cache
        self.records: list[ClipRecord] = kept
        self._rows = (np.asarray([cache.row(r.key) for r in kept], dtype=np.int64) if cache is not None
                      else None)
        self._category = torch.tensor([self.task_names.index(r.category) for r in kept], dtype=torch.int64)
        self._labels = self._encode_labels(kept)
        if self.skipped:
            log.warning("%s", self.skip_report().splitlines()[0])

    # -- validation --------------------------------------------------------------
    def _skip(self, err: media.MediaError) -> bool:
        if self.on_error == "raise":
            raise err
        self.skipped[err.kind] += 1
        if len(self._skip_examples[err.kind]) < 3:
            self._skip_examples[err.kind].append(str(err))
        return False

    def _note_runtime_skip(self, s: SkippedClip) -> bool:
        """Count a clip that failed when read; False if it was counted before."""
        if s.index in self.failed_at_run_time:
            return False
        self.failed_at_run_time.add(s.index)
        self.skipped[s.kind] += 1
        if len(self._skip_examples[s.kind]) < 3:
            self._skip_examples[s.kind].append(f"{s} [when read]")
        return True

    def _check_categories(self, records: Sequence[ClipRecord]) -> None:
        bad = [f"{r.source}:{r.row}: category {r.category!r}" for r in records if r.category not in self.task_names]
        if bad:
            raise ValueError(f"{len(bad)} record(s) have a category outside task_names "
                             f"{self.task_names}: " + "; ".join(bad[:10]))

    def _check_files(self, r: ClipRecord) -> bool:
        """Existence checks only (one or two stats per clip); decoding errors surface later."""
        if not os.path.exists(r.video):
            return self._skip(media.MissingMediaError(r.video, f"frames/video of clip {r.key} not found"))
        if os.path.isdir(r.video):
            need = _required_frame_index(self.features)
            if not media.frames_dir_complete(r.video, need):
                return self._skip(media.ShortVideoError(
                    r.video, f"frames directory incomplete: frame_{need}.jpg/.png is missing"))
        if not os.path.isfile(r.audio):
            return self._skip(media.MissingMediaError(r.audio, f"audio of clip {r.key} not found"))
        return True

    def _check_cached(self, cache: FeatureCache, r: ClipRecord) -> bool:
        if r.key not in cache:
            raise ValueError(f"clip {r.key} ({r.source}:{r.row}) is not in cache {cache.path}")
        if r.key in cache.failures:
            kind, path, reason = cache.failures[r.key]
            return self._skip(_ERRORS.get(kind, media.MediaError)(path, reason))
        return True

    def _encode_labels(self, records: Sequence[ClipRecord]) -> torch.Tensor:
        table = self.label_table
        if table is None:
            return torch.full((len(records),), -1, dtype=torch.int64)
        if self.multi_label:
            hot = torch.zeros(len(records), len(table), dtype=torch.float32)
            for i, r in enumerate(records):
                ids = [table.mid_to_id[m] for m in r.labels if m in table.mid_to_id]
                if not ids:
                    raise ValueError(f"{r.source}:{r.row}: no label of clip {r.key} is in {table.source}")
                hot[i, ids] = 1.0
            return hot
        out = torch.empty(len(records), dtype=torch.int64)
        for i, r in enumerate(records):
            if len(r.labels) != 1 or r.labels[0] not in table.mid_to_id:
                raise ValueError(f"{r.source}:{r.row}: clip {r.key} needs exactly one mid of "
                                 f"{table.source}, has {list(r.labels)}")
            out[i] = table.mid_to_id[r.labels[0]]
        return out

    def skip_report(self) -> str:
        """Readable summary of dropped clips (first line: counts per reason)."""
        total = sum(self.skipped.values())
        if not total:
            return f"AudioVideoDataset: all {self.num_records} clips usable"
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        late = len(self.failed_at_run_time)
        kept = len(self.records) - late
        lines = [f"AudioVideoDataset: skipped {total} of {self.num_records} clips ({counts}); {kept} kept"
                 + (f" ({late} of the skipped failed when read and were dropped from their batches)"
                    if late else "")]
        for kind in sorted(self._skip_examples):
            lines += [f"  {kind}: {ex}" for ex in self._skip_examples[kind]]
        return "\n".join(lines)

    # -- sampling ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make augmentation a deterministic function of (seed, epoch, index)."""
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator | None:
        if not self.train:
            return None  # eval transforms draw nothing
        if self.epoch is not None:
            seed = _mix_seed(self.seed, self.epoch, index)
        else:
            seed = _mix_seed(self.seed, index, int(torch.randint(2**62, (1,)).item()))
        return torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | SkippedClip:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        cfg = self.features
        gen = self._generator(index)
        times = frame_times(cfg, self.train, gen)
        if self.cache is not None:
            row = int(self._rows[index])  # type: ignore[index]
            frames = torch.from_numpy(self.cache.video[row, self.cache.time_positions(times)])
            fbank = torch.from_numpy(np.asarray(self.cache.audio[row], dtype=np.float32))
        else:
            # never replaced by another clip: raised, or (skip) dropped from its batch by collate_av
            try:
                frames, fbank = _decode_clip(self.records[index], times, cfg)
            except media.MediaError as e:
                if self.on_error == "raise":
                    raise
                r = self.records[index]
                return SkippedClip(dataset=self._token, index=index, key=r.key, kind=e.kind, path=e.path,
                                   reason=e.reason)
        video = video_from_frames(frames, cfg, train=self.train, generator=gen)
        if self.train and (cfg.noise or cfg.roll):
            fbank = augment_fbank(fbank, cfg, gen)
        return {"video": video, "audio": fbank.unsqueeze(0), "category": self._category[index],
                "label": self._labels[index], "index": torch.tensor(index, dtype=torch.int64)}
