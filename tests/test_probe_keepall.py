"""experiments/probe_keepall.py: the keep-all probe's paired section on its own builds, the per-seed
table beside published runs, and the two-machine differences."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_experiment

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_experiment("probe_keepall")


def _res(strategy: str, seed: int, avg: float, init: float, cap: str) -> dict:
    """A complete results.json without per-query ranks (the bootstrap then uses the summary values)."""
    summ = {d: {"Avg": {"A": avg + (1 if d == "v2a" else 0), "F": 1.0}} for d in ("a2v", "v2a")}
    rec = {d: {k: [init, init] for k in ("R@1", "R@5", "R@10")} for d in ("a2v", "v2a")}
    return {"strategy": strategy, "seed": seed, "complete": True, "summary": summ, "recall_initial": rec,
            "tasks": [0, 1], "environment": {"cpu_capability": cap},
            "downstream": {"localise": {"miou_patch": 70.0, "miou_pixel": 40.0}}}


def _put(root: Path, res: dict) -> None:
    d = root / f"seed{res['seed']}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))


def _published(pub: Path) -> None:
    for k, avg in (("stella_random", 20.0), ("stella", 22.0), ("er", 29.0), ("derpp", 33.0)):
        for seed in (0, 1):
            _put(pub / k, _res(k, seed, avg + seed, 12.5 if seed == 0 else 13.0, "AVX512"))


def test_table_leads_and_build_check(tmp_path, capsys):
    probe, pub = tmp_path / "probe", tmp_path / "runs"
    _put(probe / "runs" / "stella_keepall", _res("stella_keepall", 0, 31.0, 12.0, "AVX2"))
    _put(probe / "runs" / "stella_keepall", _res("stella_keepall", 1, 30.0, 13.0, "AVX512"))
    _published(pub)
    out = tmp_path / "README.md"
    assert _script().main(["--probe", str(probe), "--published", str(pub), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| 0 | STELLA: random patches"))
    assert "| published |" in row and "+11.00 / +11.00" in row and "| AVX512 |" in row   # 31 − 20, 32 − 21
    assert "| 1 | DER++ | published | 34.00 | 35.00 | -4.00 / -4.00 |" in text
    # seed 0's build differs from the published one (zero-shot −0.5), seed 1's is the same
    assert "seed 0: another build than the published runs: zero-shot Avg A→V / V→A differs by -0.50 / -0.50" in text
    assert "seed 1: the same build as the published runs" in text and "not paired over the initialisation" in text
    assert "## Paired" not in text and "needs references run from the probe's builds" in text


def test_paired_section_and_two_machines(tmp_path):
    probe, pub = tmp_path / "probe", tmp_path / "runs"
    _published(pub)
    for seed in (0, 1, 2):
        init = 12.0 + seed
        _put(probe / "runs" / "stella_keepall", _res("stella_keepall", seed, 31.0 + seed, init, "AVX2"))
        _put(probe / "runs" / "stella_random", _res("stella_random", seed, 18.0 + seed, init, "AVX2"))
        _put(probe / "runs" / "stella", _res("stella", seed, 25.0 + seed, init, "AVX2"))
        # seed 2's DER++ started from another build: it must be left out of the pairing
        _put(probe / "runs" / "derpp", _res("derpp", seed, 30.0 + 2 * seed, init + (0.5 if seed == 2 else 0), "AVX2"))
    text = _script().report(probe, pub, n_boot=200)
    paired = text.split("## Paired on the probe's own builds", 1)[1].split("## Per seed", 1)[0]
    assert "ran seeds 0, 1 on one machine (AVX2 kernel path)" in paired
    assert "seed 2 left out of the paired section: derpp started from another build" in paired
    # means over seeds 0-1: keep-all 31.5, random 18.5, DER++ 31.0 (A→V); every run moves with its seed
    assert "| STELLA: random patches (no LPIS, no RCA) | 18.50 (18.00, 19.00) | 19.50 (19.00, 20.00) |" in paired
    assert "| STELLA: random patches (no LPIS, no RCA) − DER++ | -12.50 [-13.00, -12.00] |" in paired
    # the guide's choice at the same kept tokens, and STELLA against the full-clip baseline
    assert "| STELLA − STELLA: random patches (no LPIS, no RCA) | +7.00 [7.00, 7.00] |" in paired
    assert "| STELLA − DER++ | -5.50 [-6.00, -5.00] |" in paired
    keep_random = next(line for line in paired.splitlines() if line.startswith("| STELLA: all tokens") and "random" in line)
    assert "+13.00 [13.00, 13.00]" in keep_random       # a constant difference over seeds: a zero-width interval
    assert "**≈0**" not in keep_random
    keep_derpp = next(line for line in paired.splitlines() if line.startswith("| STELLA: all tokens") and "DER++" in line)
    assert keep_derpp.count("+0.50 [0.00, 1.00]") == 2   # 31 − 30 and 32 − 32 resampled over two seeds
    two = text.split("## One configuration on two machines", 1)[1]
    # probe random seed 1: 19 against published 21 (A→V), zero-shot 13 against 13; published SD of 20, 21 = 0.71
    assert "| STELLA: random patches (no LPIS, no RCA) | 1 | AVX2 − AVX512 | +0.00 / +0.00 | -2.00 / -2.00 | 0.71 / 0.71 |" in two
    assert "| DER++ | 2 |" not in two                    # no published seed 2


def test_refuses_a_run_filed_under_another_strategy(tmp_path):
    _put(tmp_path / "probe" / "runs" / "stella_keepall", _res("stella_random", 0, 20.0, 12.0, "AVX2"))
    with pytest.raises(SystemExit, match="a run of 'stella_random', not of 'stella_keepall'"):
        _script().main(["--probe", str(tmp_path / "probe"), "--published", str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match="no complete stella_keepall run"):
        _script().main(["--probe", str(tmp_path / "nothing"), "--published", str(tmp_path / "runs")])


def test_published_probe_readme_regenerates_byte_for_byte():
    results = ROOT / "docs" / "results" / "synthetic_v5"
    probe = results / "probes" / "keepall"
    if not (probe / "runs").is_dir():
        pytest.skip("no published keep-all probe")
    assert _script().report(probe, results / "runs") == (probe / "README.md").read_text()
