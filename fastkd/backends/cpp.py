"""The C++ backends ``cpu`` and ``cuda``: loading fastkd._C on the first call that needs it.

Order: the prebuilt module (from ``pip install``), else a JIT build with ninja into a
cache directory (once per source change), else None with a warning that carries the
compiler's own error, in which case the ``cpu``/``cuda`` backends are unavailable and
``auto`` falls back to Triton or torch. ``import fastkd`` never builds anything.
``FASTKD_NO_JIT=1`` skips the JIT build; ``FASTKD_BUILD_DIR`` moves its cache.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import sys
import time
import warnings

import torch

from . import (KernelBackend, ShardPhases, fake_forward, fake_forward_inplace, fake_row_stats, fake_scale_grad_,
               fake_shard_row_stats, fake_shard_row_sums, fake_shard_write_grad, fake_sparse_forward,
               fake_sparse_forward_inplace, fake_multi_forward, fake_multi_forward_inplace,
               fake_forward_stats, fake_forward_stats_inplace, fake_sparse_forward_stats,
               fake_sparse_forward_stats_inplace)

EXT_NAME = "fastkd_C"


def build_dir() -> str:
    return os.environ.get("FASTKD_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastkd", "build")


def _is_stale(directory: str, sources: list) -> bool:
    """Whether the cached build is missing or older than a source (so loading compiles)."""
    built = glob.glob(os.path.join(directory, EXT_NAME + "*.so"))
    if not built:
        return True
    newest_source = max(os.path.getmtime(p) for p in sources + _headers())
    return min(os.path.getmtime(p) for p in built) < newest_source


def _headers() -> list:
    from . import cpp_build as _build

    return glob.glob(os.path.join(_build.CSRC, "**", "*.h"), recursive=True) + glob.glob(
        os.path.join(_build.CSRC, "**", "*.cuh"), recursive=True)


def compiler_errors(log: str, limit: int = 8) -> list:
    """The compiler's own error lines from a build log (not the command lines around them)."""
    lines = [ln.strip() for ln in log.splitlines()]
    # "file:line:col: error: ..." (gcc/clang), "file(line): error: ..." (nvcc), "error: ..." (linker, nvcc)
    pattern = re.compile(r"(^|:\d+:(\d+:)? |\(\d+\): )(fatal )?error[: ]")
    errors = [ln for ln in lines if pattern.search(ln)]
    return errors[:limit]


def _jit_build():
    from torch.utils.cpp_extension import load

    from . import cpp_build as _build

    sources = _build.cpu_sources()
    kwargs = dict(extra_cflags=_build.cxx_flags(), extra_ldflags=_build.extra_ldflags())
    if _build.want_cuda():
        archs = _build.cuda_arch_list()
        sources = sources + _build.cuda_sources()
        kwargs.update(extra_cflags=kwargs["extra_cflags"] + _build.cuda_cxx_flags(archs),
                      extra_cuda_cflags=_build.nvcc_flags(archs))
    directory = build_dir()
    os.makedirs(directory, exist_ok=True)
    building = _is_stale(directory, sources)
    if building:
        print(f"fastkd: no prebuilt extension; compiling fastkd._C into {directory} "
              "(once per source change, about a minute)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = load(name=EXT_NAME, sources=sources, build_directory=directory, verbose=False, **kwargs)
    except Exception as exc:
        log_path = os.path.join(directory, "build_error.log")
        with open(log_path, "w") as f:
            f.write(str(exc))
        errors = compiler_errors(str(exc)) or [str(exc).strip().splitlines()[0] if str(exc).strip()
                                               else type(exc).__name__]
        raise RuntimeError("\n  ".join(["the build failed:"] + errors + [f"full log: {log_path}"])) from exc
    if building:
        print(f"fastkd: built fastkd._C in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def import_prebuilt():
    """``(module, None)`` for the prebuilt fastkd._C, else ``(None, why)``: why it is absent,
    or the import error of one that exists but does not load (built against another torch,
    a missing library), which must not pass for "no extension"."""
    try:
        from .. import _C  # noqa: F401

        return _C, None
    except ImportError as exc:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        found = glob.glob(os.path.join(package, "_C*.so")) + glob.glob(os.path.join(package, "_C*.pyd"))
        if found:
            return None, f"the prebuilt {os.path.basename(found[0])} does not load ({exc})"
        return None, "no prebuilt extension"


@functools.lru_cache(maxsize=None)
def load_extension():
    """The extension module, or None when it can be neither imported nor built."""
    module, why = import_prebuilt()
    if module is not None:
        return module
    if os.environ.get("FASTKD_NO_JIT", "0") == "1":
        warnings.warn(f"fastkd: {why} and FASTKD_NO_JIT=1; the cpu/cuda backends are unavailable, "
                      "using Triton/torch (the torch backend is about 10x slower on the CPU)",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        return _jit_build()
    except Exception as exc:  # compiler missing, headers missing, build error...
        warnings.warn(f"fastkd: could not build the C++ extension, so the cpu/cuda backends are unavailable "
                      f"and Triton/torch run instead (the torch backend is about 10x slower on the CPU); "
                      f"{exc}", RuntimeWarning, stacklevel=3)
        return None


def has_cuda_kernels() -> bool:
    ext = load_extension()
    return bool(ext is not None and getattr(ext, "with_cuda", False))


def empty_cpu_grad_cache() -> int:
    """Release the freed CPU gradient buffers fastkd keeps for reuse; returns the bytes.

    The CPU backend keeps up to ``FASTKD_CPU_GRAD_CACHE_MB`` (default 1024; 0 disables) of
    freed gradient buffers so the next call skips the page faults of fresh memory, as
    PyTorch's CUDA caching allocator does on the GPU (``torch.cuda.empty_cache``'s twin).
    """
    if load_extension.cache_info().currsize == 0:
        return 0  # the extension was never loaded, so nothing was cached
    ext = load_extension()
    return int(ext.empty_cpu_grad_cache()) if ext is not None and hasattr(ext, "empty_cpu_grad_cache") else 0


def device_code_problem(capability: tuple, archs: str) -> str | None:
    """What a device of ``capability`` (major, minor) misses in fastkd._C built for ``archs``
    (its ``cuda_archs``, "8.0,9.0a"), or None: no code at all, or no cluster kernel on an
    sm_90 or newer device (its code runs from an older architecture's SASS or PTX)."""
    from . import cpp_build as _build

    cc = capability[0] * 10 + capability[1]
    entries = [_build.parse_arch(e) for e in archs.split(",") if e]
    # What the driver loads: SASS of the device's major and at most its minor, else PTX of
    # at most the device's architecture, compiled at load; "a" code runs only on its own
    # architecture, "f" code only within its major (family).
    def fits(sm, suffix, ptx):
        if suffix == "a":
            return sm == cc
        return sm <= cc and (ptx and suffix != "f" or sm // 10 == cc // 10)

    sass = [sm for sm, suffix, _ in entries if fits(sm, suffix, False)]
    ptx = [sm for sm, suffix, ptx in entries if ptx and fits(sm, suffix, True)]
    runs = max(sass or ptx or [0])
    device = f"sm_{cc}"
    if not runs:
        return (f"fastkd._C was built for {archs.replace(',', ';')} and has no code for this {device} device: "
                f"its CUDA kernels will fail with 'no kernel image is available'; rebuild with "
                f"TORCH_CUDA_ARCH_LIST including {capability[0]}.{capability[1]}, or use backend='triton'")
    if cc >= _build.CLUSTER_ARCH > runs:
        return (f"fastkd._C was built for {archs.replace(',', ';')}, without sm_90 code: on this {device} "
                f"device the cuda backend runs sm_{runs} code, with no cluster kernel (two-pass only); "
                f"rebuild with TORCH_CUDA_ARCH_LIST including 9.0a")
    return None


@functools.lru_cache(maxsize=None)
def _check_device_code(index: int) -> None:
    """Warns (once per device) when fastkd._C lacks code for CUDA device ``index``."""
    archs = getattr(load_extension(), "cuda_archs", None)
    if archs is None:  # built without the define (before it existed, or by hand)
        return
    problem = device_code_problem(tuple(torch.cuda.get_device_capability(index)), archs)
    if problem:
        warnings.warn(f"fastkd: cuda:{index}: {problem}", RuntimeWarning, stacklevel=2)


def _runs_on_cuda(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if not torch.compiler.is_compiling():
        _check_device_code(torch.cuda.current_device() if device.index is None else device.index)
    return True


# ---------------------------------------------------------------------------------------
# Registration: one set of operators (torch.ops.fastkd.*) serves both devices.

def grad_row_stride(student: torch.Tensor) -> int:
    """The row stride of the gradient ``kd_forward`` allocates: on CUDA the least one >= the
    student's width that is congruent to the student's row stride modulo 16 bytes, so
    every gradient row is aligned like its student row (csrc/cuda/kd_cuda.h: grad_alloc);
    contiguous elsewhere. The fake must give the real strides, or torch.compile's
    generated code would index the gradient wrongly."""
    n, cols = student.shape
    if student.device.type != "cuda" or n <= 1:
        return cols
    per16 = 16 // student.element_size()
    return cols + (student.stride(0) - cols) % per16


def fake_kd_forward(student, teacher, labels, grad_scale, row_stats, ints, floats):
    loss, grad = fake_forward(student, teacher, labels, grad_scale, row_stats, ints, floats)
    stride = grad_row_stride(student)
    if stride != student.shape[1]:
        grad = torch.empty_strided(tuple(student.shape), (stride, 1), dtype=student.dtype, device=student.device)
    return loss, grad


def fake_kd_multi_forward(student, teachers, weights, labels, grad_scale, ints, floats):
    loss, grad = fake_multi_forward(student, teachers, weights, labels, grad_scale, ints, floats)
    stride = grad_row_stride(student)
    if stride != student.shape[1]:
        grad = torch.empty_strided(tuple(student.shape), (stride, 1), dtype=student.dtype, device=student.device)
    return loss, grad


def fake_kd_forward_stats(student, teacher, labels, grad_scale, ints, floats):
    loss, grad, stats = fake_forward_stats(student, teacher, labels, grad_scale, ints, floats)
    stride = grad_row_stride(student)
    if stride != student.shape[1]:
        grad = torch.empty_strided(tuple(student.shape), (stride, 1), dtype=student.dtype, device=student.device)
    return loss, grad, stats


def backends() -> tuple:
    """The ``cpu`` backend, and ``cuda`` when the extension has CUDA kernels; () without it."""
    ext = load_extension()
    if ext is None:
        return ()
    for op, fake in (("kd_forward", fake_kd_forward), ("kd_forward_inplace", fake_forward_inplace),
                     ("row_stats", fake_row_stats), ("scale_grad_", fake_scale_grad_),
                     ("shard_row_stats", fake_shard_row_stats), ("shard_row_sums", fake_shard_row_sums),
                     ("shard_write_grad", fake_shard_write_grad)):
        torch.library.register_fake(f"fastkd::{op}")(fake)
    ops = torch.ops.fastkd
    # An extension built before the sparse operators existed has none (no sparse kernels then).
    has_sparse = hasattr(ext, "sparse_int_settings")
    if has_sparse:
        torch.library.register_fake("fastkd::sparse_kd_forward")(fake_sparse_forward)
        torch.library.register_fake("fastkd::sparse_kd_forward_inplace")(fake_sparse_forward_inplace)

    def sparse_forward(student, ids, logprobs, labels, grad_scale, cfg):
        return ops.sparse_kd_forward(student, ids, logprobs, labels, grad_scale, *cfg.kernel_settings())

    def sparse_forward_inplace(student, ids, logprobs, labels, grad_scale, cfg):
        return ops.sparse_kd_forward_inplace(student, ids, logprobs, labels, grad_scale, *cfg.kernel_settings())

    # An extension built before the several-teachers operators existed has none.
    has_multi = hasattr(ext, "multi_int_settings")
    if has_multi:
        torch.library.register_fake("fastkd::kd_multi_forward")(fake_kd_multi_forward)
        torch.library.register_fake("fastkd::kd_multi_forward_inplace")(fake_multi_forward_inplace)

    def multi_forward(student, teachers, weights, labels, grad_scale, cfg):
        return ops.kd_multi_forward(student, list(teachers), weights, labels, grad_scale,
                                    *cfg.multi_kernel_settings())

    def multi_forward_inplace(student, teachers, weights, labels, grad_scale, cfg):
        return ops.kd_multi_forward_inplace(student, list(teachers), weights, labels, grad_scale,
                                            *cfg.multi_kernel_settings())

    extra = dict(multi_forward=multi_forward, multi_forward_inplace=multi_forward_inplace) if has_multi else {}
    # The per-token diagnostics' operators (an older extension has none).
    if hasattr(ext, "stats_width"):
        for op, fake in (("kd_forward_stats", fake_kd_forward_stats),
                         ("kd_forward_stats_inplace", fake_forward_stats_inplace),
                         ("sparse_kd_forward_stats", fake_sparse_forward_stats),
                         ("sparse_kd_forward_stats_inplace", fake_sparse_forward_stats_inplace)):
            torch.library.register_fake(f"fastkd::{op}")(fake)
        extra.update(
            forward_stats=lambda student, teacher, labels, grad_scale, cfg: ops.kd_forward_stats(
                student, teacher, labels, grad_scale, *cfg.kernel_settings()),
            forward_stats_inplace=lambda student, teacher, labels, grad_scale, cfg: ops.kd_forward_stats_inplace(
                student, teacher, labels, grad_scale, *cfg.kernel_settings()),
            sparse_forward_stats=lambda student, ids, logprobs, labels, grad_scale, cfg: ops.sparse_kd_forward_stats(
                student, ids, logprobs, labels, grad_scale, *cfg.kernel_settings()),
            sparse_forward_stats_inplace=lambda student, ids, logprobs, labels, grad_scale, cfg:
                ops.sparse_kd_forward_stats_inplace(student, ids, logprobs, labels, grad_scale, *cfg.kernel_settings()))

    def forward(student, teacher, labels, grad_scale, cfg, row_stats=None):
        return ops.kd_forward(student, teacher, labels, grad_scale, row_stats, *cfg.kernel_settings())

    def forward_inplace(student, teacher, labels, grad_scale, cfg, row_stats=None):
        return ops.kd_forward_inplace(student, teacher, labels, grad_scale, row_stats, *cfg.kernel_settings())

    cpu = KernelBackend("cpu", forward, forward_inplace, ops.scale_grad_, lambda device: device.type == "cpu",
                        dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), shard=shard_phases(ops),
                        sparse_forward=sparse_forward if has_sparse else None,
                        sparse_forward_inplace=sparse_forward_inplace if has_sparse else None, **extra)
    if not getattr(ext, "with_cuda", False):
        return (cpu,)
    return cpu, KernelBackend("cuda", forward, forward_inplace, ops.scale_grad_, _runs_on_cuda,
                              shard=shard_phases(ops),
                              sparse_forward=sparse_forward if has_sparse else None,
                              sparse_forward_inplace=sparse_forward_inplace if has_sparse else None, **extra)


def shard_phases(ops) -> ShardPhases:
    """The per-shard phases of the vocab-parallel loss, as operators of ``ops`` (torch.ops.fastkd)."""
    def row_stats(student, teacher, cfg):
        return ops.shard_row_stats(student, teacher, *cfg.kernel_settings())

    def row_sums(student, teacher, stats, cfg):
        return ops.shard_row_sums(student, teacher, stats, *cfg.kernel_settings())

    def write_grad(student, teacher, labels, grad_scale, stats, sums, vocab_start, cfg):
        return ops.shard_write_grad(student, teacher, labels, grad_scale, stats, sums, vocab_start,
                                    *cfg.kernel_settings())

    return ShardPhases(row_stats, row_sums, write_grad)
