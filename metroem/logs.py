"""How the command-line tools show the library's messages.

The library reports progress and notes through :mod:`logging` (``log =
logging.getLogger(__name__)`` in each module, all under the ``metroem`` logger) and never
prints. A command shows them as plain lines on stderr (no logger names, no levels), so its
results (tables, JSON, paths) stay alone on stdout. Every command takes ``--verbose`` /
``--quiet`` (:func:`add_arguments`) and calls :func:`setup_logging` with them; around the
whole command :func:`metroem.errors.cli_errors` sets up the default first and afterwards puts
the ``metroem`` logger back as it was (:func:`command_logging`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

__all__ = ["add_arguments", "setup_logging", "command_logging"]

LOGGER = "metroem"


class _Handler(logging.Handler):
    """Plain lines on the *current* ``sys.stderr`` (looked up per line, so redirections and the
    training run's ``train.log`` copy see them), written between tqdm progress bars."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            with _bars_cleared():
                sys.stderr.write(text)
                sys.stderr.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _bars_cleared():
    """Clear the open tqdm bars, let a line be written, draw the bars again below it."""
    std = sys.modules.get("tqdm.std")  # no bar can be open unless tqdm was imported
    if std is None:
        yield
        return
    cls = std.tqdm
    with cls.get_lock():
        bars = [b for b in list(getattr(cls, "_instances", ()))
                if not b.disable and hasattr(b, "start_t")]
        for b in bars:
            _quietly(b.clear, nolock=True)
        try:
            yield
        finally:
            for b in bars:
                _quietly(b.refresh, nolock=True)


def _quietly(fn, **kwargs) -> None:
    try:  # a bar left open on a stream closed since must not cost the log line
        fn(**kwargs)
    except (OSError, ValueError):
        pass


def add_arguments(parser: argparse.ArgumentParser, default=0) -> None:
    """Add ``--verbose`` / ``--quiet`` (``args.verbosity``: 1 / -1, default ``default``; a
    subcommand's parser passes ``argparse.SUPPRESS`` so the main parser's value stands) to a
    command."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                   default=default, help="also show debug messages")
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                   default=default, help="show only warnings and errors (progress bars stay)")


def setup_logging(verbosity: int = 0) -> None:
    """Show the ``metroem.*`` messages on stderr as plain lines: INFO and above for
    ``verbosity`` 0, DEBUG too for > 0, only warnings and errors for < 0.

    The handler is added once; a ``metroem`` logger that was given handlers already (by an
    application embedding metroem) keeps them, and only its level is set.
    """
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        logger.addHandler(_Handler())
    if verbosity > 0:
        logger.setLevel(logging.DEBUG)
    elif verbosity < 0:
        logger.setLevel(logging.WARNING)
    else:
        logger.setLevel(logging.INFO)


@contextlib.contextmanager
def command_logging():
    """Around one command: :func:`setup_logging` at the default level, and the ``metroem``
    logger's handlers and level put back afterwards (a command run inside a Python session
    leaves that session's logging as it found it)."""
    logger = logging.getLogger(LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    setup_logging()
    try:
        yield
    finally:
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)
        logger.setLevel(level)
