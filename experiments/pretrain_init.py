#!/usr/bin/env python
"""``stella-pretrain init`` as a script (options: ``--help``; code: ``stella_avalanche/cli/pretrain.py``)."""
import sys

from stella_avalanche.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main(["init", *sys.argv[1:]]))
