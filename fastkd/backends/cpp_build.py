"""What fastkd._C is built from, and with which flags.

Shared by ``setup.py`` (ahead-of-time build) and ``fastkd.backends.cpp`` (JIT build with ninja on
first use), so the two can never drift apart. Imports nothing from fastkd.

Environment:
  FASTKD_CPU_ARCH         value of -march for the CPU kernel (default: native)
  FASTKD_BUILD_CUDA       0 skips the CUDA kernels even when torch and nvcc have CUDA
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: "8.0;9.0a")

No flag here names a C++ standard: torch.utils.cpp_extension adds the one the installed
torch needs (-std=c++17 up to some release, -std=c++20 since), for g++ and for nvcc,
but only when none was passed, so a hard-coded -std would override it and break either
old or new torch. ``torch_std_flag()`` gives that standard to scripts that call the
compilers themselves (.ci/compile_cuda.sh).
"""
from __future__ import annotations

import glob
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def cpu_sources() -> list:
    return [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))


def cuda_sources() -> list:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))


def want_cuda() -> bool:
    """CUDA kernels are built when torch has CUDA, nvcc exists and nobody said no."""
    if os.environ.get("FASTKD_BUILD_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or not cuda_sources():
        return False
    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def cxx_flags() -> list:
    arch = os.environ.get("FASTKD_CPU_ARCH", "native")
    # No trapping math: lets GCC if-convert the selects in the exp/log polynomials so the
    # row loops vectorise (10x); NaN and inf semantics are unchanged (no -ffast-math).
    return ["-O3", "-fopenmp", f"-march={arch}", "-fno-trapping-math", "-fno-math-errno"]


def cuda_gencode_flags(arch_list: str | None = None) -> list:
    """-gencode flags for TORCH_CUDA_ARCH_LIST entries such as "8.0;9.0a" or "9.0+PTX"."""
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    flags = []
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        entry = entry.replace("+PTX", "")
        suffix = "a" if entry.endswith("a") else ""
        num = entry.rstrip("a").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num}{suffix},code=compute_{num}{suffix}")
    return flags


def nvcc_flags() -> list:
    return ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DFASTKD_WITH_CUDA"] + cuda_gencode_flags()


def torch_std_flag() -> str:
    """The -std flag for the installed torch's headers, for compiler calls made outside
    torch.utils.cpp_extension: the newer of C++17 and what ATen/ATen.h requires (its
    ``#error C++NN or later compatible compiler is required`` line)."""
    from torch.utils.cpp_extension import include_paths

    std = 17
    for inc in include_paths():
        header = os.path.join(inc, "ATen", "ATen.h")
        if os.path.isfile(header):
            with open(header, encoding="utf-8", errors="replace") as f:
                found = re.search(r"C\+\+(\d+) or later compatible compiler is required", f.read())
            if found:
                std = max(std, int(found.group(1)))
            break
    return f"-std=c++{std}"


def extra_ldflags() -> list:
    return ["-fopenmp"]
