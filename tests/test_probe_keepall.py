"""experiments/probe_keepall.py: the per-seed table of the keep-all probe beside published runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("probe_keepall", ROOT / "experiments" / "probe_keepall.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _res(strategy: str, seed: int, avg: float, init: float, cap: str) -> dict:
    summ = {d: {"Avg": {"A": avg + (1 if d == "v2a" else 0)}} for d in ("a2v", "v2a")}
    rec = {d: {k: [init, init] for k in ("R@1", "R@5", "R@10")} for d in ("a2v", "v2a")}
    return {"strategy": strategy, "seed": seed, "complete": True, "summary": summ, "recall_initial": rec,
            "environment": {"cpu_capability": cap},
            "downstream": {"localise": {"miou_patch": 70.0, "miou_pixel": 40.0}}}


def _put(root: Path, res: dict) -> None:
    d = root / f"seed{res['seed']}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))


def test_table_leads_and_build_check(tmp_path, capsys):
    probe, pub = tmp_path / "probe", tmp_path / "runs"
    _put(probe, _res("stella_keepall", 0, 31.0, 12.0, "AVX2"))
    _put(probe, _res("stella_keepall", 1, 30.0, 13.0, "AVX512"))
    for k, avg in (("stella_random", 20.0), ("stella", 22.0), ("er", 29.0), ("derpp", 33.0)):
        for seed in (0, 1):
            _put(pub / k, _res(k, seed, avg, 12.5 if seed == 0 else 13.0, "AVX512"))
    out = tmp_path / "README.md"
    assert _script().main(["--probe-runs", str(probe), "--published", str(pub), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| 0 | STELLA: random patches"))
    assert "+11.00 / +11.00" in row and "| AVX512 |" in row          # 31 − 20 (A→V), 32 − 21 (V→A)
    assert "| 1 | DER++ | 33.00 | 34.00 | -3.00 / -3.00 |" in text
    # seed 0's build differs from the published one (zero-shot −0.5), seed 1's is the same
    assert "seed 0: another build than the published runs: zero-shot Avg A→V / V→A differs by -0.50 / -0.50" in text
    assert "seed 1: the same build as the published runs" in text and "not paired over the initialisation" in text


def test_refuses_a_run_of_another_strategy(tmp_path):
    import pytest

    _put(tmp_path / "probe", _res("stella_random", 0, 20.0, 12.0, "AVX2"))
    with pytest.raises(SystemExit, match="not a complete stella_keepall run"):
        _script().main(["--probe-runs", str(tmp_path / "probe"), "--published", str(tmp_path / "runs")])
