"""Peak memory one call needs on top of what is alive before it (inputs, weights).

CUDA: `torch.cuda.max_memory_allocated` above `memory_allocated` at the start.
CPU: growth of the process's peak resident set (VmHWM, reset by writing 5 to
/proc/self/clear_refs) over the resident set at the start. It counts pages first touched
during the call; glibc serves blocks >= 32 MiB with mmap and returns them on free, so for
realistic shapes every [N, V] temporary shows up; smaller blocks recycled from the malloc
heap do not (a lower bound for tiny shapes, and after earlier rows freed such blocks).
Both include the gradient the call leaves behind.

Two ways to use it: `peak_extra_bytes` in the benchmark's own process, after the row was
timed; or `first_call_peak` in a fresh process per row (`peak_in_fresh_process` starts
it), on the first full-size call after a warm-up on a few rows, so that no heap left by
earlier rows or repetitions hides anything.
"""
from __future__ import annotations

import gc
import json
import subprocess
from typing import Callable, List, Optional

import torch

import fastkd

# Rows of the warm-up call before a fresh process's measured call: thread pools, lazy
# initialisation and BLAS handles, without touching full-size memory.
WARMUP_ROWS = 8


def peak_extra_bytes(run: Callable, clear: Callable, device: torch.device) -> Optional[int]:
    """Peak bytes of one `run()` above the memory in use before it; None where unavailable."""
    clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # fastkd keeps freed CPU gradient buffers for reuse: release them first so that a
    # call's gradient is counted, as it is on a cold first call.
    fastkd.empty_cpu_grad_cache()
    if not _reset_peak_rss():
        return None
    base = _proc_status_kib("VmRSS")
    run()
    return max(0, _proc_status_kib("VmHWM") - base) * 1024


def first_call_peak(build: Callable, inputs, device: torch.device) -> Optional[int]:
    """Peak extra bytes of the first full-size call of `build(inputs)`, after one call of
    `build(inputs.head(WARMUP_ROWS))`: what a fresh process measures."""
    warm = build(inputs.head(WARMUP_ROWS))
    warm.clear()
    warm.run()
    warm.clear()
    del warm
    runner = build(inputs)
    return peak_extra_bytes(runner.run, runner.clear, device)


def peak_in_fresh_process(command: List[str]) -> Optional[int]:
    """Run `command` (a benchmark process that ends by printing `report_peak`'s line) and
    return the bytes it measured."""
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory subprocess failed (exit {proc.returncode}): {why}")
    return json.loads(lines[-1])["peak_extra_bytes"]


def report_peak(peak: Optional[int]) -> None:
    """The last line a fresh-process measurement prints, read by `peak_in_fresh_process`."""
    print(json.dumps({"peak_extra_bytes": peak}), flush=True)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
