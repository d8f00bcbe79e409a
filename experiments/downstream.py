#!/usr/bin/env python
"""``stella-downstream`` as a script (options: ``--help``; code: ``stella_avalanche/cli/downstream.py``)."""
import sys

from stella_avalanche.cli.downstream import main

if __name__ == "__main__":
    sys.exit(main())
