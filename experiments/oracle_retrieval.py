#!/usr/bin/env python
"""Retrieval oracles of a synthetic preset: a thin wrapper of :mod:`stella_avalanche.cli.oracle`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stella_avalanche.cli.oracle import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
