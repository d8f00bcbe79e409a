#!/usr/bin/env python
"""``stella-prepare audioset`` as a script (options: ``--help``; code: ``stella_avalanche/cli/prepare.py``)."""
import sys

from stella_avalanche.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main(["audioset", *sys.argv[1:]]))
