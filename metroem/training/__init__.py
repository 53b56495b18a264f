"""Training: the loop (``engine``), checkpoints, logging, distributed helpers and the CLI.

Submodules are imported explicitly (``from metroem.training import checkpoint``); this package
imports nothing itself so that ``import metroem.training.checkpoint`` stays light.
"""
