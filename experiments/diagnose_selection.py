#!/usr/bin/env python
"""``stella-diagnose`` as a script (options: ``--help``; code: ``stella_avalanche/cli/diagnose.py``)."""
import sys

from stella_avalanche.cli.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
