"""The suite's guard against a stuck test (pyproject.toml: pytest-timeout, thread method).

A CI run whose one test hung (on one xdist worker, in a call with no time limit of its own)
sat at 91% until CI's 90-minute limit, with no word of which test or where. With the
guard, every thread's stack is printed after ``faulthandler_timeout`` seconds, the test
fails after ``timeout`` seconds, and the rest of the suite runs on.
"""
import sys
import time

import pytest

from harness import processes


def test_this_session_runs_under_the_guard(request):
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"
    assert 0 < float(request.config.getini("faulthandler_timeout")) < float(request.config.getini("timeout")) <= 1800
    assert request.config.getini("timeout_method") == "thread"  # also stops a hang in C code


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stuck_test_fails_and_names_itself(tmp_path, workers):
    (tmp_path / "test_stuck.py").write_text(
        "import threading, time\n"
        "def test_stuck_in_a_lock():\n"
        "    lock = threading.Lock(); lock.acquire(); lock.acquire()  # never returns\n"
        "def test_fine():\n"
        "    assert 1 + 1 == 2\n")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=2",
            "-o", "timeout=4", "-o", "timeout_method=thread", str(tmp_path)] + (["-n", str(workers)] if workers else [])
    start = time.monotonic()
    done = processes.run(args, cwd=tmp_path, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert time.monotonic() - start < 60, out
    assert 'test_stuck.py", line 3' in out, out  # where it is stuck: the stuck thread's stack
    if workers:  # the worker is replaced and the run goes on (without xdist the run ends there)
        assert "FAILED test_stuck.py::test_stuck_in_a_lock" in out, out
        assert "1 failed, 1 passed" in out, out
    else:
        assert "Timeout" in out, out


def test_command_limits_fire_before_the_guard(request):
    """A command's own limit (harness.processes.run(timeout=...)) must end it before the
    guard ends the whole test: only then does the failure carry the command's output."""
    import re
    from pathlib import Path

    guard = float(request.config.getini("faulthandler_timeout"))
    limits = {f"{path.name}: timeout={value}": float(value)
              for path in Path(__file__).parent.glob("test_*.py")
              for value in re.findall(r"\btimeout=(\d+(?:\.\d+)?)", path.read_text())}
    assert limits, "no command limits found"
    assert {k: v for k, v in limits.items() if v >= guard} == {}
