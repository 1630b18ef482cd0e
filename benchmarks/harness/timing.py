"""Seconds per call: warm-up, repetitions, medians (docs/measuring.md).

CPU: `time.perf_counter` around each call after a few untimed warm-up calls.
CUDA: `triton.testing.do_bench` (L2 flushed before each call) when triton is installed,
else CUDA events around each call with our own L2 flush.
In both, gradients are dropped *between* calls, outside the timed region, so that every
call allocates its gradient and backward never turns into an accumulation.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch

try:  # optional: the CUDA timer of choice
    import triton
    import triton.testing
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

L2_FLUSH_BYTES = 256 * 2 ** 20  # larger than any GPU's L2


def time_cpu(run: Callable, clear: Callable, reps: int, warmup: int) -> List[float]:
    """Wall-clock seconds of `reps` calls after `warmup` untimed ones; `clear()` runs before each."""
    for _ in range(warmup):
        clear()
        run()
    times = []
    for _ in range(reps):
        clear()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def time_cuda(run: Callable, leaves: List[torch.Tensor], reps: int) -> List[float]:
    """Seconds per call on CUDA: at least `reps` calls and 100 ms of them."""
    est_ms = _estimate_ms(run, leaves)
    rep_ms = max(100.0, reps * est_ms)
    warmup_ms = max(25.0, 2 * est_ms)
    if triton is not None:
        try:  # every individual time, so the JSON holds the raw numbers
            ms = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                                         return_mode="all")
            return [m / 1e3 for m in ms]
        except (TypeError, ValueError, AssertionError):  # older triton: no "all" mode
            ms = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                                         quantiles=[0.5])
            return [float(ms if not isinstance(ms, (list, tuple)) else ms[0]) / 1e3]
    return _time_cuda_events(run, leaves, max(reps, int(rep_ms / max(est_ms, 1e-3))))


def time_call(run: Callable, clear: Callable, leaves: List[torch.Tensor], device: torch.device,
              reps: int, warmup: int) -> List[float]:
    """Seconds per call of `run` on `device`.

    CPU: `clear()` before each call. CUDA: the leaves' gradients are dropped before each
    call (do_bench's `grad_to_none`) and `reps` is a minimum.
    """
    if device.type == "cuda":
        return time_cuda(run, leaves, reps)
    return time_cpu(run, clear, reps, warmup)


def median_seconds(run: Callable, device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of a call that leaves no gradients (the machine ceilings)."""
    return statistics.median(time_call(run, lambda: None, [], device, reps, warmup))


def timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton.testing.do_bench (median, L2 flushed)" if triton is not None else "CUDA events (median)"
    return "time.perf_counter (median)"


def _drop_grads(leaves: List[torch.Tensor]) -> None:
    for x in leaves:
        x.grad = None


def _estimate_ms(run: Callable, leaves: List[torch.Tensor]) -> float:
    _drop_grads(leaves)
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _drop_grads(leaves)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_cuda_events(run: Callable, leaves: List[torch.Tensor], reps: int) -> List[float]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _drop_grads(leaves)
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
