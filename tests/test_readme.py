"""The README answers its readers' four questions with commands and code that work as written.

- it stays short, and each question's section starts with its answer (a command or code block
  within the first screenful of the section);
- its result table is the regeneration of the published aggregate it names (one source per figure);
- every ``stella-*`` command it gives parses with that command's own parser, and the plugin snippet
  runs (on the tiny synthetic preset, two tasks);
- ``make demo`` and ``make test`` are the Makefile's targets.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stella_avalanche.evaluation.published import BLOCK_RE, update_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCREEN = 30  # lines of a terminal screenful
SECTIONS = ("## Try it", "## Run it on your own VGGSound or AudioSet", "## Use the plugin in your own Avalanche strategy",
            "## What the numbers mean")


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _text(), flags=re.M | re.S)


def test_readme_is_short_and_answers_each_question_first():
    lines = _text().splitlines()
    assert len(lines) <= 160, len(lines)
    for title in SECTIONS:
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        screen = lines[start:start + SCREEN]
        assert any(line.startswith("```") or line.startswith("- **R@K**") for line in screen), title
    numbers = "\n".join(lines[next(i for i, l in enumerate(lines) if l.startswith(SECTIONS[3])):])
    for term in ("**R@K**", "**𝒜**", "**ℱ**", "**Avg**"):
        assert term in numbers, term
    assert "docs/contracts.md" in _text() and "docs/benchmarks.md" in _text()


def test_result_block_is_generated_from_its_source():
    text = _text()
    blocks = list(BLOCK_RE.finditer(text))
    assert blocks and blocks[0].group("name") == "headline"
    assert (ROOT / blocks[0].group("source")).is_file()
    assert update_blocks(text, root=ROOT) == text, "README's generated block is stale: python -m stella_avalanche.cli.docs"
    body = blocks[0].group("body")
    assert "| Finetune (lower bound) |" in body and "| Multitask (upper bound) |" in body


def test_headline_puts_the_initialisation_first_when_the_comparison_has_it(tmp_path):
    from stella_avalanche.evaluation.published import headline_table

    head = "key,direction,metric,seeds,mean,std,ci_lo,ci_hi,diff_derpp,diff_derpp_lo,diff_derpp_hi," \
           "diff_finetune,diff_finetune_lo,diff_finetune_hi\n"
    rows = ["finetune,{d},A,2,10.0,1.0,9,11,,,,,,", "finetune,{d},F,2,8.0,1.0,7,9,,,,,,",
            "multitask,{d},A,2,30.0,0.5,29,31,,,,20.0,15.0,25.0"]
    (tmp_path / "intervals.csv").write_text(head + "\n".join(r.format(d=d) for d in ("a2v", "v2a") for r in rows) + "\n")
    table = headline_table(tmp_path / "intervals.csv")
    assert "Initialisation" not in table and table.count("\n") == 2 + 2
    assert "| Multitask (upper bound) | 2 | 30.00 ± 0.50 | – | 30.00 ± 0.50 | – | +20.00 [+15.00, +25.00] / " in table
    (tmp_path / "comparison.csv").write_text(
        "strategy,seeds,a2v/Avg/A/mean,a2v/Avg/A/std,v2a/Avg/A/mean,v2a/Avg/A/std\n"
        "initial,4,13.02,0.0,13.09,0.0\nfinetune,2,10,1,10,1\n")
    lines = headline_table(tmp_path / "intervals.csv").splitlines()
    assert lines[2].startswith("| Initialisation (no training) | 4 runs | 13.02 ± 0.00 | – | 13.09 ± 0.00 | – |")
    assert lines[3].startswith("| Finetune (lower bound) | 2 |")


def test_every_generated_block_is_current():
    from stella_avalanche.cli.docs import DOCUMENTS

    for name in DOCUMENTS:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert BLOCK_RE.search(text), name
        assert update_blocks(text, root=ROOT) == text, f"{name}: python -m stella_avalanche.cli.docs"


def test_the_docs_command_finds_a_stale_block(tmp_path):
    from stella_avalanche.cli.docs import main

    stale = tmp_path / "R.md"
    stale.write_text(BLOCK_RE.sub(lambda m: m.group(1) + "| old |\n" + m.group(5), _text()), encoding="utf-8")
    assert main([str(stale), "--root", str(ROOT), "--check"]) == 1
    assert main([str(stale), "--root", str(ROOT)]) == 0
    assert stale.read_text(encoding="utf-8") == _text()


def _commands() -> list[list[str]]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                cmds.append(shlex.split(line))
    return cmds


def test_readme_commands_exist():
    makefile = (ROOT / "Makefile").read_text()
    parsed = 0
    for argv in _commands():
        if argv[0] == "make":
            assert re.search(rf"^{argv[1]}:", makefile, flags=re.M), argv
            continue
        assert argv[0].startswith("stella-"), argv
        name = argv[0].removeprefix("stella-")
        import importlib

        mod = importlib.import_module(f"stella_avalanche.cli.{name}")
        if hasattr(mod, "build_parser"):
            mod.build_parser().parse_args(argv[1:])
        else:
            mod.parse_args(argv[1:])
        parsed += 1
    assert parsed >= 4
    scripts = (ROOT / "pyproject.toml").read_text()
    for argv in _commands():
        if argv[0].startswith("stella-"):
            assert f'{argv[0]} = "stella_avalanche.cli.' in scripts, argv[0]


def test_readme_plugin_snippet_runs(tmp_path):
    (code,) = _blocks("python")
    assert "STELLAPlugin(" in code and "AudioVideoPretraining(" in code and "EvaluationPlugin(" in code
    # fast: two tasks of the tiny preset (the snippet already uses it), batch 4
    fast = code.replace("for experience in bm.train_stream:", "for experience in bm.train_stream[:2]:")
    fast = fast.replace("train_mb_size=32", "train_mb_size=4")
    assert fast.count("[:2]") == 1 and "train_mb_size=4" in fast
    env = {**os.environ, "STELLA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", fast], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "V2A_R@1_Pooled/eval_phase/retrieval_stream" in proc.stdout
    assert any((tmp_path / "runs" / "my_tb").glob("events.out.tfevents.*"))
