"""Quiet, single-voiced output: ``--quiet`` switches every progress bar off (feature-cache builds
included) and under torchrun only rank 0 prints the final table and ``results:`` line."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from stella_avalanche import utils
from stella_avalanche.data.datasets import FeatureCache
from stella_avalanche.data.features import FeatureConfig
from stella_avalanche.data.manifests import ClipRecord

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def progress_switch():
    yield utils.set_progress
    utils.set_progress(True)


def _records(m) -> list[ClipRecord]:
    return [ClipRecord(key=f"k{i}", vid=f"k{i}", video=str(m.frames_dir), audio=str(m.wav), labels=("/m/a",),
                       category="t", source="s.csv", row=i + 1) for i in range(2)]


@pytest.mark.parametrize("enabled", [False, True])
def test_feature_cache_bar_follows_the_switch(media_files, tmp_path, capsys, progress_switch, enabled):
    progress_switch(enabled)
    FeatureCache(tmp_path, records=_records(media_files), features=FeatureConfig.synthetic())
    err = capsys.readouterr().err
    assert ("caching features" in err) == enabled


def _run_stella_main(monkeypatch, tmp_path, rank: int, argv: list[str]) -> None:
    import stella_avalanche.distributed as dist_mod
    import stella_avalanche.evaluation.report as report
    import stella_avalanche.experiment as experiment

    seen: dict = {}

    def fake_run(cfg, *, out_dir, progress, verbose=False, **kw):
        seen["progress_arg"], seen["bars"] = progress, utils.progress_enabled()
        seen["verbose"] = verbose
        return {"fake": True}

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    monkeypatch.setattr(report, "summary_table_markdown", lambda results: "| table |")
    monkeypatch.setattr(dist_mod, "get_rank", lambda: rank)
    spec = importlib.util.spec_from_file_location("run_stella_cli", ROOT / "experiments" / "run_stella.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "o"), *argv]) == 0
    return seen


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank0_prints_the_results_line(monkeypatch, tmp_path, capsys, progress_switch, rank):
    _run_stella_main(monkeypatch, tmp_path, rank, [])
    out = capsys.readouterr().out
    assert ("results:" in out and "| table |" in out) == (rank == 0)


def test_quiet_switches_all_bars_off(monkeypatch, tmp_path, progress_switch):
    seen = _run_stella_main(monkeypatch, tmp_path, 0, ["--quiet"])
    assert seen == {"progress_arg": False, "bars": False, "verbose": False}
    utils.set_progress(True)
    seen = _run_stella_main(monkeypatch, tmp_path, 0, [])
    assert seen == {"progress_arg": True, "bars": True, "verbose": False}
    seen = _run_stella_main(monkeypatch, tmp_path, 0, ["--verbose"])
    assert seen == {"progress_arg": True, "bars": True, "verbose": True}


def test_the_cli_names_the_output_folder_first(monkeypatch, tmp_path, capsys, progress_switch):
    _run_stella_main(monkeypatch, tmp_path, 0, [])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"output folder: {tmp_path / 'o'}")
    assert lines[-1].startswith(f"results: {tmp_path / 'o' / 'results.json'}")


@pytest.mark.parametrize("verbose", [False, True])
def test_default_terminal_output_is_one_line_per_task(tmp_path, verbose):
    """The default loggers print progress and one recall line per evaluation; every metric value
    (Avalanche's InteractiveLogger) only with ``verbose``; the files get everything either way."""
    from avalanche.logging import InteractiveLogger

    from stella_avalanche.evaluation.loggers import JSONLLogger, ProgressLogger, make_loggers

    loggers = make_loggers(tmp_path, interactive=verbose, progress=not verbose, task_names=["a", "b"])
    kinds = {type(lg) for lg in loggers}
    assert (InteractiveLogger in kinds) == verbose and (ProgressLogger in kinds) != verbose
    assert JSONLLogger in kinds


class _Clock:
    train_exp_counter = 2
    train_exp_epochs = 0


class _Strategy:
    clock = _Clock()
    train_epochs = 1
    dataloader = range(3)


def test_progress_logger_prints_one_recall_line(progress_switch):
    import io

    from stella_avalanche.evaluation.loggers import ProgressLogger

    buf = io.StringIO()
    lg = ProgressLogger(task_names=["music", "animals", "vehicles"], file=buf)
    lg.before_eval(_Strategy(), [])
    for d, k, v in (("A2V", 1, 10.0), ("A2V", 5, 30.25), ("V2A", 1, 12.0), ("V2A", 5, 33.0)):
        lg.log_single_metric(f"{d}_R@{k}_Pooled/eval_phase/retrieval_stream", v, 10)
        lg.log_single_metric(f"{d}_R@{k}_Pooled/eval_phase/retrieval_stream/Task000", 99.0, 10)  # per task: not shown
    lg.after_eval(_Strategy(), [])
    assert buf.getvalue() == "task 2/3 (animals): A→V R@1/5 10.0/30.2, V→A R@1/5 12.0/33.0\n"
    # the zero-shot evaluation before the first task is named as such, not "task 0"
    before = _Strategy()
    before.clock = type("_Clock0", (), {"train_exp_counter": 0, "train_exp_epochs": 0})()
    buf = io.StringIO()
    lg = ProgressLogger(task_names=["music", "animals", "vehicles"], file=buf)
    lg.before_eval(before, [])
    lg.log_single_metric("A2V_R@1_Pooled/eval_phase/retrieval_stream", 2.5, 0)
    lg.after_eval(before, [])
    assert buf.getvalue() == "initialisation (no training): A→V R@1 2.5\n"
    # a training epoch's bar in a log file (not a TTY) writes no line per update
    progress_switch(True)
    buf = io.StringIO()
    lg = ProgressLogger(file=buf)
    lg.before_training_epoch(_Strategy(), [])
    for _ in range(3):
        lg.after_training_iteration(_Strategy(), [])
    lg.after_training_epoch(_Strategy(), [])
    assert buf.getvalue().count("it/s") + buf.getvalue().count("s/it") <= 2, buf.getvalue()


def test_bars_in_a_log_file_refresh_rarely():
    import io

    interactive = type("Tty", (io.StringIO,), {"isatty": lambda self: True})()
    assert utils.tqdm_options(io.StringIO())["mininterval"] >= 30
    assert utils.tqdm_options(interactive)["mininterval"] < 1
