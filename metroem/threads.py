"""``--threads``: how many CPU threads torch may use, the same option on every command.

torch starts one thread per core (or ``$OMP_NUM_THREADS``). On a shared machine that
oversubscribes the cores: with one other busy process on 2 cores, a training step went from
0.5 s to 5-16 s. Pass ``--threads`` (e.g. 1) to leave room for others.
"""

from __future__ import annotations

import argparse
import logging

import torch

from metroem.errors import MetroemError

__all__ = ["add_argument", "apply"]

log = logging.getLogger(__name__)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` to a command's parser."""
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for torch (default: $OMP_NUM_THREADS, else one per core: "
        f"{torch.get_num_threads()} here); on a shared machine pass fewer, e.g. 1",
    )


def apply(threads: int | None, announce: bool = False) -> int:
    """Use ``threads`` CPU threads (None: leave torch's default); returns the count in use.

    ``announce`` logs one line with the count (the run header of long commands).
    """
    if threads is not None:
        if threads < 1:
            raise MetroemError(f"--threads {threads}: pass a number of threads >= 1")
        torch.set_num_threads(int(threads))
    n = torch.get_num_threads()
    if announce:
        log.info("%d CPU thread%s (--threads)", n, "" if n == 1 else "s")
    return n
