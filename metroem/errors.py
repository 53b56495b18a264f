"""The one exception type a user sees as a clean, one-line message."""

from __future__ import annotations

import functools
import logging
import sys


class MetroemError(Exception):
    """A problem with the user's input or environment, explained in one line (what + fix).

    Command-line entry points catch it (see :func:`cli_errors`) and print ``error: <message>``
    with exit status 2 instead of a traceback.
    """


def cli_errors(main):
    """Decorate a CLI ``main`` so MetroemError (and Ctrl-C) end in one line, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        handler = _log_to_stderr()
        try:
            return main(*args, **kwargs)
        except MetroemError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            if handler is not None:
                logging.getLogger("metroem").removeHandler(handler)

    return wrapper


def _log_to_stderr() -> logging.Handler | None:
    """Show the library's ``metroem.*`` INFO lines (plain messages) on stderr during a command,
    unless the caller configured logging for them already."""
    logger = logging.getLogger("metroem")
    if logger.handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
