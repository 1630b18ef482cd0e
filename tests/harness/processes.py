"""Running a command from a test under a time limit, leaving nothing behind.

``subprocess.run(..., timeout=N)`` kills only its direct child when the time is up: the
child's own children (torchrun's ranks, a process pool's workers, nvcc's stages) live on,
a stuck rank spinning on a core or holding its port for the rest of the CI run, and a
call without ``timeout`` can wait forever. Here every command has a limit, runs in a
session of its own, and its whole process group is killed at the limit and after a
normal exit, so nothing it started outlives the test; a time-out fails the test with the
tails of what the command printed. Standard input is empty (CI has none).
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional, Sequence

TAIL_CHARS = 4000     # of each stream, in the error a time-out raises
DRAIN_S = 10          # how long to read what is left once the group is killed


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def run(cmd: Sequence[str], *, timeout: float, check: bool = False, input: Optional[str] = None,
        capture_output: bool = True, text: bool = True, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run``'s result for ``cmd``, with standard input empty unless ``input`` is
    given. Past ``timeout`` seconds the command and everything it started is killed and the
    test fails with the tails of what it printed."""
    pipe = subprocess.PIPE if capture_output else None
    with subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=pipe, stderr=pipe, text=text, start_new_session=True, **popen_kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=DRAIN_S)
            except subprocess.TimeoutExpired:  # a process that left the group holds a pipe
                out, err = "", ""
            raise AssertionError(
                f"{' '.join(map(str, cmd))!r} ran past its {timeout:g} s and was killed with every process it "
                f"started\n--- stdout (tail)\n{(out or '')[-TAIL_CHARS:]}\n--- stderr (tail)\n"
                f"{(err or '')[-TAIL_CHARS:]}") from None
        finally:
            _kill_group(proc)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
