"""What every metroem command line shares: one parser class and the flags spelt once.

:class:`Parser` turns argparse usage errors into one-line MetroemErrors (``error: ...; see PROG
--help``, exit status 2 through :func:`metroem.errors.cli_errors`), like every other bad input.
The ``add_*`` helpers give one concept one spelling on every command (the table is docs/cli.md):
``--pyramid_path`` (a pyramid folder, or a shipped pyramid's name), ``--checkpoint_name``,
``--device`` (:mod:`metroem.devices`), ``--threads`` and ``-v`` / ``-q``. Older spellings a
command already accepted stay as aliases of the same option.
"""

from __future__ import annotations

import argparse

from metroem import devices, logs, threads
from metroem.errors import MetroemError

__all__ = ["Parser", "add_common", "add_pyramid", "add_checkpoint", "add_device"]


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line MetroemErrors (``error: ...``, exit 2)."""

    def error(self, message: str):
        raise MetroemError(f"{message}; see {self.prog} --help")


def add_common(parser: argparse.ArgumentParser, threads_flag: bool = True) -> None:
    """``--threads N`` (:mod:`metroem.threads`; not for commands that compute nothing) and
    ``-v`` / ``-q`` (:mod:`metroem.logs`)."""
    if threads_flag:
        threads.add_argument(parser)
    logs.add_arguments(parser)


def parse_args(parser: argparse.ArgumentParser, argv=None,
               announce_threads: bool = False) -> argparse.Namespace:
    """Parse a command's arguments and apply the common flags :func:`add_common` adds: the log
    level, then ``--threads`` (``announce_threads`` logs the count, the run header of long
    commands)."""
    args = parser.parse_args(None if argv is None else list(argv))
    logs.setup_logging(args.verbosity)
    if hasattr(args, "threads"):
        threads.apply(args.threads, announce=announce_threads)
    return args


def add_pyramid(parser, *aliases: str, required: bool = True, default=None,
                help: str | None = None) -> argparse.Action:
    """``--pyramid_path DIR`` (dest ``pyramid_path``): a pyramid folder or a shipped pyramid's
    name (``isbi``, ``demo``; :mod:`metroem.pretrained`)."""
    return parser.add_argument(
        "--pyramid_path", *aliases, dest="pyramid_path", required=required, default=default,
        metavar="PYRAMID",
        help=help or "pyramid folder (module folders <STAGE>_mip<MIP>in_<SUFFIX>) or a shipped "
        "pyramid's name (metroem pretrained list)")


def add_checkpoint(parser, *aliases: str, required: bool = False,
                   help: str | None = None) -> argparse.Action:
    """``--checkpoint_name NAME`` (dest ``checkpoint_name``)."""
    return parser.add_argument(
        "--checkpoint_name", *aliases, dest="checkpoint_name", required=required, metavar="NAME",
        help=help or "checkpoint of every stage, or one per stage: a,b,c (default: the stages' "
        "shared default; differing or unfinished defaults are refused)")


def add_device(parser, *aliases: str, default: str | None = "cpu",
               help: str | None = None) -> argparse.Action:
    """``--device`` (dest ``device``), parsed by :mod:`metroem.devices`."""
    return parser.add_argument(
        "--device", *aliases, dest="device", default=default,
        help=help or f"where the network runs: {devices.HELP} (default {default})")
