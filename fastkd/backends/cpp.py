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

from . import KernelBackend, fake_forward, fake_forward_inplace, fake_row_stats, fake_scale_grad_

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
        sources = sources + _build.cuda_sources()
        kwargs.update(extra_cflags=kwargs["extra_cflags"] + ["-DFASTKD_WITH_CUDA"],
                      extra_cuda_cflags=_build.nvcc_flags())
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


@functools.lru_cache(maxsize=None)
def load_extension():
    """The extension module, or None when it can be neither imported nor built."""
    try:
        from .. import _C  # noqa: F401

        return _C
    except ImportError:
        pass
    if os.environ.get("FASTKD_NO_JIT", "0") == "1":
        warnings.warn("fastkd: no compiled extension (FASTKD_NO_JIT=1); the cpu/cuda backends are unavailable, "
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


def backends() -> tuple:
    """The ``cpu`` backend, and ``cuda`` when the extension has CUDA kernels; () without it."""
    ext = load_extension()
    if ext is None:
        return ()
    for op, fake in (("kd_forward", fake_kd_forward), ("kd_forward_inplace", fake_forward_inplace),
                     ("row_stats", fake_row_stats), ("scale_grad_", fake_scale_grad_)):
        torch.library.register_fake(f"fastkd::{op}")(fake)
    ops = torch.ops.fastkd

    def forward(student, teacher, labels, grad_scale, cfg, row_stats=None):
        return ops.kd_forward(student, teacher, labels, grad_scale, row_stats, *cfg.kernel_settings())

    def forward_inplace(student, teacher, labels, grad_scale, cfg, row_stats=None):
        return ops.kd_forward_inplace(student, teacher, labels, grad_scale, row_stats, *cfg.kernel_settings())

    cpu = KernelBackend("cpu", forward, forward_inplace, ops.scale_grad_, lambda device: device.type == "cpu",
                        dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    if not getattr(ext, "with_cuda", False):
        return (cpu,)
    return cpu, KernelBackend("cuda", forward, forward_inplace, ops.scale_grad_, lambda device: device.type == "cuda")
