"""experiments/init_builds.py: per-seed build figures read from planted checkpoints in a temporary
cache, beside the zero-shot and final recall of that seed's runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_experiment


def _script():
    return load_experiment("init_builds")


def _res(strategy: str, seed: int, final: float, zero: float) -> dict:
    key = f"synthetic-default-k{seed}"
    return {"strategy": strategy, "seed": seed, "complete": True,
            "summary": {d: {"Avg": {"A": final, "F": 1.0}} for d in ("a2v", "v2a")},
            "recall_initial": {d: {k: [zero, zero] for k in ("R@1", "R@5", "R@10")} for d in ("a2v", "v2a")},
            "init": {"backbone": f"$STELLA_CACHE/init/{key}/backbone.pt", "avm": f"$STELLA_CACHE/init/{key}/avm-x.pt"}}


def _put(runs: Path, key: str, res: dict) -> None:
    d = runs / key / f"seed{res['seed']}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))


def _build(cache: Path, seed: int, nce: float, acc: float, phase_end: float | None = None) -> None:
    d = cache / "init" / f"synthetic-default-k{seed}"
    d.mkdir(parents=True)
    hist = [{"loss": 4.0, "loss_nce": nce + 0.01 * (i % 2)} for i in range(10)]
    meta = {"schedule": {"batch_size": 32, "train_seed": seed}, "history": hist}
    if phase_end is not None:  # builds made since the stage-1 summary was recorded
        meta["stage1"] = {"nce_contrastive_end": phase_end}
    torch.save({"model": {}, "meta": meta}, d / "backbone.pt")
    torch.save({"avm": {}, "meta": {"stage2": {"heldout": [{"accuracy": 0.5}, {"accuracy": acc}],
                                               "criterion_met": acc >= 0.85}}}, d / "avm-x.pt")


def test_rows_from_builds_and_runs(tmp_path, monkeypatch, capsys):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setenv("STELLA_CACHE", str(cache))
    _build(cache, 0, 3.1, 0.9)
    _build(cache, 1, 3.46, 0.55, phase_end=2.0)   # aligned, then lost it; seed 2's build is not here
    for seed, zero in ((0, 12.0), (1, 5.0), (2, 13.0)):
        _put(runs, "derpp", _res("derpp", seed, 30.0 + seed, zero))
        _put(runs, "finetune", _res("finetune", seed, 10.0 + seed, zero))
    _put(runs, "er", _res("er", 0, 99.0, 12.0))          # one seed only: left out of the final column
    out = tmp_path / "init_builds.md"
    assert _script().main(["--runs", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    chance = f"{math.log(32):.3f}"
    assert f"| 0 | 3 | 3.105 ({chance}) | 0.900 (yes) | 12.00 / 12.00 | 20.00 / 20.00 |" in text
    assert f"| 1 | 2 | 2.000 → 3.465 ({chance}) | 0.550 (no) | 5.00 / 5.00 | 21.00 / 21.00 |" in text
    assert "| 2 | 2 | – | – | 13.00 / 13.00 | 22.00 / 22.00 |" in text
    assert "ran every seed (derpp, finetune)" in text


def test_a_seed_with_two_builds_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STELLA_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    _put(runs, "derpp", _res("derpp", 0, 30.0, 12.0))
    other = _res("finetune", 0, 10.0, 12.0)
    other["init"]["backbone"] = "$STELLA_CACHE/init/synthetic-default-other/backbone.pt"
    _put(runs, "finetune", other)
    with pytest.raises(SystemExit, match="seed 0: its runs name 2 different initialisation builds"):
        _script().main(["--runs", str(runs)])
    with pytest.raises(SystemExit, match="no complete runs"):
        _script().main(["--runs", str(tmp_path / "empty")])
