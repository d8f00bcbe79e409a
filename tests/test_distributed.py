"""run_stella.py under torchrun: 2 CPU processes (gloo) vs a single process.

- evaluation only (0 epochs) of the same fixed model: the sharded, gathered recall matrix equals the
  single-process one exactly;
- a short STELLA training run completes under DDP and rank 0 alone writes a complete results.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = str(ROOT / "experiments" / "run_stella.py")
COMMON = ["--quiet", "benchmark.preset=tiny", "init.checkpoint=none", "init.avm_checkpoint=none",
          "train.batch_size=4", "train.eval_batch_size=16", "checkpoint.every_n_iterations=0",
          "--no-downstream"]


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(STELLA_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", RUN, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    # generate the tiny synthetic data once, outside the timed/parallel runs
    r = subprocess.run([sys.executable, "-c", "from stella_avalanche.benchmarks.synthetic import synthetic_benchmark;"
                        "synthetic_benchmark(seed=0, preset='tiny')"], env=_env(path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return path


def test_ddp_recall_equals_single_process(cache: Path, tmp_path: Path) -> None:
    args = ["--strategy", "finetune", "train.epochs=0", *COMMON]
    single = subprocess.run([sys.executable, RUN, "--out", str(tmp_path / "single"), *args], env=_env(cache),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(["--out", str(tmp_path / "ddp"), *args], _env(cache))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = json.loads((tmp_path / "single" / "results.json").read_text())
    b = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert len(a["recall"]["a2v"]["R@1"]) == 8  # one row per task, the model never changed
    for d in ("a2v", "v2a"):
        for k in ("R@1", "R@5", "R@10"):
            assert a["recall"][d][k] == b["recall"][d][k], (d, k)


def test_ddp_stella_training_completes(cache: Path, tmp_path: Path) -> None:
    r = _torchrun(["--strategy", "stella", "--out", str(tmp_path / "stella"), "train.epochs=1",
                   "strategy.params.mem_size=16", *COMMON], _env(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "stella" / "results.json").read_text())
    assert res["complete"] and res["world_size"] == 2
    assert len(res["recall"]["a2v"]["R@5"]) == 8
    assert all(0.0 <= x <= 100.0 for row in res["recall"]["v2a"]["R@5"] for x in row)
    # per-rank checkpoint series (the buffers differ per rank)
    assert (tmp_path / "stella" / "checkpoints" / "rank0").is_dir()
    assert (tmp_path / "stella" / "checkpoints" / "rank1").is_dir()
