"""One case (op, shape, loss): every implementation on the same inputs, each checked
against the eager row, timed, and measured for peak memory. One failing implementation
records its error in its row and does not end the run."""
from __future__ import annotations

import gc
import math
import os
import statistics
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .memory import peak_extra_bytes
from .runner import Impl, Runner
from .timing import time_call

RATIO_BASELINES = ("eager", "compile", "liger")


@dataclass
class Measurement:
    """How each row is measured."""
    device: torch.device
    reps: int     # timed repetitions (CUDA: at least this many, and 100 ms of them)
    warmup: int   # untimed calls before the CPU timing loop
    # impl -> peak extra bytes measured elsewhere (a fresh process); None: in this
    # process, after the row was timed (memory.peak_extra_bytes).
    peak_of: Optional[Callable[[Impl], Optional[int]]] = None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32 and in row chunks (no [N, V] fp32 temporaries on big shapes)."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    num = den = 0.0
    step = max(1, (1 << 24) // max(1, a2.shape[-1]))
    for i in range(0, a2.shape[0], step):
        x, y = a2[i:i + step].float(), b2[i:i + step].float()
        num += float(torch.linalg.vector_norm(x - y)) ** 2
        den += float(torch.linalg.vector_norm(y)) ** 2
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def run_impl(impl: Impl, inputs, how: Measurement, eager_out: Dict) -> Dict:
    """Build, check against the eager result, time and measure one implementation.

    The eager row fills `eager_out` (its loss and gradient); later rows are compared with it.
    """
    row: Dict = {"impl": impl.name, "kind": impl.kind}
    runner: Optional[Runner] = None
    try:
        runner = impl.build(inputs)
        # The first call (on untouched inputs: inplace overwrites them) gives the values to check.
        runner.clear()
        loss = float(runner.run())
        grad = runner.checked_grad
        row["loss"] = loss
        if impl.name == "eager":
            eager_out["loss"], eager_out["grad"] = loss, grad.detach().clone()
        elif "loss" in eager_out:
            row["loss_rel_err"] = abs(loss - eager_out["loss"]) / max(abs(eager_out["loss"]), 1e-30)
            row["grad_rel_err"] = rel_err(grad, eager_out["grad"])
        grad = None
        if runner.compile_s is not None:
            row["compile_s"] = runner.compile_s
        times = time_call(runner.run, runner.clear, runner.leaves, how.device, how.reps, how.warmup)
        row["times_s"] = times
        row["time_s"] = statistics.median(times)
        if how.peak_of is None:
            row["peak_extra_bytes"] = peak_extra_bytes(runner.run, runner.clear, how.device)
        else:
            runner.clear()
            runner = None  # free this row's buffers while the fresh process measures
            gc.collect()
            row["peak_extra_bytes"] = how.peak_of(impl)
    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if os.environ.get("FASTKD_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        if runner is not None:
            runner.clear()
        del runner
        gc.collect()
        if how.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: List[Dict]) -> None:
    """Speedup of each row against each baseline timed on the same case (> 1 = faster)."""
    base = {r["impl"]: r.get("time_s") for r in rows if r["kind"] == "baseline"}
    for r in rows:
        for b in RATIO_BASELINES:
            if r.get("time_s") and base.get(b):
                r[f"speedup_vs_{b}"] = base[b] / r["time_s"]


def run_case(case: Dict, impls: List[Impl], inputs, floor_s: float, how: Measurement,
             progress: Callable[[Dict], None]) -> List[Dict]:
    """Rows of every implementation; `case` (shape, divergence) heads each row."""
    eager_out: Dict = {}
    rows = []
    for impl in impls:
        row = dict(case, floor_s=floor_s)
        row.update(run_impl(impl, inputs, how, eager_out))
        if row.get("time_s"):
            row["pct_of_floor"] = 100.0 * floor_s / row["time_s"]
        rows.append(row)
        progress(row)
    add_ratios(rows)
    return rows
