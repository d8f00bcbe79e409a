"""``python -m stella_avalanche.cli.docs``: rewrite the generated figure blocks of the README (and any
other document given) from the published result files they name; ``--check`` only reports stale ones.

    python -m stella_avalanche.cli.docs            # rewrite the blocks of README.md and docs/results/
    python -m stella_avalanche.cli.docs --check    # exit 1 when a block differs from its source

The blocks and their sources: :mod:`stella_avalanche.evaluation.published`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from stella_avalanche.evaluation.published import update_blocks

#: the documents with generated blocks (paths relative to the repository root)
DOCUMENTS = ("README.md", "docs/results/README.md", "docs/results/synthetic_v4/README.md",
             "docs/results/synthetic_v5/README.md")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 0, or 1 under ``--check`` when a document is stale."""
    p = argparse.ArgumentParser(prog="stella-docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", default=list(DOCUMENTS),
                   help=f"documents to update (default: {', '.join(DOCUMENTS)})")
    p.add_argument("--root", default=".", help="the folder the blocks' source paths are relative to")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = p.parse_args(argv)
    stale = []
    for name in args.files:
        path = Path(name)
        old = path.read_text(encoding="utf-8")
        new = update_blocks(old, root=args.root)
        if new != old:
            stale.append(name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for name in stale:
        print(f"{'stale' if args.check else 'updated'}: {name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
