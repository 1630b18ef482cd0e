"""The backend registry and the choice of backend, in one place.

Backends: ``cpu`` and ``cuda`` (the compiled extension fastkd._C), ``triton``, and
``torch`` (the float64-capable reference, differentiated by autograd). They register on
first use, not at ``import fastkd``: loading the C++ extension may mean a JIT build, and
importing Triton takes seconds.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch


from .backends import MAX_KERNEL_TEACHERS, KernelBackend

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
# What ``auto`` tries, in order, per device type. On CUDA the ``cuda`` kernels are left out
# until their tests have passed on a GPU (none has run on one yet: issue 10): the Triton
# kernels' logic is checked by the interpreter on every CI run, so they go first, and
# ``backend="cuda"`` asks for the CUDA kernels by name. After a green GPU check, this
# order is to be set by measured speed.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
_UNAVAILABLE_WHY = {"triton": "triton is not installed",
                    "cuda": "fastkd._C was built without CUDA kernels",
                    "cpu": "fastkd._C could not be loaded or built"}

_BACKENDS: Dict[str, KernelBackend] = {}


def _register_all() -> bool:
    if not _BACKENDS:
        from .backends import cpp, reference

        for backend in (reference.backend(), *cpp.backends(), _triton_backend()):
            if backend is not None:
                _BACKENDS[backend.name] = backend
    return True


# torch.compile runs this for real at trace time instead of tracing it (registering
# operators and fakes is not something a graph can contain). This is what
# torch.compiler.assume_constant_result does; set directly, because importing that
# decorator imports torch._dynamo (and Triton) at `import fastkd`.
_register_all._dynamo_marked_constant = True


def _triton_backend() -> Optional[KernelBackend]:
    try:
        from .backends import triton
    except ModuleNotFoundError as exc:
        if exc.name == "triton" or (exc.name or "").startswith("triton."):
            return None  # triton is optional; any other import error is a bug and surfaces
        raise
    return triton.backend()


def get_backend(name: str) -> Optional[KernelBackend]:
    """The backend ``name``, or None where it cannot be loaded here."""
    _register_all()
    return _BACKENDS.get(name)


def check_backend_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, op: str = "dense") -> str:
    """The backend that will run: ``auto`` (or ``FASTKD_BACKEND``) resolved for ``device``.

    ``op`` is ``dense`` (kd_loss) or ``sparse`` (sparse_kd_loss): ``auto`` skips backends
    without kernels for it. An explicitly requested backend that cannot run on ``device``
    (or lacks ``op``) is an error, not a silent fallback.
    """
    check_backend_name(backend)
    source = "backend="
    if backend == "auto":
        env = os.environ.get("FASTKD_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend, source = env, "FASTKD_BACKEND="
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            kernels = get_backend(name)
            if kernels is not None and kernels.has(op) and kernels.supports(device):
                return name
        return "torch"
    kernels = get_backend(backend)
    if kernels is None:
        raise ValueError(f"{source}{backend!r} is not available: {_UNAVAILABLE_WHY[backend]}")
    if not kernels.supports(device):
        hint = " (set TRITON_INTERPRET=1 before importing fastkd to run Triton on the CPU)" if backend == "triton" else ""
        raise ValueError(f"{source}{backend!r} cannot run on {device.type} tensors{hint}")
    if not kernels.has(op):
        raise ValueError(f"{source}{backend!r} has no {op} kernels (yet); use backend='auto' or 'torch'")
    return backend


# The backends whose kernels apply the logit options (logit_scale, softcap, the teacher's,
# label_smoothing, z_loss): every backend today. A backend added without them is left out,
# and then a config using the options never runs on it silently: ``auto`` picks ``torch``,
# and naming it is an error.
LOGIT_OPTIONS_BACKENDS = {"torch", "cpu", "triton", "cuda"}


def _equals(value, default) -> bool:
    """``value == default`` for a number; False for a symbolic value (it may be anything)."""
    return not isinstance(value, (torch.SymFloat, torch.SymInt)) and value == default


def uses_logit_options(cfg) -> bool:
    return (not _equals(cfg.logit_scale, 1.0) or cfg.softcap is not None or not _equals(cfg.teacher_scale, 1.0)
            or cfg.teacher_cap is not None or not _equals(cfg.label_smoothing, 0.0) or not _equals(cfg.z_loss, 0.0))


# The backends that run several teachers (teacher_logits a sequence of K, or teacher
# weights per token; docs/multi_teacher.md), the compiled ones up to MAX_KERNEL_TEACHERS
# (``cpu``: csrc/cpu/kd_multi_cpu.cpp, ``triton``: backends/triton/multi.py, ``cuda``:
# csrc/cuda/kd_multi.cu, compile-checked only, as every CUDA kernel: ``auto`` does not pick
# ``cuda`` yet). A call they cannot run goes to ``torch``, as for the logit options above.
# One teacher given as a sequence of one (without weights) is the single-teacher call.
MULTI_TEACHER_BACKENDS = {"torch", "cpu", "triton", "cuda"}


# The backends whose kernels write the per-token diagnostics in the loss's own pass
# (return_stats=True; fastkd/backends/__init__.py), for dense and sparse teachers (``cuda``:
# compile-checked only, as above). Others
# are refused as for the options above (``auto`` picks ``torch``, which computes them with
# fastkd.stats in separate passes).
STATS_BACKENDS = {"torch", "cpu", "triton", "cuda"}


def _runs_teachers(name: str, count: int) -> bool:
    return name == "torch" or (name in MULTI_TEACHER_BACKENDS and count <= MAX_KERNEL_TEACHERS)


def backend_for(backend: str, device: torch.device, *dtypes: torch.dtype,
                what: str = "logits", op: str = "dense", cfg=None, several_teachers: int = 0,
                stats: bool = False) -> KernelBackend:
    """The resolved backend for tensors of ``device`` and ``dtypes``; refuses a dtype it
    lacks, and (given the call's ``cfg``) logit options its kernels do not apply, and
    ``several_teachers`` (the count K of a call run as several teachers; 0 for one) where
    it cannot run them, and ``stats`` (return_stats=True) where its kernels do not write them."""
    name = resolve_backend(backend, device, op)
    if several_teachers and not _runs_teachers(name, several_teachers):
        if backend != "auto":
            why = ("does not run several teachers yet" if name not in MULTI_TEACHER_BACKENDS else
                   f"runs at most {MAX_KERNEL_TEACHERS} teachers in one call, got {several_teachers}")
            raise NotImplementedError(f"backend {name!r} {why} (teacher_logits with K > 1 teachers, or "
                                      f"teacher_weights other than None or [1.0]); use backend='auto' or 'torch'")
        name = "torch"
    if cfg is not None and name not in LOGIT_OPTIONS_BACKENDS and uses_logit_options(cfg):
        if backend != "auto":
            raise NotImplementedError(f"backend {name!r} does not apply logit_scale, softcap, label_smoothing "
                                      f"or z_loss yet; use backend='auto' or 'torch'")
        name = "torch"
    if stats and name not in STATS_BACKENDS:
        if backend != "auto":
            raise NotImplementedError(f"backend {name!r} does not compute return_stats yet; use backend='auto' or "
                                      f"'torch', or fastkd.kd_stats / fastkd.sparse_kd_stats")
        name = "torch"
    kernels = get_backend(name)
    for dtype in dtypes:
        if dtype not in kernels.dtypes:
            able = " and ".join(repr(n) for n, b in _BACKENDS.items() if dtype in b.dtypes)
            raise TypeError(f"{str(dtype).replace('torch.', '')} {what} are supported by {able}, not {name!r}")
    return kernels
