"""The one exception type a user sees as a clean, one-line message."""

from __future__ import annotations

import functools
import sys

from metroem import logs


class MetroemError(Exception):
    """A problem with the user's input or environment, explained in one line (what + fix).

    Command-line entry points catch it (see :func:`cli_errors`) and print ``error: <message>``
    with exit status 2 instead of a traceback.
    """


def cli_errors(main):
    """Decorate a CLI ``main`` so MetroemError (and Ctrl-C) end in one line, not a traceback.

    The library's log lines are shown on stderr while the command runs
    (:func:`metroem.logs.command_logging`; ``main`` sets its ``--verbose`` / ``--quiet``).
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with logs.command_logging():
            try:
                return main(*args, **kwargs)
            except MetroemError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(130)

    return wrapper
