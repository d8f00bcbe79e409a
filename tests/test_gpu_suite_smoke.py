"""benchmarks/perf/gpu_suite.py --smoke: the GPU measurement script runs end to end on the CPU.

One subprocess with the tiny model, 2 steps, DER++ and STELLA, and inert stand-ins for the packages
the GPU machine lacks (as it will run there): every section of the JSON is filled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "perf" / "gpu_suite.py"


def test_gpu_suite_smoke(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out), "--strategies", "derpp", "stella",
                        "--variants", "stella:head_chunk=12", "derpp:bf16_stream=1",
                        "--stub", "wandb", "qpsolvers", "quadprog", "gdown", "pytorchcv", "GPUtil"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["smoke"] and res["meta"]["device"] == "cpu"
    assert sorted(res["meta"]["stubbed"]) == sorted(["wandb", "qpsolvers", "quadprog", "gdown", "pytorchcv", "GPUtil"])
    settings = {(row["setting"], row["strategy"]) for row in res["runs"]}
    names = ("b3_buffer_gpu", "b3_buffer_pinned_host", "b4", "b3_buffer_gpu_variants")
    assert settings == {(s, m) for s in names for m in ("derpp", "stella")} | {
        ("b3_buffer_gpu_variants", "stella:head_chunk=12"), ("b3_buffer_gpu_variants", "derpp:bf16_stream=1")}
    for row in res["runs"]:
        sps = row["samples_per_second"]
        assert row["repeats"] == 2 and len(sps["values"]) == 2 and 0 < sps["min"] <= sps["mean"] <= sps["max"]
        assert row["flops_per_step"] > 0 and row["tflops"]["mean"] > 0
        # the step alone (loader wait excluded) is shorter than the whole experience's share
        assert len(row["in_step_seconds"]["values"]) == 2 * 2
        assert len(row["warmup_losses"]) == 1 and row["warmup_losses"][0] > 0  # --smoke: 1 warm-up step
        assert 0 < row["in_step_seconds"]["mean"] <= 1.05 * row["step_seconds"]["max"]
    # the analytic FLOPs agree with torch's counter (math attention on the CPU)
    assert {f["strategy"] for f in res["flop_check"]} == {"derpp", "stella"}
    assert all(abs(f["counted_over_analytic"] - 1) < 0.05 for f in res["flop_check"])
    # one audited step per strategy: the template's finite-loss check is a host read in every step
    assert {s["strategy"] for s in res["sync"]} == {"derpp", "stella"}
    for s in res["sync"]:
        assert any("template.py" in site and kind == "value_read" for kind, _, site, _ in s["audit"])
        # no host data copied into device tensors inside the step (each was a stream wait on CUDA)
        assert not {"host_data", "scalar_write"} & set(s["audit_counts"]), s["audit"]
    assert [b["input_fields_equal"] for b in res["buffer_check"]] == [True, True]
    assert all(b["selected_fields_equal_repeat"] and max(b["max_abs_diff_repeat"].values()) == 0
               for b in res["buffer_check"])  # the CPU is deterministic
    assert set(res["cost_model"]) == {"3", "4"} and res["cost_model"]["3"]["stella"]["flops"] > 0
    assert "| b4 | stella |" in r.stdout
