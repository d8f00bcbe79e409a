"""Bad-input sweep (issue 6): every broken input gives a clear error naming the file / row / field,
or, under ``on_error="skip"``, a counted and logged skip, and never a lost result.

Media come from ``conftest.media_files`` (tiny PyAV-made files); the few extra broken files are
written here. Decode failures are found at construction only when a dataset builds its feature
cache (an uncached dataset only checks that files exist; a clip that fails when read raises, or under
"skip" is dropped from its batch: tests/test_runtime_skip.py), so each skip case here builds a cache.
"""
from __future__ import annotations

import collections
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SECONDS, SR, sine, write_wav
from stella_avalanche.data import datasets as D
from stella_avalanche.data import media
from stella_avalanche.data.datasets import AudioVideoDataset, FeatureCache
from stella_avalanche.data.features import FeatureConfig, compute_fbank
from stella_avalanche.data.manifests import ClipRecord, ManifestError, read_split_csv, write_split_csv

torch.set_num_threads(1)
SYN = FeatureConfig.synthetic()
TASKS = ["sports", "music"]


def rec(key: str, video: Path | str, audio: Path | str, category: str = "sports", *, row: int = 1) -> ClipRecord:
    return ClipRecord(key=key, vid=key, video=str(video), audio=str(audio), labels=("/m/a",),
                      category=category, source="split.csv", row=row)


@pytest.fixture(scope="module")
def good(media_files) -> list[ClipRecord]:
    m = media_files
    return [rec("A", m.frames_dir, m.wav), rec("B", m.frames_dir, m.wav_b, "music", row=2)]


def _check_skipped(good: list[ClipRecord], bad: list[ClipRecord], cache: Path, counts: dict[str, int],
                   texts: list[str], caplog: pytest.LogCaptureFixture) -> AudioVideoDataset:
    """Build a cached dataset over good + bad clips with on_error="skip" and check the bookkeeping."""
    with caplog.at_level("WARNING", logger="stella_avalanche.data.datasets"):
        ds = AudioVideoDataset(good + bad, features=SYN, train=False, task_names=TASKS, cache=cache,
                               on_error="skip", progress=False)
    assert ds.skipped == collections.Counter(counts)
    assert [r.key for r in ds.records] == [r.key for r in good]          # good clips kept, in order
    report = ds.skip_report()
    n = sum(counts.values())
    assert f"skipped {n} of {len(good) + len(bad)} clips" in report
    for kind in counts:
        assert f"{kind}={counts[kind]}" in report
    for text in texts:                                                    # paths and reasons are shown
        assert text in report, (text, report)
    assert any(f"skipped {n} of" in r.message for r in caplog.records)   # and logged
    for i in range(len(ds)):                                              # kept samples are intact
        assert torch.isfinite(ds[i]["audio"]).all() and torch.isfinite(ds[i]["video"]).all()
    return ds


def _check_cached_raise(good: list[ClipRecord], bad: ClipRecord, cache: Path, err: type, path: str) -> None:
    """on_error="raise": the cache build aborts with the typed error and leaves nothing behind."""
    with pytest.raises(err) as info:
        AudioVideoDataset(good + [bad], features=SYN, train=False, task_names=TASKS, cache=cache, progress=False)
    assert path in str(info.value) and info.value.path.startswith(path)
    assert not cache.exists() or not [p for p in cache.iterdir()]


# ====================================================================== 1. missing media
def test_01_missing_media(media_files, good, tmp_path, caplog):
    gone_video, gone_audio = tmp_path / "gone_clip", tmp_path / "gone.wav"
    no_video = rec("X", gone_video, media_files.wav)
    no_audio = rec("Y", media_files.frames_dir, gone_audio)
    for bad, path in ((no_video, gone_video), (no_audio, gone_audio)):   # raised at construction
        with pytest.raises(media.MissingMediaError) as info:
            AudioVideoDataset(good + [bad], features=SYN, train=False, task_names=TASKS)
        assert info.value.path == str(path) and "not found" in str(info.value) and bad.key in str(info.value)
    with pytest.raises(media.MissingMediaError, match="gone.wav: audio file not found"):
        media.read_audio(gone_audio)
    with pytest.raises(media.MissingMediaError, match="gone_clip"):
        media.read_frames(gone_video, [0.0], SYN)
    ds = _check_skipped(good, [no_video, no_audio], tmp_path / "cache", {"missing": 2},
                        [str(gone_video), str(gone_audio)], caplog)
    assert len(ds) == 2


# ====================================================================== 2. corrupt video
def test_02_corrupt_video(media_files, good, tmp_path, caplog):
    path = str(media_files.corrupt_video)
    bad = rec("C", path, media_files.wav)
    with pytest.raises(media.CorruptMediaError, match="cannot open video") as info:
        media.read_frames(path, [0.0, 0.64], SYN)
    assert info.value.path == path and path in str(info.value)
    # uncached: the file exists, so the error surfaces when the sample is read, never replaced:
    # raised, or under "skip" a marker that collate_av drops from the batch (tests/test_runtime_skip.py)
    ds = AudioVideoDataset(good + [bad], features=SYN, train=False, task_names=TASKS)
    with pytest.raises(media.CorruptMediaError, match="corrupt.mp4"):
        ds[2]
    ds = AudioVideoDataset(good + [bad], features=SYN, train=False, task_names=TASKS, on_error="skip")
    assert isinstance(ds[2], D.SkippedClip) and ds[2].path == path and ds[2].kind == "corrupt"
    _check_skipped(good, [bad], tmp_path / "skip", {"corrupt": 1}, [path, "cannot open video"], caplog)
    _check_cached_raise(good, bad, tmp_path / "raise", media.CorruptMediaError, path)


# ====================================================================== 3. corrupt audio
def test_03_corrupt_audio(media_files, good, tmp_path, caplog):
    garbage_wav = tmp_path / "garbage.wav"
    garbage_wav.write_bytes(np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    mp3 = str(media_files.corrupt_audio)
    for path in (str(garbage_wav), mp3):
        with pytest.raises(media.CorruptMediaError) as info:
            media.read_audio(path, sample_rate=SR, seconds=SECONDS)
        assert info.value.path == path and str(info.value).startswith(f"{path}: cannot")
    bad = [rec("W", media_files.frames_dir, garbage_wav), rec("M", media_files.frames_dir, mp3)]
    _check_skipped(good, bad, tmp_path / "skip", {"corrupt": 2}, [str(garbage_wav), mp3], caplog)
    _check_cached_raise(good, bad[0], tmp_path / "raise", media.CorruptMediaError, str(garbage_wav))


# ====================================================================== 4. silent audio
def test_04_silent_audio(media_files, good, tmp_path, caplog):
    zeros = str(media_files.silent)
    dc = str(write_wav(tmp_path / "dc.wav", np.full(int(SECONDS * SR), 0.5), SR))   # constant: silent
    for path in (zeros, dc):                                                       # after mean removal
        with pytest.raises(media.SilentAudioError, match="audio is silent") as info:
            media.read_audio(path, sample_rate=SR, seconds=SECONDS)
        assert info.value.path == path
    bad = [rec("Z", media_files.frames_dir, zeros), rec("D", media_files.frames_dir, dc)]
    _check_skipped(good, bad, tmp_path / "skip", {"silent_audio": 2}, [zeros, dc, "audio is silent"], caplog)
    _check_cached_raise(good, bad[0], tmp_path / "raise", media.SilentAudioError, zeros)


# ====================================================================== 5. audio shorter than a patch
def test_05_audio_shorter_than_one_patch(media_files, good, tmp_path, caplog):
    one_patch = int(SYN.min_audio_seconds * SR)               # 2800 samples = 16 fbank frames
    assert one_patch == 2800
    ok = write_wav(tmp_path / "p16.wav", sine(one_patch / SR, SR), SR)
    short = str(write_wav(tmp_path / "p15.wav", sine((one_patch - 1) / SR, SR), SR))
    empty = str(write_wav(tmp_path / "empty.wav", np.zeros(0), SR))   # valid header, 0 samples
    tiny = str(media_files.short_audio)                                # 100 samples
    fb = compute_fbank(media.read_audio(ok, sample_rate=SR, seconds=SECONDS, min_seconds=SYN.min_audio_seconds), SYN)
    pad = torch.tensor((0.0 - SYN.fbank_mean) / SYN.fbank_std)
    assert not torch.allclose(fb[15], pad) and torch.allclose(fb[16:], pad.expand_as(fb[16:]))  # 16 real frames
    with pytest.raises(media.ShortAudioError, match="2799 samples at 16000 Hz, fewer than the minimum 2800"):
        media.read_audio(short, sample_rate=SR, seconds=SECONDS, min_seconds=SYN.min_audio_seconds)
    with pytest.raises(media.ShortAudioError, match="holds 0 samples") as info:
        media.read_audio(empty, sample_rate=SR, seconds=SECONDS)
    assert info.value.path == empty
    bad = [rec("S", media_files.frames_dir, short), rec("E", media_files.frames_dir, empty),
           rec("T", media_files.frames_dir, tiny)]
    _check_skipped(good, bad, tmp_path / "skip", {"short_audio": 3}, [short, empty, tiny], caplog)
    _check_cached_raise(good, bad[2], tmp_path / "raise", media.ShortAudioError, tiny)


# ====================================================================== 6. 44.1 kHz stereo
def test_06_stereo_44k_is_resampled_and_downmixed(media_files, tmp_path):
    # L = 0.4 sin, R = 0.2 sin at 44.1 kHz -> a 16 kHz mono 0.3 sine (the channel average)
    mono = write_wav(tmp_path / "mono16k.wav", sine(SECONDS, SR, amp=0.3), SR)
    got = media.read_audio(media_files.stereo44k, sample_rate=SR, seconds=SECONDS)
    ref = media.read_audio(mono, sample_rate=SR, seconds=SECONDS)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (int(SECONDS * SR),)
    assert float(got[200:-200].abs().max()) == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(got[200:-200], ref[200:-200], atol=0.01)
    spec = torch.fft.rfft(got.double()).abs()
    assert abs(float(spec.argmax()) * SR / got.numel() - 440.0) < 5.0
    ds = AudioVideoDataset([rec("L", media_files.frames_dir, media_files.stereo44k),
                            rec("R", media_files.frames_dir, mono)], features=SYN, train=False,
                           task_names=TASKS, on_error="skip")
    assert not ds.skipped and len(ds) == 2                       # accepted, not skipped
    a, b = ds[0]["audio"], ds[1]["audio"]
    assert a.shape == (1, SYN.target_length, SYN.mel_bins) and torch.isfinite(a).all()
    # same fbank as the 16 kHz mono clip where there is signal (the near-empty top mel bands differ
    # only by the resampler's and int16's noise floors), and the same loudest band in every frame
    real = slice(0, int(SECONDS * 100) - 2)                      # fbank frames with audio, not padding
    assert (a[0, real, :32] - b[0, real, :32]).abs().max() < 0.05
    assert torch.equal(a[0, real].argmax(-1), b[0, real].argmax(-1))


# ====================================================================== 7. incomplete frames directory
def test_07_frames_directory_too_short(media_files, good, tmp_path, caplog):
    short = str(media_files.short_frames_dir)                    # frame_0 .. frame_9 only
    holed = tmp_path / "holed"                                   # last needed frame (48) present, frame_16 missing
    shutil.copytree(media_files.frames_dir, holed)
    (holed / "frame_16.jpg").unlink()
    with pytest.raises(media.ShortVideoError) as info:           # found from one stat at construction
        AudioVideoDataset(good + [rec("S", short, media_files.wav)], features=SYN, train=False, task_names=TASKS)
    assert info.value.path == short and "frame_48.jpg/.png is missing" in str(info.value) and info.value.kind == "incomplete_frames"
    ds = AudioVideoDataset([rec("H", holed, media_files.wav)], features=SYN, train=False, task_names=TASKS)
    with pytest.raises(media.ShortVideoError, match=r"holed: frame_16\.jpg/\.png is missing"):
        ds[0]                                                    # a hole surfaces when decoded
    bad = [rec("S", short, media_files.wav), rec("H", holed, media_files.wav)]
    _check_skipped(good, bad, tmp_path / "skip", {"incomplete_frames": 2}, [short, str(holed)], caplog)


# ====================================================================== 8. csv column problems
def test_08_csv_missing_and_renamed_columns(tmp_path):
    row = "A,clipA,clipA.wav,/m/a,sports\n"
    cases = {"vid,frames_path,wav,label\n" + row[:-8] + "\n": ["missing column(s) ['category']"],
             "vid,frames_path,audio,label,category\n" + row: ["missing column(s) ['wav']",
                                                             "unexpected column(s) ['audio']"],
             # every column renamed: must be reported as a header, not read as a clip
             "video_id,video,audio,labels,task\n" + row: ["missing column(s) ['vid', 'frames_path', 'wav'"]}
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"h{i}.csv"
        path.write_text(text)
        with pytest.raises(ManifestError) as info:
            read_split_csv(path, data_root=tmp_path)
        assert f"{path}:1: header" in str(info.value) and info.value.source == str(path)
        for e in expected:
            assert e in str(info.value), (text, str(info.value))
    # header-less: a row missing a field, and one with an empty field, each named by line
    path = tmp_path / "rows.csv"
    path.write_text("0,A,clipA,clipA.wav,/m/a,sports\n1,B,clipB,clipB.wav,/m/a\n2,C,clipC,,/m/a,music\n")
    with pytest.raises(ManifestError) as info:
        read_split_csv(path, data_root=tmp_path, task_names=TASKS)
    assert info.value.problems == [f"{path}:2: expected 6 fields, found 5", f"{path}:3: empty field(s) ['wav']"]


# ====================================================================== 9. duplicate clip ids
def test_09_duplicate_clip_ids(media_files, tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("0,A,x/clipA,a.wav,/m/a,sports\n1,B,x/clipB,b.wav,/m/a,sports\n2,A2,y/clipA,c.wav,/m/a,music\n")
    with pytest.raises(ManifestError) as info:
        read_split_csv(path, data_root=tmp_path, task_names=TASKS)
    assert info.value.problems == [f"{path}:3: duplicate clip key 'clipA' (first at line 1)"]
    # records built in code bypass the CSV check: the dataset and the cache catch them too
    recs = [rec("A", media_files.frames_dir, media_files.wav, row=4),
            rec("A", media_files.frames_dir, media_files.wav_b, row=9)]
    for build in (lambda: AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, on_error="skip"),
                  lambda: FeatureCache(tmp_path / "c", records=recs, features=SYN, progress=False)):
        with pytest.raises(ValueError, match=r"split\.csv:9: clip key 'A' repeats split\.csv:4"):
            build()
    assert not (tmp_path / "c").exists()


# ====================================================================== benchmark fixture (10, 11)
@pytest.fixture()
def vgg_csvs(media_files, tmp_path) -> Path:
    """A prepared Continual-VS folder with sports and music clips (symlinks to the fixture media)."""
    from stella_avalanche.benchmarks.splits import VGGSOUND_FILES

    root = tmp_path / "vgg"
    root.mkdir()
    (root / VGGSOUND_FILES["labels"]).write_text("index,mid,display_name\n0,/m/golf,golf\n1,/m/bell,bell\n")
    n = 0
    for split in ("train", "test", "retrieval"):
        rows = []
        for cat, mid in (("sports", "/m/golf"), ("music", "/m/bell")):
            n += 1
            os.symlink(media_files.frames_dir, root / f"clip{n}")
            rows.append({"vid": f"v{n}", "frames_path": f"clip{n}", "wav": str(media_files.wav),
                         "label": mid, "category": cat})
        write_split_csv(root / VGGSOUND_FILES[split], rows)
    return root


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


# ====================================================================== 10. unknown task name
def test_10_unknown_task_name(vgg_csvs, tmp_path):
    from stella_avalanche.benchmarks.splits import VGGSOUND_FILES
    from stella_avalanche.benchmarks.vggsound import vggsound_benchmark

    bm = vggsound_benchmark(vgg_csvs, features=SYN, tasks=["sports", "music"])   # the fixture is valid
    assert [len(e.dataset) for e in bm.train_stream] == [1, 1]
    with pytest.raises(ValueError, match=r"unknown task name\(s\) \['sport'\]; valid names: \['sports'"):
        vggsound_benchmark(vgg_csvs, features=SYN, tasks=["sports", "sport"])
    train = vgg_csvs / VGGSOUND_FILES["train"]
    _rewrite(train, ",/m/bell,music", ",/m/bell,musik")                          # line 2 of the train csv
    with pytest.raises(ManifestError) as info:
        vggsound_benchmark(vgg_csvs, features=SYN, tasks=["sports"])              # caught even if unselected
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{train}:2: category 'musik' is not one of the task names")
    # the same check on a single CSV, and on records given to a dataset directly
    with pytest.raises(ManifestError, match=rf"{train}:2: category 'musik'"):
        read_split_csv(train, data_root=vgg_csvs, task_names=TASKS)
    recs = read_split_csv(train, data_root=vgg_csvs)
    with pytest.raises(ValueError, match=rf"{train}:2: category 'musik'"):
        AudioVideoDataset(recs, features=SYN, train=True, task_names=TASKS)


# ====================================================================== 11. task with zero clips
def test_11_task_without_clips(vgg_csvs):
    from stella_avalanche.benchmarks.splits import VGGSOUND_FILES
    from stella_avalanche.benchmarks.vggsound import vggsound_benchmark

    train, test = (vgg_csvs / VGGSOUND_FILES[s] for s in ("train", "test"))
    with pytest.raises(ValueError) as info:
        vggsound_benchmark(vgg_csvs, features=SYN, tasks=["sports", "vehicle"])
    assert f"task(s) ['vehicle'] have no clips in {train}" in str(info.value)
    _rewrite(test, ",/m/bell,music", ",/m/golf,sports")                          # music gone from test only
    with pytest.raises(ValueError) as info:
        vggsound_benchmark(vgg_csvs, features=SYN, tasks=["sports", "music"])
    assert f"task(s) ['music'] have no clips in {test}" in str(info.value)


# ====================================================================== 12. NaN / inf loss
class _RandomAV(torch.utils.data.Dataset):
    """Random dict samples in the tiny preset's shapes (T=4, S=64; A=256, F=64)."""

    def __init__(self, n: int, category: int) -> None:
        g = torch.Generator().manual_seed(category)
        self.video = torch.randn(n, 4, 3, 64, 64, generator=g)
        self.audio = torch.randn(n, 1, 256, 64, generator=g)
        self.category = category

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "audio": self.audio[i], "category": self.category,
                "label": self.category, "index": i}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_12_non_finite_loss_keeps_checkpoints(tmp_path, bad_value):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset

    from stella_avalanche.checkpoint import CheckpointPlugin, Position, load_checkpoint, save_checkpoint
    from stella_avalanche.models.cav import build_model
    from stella_avalanche.training.template import AudioVideoPretraining, NonFiniteLossError

    torch.manual_seed(0)
    wrap = lambda d: AvalancheDataset([d], collate_fn=torch.utils.data.default_collate)  # noqa: E731
    bm = benchmark_from_datasets(train=[wrap(_RandomAV(8, 0)), wrap(_RandomAV(8, 1))])
    model = build_model("tiny")
    ckdir = tmp_path / "ckpt"
    strategy = AudioVideoPretraining(model=model, train_mb_size=2, train_epochs=1, device="cpu",
                                     plugins=[CheckpointPlugin(directory=ckdir, every_n_iterations=2, keep_last=10)])
    calls = {"n": 0}
    k = 7                                            # the 7th forward (3rd batch of task 1) fails
    original = model.pretrain_forward

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] == k:
            out["loss"] = out["loss"] * bad_value
        return out

    model.pretrain_forward = poisoned                # CAVMAE.forward calls self.pretrain_forward
    strategy.train(bm.train_stream[0], eval_streams=[])          # iterations 1..4, all finite
    end0 = save_checkpoint(ckdir, strategy, Position(experience=1), keep_last=10)
    before = {p.name: _sha(p) for p in sorted(ckdir.glob("ckpt-*.pt"))}
    assert sorted(before) == ["ckpt-000000002.pt", "ckpt-000000004.pt"] and end0.name in before
    weights0 = {n: t.clone() for n, t in model.state_dict().items()}

    with pytest.raises(NonFiniteLossError) as info:
        strategy.train(bm.train_stream[1], eval_streams=[])
    msg = str(info.value)
    assert f"non-finite training loss [{bad_value}] at iteration {k - 1} (experience 1)" in msg
    assert "last checkpoint is untouched" in msg
    # earlier checkpoints: byte-identical and loadable; the one written in task 1 (after iteration 6)
    # holds finite weights; nothing was written for the failed iteration
    after = {p.name: _sha(p) for p in sorted(ckdir.glob("ckpt-*.pt"))}
    assert {n: after[n] for n in before} == before
    assert sorted(after) == ["ckpt-000000002.pt", "ckpt-000000004.pt", "ckpt-000000006.pt"]
    ck = load_checkpoint(end0)
    assert ck["position"] == Position(experience=1)
    assert all(torch.equal(ck["strategy"]["model"][n], weights0[n]) for n in weights0)
    last = load_checkpoint(ckdir / "ckpt-000000006.pt")["strategy"]["model"]
    assert all(torch.isfinite(t).all() for t in last.values() if t.is_floating_point())
    # the failing step was not applied: the live weights equal the last checkpoint's
    assert all(torch.equal(model.state_dict()[n], last[n]) for n in last)
    fresh = build_model("tiny")
    fresh.load_state_dict(ck["strategy"]["model"])                 # restorable into a new model


# ====================================================================== 13. results dir not writable
def _minimal_results(tmp_path: Path) -> dict:
    from stella_avalanche.evaluation import report as R

    rm = {d: {f"R@{k}": [[0.5]] for k in (1, 5, 10)} for d in ("a2v", "v2a")}
    return R.build_results(strategy="finetune", benchmark="synthetic", seed=0, tasks=["t0"], recall_matrix=rm,
                           config={}, cost={"train_seconds": 1.0, "samples_per_second": 1.0,
                                            "peak_memory_bytes": 1, "buffer_bytes": 0, "wall_seconds": 1.0})


def test_13_results_dir_not_writable_precheck(tmp_path, monkeypatch):
    """run_experiment refuses an unwritable results directory before building anything (the
    os.access pre-check; os.access is patched because chmod does not bind root)."""
    import stella_avalanche.experiment as E

    out = tmp_path / "results"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(E.os, "access", lambda p, mode, **kw: False if Path(p) == out and mode & os.W_OK
                        else real_access(p, mode, **kw))
    monkeypatch.setattr(E, "_build_benchmark", lambda cfg: pytest.fail("benchmark built before the check"))
    with pytest.raises(PermissionError, match=f"results directory is not writable: {out}"):
        E.run_experiment(E.load_config(benchmark="synthetic"), out_dir=out, device="cpu", progress=False)


def _write_as_nobody(cwd: Path, rel: str, results: dict) -> tuple[int, str]:
    """Call write_results_json(rel) in a forked child running as uid/gid 65534 from ``cwd`` (a
    relative path, so the child needs no access to the root-only parents of pytest's tmp dir).
    Returns (exit code, message): 0 = PermissionError, 1 = written, 2 = could not drop privileges."""
    import signal
    import time

    from stella_avalanche.evaluation import report as R

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec (the interpreter lives under root-only /root), always _exit
        code, msg = 2, "?"
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgid(65534)
            os.setuid(65534)
            try:
                R.write_results_json(rel, results)
                code, msg = 1, "written"
            except PermissionError as e:
                code, msg = 0, f"PermissionError: {e}"
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            msg = f"{type(e).__name__}: {e}"
        finally:
            try:
                os.write(w, msg.encode())
            finally:
                os._exit(code)
    os.close(w)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("unprivileged child did not finish in 30 s")
        time.sleep(0.02)
    with os.fdopen(r) as fh:
        return os.waitstatus_to_exitcode(status), fh.read()


def test_13_results_dir_chmod_500(tmp_path):
    """write_results_json into a chmod 0o500 directory raises PermissionError naming the path and
    keeps the previous results.json. Root ignores mode bits, so as root the write is made by a
    forked child running as uid 65534, owner of the 0o500 directory."""
    from stella_avalanche.evaluation import report as R

    out = tmp_path / "results"
    out.mkdir()
    results = _minimal_results(tmp_path)
    R.write_results_json(out / "results.json", results)
    old = (out / "results.json").read_bytes()
    try:
        if os.geteuid() != 0:
            out.chmod(0o500)
            with pytest.raises(PermissionError) as info:
                R.write_results_json(out / "results.json", results)
            assert f"{out}/.results.json." in str(info.value)
        else:
            tmp_path.chmod(0o755)
            os.chown(out, 65534, 65534)
            out.chmod(0o500)
            code, msg = _write_as_nobody(tmp_path, "results/results.json", results)
            if code == 2:
                pytest.skip(f"running as root and cannot drop privileges ({msg}); chmod does not bind root")
            assert code == 0, msg
            assert f"PermissionError: [Errno 13] Permission denied: '{out}/.results.json." in msg
        assert (out / "results.json").read_bytes() == old                         # previous result kept
        assert os.listdir(out) == ["results.json"]                                # no temp file left
    finally:
        out.chmod(0o700)


# ====================================================================== 14. interrupted cache build
def test_14_interrupted_cache_build(media_files, good, tmp_path, monkeypatch):
    recs = good + [rec("P", media_files.png_dir, media_files.stereo44k, row=3),
                   rec("V", media_files.mp4, media_files.mp4, "music", row=4)]
    root = tmp_path / "cache"
    real_decode = D._decode_clip
    real_rmtree = shutil.rmtree
    decoded = {"n": 0}

    def crashing(*args, **kwargs):
        decoded["n"] += 1
        if decoded["n"] > 2:
            raise KeyboardInterrupt("simulated crash")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(D, "_decode_clip", crashing)
    # Ctrl-C during the build (not a MediaError, so on_error="skip" does not swallow it): the
    # half-written temp directory is removed and no cache directory appears
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, cache=root, on_error="skip",
                          progress=False)
    assert decoded["n"] == 3 and list(root.iterdir()) == []
    decoded["n"] = 0
    # a hard crash (kill -9) runs no cleanup: keep the half-written temp directory like one would
    monkeypatch.setattr(D.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, cache=root, on_error="skip",
                          progress=False)
    leftovers = list(root.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".av-") and ".tmp-" in leftovers[0].name
    assert not (leftovers[0] / "COMPLETE").exists() and (leftovers[0] / "video.npy").exists()
    # a stale final directory without the marker (half-copied by hand, older code) is not trusted either
    name = f"av-{D.manifest_hash(recs)}-{SYN.cache_key()}"
    shutil.copytree(leftovers[0], root / name)

    monkeypatch.setattr(D, "_decode_clip", real_decode)
    monkeypatch.setattr(D.shutil, "rmtree", real_rmtree)
    ds = AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS, cache=root, on_error="skip",
                           progress=False)
    assert ds.cache.built and ds.cache.path == root / name and not ds.skipped
    assert (ds.cache.path / "COMPLETE").is_file() and len(ds) == 4
    plain = AudioVideoDataset(recs, features=SYN, train=False, task_names=TASKS)
    for i in range(len(recs)):                        # rows 2, 3 were never decoded in the crashed run
        a, b = plain[i], ds[i]
        assert torch.equal(a["video"], b["video"]), i
        assert torch.allclose(a["audio"], b["audio"], atol=4e-3), i
    again = FeatureCache(root, records=recs, features=SYN, progress=False)
    assert not again.built                            # the completed cache is now reused
