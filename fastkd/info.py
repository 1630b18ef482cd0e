"""``python -m fastkd.info``: what fastkd can run here, and why not, for bug reports.

Prints the versions (fastkd, torch, triton, CUDA), the compiled extension (where it came
from, what it was built for and against), each backend's availability with the reason
when it is missing, the CPU's vector ISA, the GPUs, and the backend ``auto`` picks per
device. It never starts a JIT build unless asked (``--build``): without a prebuilt or
cached extension it says what the first call would do instead.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import Dict, List, Optional, Tuple

import torch

# The vector extensions that matter to the CPU kernel, widest first.
_ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "avx2", "fma", "avx",
              "sse4_2", "asimd", "sve")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_description() -> Tuple[str, List[str]]:
    """(model name, vector ISA flags present) from /proc/cpuinfo; the platform's name elsewhere."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor(), platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in _ISA_FLAGS if f in flags]


def extension_status(build: bool) -> Dict[str, object]:
    """Where fastkd._C comes from and what it reports, without building it unless ``build``."""
    from .backends import cpp

    status: Dict[str, object] = {"module": None, "source": None, "problem": None}
    module, why = cpp.import_prebuilt()
    if module is not None:
        status.update(module=module, source=f"prebuilt ({module.__file__})")
        return status
    if why == "no prebuilt extension":
        why += " (a source tree not built yet, or an isolated `pip install .`, which cannot compile it)"
    status["problem"] = why
    from .backends import cpp_build

    sources = [p for p in cpp_build.cpu_sources() if os.path.isfile(p)]
    if not sources:
        status["problem"] += f"; and no C++ sources to build it from (looked in {cpp_build.CSRC})"
        return status
    cached = not cpp._is_stale(cpp.build_dir(), sources)
    if os.environ.get("FASTKD_NO_JIT", "0") == "1":
        status["problem"] += "; FASTKD_NO_JIT=1 forbids the JIT build"
        return status
    if not (cached or build):
        status["problem"] += (f"; the first call that needs it JIT-builds it into {cpp.build_dir()} "
                              f"(about a minute; `python -m fastkd.info --build` does it now)")
        return status
    module = cpp.load_extension()  # a fresh JIT cache loads without compiling
    if module is None:
        status["problem"] += "; the JIT build failed (see the warning above)"
    else:
        status.update(module=module, source=f"JIT-built ({cpp.build_dir()})", problem=None)
    return status


def backend_status(extension_loaded: bool) -> Dict[str, str]:
    """Each backend: "available ..." or "unavailable: why"."""
    from . import _dispatch

    out = {"torch": "available (float64 reference, differentiated by autograd; any device; dense, sparse, "
                    "vocab-parallel)"}
    if extension_loaded:
        backends = {name: _dispatch.get_backend(name) for name in ("cpu", "cuda", "triton")}
    else:  # the registry would load (and build) the extension: ask triton alone
        backends = {"cpu": None, "cuda": None, "triton": _dispatch._triton_backend()}
    for name, kernels in backends.items():
        if kernels is not None:
            where = {"cpu": "CPU tensors", "cuda": "CUDA tensors",
                     "triton": "CUDA tensors" + (", and CPU tensors (TRITON_INTERPRET=1)"
                                                 if os.environ.get("TRITON_INTERPRET") == "1" else "")}[name]
            # Which losses its kernels run: dense kd_loss always; sparse teachers and the
            # vocab-parallel shard phases where the backend (or an older _C) has them.
            losses = ["dense"] + [op for op, has in (("sparse", kernels.has("sparse")),
                                                     ("vocab-parallel", kernels.shard is not None)) if has]
            out[name] = f"available on {where} ({', '.join(losses)})"
        elif name == "triton":
            out[name] = f"unavailable: {_dispatch._UNAVAILABLE_WHY['triton']}"
        elif not extension_loaded:
            out[name] = "unavailable: fastkd._C is not loaded (see 'extension')"
        else:
            out[name] = f"unavailable: {_dispatch._UNAVAILABLE_WHY[name]}"
    return out


def auto_choices(extension_loaded: bool) -> Dict[str, str]:
    from . import _dispatch

    choices = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if not extension_loaded and "cpu" in _dispatch.AUTO_ORDER.get(device, ()):
            no_jit = os.environ.get("FASTKD_NO_JIT", "0") == "1"
            choices[device] = "torch (fastkd._C unavailable)" if no_jit else "cpu once fastkd._C is built, torch until then"
            continue
        choices[device] = _dispatch.resolve_backend("auto", torch.device(device))
    if not torch.cuda.is_available():
        choices["cuda"] = "(no CUDA device)"
    env = os.environ.get("FASTKD_BACKEND", "").strip()
    if env:
        choices["note"] = f"FASTKD_BACKEND={env} overrides auto"
    return choices


def collect(build: bool = False) -> Dict[str, object]:
    """Everything the report prints, as a dict (for tests and for tools)."""
    import fastkd

    from .backends import cpp_build

    ext = extension_status(build)
    module = ext["module"]
    model, isa = cpu_description()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = [f"cuda:{i}: {torch.cuda.get_device_name(i)}, sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    extension = {"source": ext["source"], "problem": ext["problem"]}
    if module is not None:
        extension.update(
            cpu_isa=getattr(module, "cpu_isa", "?"), cpu_arch=getattr(module, "cpu_arch", "?"),
            built_with_torch=getattr(module, "built_with_torch", "?"), compiler=getattr(module, "compiler", "?"),
            cuda_kernels=("yes, for " + getattr(module, "cuda_archs", "?")) if getattr(module, "with_cuda", False)
            else "no")
    return {
        "fastkd": f"{fastkd.__version__} ({os.path.dirname(fastkd.__file__)})",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": triton_version or "not installed",
        "CPU": model,
        "CPU vector ISA": " ".join(isa) or "none detected",
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "CPU threads (torch)": torch.get_num_threads(),
        "GPUs": gpus or ["none visible"],
        "extension": extension,
        "build flags here": " ".join(cpp_build.cxx_flags()),
        "backends": backend_status(module is not None),
        "auto picks": auto_choices(module is not None),
    }


def format_report(info: Dict[str, object]) -> str:
    lines = ["fastkd environment (python -m fastkd.info)"]

    def add(key, value, indent=""):
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            for k, v in value.items():
                if v is not None:
                    add(k, v, indent + "  ")
        elif isinstance(value, list):
            lines.append(f"{indent}{key}:")
            lines.extend(f"{indent}  {v}" for v in value)
        else:
            lines.append(f"{indent}{key + ':':<24}{value}")

    for key, value in info.items():
        add(key, value)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastkd.info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="JIT-build fastkd._C now if it is not prebuilt")
    args = ap.parse_args(argv)
    print(format_report(collect(build=args.build)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
