"""What fastkd._C is built from, and with which flags.

Shared by ``setup.py`` (ahead-of-time build) and ``fastkd.backends.cpp`` (JIT build with ninja on
first use), so the two can never drift apart. Imports nothing from fastkd.

Environment:
  FASTKD_CPU_ARCH         value of -march for the CPU kernel (default: native)
  FASTKD_BUILD_CUDA       unset: the CUDA kernels are built when they can be (below);
                          0: never; 1: always, and any reason not to is an error
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: "8.0;9.0a")

The CUDA kernels are built when torch has CUDA, nvcc is found (torch's CUDA_HOME, else
PATH) and nvcc's CUDA major version equals torch's (torch.version.cuda). On a major
mismatch torch.utils.cpp_extension refuses to compile, which would lose the CPU kernel
too, so the CUDA part is skipped with a warning instead (an error under
FASTKD_BUILD_CUDA=1).

TORCH_CUDA_ARCH_LIST is checked against the architectures that nvcc says it supports
(``nvcc --list-gpu-code``, asked once per process): entries it does not support (an
inherited list such as NGC's, down to 5.2, under nvcc 13) are dropped with a warning
naming them; an entry that cannot be parsed, or a list with nothing left, is an error.
A list without 9.0 (or 9.0a) builds no cluster kernel, which is warned about. The final
list goes into fastkd._C as ``cuda_archs``, and the ``cuda`` backend warns once per
device when fastkd._C has no code for it, or none with the cluster kernel for an sm_90
or newer device (``fastkd.backends.cpp.device_code_problem``).

No flag here names a C++ standard: torch.utils.cpp_extension adds the one the installed
torch needs (-std=c++17 up to some release, -std=c++20 since), for g++ and for nvcc,
but only when none was passed, so a hard-coded -std would override it and break either
old or new torch. ``torch_std_flag()`` gives that standard to scripts that call the
compilers themselves (.ci/compile_cuda.sh).
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import warnings

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(PACKAGE)


def _find_csrc() -> str:
    """The C++ sources: csrc/ of a source checkout (or unpacked sdist), else the copy that
    wheels carry as fastkd/_csrc (setup.py), so the JIT fallback works from an installed
    wheel too (e.g. after a torch upgrade that the prebuilt extension does not load with)."""
    checkout = os.path.join(ROOT, "csrc")
    packaged = os.path.join(PACKAGE, "_csrc")
    return checkout if os.path.isdir(checkout) or not os.path.isdir(packaged) else packaged


CSRC = _find_csrc()
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
# The first architecture with thread-block clusters (csrc/cuda/kd_cluster.cu).
CLUSTER_ARCH = 90


class CudaBuildWarning(UserWarning):
    """Something about the CUDA build that the user should know (and can fix)."""


def cpu_sources() -> list:
    return [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))


def cuda_sources() -> list:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))


def nvcc_path() -> str | None:
    """The nvcc that torch.utils.cpp_extension will run: $CUDA_HOME/bin/nvcc, else PATH's."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        path = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.isfile(path):
            return path
    return shutil.which("nvcc")


def cuda_headers_problem() -> str | None:
    """Why the CUDA toolkit's headers cannot be found where torch.utils.cpp_extension will look
    ($CUDA_HOME/include), or None. torch derives CUDA_HOME from the nvcc on PATH when it is
    not set, so a wrapper script such as /usr/local/bin/nvcc makes it /usr/local, whose
    include/ has no cuda_runtime.h: the CUDA build would then fail deep inside ninja."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return None
    return (f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (torch derives CUDA_HOME from the nvcc "
            f"on PATH when it is unset); set CUDA_HOME to the toolkit's root, e.g. /usr/local/cuda")


def run_nvcc(nvcc: str, *args: str) -> str:
    """nvcc's stdout for ``args`` (the one place that runs nvcc; tests replace it)."""
    return subprocess.run([nvcc, *args], check=True, capture_output=True, text=True, timeout=60).stdout


@functools.lru_cache(maxsize=None)
def nvcc_info(nvcc: str) -> tuple:
    """``((major, minor), supported)`` for ``nvcc``: its CUDA release and the SM numbers it
    can compile for (``{75, 80, 86, ..., 90, 100, ...}``, from ``--list-gpu-code``), or
    None for a part it could not tell. Asked once per nvcc and process."""
    try:
        found = re.search(r"release (\d+)\.(\d+)", run_nvcc(nvcc, "--version"))
        version = (int(found.group(1)), int(found.group(2))) if found else None
    except (OSError, subprocess.SubprocessError):
        version = None
    try:
        supported = frozenset(int(n) for n in re.findall(r"\bsm_(\d+)", run_nvcc(nvcc, "--list-gpu-code"))) or None
    except (OSError, subprocess.SubprocessError):  # nvcc before 11.0 has no --list-gpu-code
        supported = None
    return version, supported


def _cuda_skip() -> tuple:
    """``(reason, surprising)``: why the CUDA kernels are not built here (None: they are), and
    whether a user would expect them (torch and nvcc both have CUDA, yet no)."""
    if os.environ.get("FASTKD_BUILD_CUDA") == "0":
        return "FASTKD_BUILD_CUDA=0", False
    import torch

    if torch.version.cuda is None:
        return "torch has no CUDA (torch.version.cuda is None)", False
    if not cuda_sources():
        return "csrc/cuda has no sources", False
    nvcc = nvcc_path()
    if nvcc is None:
        return "nvcc was found neither in CUDA_HOME nor on PATH", False
    version = nvcc_info(nvcc)[0]
    if version is None:
        return f"could not get a CUDA version from `{nvcc} --version`", True
    torch_major = int(torch.version.cuda.split(".")[0])
    if version[0] != torch_major:
        return (f"torch was built with CUDA {torch.version.cuda} but {nvcc} is CUDA {version[0]}.{version[1]}: "
                f"torch.utils.cpp_extension refuses a different major version (and the kernels would need "
                f"another CUDA runtime than torch's); point CUDA_HOME at a CUDA {torch_major}.x toolkit"), True
    headers = cuda_headers_problem()
    if headers is not None:
        return headers, True
    return None, False


def cuda_skip_reason() -> str | None:
    """Why the CUDA kernels are not built here (one sentence), or None when they are."""
    return _cuda_skip()[0]


def want_cuda() -> bool:
    """Whether fastkd._C gets the CUDA kernels (see the module's docstring).

    Under FASTKD_BUILD_CUDA=1 any reason not to is a RuntimeError; otherwise a CudaBuildWarning
    says why when torch and nvcc both have CUDA (a major mismatch), and the CPU kernel is
    built alone.
    """
    reason, surprising = _cuda_skip()
    if reason is None:
        return True
    if os.environ.get("FASTKD_BUILD_CUDA") == "1":
        raise RuntimeError(f"fastkd: FASTKD_BUILD_CUDA=1, but the CUDA kernels cannot be built: {reason}")
    if surprising:
        warnings.warn(f"fastkd: building fastkd._C without its CUDA kernels (the cuda backend will be missing): "
                      f"{reason}", CudaBuildWarning, stacklevel=2)
    return False


def cxx_flags() -> list:
    arch = os.environ.get("FASTKD_CPU_ARCH", "native")
    # No trapping math: lets GCC if-convert the selects in the exp/log polynomials so the
    # row loops vectorise (10x); NaN and inf semantics are unchanged (no -ffast-math).
    return (["-O3", "-fopenmp", f"-march={arch}", "-fno-trapping-math", "-fno-math-errno"] + vector_width_flags()
            + build_info_flags(arch))


def vector_width_flags() -> list:
    """512-bit vectors where the CPU has AVX-512. GCC's tuning for Intel's AVX-512 cores
    prefers 256-bit vectors, so -march=native built the row loops with ymm registers only on
    an Intel Xeon (0 zmm instructions in kd_cpu.cpp for -march=icelake-server with GCC 12;
    18373 with this flag), half the width AMD's Zen 4 tuning gets. Without AVX-512 the flag
    changes nothing; it is an x86 option, so other machines do not get it."""
    import platform

    return ["-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386") else []


def build_info_flags(arch: str) -> list:
    """Defines that fastkd._C reports back (attributes ``cpu_arch``, ``built_with_torch``;
    ``python -m fastkd.info``): what -march it got and which torch it was compiled against,
    the first thing to compare when a prebuilt extension fails to load."""
    import torch

    version = re.sub(r"[^0-9A-Za-z.+_-]", "_", torch.__version__)  # survives the shell unquoted
    return [f"-DFASTKD_CPU_ARCH={arch}", f"-DFASTKD_TORCH_VERSION={version}"]


_ARCH_ENTRY = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?")


def parse_arch(entry: str) -> tuple:
    """``(sm, suffix, ptx)`` of one TORCH_CUDA_ARCH_LIST entry: "9.0a" -> (90, "a", False),
    "8.6+PTX" -> (86, "", True); ValueError for anything else (names such as "Hopper" too)."""
    found = _ARCH_ENTRY.fullmatch(entry)
    if not found:
        raise ValueError(f"fastkd: TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form 8.0, 9.0a or 9.0+PTX; "
                         f"set TORCH_CUDA_ARCH_LIST, e.g. to {DEFAULT_CUDA_ARCHS!r}")
    major, minor, suffix, ptx = found.groups()
    return int(major) * 10 + int(minor), suffix, bool(ptx)


def cuda_arch_list(arch_list: str | None = None, nvcc: str | None = None) -> list:
    """The TORCH_CUDA_ARCH_LIST entries (default DEFAULT_CUDA_ARCHS) that ``nvcc`` (default:
    the one that builds) can compile for, in order.

    Entries nvcc does not support are dropped with a CudaBuildWarning naming them; an entry
    that does not parse, or nothing left, is a ValueError saying what to set. A list with
    no code for sm_90 or newer (no cluster kernel) is warned about. Without an nvcc to ask,
    the list is taken as given.
    """
    source = "TORCH_CUDA_ARCH_LIST" if arch_list is None and os.environ.get("TORCH_CUDA_ARCH_LIST") else None
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    source = source or "the CUDA arch list"
    entries = [e for e in arch_list.replace(",", ";").replace(" ", ";").split(";") if e]
    parsed = [parse_arch(e) for e in entries]
    nvcc = nvcc or nvcc_path()
    supported = nvcc_info(nvcc)[1] if nvcc else None
    kept = entries if supported is None else [e for e, p in zip(entries, parsed) if p[0] in supported]
    dropped = [e for e in entries if e not in kept]
    if not kept:
        allowed = ", ".join(f"{n // 10}.{n % 10}" for n in sorted(supported or ()))
        raise ValueError(f"fastkd: {source}={arch_list!r} has no architecture that {nvcc} supports "
                         f"({allowed}); set TORCH_CUDA_ARCH_LIST, e.g. to {DEFAULT_CUDA_ARCHS!r}, "
                         f"or FASTKD_BUILD_CUDA=0 to build the CPU kernel only")
    if dropped:
        warnings.warn(f"fastkd: {source} entries {', '.join(dropped)} dropped: {nvcc} cannot compile for "
                      f"them; building for {';'.join(kept)}", CudaBuildWarning, stacklevel=2)
    if not any(parse_arch(e)[0] >= CLUSTER_ARCH for e in kept):
        warnings.warn(f"fastkd: {source} {';'.join(kept)} has no 9.0 (or newer) entry, so fastkd._C gets no "
                      f"cluster kernel and runs the two-pass kernel on Hopper; add 9.0a to build it",
                      CudaBuildWarning, stacklevel=2)
    return kept


def cuda_gencode_flags(archs: list | None = None) -> list:
    """-gencode flags for arch entries such as ["8.0", "9.0a", "9.0+PTX"] (default: cuda_arch_list())."""
    flags = []
    for entry in cuda_arch_list() if archs is None else archs:
        sm, suffix, ptx = parse_arch(entry)
        flags.append(f"-gencode=arch=compute_{sm}{suffix},code=sm_{sm}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm}{suffix},code=compute_{sm}{suffix}")
    return flags


def cuda_archs_define(archs: list) -> str:
    """The define that tells fastkd._C (csrc/ops.cpp, attribute ``cuda_archs``) what it was built
    for, "8.0,9.0a": commas and no quotes, which survive the shell that ninja runs the
    compilers in (ops.cpp stringifies the tokens)."""
    return "-DFASTKD_CUDA_ARCHS=" + ",".join(archs)


def cuda_cxx_flags(archs: list | None = None) -> list:
    """Extra host-compiler flags of a build with the CUDA kernels."""
    return ["-DFASTKD_WITH_CUDA", cuda_archs_define(cuda_arch_list() if archs is None else archs)]


def nvcc_flags(archs: list | None = None) -> list:
    """nvcc's flags for the arch entries ``archs`` (default: cuda_arch_list())."""
    archs = cuda_arch_list() if archs is None else archs
    # No FASTKD_CUDA_ARCHS here: only ops.cpp (host compiler) reads it, and nvcc would split
    # its comma-separated value into two -D options.
    return ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DFASTKD_WITH_CUDA"] + cuda_gencode_flags(archs)


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
