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

    def fake_run(cfg, *, out_dir, progress, **kw):
        seen["progress_arg"], seen["bars"] = progress, utils.progress_enabled()
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
    assert seen == {"progress_arg": False, "bars": False}
    utils.set_progress(True)
    seen = _run_stella_main(monkeypatch, tmp_path, 0, [])
    assert seen == {"progress_arg": True, "bars": True}
