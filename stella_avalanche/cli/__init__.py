"""Command-line entry points of the package (each a ``main(argv=None)``); ``experiments/`` holds thin
wrappers around them."""
