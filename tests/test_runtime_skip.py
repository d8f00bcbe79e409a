"""Skip without a cache: under ``on_error="skip"`` a clip that fails to decode when it is read, in the
middle of an epoch, is dropped from its batch and counted (skip report, run log); never replaced by
another clip. Under ``on_error="raise"`` the same epoch stops with the file named."""
from __future__ import annotations

import collections
import math

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from conftest import Media
from stella_avalanche.batch_keys import SKIPPED
from stella_avalanche.benchmarks.common import wrap_dataset
from stella_avalanche.data import media
from stella_avalanche.data.datasets import AudioVideoDataset, SkippedClip, collate_av
from stella_avalanche.data.features import FeatureConfig
from stella_avalanche.data.manifests import ClipRecord

torch.set_num_threads(1)
SYN = FeatureConfig.synthetic()
TASKS = ["sports"]
BATCH = 3


def _records(m: Media) -> list[ClipRecord]:
    """Six clips (two batches of 3); the fourth, in the middle of the epoch, has a garbage audio file."""
    out = []
    for i in range(6):
        audio = m.corrupt_audio if i == 3 else (m.wav if i % 2 else m.wav_b)
        out.append(ClipRecord(key=f"c{i}", vid=f"c{i}", video=str(m.frames_dir), audio=str(audio),
                              labels=("/m/a",), category="sports", source="split.csv", row=i + 1))
    return out


class _Rows(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[int]] = []
        self.losses: list[float] = []

    def before_forward(self, strategy, **kw) -> None:
        assert SKIPPED not in strategy.mbatch              # plugins never see the skip list
        self.rows.append(strategy.mbatch["index"].tolist())

    def before_backward(self, strategy, **kw) -> None:
        self.losses.append(float(strategy.loss.detach().sum()))


def _train(ds: AudioVideoDataset, workers: int = 0):
    from avalanche.benchmarks import benchmark_from_datasets

    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.training.template import AudioVideoPretraining

    torch.manual_seed(0)
    model = CAVMAE(model_config_for("tiny", SYN))
    spy = _Rows()
    s = AudioVideoPretraining(model=model, train_mb_size=BATCH, train_epochs=1, device="cpu", plugins=[spy],
                              seed=0, num_workers=workers)
    s.train(benchmark_from_datasets(train=[wrap_dataset(ds)]).train_stream[0])
    return s, spy


def test_a_clip_failing_mid_epoch_is_dropped_and_counted(media_files, caplog):
    ds = AudioVideoDataset(_records(media_files), features=SYN, train=True, task_names=TASKS, on_error="skip",
                           progress=False)
    assert len(ds) == 6 and not ds.skipped                 # the file exists: nothing is known yet
    with caplog.at_level("WARNING", logger="stella_avalanche.training.template"):
        s, spy = _train(ds)
    seen = sorted(i for rows in spy.rows for i in rows)
    assert seen == [0, 1, 2, 4, 5]                         # clip 3 dropped, no other clip in its place
    assert sorted(len(r) for r in spy.rows) == [BATCH - 1, BATCH]   # its batch is one row short
    assert all(math.isfinite(x) for x in spy.losses)
    assert s.skipped_at_run_time == 1
    assert ds.skipped == collections.Counter(corrupt=1) and ds.failed_at_run_time == {3}
    report = ds.skip_report()
    assert "skipped 1 of 6 clips (corrupt=1); 5 kept (1 of the skipped failed when read" in report
    assert str(media_files.corrupt_audio) in report
    logged = [r.message for r in caplog.records if "failed to decode" in r.message]
    assert len(logged) == 1 and str(media_files.corrupt_audio) in logged[0]


def test_skips_in_loader_workers_reach_the_dataset(media_files):
    ds = AudioVideoDataset(_records(media_files), features=SYN, train=True, task_names=TASKS, on_error="skip",
                           progress=False)
    s, spy = _train(ds, workers=1)
    assert sorted(i for rows in spy.rows for i in rows) == [0, 1, 2, 4, 5]
    assert s.skipped_at_run_time == 1 and ds.failed_at_run_time == {3}


def test_raise_policy_stops_the_epoch_naming_the_file(media_files):
    ds = AudioVideoDataset(_records(media_files), features=SYN, train=True, task_names=TASKS, on_error="raise",
                           progress=False)
    with pytest.raises(media.CorruptMediaError, match="corrupt.mp3"):
        _train(ds)


def test_collate_drops_markers_and_refuses_an_empty_batch(media_files):
    ds = AudioVideoDataset(_records(media_files), features=SYN, train=False, task_names=TASKS, on_error="skip",
                           progress=False)
    bad = ds[3]
    assert isinstance(bad, SkippedClip) and bad.key == "c3" and bad.kind == "corrupt"
    batch = collate_av([ds[2], bad, ds[5]])
    assert batch["index"].tolist() == [2, 5] and batch[SKIPPED] == (bad,)
    assert SKIPPED not in collate_av([ds[2], ds[5]])
    with pytest.raises(media.MediaError, match="every clip of a batch of 1 failed to decode"):
        collate_av([bad])
