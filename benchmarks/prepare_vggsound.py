#!/usr/bin/env python
"""``stella-prepare vggsound`` as a script (options: ``--help``; code: ``stella_avalanche/cli/prepare.py``)."""
import sys

from stella_avalanche.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main(["vggsound", *sys.argv[1:]]))
