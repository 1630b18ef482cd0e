"""Builds fastkd._C: the fused CPU kernel always, the CUDA kernels when torch has CUDA and
nvcc is present (see fastkd/backends/cpp_build.py for the flags and environment variables).

Install with ``pip install --no-build-isolation .`` so the build uses the installed torch:
an extension must be compiled against the torch it will load into. A plain ``pip install .``
builds in an isolated environment without torch; it then installs fastkd without the
compiled extension (saying so), and the first call that needs it compiles it against the
installed torch (the JIT fallback, from the C++ sources wheels carry as fastkd/_csrc).
``FASTKD_REQUIRE_EXTENSION=1`` turns that case into an error instead.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("fastkd_build", os.path.join(HERE, "fastkd", "backends", "cpp_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

NO_TORCH = """
fastkd: torch is not importable in this build environment, so fastkd._C is not compiled now.
  This is what `pip install .` does by default: it builds in an isolated environment that
  does not see your torch. fastkd will compile the extension against your installed torch
  the first time a call needs it (about a minute, once). To compile it now instead, run
      pip install --no-build-isolation .
  (`python -m fastkd.info` shows which case you are in.)
"""


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the package as fastkd/_csrc: the JIT fallback's sources."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastkd", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(build.CSRC, target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731
    if build.want_cuda():
        archs = build.cuda_arch_list()
        print("fastkd: building fastkd._C with the CPU kernel and CUDA kernels for", ";".join(archs))
        return [CUDAExtension(
            "fastkd._C", rel(build.cpu_sources() + build.cuda_sources()),
            extra_compile_args={"cxx": build.cxx_flags() + build.cuda_cxx_flags(archs),
                                "nvcc": build.nvcc_flags(archs)},
            extra_link_args=build.extra_ldflags())]
    print(f"fastkd: building fastkd._C with the CPU kernel only ({build.cuda_skip_reason()})")
    return [CppExtension(
        "fastkd._C", rel(build.cpu_sources()),
        extra_compile_args={"cxx": build.cxx_flags()}, extra_link_args=build.extra_ldflags())]


def main():
    try:
        import torch  # noqa: F401
    except ImportError:
        if os.environ.get("FASTKD_REQUIRE_EXTENSION", "0") == "1":
            sys.exit("fastkd: FASTKD_REQUIRE_EXTENSION=1, but torch is not importable in this build environment, "
                     "so fastkd._C cannot be compiled; install torch, then run pip install --no-build-isolation .")
        print(NO_TORCH, file=sys.stderr)
        setup(cmdclass={"build_py": BuildPyWithSources})
        return
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=extensions(),
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSources})


main()
