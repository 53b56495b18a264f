"""metroem.logs: commands show the library's log lines on stderr, plainly, at the level of
--verbose / --quiet, and leave logging as they found it."""

from __future__ import annotations

import argparse
import logging

import pytest

from metroem import logs
from metroem.errors import MetroemError, cli_errors

log = logging.getLogger("metroem.test_logs")


def test_a_command_logs_plain_lines_to_stderr_and_puts_logging_back(capsys):
    root = logging.getLogger("metroem")
    before = (root.level, list(root.handlers))

    @cli_errors
    def main(argv):
        p = argparse.ArgumentParser()
        logs.add_arguments(p)
        args = p.parse_args(argv)
        logs.setup_logging(args.verbosity)
        log.debug("detail")
        log.info("progress")
        log.warning("careful")
        print("result")
        return 0

    assert main([]) == 0
    out, err = capsys.readouterr()
    assert out == "result\n" and err == "progress\ncareful\n"
    assert main(["--quiet"]) == 0
    assert capsys.readouterr().err == "careful\n"
    assert main(["-v"]) == 0
    assert capsys.readouterr().err == "detail\nprogress\ncareful\n"
    assert (root.level, list(root.handlers)) == before


def test_errors_stay_one_line_after_the_log_lines(capsys):
    @cli_errors
    def main():
        logs.setup_logging(0)
        log.info("working")
        raise MetroemError("bad input; fix it")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err == "working\nerror: bad input; fix it\n"


def test_verbose_and_quiet_exclude_each_other():
    p = argparse.ArgumentParser()
    logs.add_arguments(p)
    assert p.parse_args([]).verbosity == 0
    assert p.parse_args(["--verbose"]).verbosity == 1
    assert p.parse_args(["-q"]).verbosity == -1
    with pytest.raises(SystemExit):
        p.parse_args(["-v", "-q"])
