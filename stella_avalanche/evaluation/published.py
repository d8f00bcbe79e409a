"""Figures that documents quote, written from the published result files (one source per figure).

A document holds a generated block between two marker comments::

    <!-- generated:headline from docs/results/synthetic_v3/intervals.csv -->
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

__all__ = ["headline_table", "render_block", "update_blocks", "BLOCK_RE", "RENDERERS"]

#: an opening marker, the body, the closing marker (``name`` and the source path are captured)
BLOCK_RE = re.compile(r"(<!-- generated:(?P<name>[\w-]+) from (?P<source>\S+) -->\n)(?P<body>.*?)"
                      r"(<!-- /generated:(?P=name) -->)", re.S)

#: the methods of the headline table, in order, with their display names
_HEADLINE_ROWS = (("finetune", "Finetune (lower bound)"), ("derpp", "DER++"), ("stella", "STELLA"),
                  ("multitask", "Multitask (upper bound)"))


def _num(text: str) -> float | None:
    return None if text in ("", "nan") else float(text)


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def headline_table(intervals_csv: str | Path) -> str:
    """The README's result table from a comparison's ``intervals.csv`` (``compare.py`` writes it):
    per method 𝒜 and ℱ of each direction (Avg of R@1/5/10, %, mean ± std over seeds) and the paired
    differences to DER++ in 𝒜 and ℱ with their 95 % bootstrap intervals ("≈0" when one contains zero)."""
    rows: dict[tuple[str, str, str], Mapping[str, str]] = {}
    with open(intervals_csv, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            rows[(r["key"], r["direction"], r["metric"])] = r
    lines = ["| method | seeds | A→V 𝒜 | A→V ℱ | V→A 𝒜 | V→A ℱ | Δ𝒜 vs DER++ A→V / V→A | Δℱ vs DER++ A→V / V→A |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label in _HEADLINE_ROWS:
        if (key, "a2v", "A") not in rows:
            continue
        cells: list[str] = []
        diffs: dict[str, list[str]] = {"A": [], "F": []}
        for d in ("a2v", "v2a"):
            for m in ("A", "F"):
                r = rows.get((key, d, m))
                mean = None if r is None else _num(r["mean"])
                cells.append("–" if mean is None else f"{mean:.2f} ± {float(r['std']):.2f}")
                diff = None if r is None else _num(r.get("diff_derpp", ""))
                if diff is None:
                    diffs[m].append("–")
                else:
                    lo, hi = float(r["diff_derpp_lo"]), float(r["diff_derpp_hi"])
                    diffs[m].append(f"{_signed(diff)} [{_signed(lo)}, {_signed(hi)}]" + (" ≈0" if lo <= 0 <= hi else ""))
        seeds = rows[(key, "a2v", "A")]["seeds"]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " | " + " / ".join(diffs["A"]) + " | "
                     + " / ".join(diffs["F"]) + " |")
    return "\n".join(lines) + "\n"


#: block name -> function of the source path that writes the block's body
RENDERERS: dict[str, Callable[[Path], str]] = {"headline": headline_table}


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
