"""The command-line entry points, each a module with ``main(argv=None)`` returning an exit status.

Installed as console scripts (``pyproject.toml``) and runnable as ``python -m stella_avalanche.cli.<name>``:
``stella-run`` (:mod:`.run`), ``stella-prepare`` (:mod:`.prepare`), ``stella-pretrain`` (:mod:`.pretrain`),
``stella-diagnose`` (:mod:`.diagnose`), ``stella-downstream`` (:mod:`.downstream`),
``stella-compare`` (:mod:`.compare`) and ``stella-oracle`` (:mod:`.oracle`). ``experiments/*.py`` and
``benchmarks/prepare_*.py`` are thin wrappers over them.
"""
