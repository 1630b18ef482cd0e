"""Builds fastkd._C: the fused CPU kernel always, the CUDA kernels when torch has CUDA and
nvcc is present (see fastkd/backends/cpp_build.py for the flags and environment variables).

Install with ``pip install --no-build-isolation .`` so the build uses the installed torch.
"""
import importlib.util
import os

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "fastkd_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastkd", "backends", "cpp_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda paths: [os.path.relpath(p, build.ROOT) for p in paths]  # noqa: E731
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


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=extensions(), cmdclass=cmdclass())
