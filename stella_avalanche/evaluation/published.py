"""Figures that documents quote, written from the published result files (one source per figure).

A document holds a generated block between two marker comments::

    <!-- generated:headline from docs/results/synthetic_v4/intervals.csv -->
    ...
    <!-- /generated:headline -->

:func:`render_block` writes the block's body from the file the opening marker names;
:func:`update_blocks` rewrites every such block of a text; ``stella-docs`` (``python -m
stella_avalanche.cli.docs``) does it for the README and checks it (``--check``), and the test suite
asserts the committed README equals its regeneration.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable, Mapping

from stella_avalanche.evaluation.bootstrap import verdict_summary

__all__ = ["headline_table", "verdicts_summary_line", "verdicts_table", "render_block", "update_blocks", "BLOCK_RE", "RENDERERS"]

#: an opening marker, the body, the closing marker (``name`` and the source path are captured)
BLOCK_RE = re.compile(r"(<!-- generated:(?P<name>[\w-]+) from (?P<source>\S+) -->\n)(?P<body>.*?)"
                      r"(<!-- /generated:(?P=name) -->)", re.S)

#: the methods of the headline table, in order, with their display names (a method without runs is left out)
_HEADLINE_ROWS = (("finetune", "Finetune (lower bound)"), ("derpp", "DER++"), ("stella", "STELLA"),
                  ("stella_plus", "STELLA+"), ("multitask", "Multitask (upper bound)"))
_INITIAL = ("initial", "Initialisation (no training)")


def _num(text: str) -> float | None:
    return None if text in ("", "nan") else float(text)


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def _diff_cell(r: Mapping[str, str] | None, ref: str) -> str:
    diff = None if r is None else _num(r.get(f"diff_{ref}", ""))
    if diff is None:
        return "–"
    lo, hi = float(r[f"diff_{ref}_lo"]), float(r[f"diff_{ref}_hi"])
    return f"{_signed(diff)} [{_signed(lo)}, {_signed(hi)}]" + (" ≈0" if lo <= 0 <= hi else "")


def _initial_cells(comparison_csv: Path) -> tuple[str, list[str]] | None:
    """("<n> runs", [A→V 𝒜, A→V ℱ, V→A 𝒜, V→A ℱ]) of the zero-shot row of ``comparison.csv``, if it has
    one: the number of runs that evaluated their initialisation (one build when a comparison shares it)."""
    if not comparison_csv.is_file():
        return None
    with open(comparison_csv, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["strategy"] == _INITIAL[0]:
                return f"{r['seeds']} runs", [f"{float(r[f'{d}/Avg/A/mean']):.2f} ± {float(r[f'{d}/Avg/A/std']):.2f}"
                                    if m == "A" else "–" for d in ("a2v", "v2a") for m in ("A", "F")]
    return None


def headline_table(intervals_csv: str | Path) -> str:
    """The README's result table from a comparison's ``intervals.csv`` (``compare.py`` writes it):
    per method 𝒜 and ℱ of each direction (Avg of R@1/5/10, %, mean ± std over seeds), the paired
    difference in 𝒜 to Finetune and the paired differences to DER++ in 𝒜 and ℱ, with their 95 %
    bootstrap intervals ("≈0" when one contains zero). When the ``comparison.csv`` beside it has the
    zero-shot row, the initialisation comes first (𝒜 only: it has no forgetting and no paired runs)."""
    rows: dict[tuple[str, str, str], Mapping[str, str]] = {}
    with open(intervals_csv, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            rows[(r["key"], r["direction"], r["metric"])] = r
    lines = ["| method | seeds | A→V 𝒜 | A→V ℱ | V→A 𝒜 | V→A ℱ | Δ𝒜 vs Finetune A→V / V→A "
             "| Δ𝒜 vs DER++ A→V / V→A | Δℱ vs DER++ A→V / V→A |",
             "|---|---|---|---|---|---|---|---|---|"]
    initial = _initial_cells(Path(intervals_csv).with_name("comparison.csv"))
    if initial is not None:
        lines.append(f"| {_INITIAL[1]} | {initial[0]} | " + " | ".join(initial[1]) + " | – / – | – / – | – / – |")
    for key, label in _HEADLINE_ROWS:
        if (key, "a2v", "A") not in rows:
            continue
        cells: list[str] = []
        for d in ("a2v", "v2a"):
            for m in ("A", "F"):
                r = rows.get((key, d, m))
                mean = None if r is None else _num(r["mean"])
                cells.append("–" if mean is None else f"{mean:.2f} ± {float(r['std']):.2f}")
        diffs = [" / ".join(_diff_cell(rows.get((key, d, m)), ref) for d in ("a2v", "v2a"))
                 for m, ref in (("A", "finetune"), ("A", "derpp"), ("F", "derpp"))]
        seeds = rows[(key, "a2v", "A")]["seeds"]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n"


#: verdicts.csv direction keys: retrieval directions, and the downstream columns of claim 7 (the headers of
#: comparison.DOWNSTREAM_COLUMNS; kept here so that rendering a block imports no training code)
_DIRECTIONS = {"a2v": "A→V", "v2a": "V→A", "transfer_a2v_R@5": "transfer R@5 A→V",
               "transfer_v2a_R@5": "transfer R@5 V→A", "miou_pixel": "mIoU pixel", "miou_patch": "mIoU patch"}
_SYMBOLS = {"A": "𝒜", "F": "ℱ", "D": "downstream"}


def _verdict_row(r: Mapping[str, str]) -> str:
    """One compact row of :func:`verdicts_table` from a verdicts.csv row."""
    if r["comparison"]:   # e.g. "1. 𝒜 STELLA − DER++ > 0"
        claim = f"{r['claim']}. {_SYMBOLS.get(r['metric'], r['metric'])} {r['comparison']} {r['claimed']}"
    else:                 # a claim left out: no comparison could be named
        claim = f"{r['claim']}. {r['claim_text']}"
    diff = _num(r["diff"])
    delta = "–" if diff is None else f"{_signed(diff)} [{_signed(float(r['ci_lo']))}, {_signed(float(r['ci_hi']))}]"
    verdict = r["verdict"] + (f": {r['missing']}" if r["missing"] else "")
    return f"| {claim} | {_DIRECTIONS.get(r['direction'], '–')} | {delta} | {verdict} |"


def verdicts_table(verdicts_csv: str | Path) -> str:
    """The paper's claims and their verdicts from a comparison's ``verdicts.csv`` (``compare.py`` writes
    it): the summary count, then per claim and direction the claimed difference, Δ [95 % interval] and
    the verdict (or the runs it misses). The rule is verdicts.md's; a quoting document links to it."""
    with open(verdicts_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    lines = [verdict_summary([r["verdict"] for r in rows]) + ".", "",
             "| claim | direction | Δ [95 % interval] | verdict |", "|---|---|---|---|"]
    return "\n".join(lines + [_verdict_row(r) for r in rows]) + "\n"


def verdicts_summary_line(verdicts_csv: str | Path) -> str:
    """One line for a short document: the summary count of ``verdicts.csv`` (what :func:`verdicts_table`
    opens with)."""
    with open(verdicts_csv, newline="", encoding="utf-8") as fh:
        return verdict_summary([r["verdict"] for r in csv.DictReader(fh)]) + ".\n"


#: block name -> function of the source path that writes the block's body
RENDERERS: dict[str, Callable[[Path], str]] = {"headline": headline_table, "verdicts": verdicts_table,
                                               "verdicts-summary": verdicts_summary_line}


def render_block(name: str, source: str | Path) -> str:
    """The body of the generated block ``name`` from ``source``."""
    if name not in RENDERERS:
        raise KeyError(f"unknown generated block {name!r}; known: {', '.join(RENDERERS)}")
    return RENDERERS[name](Path(source))


def update_blocks(text: str, *, root: str | Path = ".") -> str:
    """``text`` with every generated block rewritten from its source (paths relative to ``root``)."""
    def repl(m: re.Match[str]) -> str:
        body = render_block(m.group("name"), Path(root) / m.group("source"))
        return m.group(1) + body + m.group(5)

    return BLOCK_RE.sub(repl, text)
