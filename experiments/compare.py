#!/usr/bin/env python
"""Compare strategies x seeds on one benchmark: a thin wrapper of :mod:`stella_avalanche.cli.compare`
(library: :mod:`stella_avalanche.evaluation.comparison`); ``--help`` lists the options."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stella_avalanche.cli.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
