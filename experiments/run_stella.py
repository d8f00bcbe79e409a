#!/usr/bin/env python
"""``stella-run`` as a script (options: ``--help``; code: ``stella_avalanche/cli/run.py``)."""
import sys

from stella_avalanche.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
