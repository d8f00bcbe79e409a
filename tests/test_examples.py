"""The scripts in examples/ run as a user runs them, on the ``tiny`` synthetic preset.

Each runs in its own process with the arguments that make it fast (two tasks, one epoch, batch 4),
with a private cache shared by the examples of this module (the tiny data set is generated once).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--tasks", "2", "--epochs", "1", "--batch-size", "4", "--mem-size", "8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    e = {**os.environ, "STELLA_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return e


def _run(script: str, args: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_stella_in_your_own_strategy(env, tmp_path):
    out = _run("stella_in_your_strategy.py", [*FAST, "--out", str(tmp_path / "logs")], env, tmp_path)
    # the user's strategy trained with STELLA and the LR scheduler; its own loss term and STELLA's are logged
    for name in ("loss_epoch/extra_nce", "loss_epoch/stella_matching", "loss_epoch/nce", "Loss_Epoch/train_phase"):
        assert name in out, name
    assert "V2A_R@1_Pooled/eval_phase/retrieval_stream" in out  # InteractiveLogger got the retrieval metrics
    matrix = out[out.index("recall matrix"):].splitlines()[1:3]
    assert len(matrix) == 2 and all(len(row.split()) == 2 for row in matrix)
    assert re.search(r"average accuracy: \d+\.\d\d", out)
    csv = (tmp_path / "logs" / "csv" / "training_results.csv").read_text().splitlines()
    assert len(csv) == 3 and float(csv[-1].split(",")[4]) > 0  # CSVLogger: the training loss per experience
    assert any((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("strategy", ["derpp", "stella"])
def test_your_own_backbone(env, tmp_path, strategy):
    out = _run("your_own_backbone.py", ["--strategy", strategy, *FAST], env, tmp_path)
    assert re.search(r"task 2/2 \(task1\): A→V R@1/5/10 [\d.]+/[\d.]+/[\d.]+", out), out
    assert re.search(rf"{strategy} v2a R@1 average accuracy: \d+\.\d\d", out)
