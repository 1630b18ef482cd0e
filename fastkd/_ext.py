"""Loading the compiled extension fastkd._C.

Order: the prebuilt module (from ``pip install``), else a JIT build with ninja into a
cache directory (once per source change), else None with a one-line warning, in which
case the ``cpu``/``cuda`` backends are unavailable and ``auto`` falls back to Triton or
torch. ``FASTKD_NO_JIT=1`` skips the JIT build.
"""
from __future__ import annotations

import functools
import os
import warnings


def _jit_build():
    from torch.utils.cpp_extension import load

    from . import _build

    sources = _build.cpu_sources()
    kwargs = dict(extra_cflags=_build.cxx_flags(), extra_ldflags=_build.extra_ldflags())
    if _build.want_cuda():
        sources = sources + _build.cuda_sources()
        kwargs.update(extra_cflags=kwargs["extra_cflags"] + ["-DFASTKD_WITH_CUDA"],
                      extra_cuda_cflags=_build.nvcc_flags())
    build_dir = os.environ.get("FASTKD_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastkd", "build")
    os.makedirs(build_dir, exist_ok=True)
    return load(name="fastkd_C", sources=sources, build_directory=build_dir, verbose=False, **kwargs)


@functools.lru_cache(maxsize=None)
def load_extension():
    """The extension module, or None when it can be neither imported nor built."""
    try:
        from . import _C  # noqa: F401

        return _C
    except ImportError:
        pass
    if os.environ.get("FASTKD_NO_JIT", "0") == "1":
        warnings.warn("fastkd: no compiled extension (FASTKD_NO_JIT=1); using the Triton/torch backends",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        return _jit_build()
    except Exception as exc:  # compiler missing, headers missing, build error...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"fastkd: could not build the C++ extension ({first}); using the Triton/torch backends",
                      RuntimeWarning, stacklevel=3)
        return None


def has_cuda_kernels() -> bool:
    ext = load_extension()
    return bool(ext is not None and getattr(ext, "with_cuda", False))
