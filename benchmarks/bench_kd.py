#!/usr/bin/env python
"""Benchmark harness for fastkd: forward+backward time, % of the memory floor, ratios
against baselines timed in the same run, and peak extra memory (docs/measuring.md).

    python benchmarks/bench_kd.py --device cpu --shapes 512x32000 --dtype float32
    python benchmarks/bench_kd.py --device cuda --shapes 8192x128256 --dtype bfloat16 --inplace
    python benchmarks/bench_kd.py --device cuda --op fused_linear --shapes 8192x2048x4096x128256

Every case times `loss = f(...); loss.backward()` on random data (logits ~ N(0, 3^2)) and
reports the median. Results go to OUT/bench_<op>_<device>_<timestamp>.{md,json,png}.
See benchmarks/README.md for what each column means and how memory is measured.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import fastkd
import fastkd.ops
from fastkd import reference

try:  # optional: the CUDA timer of choice
    import triton
    import triton.testing
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
KERNEL_BACKENDS = ("cpu", "cuda", "triton", "torch")
BASELINES = ("eager", "compile", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fastkd's default, and the one value at which every JSD convention in the wild agrees
# (Liger's chunked loss puts beta on the other side of the mixture).
BETA = 0.5
LOGIT_STD = 3.0  # docs/measuring.md: realistic spread; never zeros (would make exp/log trivially cheap)
MIB = 1024.0 ** 2


# ---------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--op", choices=("kd", "fused_linear"), default="kd")
    p.add_argument("--shapes", default=None,
                   help="comma-separated; kd: NxV (e.g. 512x32000,8192x128256); "
                        "fused_linear: NxHsxHtxV (e.g. 8192x2048x4096x128256)")
    p.add_argument("--divergences", default=None, help=f"comma-separated subset of {','.join(DIVERGENCES)}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="logits / hidden-state dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--backends", default=None,
                   help="fastkd backends to time (default: every registered backend that runs on --device)")
    p.add_argument("--baselines", default=None, help="comma-separated subset of eager,compile,liger "
                                                     "(default: all; 'none' for none)")
    p.add_argument("--inplace", action="store_true", help="also time fastkd with inplace_backward=True")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per case (cpu default 7; cuda: at least this many, "
                        "and at least 100 ms of runs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny, fast subset (smoke test): small default shape, one divergence, "
                        "eager baseline only, few repetitions; explicit options still win")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    apply_defaults(args)
    return args


def apply_defaults(args: argparse.Namespace) -> None:
    """Fill the options left unset; --quick changes only those."""
    cuda = args.device == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    if args.shapes is None:
        if args.op == "kd":
            args.shapes = "16x1001" if args.quick else ("4096x32000,8192x128256" if cuda else "512x32000")
        else:
            args.shapes = ("16x32x48x1001" if args.quick else
                           ("8192x2048x4096x128256" if cuda else "256x256x512x32000"))
    if args.divergences is None:
        args.divergences = "forward_kl" if args.quick else ",".join(DIVERGENCES)
    if args.baselines is None:
        args.baselines = "eager" if args.quick else ",".join(BASELINES)
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    if args.reps is None:
        args.reps = 3 if args.quick else (20 if cuda else 7)
    args.reps = max(1, args.reps)
    args.warmup = 1 if args.quick else 2  # untimed calls before the CPU timing loop

    args.shape_list = [parse_shape(s, args.op) for s in args.shapes.split(",") if s.strip()]
    args.divergence_list = split_list(args.divergences, DIVERGENCES, "--divergences")
    args.baseline_list = [] if args.baselines.strip() == "none" else split_list(args.baselines, BASELINES, "--baselines")
    args.backend_list = (default_backends(torch.device(args.device)) if args.backends is None
                         else split_list(args.backends, KERNEL_BACKENDS, "--backends"))


def split_list(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {','.join(allowed)}")
    return items


def parse_shape(text: str, op: str) -> tuple:
    want = 2 if op == "kd" else 4
    try:
        dims = tuple(int(x) for x in text.strip().lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != want or min(dims) <= 0:
        form = "NxV" if op == "kd" else "NxHsxHtxV"
        raise SystemExit(f"--shapes: {text!r} is not {form} with positive integers")
    return dims


def default_backends(device: torch.device) -> List[str]:
    """Registered fastkd kernel backends that run on `device`.

    Triton under TRITON_INTERPRET=1 "runs" on CPU tensors, but through a Python
    interpreter: correct and useless as a timing, so it is only timed when asked for.
    """
    names = []
    for name in ("cpu", "cuda", "triton"):
        kernels = fastkd.ops.get_backend(name)
        if kernels is None or not kernels.supports(device):
            continue
        if name == "triton" and device.type == "cpu":
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------
# Timing, memory and machine ceilings

def time_cpu(run: Callable, clear: Callable, reps: int, warmup: int) -> List[float]:
    """Wall-clock seconds of `reps` calls after `warmup` untimed ones.

    Gradients are dropped *between* calls (outside the timed region) so that every call
    allocates its gradient fresh and backward never turns into an accumulation.
    """
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
    """Seconds per call on CUDA: triton's do_bench (L2 flushed per call) when available,
    else CUDA events around each call with our own L2 flush."""
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


def _estimate_ms(run: Callable, leaves: List[torch.Tensor]) -> float:
    for x in leaves:
        x.grad = None
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for x in leaves:
        x.grad = None
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_cuda_events(run: Callable, leaves: List[torch.Tensor], reps: int) -> List[float]:
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")  # larger than any L2
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        for x in leaves:
            x.grad = None
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


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


def _fastkd_extension():
    from fastkd import _ext

    return _ext.load_extension()


def peak_extra_bytes(run: Callable, clear: Callable, device: torch.device) -> Optional[int]:
    """Peak memory one call needs on top of what is alive before it (inputs, weights).

    CUDA: torch.cuda.max_memory_allocated above memory_allocated at the start.
    CPU: growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) over the resident set at the start. It counts pages first
    touched during the call; glibc serves blocks >= 32 MiB with mmap and returns them on
    free, so for realistic shapes every [N, V] temporary shows up; small blocks recycled
    from the malloc heap do not (a lower bound for tiny shapes). None where unavailable.
    """
    clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # fastkd keeps freed CPU gradient buffers for reuse (csrc/cpu/grad_buffer_cache.h);
    # release them first so a call's gradient is counted, as it is on a cold first call.
    ext = _fastkd_extension()
    if ext is not None and hasattr(ext, "empty_cpu_grad_cache"):
        ext.empty_cpu_grad_cache()
    if not _reset_peak_rss():
        return None
    base = _proc_status_kib("VmRSS")
    run()
    return max(0, _proc_status_kib("VmHWM") - base) * 1024


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of a large same-device copy, counting read + write (docs/measuring.md)."""
    numel = (8 if quick else (256 if device.type == "cpu" else 1024)) * 2 ** 20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    run = lambda: dst.copy_(src)  # noqa: E731
    if device.type == "cuda":
        secs = statistics.median(time_cuda(run, [], 20))
    else:
        secs = statistics.median(time_cpu(run, lambda: None, reps=7, warmup=2))
    return 2 * src.numel() * src.element_size() / secs


def matmul_throughput(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """FLOP/s of a large square matmul in `dtype`: the ceiling of the fused-linear op."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    run = lambda: a @ b  # noqa: E731
    if device.type == "cuda":
        secs = statistics.median(time_cuda(run, [], 20))
    else:
        secs = statistics.median(time_cpu(run, lambda: None, reps=5, warmup=1))
    return 2.0 * n ** 3 / secs


# ---------------------------------------------------------------------------------------
# Implementations: each becomes a Runner whose run() does forward + backward once.

@dataclass
class Runner:
    fn: Callable[[], torch.Tensor]       # the loss
    leaves: List[torch.Tensor]           # tensors that receive gradients
    compile_s: Optional[float] = None    # one-off torch.compile cost, when there is one

    def run(self) -> torch.Tensor:
        loss = self.fn()
        loss.backward()
        return loss.detach()

    def clear(self) -> None:
        for x in self.leaves:
            x.grad = None


@dataclass
class Impl:
    name: str             # row label, e.g. "fastkd[cpu]", "eager", "liger"
    kind: str             # "fastkd" or "baseline"
    build: Callable       # inputs -> Runner (may raise: the row records the error)


def random_logits(n: int, v: int, dtype, device, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, v, generator=gen, device=device) * LOGIT_STD).to(dtype)


@dataclass
class KDInputs:
    student: torch.Tensor  # base copy; each implementation trains on its own clone
    teacher: torch.Tensor

    def fresh_student(self) -> torch.Tensor:
        return self.student.clone().requires_grad_(True)

    def grad_of(self, runner: Runner) -> torch.Tensor:
        return runner.leaves[0].grad


def textbook_forward_kl(s, t, temperature):
    """What most KD code does: fp32 log-softmax of both sides, KL, batchmean, times T^2."""
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature ** 2


def eager_kd_fn(divergence: str, temperature: float) -> Callable:
    if divergence == "forward_kl":
        return lambda s, t: textbook_forward_kl(s, t, temperature)
    return lambda s, t: reference.kd_loss(s, t, divergence=divergence, temperature=temperature, beta=BETA)


def compiled(fn: Callable) -> Callable:
    # A fresh dynamo cache per case: compiled code is cached on the code object shared by
    # every lambda above, and more recompilations than the limit silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def kd_impls(args, divergence: str, liger) -> List[Impl]:
    T = args.temperature
    impls: List[Impl] = []

    def baseline(name, loss_of):
        def build(x: KDInputs) -> Runner:
            s = x.fresh_student()
            return Runner(lambda: loss_of(s, x.teacher), [s])
        impls.append(Impl(name, "baseline", build))

    if "eager" in args.baseline_list:
        baseline("eager", eager_kd_fn(divergence, T))
    if "compile" in args.baseline_list:
        def build_compiled(x: KDInputs) -> Runner:
            s = x.fresh_student()
            fn = compiled(eager_kd_fn(divergence, T))
            return warm_compiled(Runner(lambda: fn(s, x.teacher), [s]))
        impls.append(Impl("compile", "baseline", build_compiled))
    if "liger" in args.baseline_list and liger.available:
        make = liger.kd_loss_maker(divergence, T)
        if make is not None:
            def build_liger(x: KDInputs) -> Runner:
                loss_of = make()
                s = x.fresh_student()
                return Runner(lambda: loss_of(s, x.teacher), [s])
            impls.append(Impl("liger", "baseline", build_liger))

    for name in args.backend_list:
        for inplace in ((False, True) if args.inplace else (False,)):
            impls.append(Impl(f"fastkd[{name}]" + ("+inplace" if inplace else ""), "fastkd",
                              fastkd_kd_builder(name, divergence, T, inplace)))
    return impls


class InplaceRunner(Runner):
    """inplace_backward takes logits a model computed (a non-leaf) and overwrites them: each
    run gets a fresh copy of the leaf, made in clear() outside the timed region, as the LM
    head's matmul would have written it (pages already touched)."""

    def __init__(self, make_loss: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor):
        super().__init__(lambda: make_loss(self.logits), [leaf])
        self.logits = leaf.clone()

    def clear(self) -> None:
        super().clear()
        self.logits = self.leaves[0].clone()


def fastkd_kd_builder(backend: str, divergence: str, temperature: float, inplace: bool) -> Callable:
    def build(x: KDInputs) -> Runner:
        # Explicit backend names, never "auto": a row must say which kernel ran.
        s = x.fresh_student()

        def loss(logits):
            return fastkd.kd_loss(logits, x.teacher, divergence=divergence, temperature=temperature, beta=BETA,
                                  inplace_backward=inplace, backend=backend)
        return InplaceRunner(loss, s) if inplace else Runner(lambda: loss(s), [s])
    return build


def warm_compiled(runner: Runner) -> Runner:
    """Compile (forward and backward graphs) outside the timed region; record how long it took."""
    t0 = time.perf_counter()
    for _ in range(2):
        runner.clear()
        runner.run()
    runner.compile_s = time.perf_counter() - t0
    runner.clear()
    return runner


# --- fused linear (hidden states + LM-head weights) -------------------------------------

@dataclass
class LinearInputs:
    student_hidden: torch.Tensor   # [N, Hs]
    student_weight: torch.Tensor   # [V, Hs]
    teacher_hidden: torch.Tensor   # [N, Ht]
    teacher_weight: torch.Tensor   # [V, Ht]
    labels: torch.Tensor           # [N], only for Liger's chunked loss (its CE weight is 0)

    def fresh_student(self):
        return (self.student_hidden.clone().requires_grad_(True),
                self.student_weight.clone().requires_grad_(True))

    def grad_of(self, runner: Runner) -> torch.Tensor:
        return runner.leaves[0].grad  # d loss / d student_hidden


def make_linear_inputs(shape, dtype, device, gen) -> LinearInputs:
    n, hs, ht, v = shape
    # Hidden ~ N(0, 1), weights ~ N(0, LOGIT_STD^2 / H): logits come out ~ N(0, LOGIT_STD^2).
    def weight(h):
        return (torch.randn(v, h, generator=gen, device=device) * (LOGIT_STD / math.sqrt(h))).to(dtype)
    return LinearInputs(
        torch.randn(n, hs, generator=gen, device=device).to(dtype), weight(hs),
        torch.randn(n, ht, generator=gen, device=device).to(dtype), weight(ht),
        torch.randint(0, v, (n,), generator=gen, device=device))


def eager_linear_fn(divergence: str, temperature: float) -> Callable:
    """Materialise both logits with matmuls, then the reference loss."""
    def loss(sh, sw, th, tw):
        s = sh @ sw.t()
        with torch.no_grad():
            t = th @ tw.t()
        return reference.kd_loss(s, t, divergence=divergence, temperature=temperature, beta=BETA)
    return loss


def linear_impls(args, divergence: str, liger) -> List[Impl]:
    T = args.temperature
    impls: List[Impl] = []

    def baseline(name, loss_of, compile_it=False):
        def build(x: LinearInputs) -> Runner:
            sh, sw = x.fresh_student()
            fn = compiled(loss_of) if compile_it else loss_of
            runner = Runner(lambda: fn(sh, sw, x.teacher_hidden, x.teacher_weight), [sh, sw])
            return warm_compiled(runner) if compile_it else runner
        impls.append(Impl(name, "baseline", build))

    if "eager" in args.baseline_list:
        baseline("eager", eager_linear_fn(divergence, T))
    if "compile" in args.baseline_list:
        baseline("compile", eager_linear_fn(divergence, T), compile_it=True)
    if "liger" in args.baseline_list and liger.available:
        for name, make in liger.fused_linear_makers(divergence, T):
            def build(x: LinearInputs, make=make) -> Runner:
                sh, sw = x.fresh_student()
                return Runner(make(sh, sw, x), [sh, sw])
            impls.append(Impl(name, "baseline", build))

    fused = getattr(fastkd, "fused_linear_kd_loss", None)
    for name in args.backend_list if fused is not None else ():
        def build(x: LinearInputs, name=name) -> Runner:
            sh, sw = x.fresh_student()
            return Runner(lambda: fused(sh, sw, x.teacher_hidden, x.teacher_weight, None, divergence=divergence,
                                        temperature=T, beta=BETA, backend=name), [sh, sw])
        impls.append(Impl(f"fastkd[{name}]", "fastkd", build))
    return impls


# --- Liger-Kernel (optional) -------------------------------------------------------------

class Liger:
    """Liger-Kernel baselines, when `import liger_kernel` works and the device is CUDA.

    Liger takes log-probabilities (its kernels do not apply the temperature or T^2), so
    the softmaxes run in eager PyTorch and the result is scaled by T^2 to match fastkd's
    `t_squared=True`; the loss-error columns then check that the conventions line up.
    """

    def __init__(self, device: torch.device, wanted: bool):
        self.available, self.note, self.version = False, None, None
        if not wanted:
            return
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
            self.note = f"liger: skipped, `import liger_kernel` failed ({type(e).__name__}: {e})"
            return
        self.version = _dist_version("liger-kernel") or _dist_version("liger_kernel")
        if device.type != "cuda":
            self.note = "liger: skipped, its kernels are Triton GPU kernels (needs --device cuda)"
            return
        self.available = True

    @staticmethod
    def _transformers(name):
        import liger_kernel.transformers as lt
        return getattr(lt, name, None)

    # divergence -> (Liger module, its arguments, what it takes: log-probabilities or probabilities)
    KD_MODULES = {
        "forward_kl": ("LigerKLDIVLoss", {"reduction": "batchmean", "log_target": True}, "log"),
        # Liger's generalised JSD: beta = 1 is its reverse-KL special case (as in TRL).
        "reverse_kl": ("LigerJSD", {"beta": 1.0}, "log"),
        "jsd": ("LigerJSD", {"beta": BETA}, "log"),
        "tvd": ("LigerTVDLoss", {"reduction": "batchmean"}, "prob"),
    }

    def kd_loss_maker(self, divergence: str, T: float) -> Optional[Callable]:
        """A factory of `loss(s, t)`, or None when this Liger has no such loss.

        The Liger module is constructed by the factory, inside the row's error handling:
        some Liger versions reject arguments (e.g. LigerJSD asserted 0 < beta < 1).
        """
        name, kwargs, takes = self.KD_MODULES[divergence]
        cls = self._transformers(name)
        if cls is None:
            return None

        def make():
            crit = cls(**kwargs)

            def loss(s, t):
                ls, lt = F.log_softmax(s.float() / T, dim=-1), F.log_softmax(t.float() / T, dim=-1)
                if takes == "prob":
                    ls, lt = ls.exp(), lt.exp()
                return crit(ls, lt) * T * T
            return loss
        return make

    def fused_linear_makers(self, divergence: str, T: float):
        """(row name, make(sh, sw, inputs) -> loss fn) for Liger's fused-linear JSD losses."""
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}.get(divergence)
        if beta is None:
            return []
        out = []
        cls = self._transformers("LigerFusedLinearJSD")
        if cls is not None:
            def make(sh, sw, x):
                crit = cls(jsd_beta=beta, temperature=T)
                return lambda: crit(sh, sw, x.teacher_hidden, x.teacher_weight, None) * T * T
            out.append(("liger", make))
        chunked = self._chunked("LigerFusedLinearJSDLoss")
        if chunked is not None and divergence == "jsd":  # its beta sits on the other side: 0.5 only
            def make_chunked(sh, sw, x):
                crit = chunked(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=T)
                # Newer versions take (..., true_labels, student_bias, teacher_bias).
                extra = (None, None) if "student_bias" in inspect.signature(crit.forward).parameters else ()
                return lambda: crit(sh, sw, x.teacher_hidden, x.teacher_weight, x.labels, *extra) * T * T
            out.append(("liger_chunked", make_chunked))
        return out

    @staticmethod
    def _chunked(name):
        try:
            import liger_kernel.chunked_loss as lc
        except ImportError:
            return None
        return getattr(lc, name, None)


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------
# One case: every implementation on the same inputs

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


def run_impl(impl: Impl, inputs, device, args, reference_out: Dict) -> Dict:
    """Build, check against the eager result, time and measure one implementation."""
    row: Dict = {"impl": impl.name, "kind": impl.kind}
    runner = None
    try:
        runner = impl.build(inputs)
        # The first call (on untouched inputs: inplace overwrites them) gives the values to check.
        runner.clear()
        loss = float(runner.run())
        grad = inputs.grad_of(runner)
        row["loss"] = loss
        if impl.name == "eager":
            reference_out["loss"], reference_out["grad"] = loss, grad.detach().clone()
        elif "loss" in reference_out:
            row["loss_rel_err"] = abs(loss - reference_out["loss"]) / max(abs(reference_out["loss"]), 1e-30)
            row["grad_rel_err"] = rel_err(grad, reference_out["grad"])
        grad = None
        if runner.compile_s is not None:
            row["compile_s"] = runner.compile_s
        if device.type == "cuda":
            times = time_cuda(runner.run, runner.leaves, args.reps)
        else:
            times = time_cpu(runner.run, runner.clear, args.reps, args.warmup)
        row["times_s"] = times
        row["time_s"] = statistics.median(times)
        row["peak_extra_bytes"] = peak_extra_bytes(runner.run, runner.clear, device)
    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if os.environ.get("FASTKD_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        if runner is not None:
            runner.clear()
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: List[Dict]) -> None:
    """Speedup of each row against each baseline timed on the same case (> 1 = faster)."""
    base = {r["impl"]: r.get("time_s") for r in rows if r["kind"] == "baseline"}
    for r in rows:
        for b in ("eager", "compile", "liger"):
            if r.get("time_s") and base.get(b):
                r[f"speedup_vs_{b}"] = base[b] / r["time_s"]


def floor_seconds(op: str, shape, dtype: torch.dtype, machine: Dict) -> Optional[float]:
    """The time below which no implementation can go (docs/measuring.md).

    kd: read s and t once, write ds once = 3*N*V*bytes at the measured copy bandwidth.
    fused_linear: the matmul FLOPs (two forward logits, grad_hidden, grad_weight) at the
    measured matmul throughput; the loss itself is noise next to them.
    """
    if op == "kd":
        n, v = shape
        return 3 * n * v * torch.finfo(dtype).bits // 8 / machine["copy_bandwidth_Bps"]
    n, hs, ht, v = shape
    flops = 2 * n * v * (hs + ht) + 2 * 2 * n * v * hs
    return flops / machine["matmul_flops"]


def run_case(args, shape, divergence, device, dtype, machine, liger, counter) -> List[Dict]:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.op == "kd":
        n, v = shape
        inputs = KDInputs(random_logits(n, v, dtype, device, gen), random_logits(n, v, dtype, device, gen))
        impls = kd_impls(args, divergence, liger)
    else:
        inputs = make_linear_inputs(shape, dtype, device, gen)
        impls = linear_impls(args, divergence, liger)
    floor = floor_seconds(args.op, shape, dtype, machine)
    reference_out: Dict = {}
    rows = []
    for impl in impls:
        row = {"shape": "x".join(map(str, shape)), "divergence": divergence, "floor_s": floor}
        row.update(run_impl(impl, inputs, device, args, reference_out))
        if row.get("time_s"):
            row["pct_of_floor"] = 100.0 * floor / row["time_s"]
        rows.append(row)
        counter[0] += 1
        print(progress_line(row, counter), flush=True)
    add_ratios(rows)
    return rows


def progress_line(row: Dict, counter) -> str:
    head = f"[{counter[0]:>3}/{counter[1]}] {row['divergence']:<10} {row['shape']:<22} {row['impl']:<24}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    parts = [f"{row['time_s'] * 1e3:9.3f} ms", f"{row['pct_of_floor']:5.1f}% of floor",
             f"peak +{fmt_mib(row.get('peak_extra_bytes'))} MiB"]
    if "loss_rel_err" in row:
        parts.append(f"loss err {row['loss_rel_err']:.1e} grad err {row['grad_rel_err']:.1e}")
    if "compile_s" in row:
        parts.append(f"(compiled in {row['compile_s']:.1f} s)")
    return head + " " + "  ".join(parts)


# ---------------------------------------------------------------------------------------
# Output: markdown, JSON, plot

def fmt_mib(b) -> str:
    return "n/a" if b is None else f"{b / MIB:.1f}"


def fmt_flops(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def fmt(x, spec, none="–") -> str:
    return none if x is None else format(x, spec)


def markdown(rows: List[Dict], meta: Dict) -> str:
    m = meta["machine"]
    lines = [
        f"## fastkd benchmark: op `{meta['op']}` on {meta['device_name']} ({meta['device']})",
        "",
        f"- command: `{meta['command']}`",
        f"- {meta['date']}; torch {meta['torch']}, triton {meta['triton'] or 'n/a'}, "
        f"liger {meta['liger'] or 'n/a'}; dtype {meta['dtype']}, T = {meta['temperature']}, beta = {BETA}; "
        f"threads {meta['threads']}; 1-min load average {meta['loadavg_1min']['start']:.1f} at start, "
        f"{meta['loadavg_1min']['end']:.1f} at end",
        f"- copy bandwidth {m['copy_bandwidth_Bps'] / 1e9:.1f} GB/s (read + write)"
        + (f"; {meta['dtype']} matmul {fmt_flops(m['matmul_flops'])}" if "matmul_flops" in m else ""),
        f"- floor: {meta['floor_rule']}; time = median of forward + backward",
        "- speedup = baseline time / row time (> 1: faster); errors are relative to the eager row",
        "",
        "| shape | divergence | implementation | time (ms) | % of floor | vs eager | vs compile | vs liger "
        "| peak extra (MiB) | loss rel. err | grad rel. err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['divergence']} | {r['impl']} | error: {r['error'].replace('|', '/')} "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['divergence']} | {r['impl']} | {r['time_s'] * 1e3:.2f} "
            f"| {r['pct_of_floor']:.1f}% | {fmt(r.get('speedup_vs_eager'), '.2f')}× "
            f"| {fmt(r.get('speedup_vs_compile'), '.2f')}× | {fmt(r.get('speedup_vs_liger'), '.2f')}× "
            f"| {fmt_mib(r.get('peak_extra_bytes'))} | {fmt(r.get('loss_rel_err'), '.1e')} "
            f"| {fmt(r.get('grad_rel_err'), '.1e')} |")
    lines = [ln.replace("–×", "–") for ln in lines]
    if meta["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], meta: Dict, path: Path) -> Optional[str]:
    """Time per implementation per shape, one panel per divergence (log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install fastkd[bench])"
    ok = [r for r in rows if r.get("time_s")]
    divs = list(dict.fromkeys(r["divergence"] for r in ok))
    if not divs:
        return "plot skipped: no successful rows"
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    panel_width = max(5.0, 0.3 * len(shapes) * len(impls) + 2.0)
    fig, axes = plt.subplots(1, len(divs), figsize=(panel_width * len(divs), 4.5), squeeze=False)
    width = 0.8 / len(impls)
    for ax, div in zip(axes[0], divs):
        for j, name in enumerate(impls):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                hit = [r for r in ok if r["divergence"] == div and r["shape"] == shape and r["impl"] == name]
                if hit:
                    xs.append(i - 0.4 + (j + 0.5) * width)
                    ys.append(hit[0]["time_s"] * 1e3)
            ax.bar(xs, ys, width, label=name)
        for i, shape in enumerate(shapes):  # the floor, as a black line across each group
            fl = [r["floor_s"] for r in ok if r["shape"] == shape and r["divergence"] == div]
            if fl:
                ax.hlines(fl[0] * 1e3, i - 0.45, i + 0.45, colors="black", linestyles="--",
                          label="floor" if i == 0 else None)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_title(div)
        ax.set_ylabel("forward + backward (ms)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"fastkd {meta['op']} — {meta['device_name']} — {meta['dtype']}, T={meta['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------
# Environment description

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def command_line(argv: Optional[Sequence[str]]) -> str:
    """The command as typed (argv given: the equivalent command of an in-process call)."""
    words = sys.argv if argv is None else [sys.argv[0]] + list(argv)
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + words)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    notes: List[str] = []

    liger = Liger(device, "liger" in args.baseline_list)
    if liger.note:
        notes.append(liger.note)
    if args.op == "fused_linear" and not hasattr(fastkd, "fused_linear_kd_loss"):
        notes.append("fastkd.fused_linear_kd_loss does not exist in this fastkd: no fastkd rows for "
                     "--op fused_linear (baselines only)")
    if args.inplace and args.op == "fused_linear":
        notes.append("--inplace has no meaning for fused_linear (no logits buffer to overwrite); ignored")
    for name in args.backend_list:
        kernels = fastkd.ops.get_backend(name)
        if name != "torch" and (kernels is None or not kernels.supports(device)):
            notes.append(f"fastkd[{name}] cannot run on {args.device} here; its rows will show the error")
    if not args.backend_list:
        notes.append(f"no fastkd kernel backend is available for {args.device}")
    if device.type == "cpu":
        notes.append("peak extra memory on CPU = growth of the peak resident set (VmHWM) during one call; "
                     "a lower bound for tiny shapes (see benchmarks/README.md)")
    for n in notes:
        print("note:", n, flush=True)

    load_start = os.getloadavg()  # CPU timings mean little on a busy machine: record how busy
    print(f"measuring {args.device} ceilings ...", flush=True)
    machine = {"copy_bandwidth_Bps": copy_bandwidth(device, args.quick)}
    if args.op == "fused_linear":
        machine["matmul_flops"] = matmul_throughput(device, dtype, args.quick)
    print(f"copy bandwidth {machine['copy_bandwidth_Bps'] / 1e9:.1f} GB/s"
          + (f", {args.dtype} matmul {fmt_flops(machine['matmul_flops'])}" if "matmul_flops" in machine else ""),
          flush=True)

    impls_of = kd_impls if args.op == "kd" else linear_impls
    counter = [0, len(args.shape_list) * sum(len(impls_of(args, d, liger)) for d in args.divergence_list)]
    rows: List[Dict] = []
    for shape in args.shape_list:
        for divergence in args.divergence_list:
            rows += run_case(args, shape, divergence, device, dtype, machine, liger, counter)

    now = _dt.datetime.now()
    meta = {
        "op": args.op, "device": args.device, "device_name": device_name(device),
        "dtype": args.dtype, "temperature": args.temperature, "beta": BETA,
        "torch": torch.__version__, "triton": getattr(triton, "__version__", None),
        "liger": liger.version, "fastkd": getattr(fastkd, "__version__", None),
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "date": now.isoformat(timespec="seconds"), "command": command_line(argv),
        "timer": timer_name(device), "reps": args.reps, "machine": machine, "notes": notes,
        "floor_rule": ("3·N·V·bytes / copy bandwidth" if args.op == "kd"
                       else "2·N·V·(Hs+Ht) + 4·N·V·Hs FLOPs / matmul throughput"),
        "backends": args.backend_list, "baselines": args.baseline_list,
        "loadavg_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{args.op}_{args.device}_{now.strftime('%Y%m%d-%H%M%S')}"
    why = plot(rows, meta, stem.with_suffix(".png"))
    if why:
        notes.append(why)
    table = markdown(rows, meta)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(table)
    print(f"wrote {stem}.md, {stem}.json" + ("" if why else f", {stem}.png"))
    return {"meta": meta, "rows": rows, "json": str(stem.with_suffix(".json"))}


def timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton.testing.do_bench (median, L2 flushed)" if triton is not None else "CUDA events (median)"
    return "time.perf_counter (median)"


if __name__ == "__main__":
    main()
