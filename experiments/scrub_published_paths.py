#!/usr/bin/env python
"""One-off: replace the machine paths in the committed result files under ``docs/`` by portable names.

The files were written before results.json named its files with ``stella_avalanche.paths.portable_path``.
The rewrite is textual, so every number and the files' layout stay byte-identical; only the path
strings change, to the names ``portable_path`` gives today:

- cached initialisations (``<home>/.cache/stella_avalanche/...``, or a job's own cache folder)
  -> ``$STELLA_CACHE/...``;
- files of the checkout a GPU job ran in -> their path relative to the repository root;
- files of installed packages (``.../site-packages/torch/...``) -> ``torch/...``;
- the GPU job's output folder -> ``$OUT/...``; other work folders -> their last two components.

Usage: ``python experiments/scrub_published_paths.py [--check] [docs]``; ``--check`` only lists the
files that would change. ``tests/test_published_paths.py`` keeps the tree clean afterwards.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

#: ordered (pattern, replacement) pairs; the first ones are the more specific
RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?:/[\w.+-]+)*/\.?cache/stella_avalanche/"), "$STELLA_CACHE/"),
    (re.compile(r"(?:/[\w.+-]+)*/site-packages/"), ""),
    (re.compile(r"/root/out/"), "$OUT/"),
    (re.compile(r"/work/main/"), ""),
    (re.compile(r"/work/(exp\d+/[\w.-]+)"), r"\1"),
    (re.compile(r"--work /tmp/sweep"), "--work sweep"),
]
SUFFIXES = {".json", ".jsonl", ".md", ".py", ".csv", ".txt"}


def scrub(text: str) -> str:
    """``text`` with every rule applied."""
    for pattern, repl in RULES:
        text = pattern.sub(lambda m: m.expand(repl) if "\\" in repl else repl, text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="docs", help="folder to rewrite (default docs)")
    p.add_argument("--check", action="store_true", help="list the files that would change, write nothing")
    args = p.parse_args(argv)
    changed = 0
    for f in sorted(Path(args.root).rglob("*")):
        if not f.is_file() or f.suffix not in SUFFIXES:
            continue
        old = f.read_text(encoding="utf-8")
        new = scrub(old)
        if new != old:
            changed += 1
            print(f)
            if not args.check:
                f.write_text(new, encoding="utf-8")
    print(f"{changed} files {'would change' if args.check else 'rewritten'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
