"""harness.processes.run, which every test that starts a command uses: its time limit holds
when the command's children keep its output pipes open, and nothing the command started
outlives it (subprocess.run leaves such children running)."""
import os
import sys
import time

import pytest

from harness import processes


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (an exited child of a dead parent is reaped by init)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped has ended too
            if f.read().split(")")[-1].split()[0] == "Z":
                return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_time_limit_holds_when_a_child_keeps_the_pipes_open(tmp_path):
    # The shape of torchrun with a stuck rank: the command's child inherits its stdout and
    # never exits. subprocess.run(timeout=1) kills bash alone and leaves the child running.
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    with pytest.raises(AssertionError, match="ran past its 1 s") as failure:
        processes.run(["bash", "-c", f"echo started; sleep 300 & echo $! > {pid_file}; wait"], timeout=1)
    assert time.monotonic() - start < processes.DRAIN_S
    assert "started" in str(failure.value)  # what it printed comes with the failure
    assert _gone(int(pid_file.read_text()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_nothing_the_command_started_outlives_it():
    done = processes.run(["bash", "-c", "sleep 300 > /dev/null 2>&1 & echo $!"], timeout=60)
    assert done.returncode == 0
    assert _gone(int(done.stdout))


def test_result_and_check_as_subprocess_run():
    done = processes.run([sys.executable, "-c", "import sys; print(sys.stdin.read() + 'out'); "
                          "print('err', file=sys.stderr); sys.exit(3)"], input="in-", timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "in-out\n", "err\n")
    with pytest.raises(Exception, match="exit status 3"):
        processes.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=60, check=True)
    # Standard input is empty unless given (CI runs with none): a read returns at once.
    assert processes.run([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"],
                         timeout=60).stdout == "''\n"
