"""Run a command-line tool in a fresh process forked from a preloaded interpreter.

A ``python TOOL ARGS`` subprocess spends most of a short run importing torch, CloudVolume and
metroem. A child of a forkserver that imported them already is still a separate process (its
own state, exit code, signals, resource limits, killable with SIGKILL) but starts in
milliseconds. Tests that run a tool many times use this; the benchmarks and the tests that check
the scripts as installed run real ``python`` subprocesses.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# What costs most of a fresh interpreter's start.
PRELOAD = ["torch", "torch._dynamo", "cloudvolume", "h5py", "torch.utils.tensorboard",
           "metroem.cli",
           "metroem.training.cli", "metroem.inference", "metroem.download", "metroem.eval.cli",
           "metroem.generate"]


def forkserver():
    """A multiprocessing context whose children start with :data:`PRELOAD` imported (started
    here, so the first tool does not pay for the server's own imports). There is one
    forkserver per test process: every caller gets the same preloaded server."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in PRELOAD if _importable(m)])
    warm = ctx.Process(target=os.getpid)
    warm.start()
    warm.join()
    return ctx


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class Completed:
    returncode: int  # negative: killed by that signal, as subprocess reports it
    stdout: str
    stderr: str


def _child(tool: list[str], argv: list[str], cwd: str, env: dict, fsize_limit: int | None,
           out: str, err: str) -> None:
    """``python TOOL ARGV`` (or ``python -m MODULE ARGV``) in this forked process."""
    import runpy
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if fsize_limit is not None:  # a full disk: writes past it fail with EFBIG, not a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    code = 0
    try:
        if tool[0] == "-m":
            sys.argv = [tool[1], *argv]
            runpy.run_module(tool[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [tool[0], *argv]
            runpy.run_path(tool[0], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = int(e.code or 0)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(err + ".code", "w") as f:  # the exit code, whatever the forkserver reports
        f.write(str(code))
    os._exit(code)


class Tool:
    """A started tool: ``poll``/``wait``/``kill`` like :class:`subprocess.Popen`."""

    def __init__(self, ctx, tool: list[str], argv: list[str], cwd: Path, env: dict,
                 logs: Path, fsize_limit: int | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self._out, self._err = logs / f"stdout-{id(self)}", logs / f"stderr-{id(self)}"
        self.process = ctx.Process(target=_child, args=(tool, argv, str(cwd), env, fsize_limit,
                                                         str(self._out), str(self._err)))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = None) -> Completed:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired("forked tool", timeout)
        texts = []
        for f in (self._out, self._err):
            texts.append(f.read_text(errors="replace") if f.exists() else "")
            f.unlink(missing_ok=True)
        # The child records its own exit code: the forkserver reports 255 when it cannot tell
        # (seen when another thread forks at the same moment). Killed: no record, the signal.
        record = Path(str(self._err) + ".code")
        code = int(record.read_text()) if record.exists() else self.process.exitcode
        record.unlink(missing_ok=True)
        return Completed(code, *texts)


def run(ctx, tool: list[str], argv: list[str], cwd: Path, env: dict, timeout: float,
        fsize_limit: int | None = None, logs: Path | None = None) -> Completed:
    """Run a tool to completion (killed after ``timeout`` seconds: TimeoutExpired)."""
    logs = logs if logs is not None else Path(cwd).parent / f".{Path(cwd).name}.logs"
    try:
        return Tool(ctx, tool, argv, cwd, env, logs, fsize_limit).wait(timeout)
    finally:
        if logs.is_dir() and not any(logs.iterdir()):
            logs.rmdir()
