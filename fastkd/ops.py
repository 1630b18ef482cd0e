"""The fused operators every kernel backend provides, and the one autograd Function on top.

A kernel backend supplies three operators with one contract (2-D logits with unit stride
along the vocabulary, labels int64 or None, ``grad_scale`` a float32 device scalar):

    forward(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature,
            beta, div_weight, ce_weight, ignore_index, vocab_size) -> (loss [N] fp32, grad)
    forward_inplace(same arguments) -> loss        # the gradient overwrites `student`
    scale_grad_(grad, grad_output)                 # grad *= grad_output, skipped when 1

``loss`` is the per-row loss before reduction (0 at ignored rows); ``grad`` is
d(sum_rows loss * grad_scale)/d student, already in the student's dtype. Folding the
reduction's scale into the forward kernel means backward only has to multiply by
``grad_output``, and the kernels skip even that when it is 1, without a host sync.

The C++ backends (``cpu``, ``cuda``) register these as ``torch.ops.fastkd.*``; the
Triton backend registers ``torch.ops.fastkd.triton_*``. All have fake implementations, so
``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch.autograd.function import once_differentiable

from . import _ext


@dataclass(frozen=True)
class KernelBackend:
    name: str
    forward: Callable
    forward_inplace: Callable
    scale_grad_: Callable
    supports: Callable[[torch.device], bool]  # can it run on tensors of this device?


_BACKENDS: Dict[str, KernelBackend] = {}


def register_backend(backend: KernelBackend) -> None:
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Optional[KernelBackend]:
    """The kernel backend ``name``, or None where it cannot be loaded here.

    Backends register on first use, not at ``import fastkd``: loading the C++ extension
    may mean a JIT build, and importing Triton takes seconds.
    """
    _register_all()
    return _BACKENDS.get(name)


# ---------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, shared by every backend's ops.

def loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """Per-row losses are float32, or float64 when an input is float64."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def fake_forward(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature,
                 beta, div_weight, ce_weight, ignore_index, vocab_size):
    loss = student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))
    return loss, student.new_empty(student.shape)


def fake_forward_inplace(student, teacher, labels, grad_scale, row_stats, divergence,
                         inv_temperature, beta, div_weight, ce_weight, ignore_index, vocab_size):
    return student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))


def fake_row_stats(student, teacher, inv_temperature, vocab_size, with_ce):
    return student.new_empty((student.shape[0], 5), dtype=torch.float32)


def fake_scale_grad_(grad, grad_output):
    return None


def _register_cpp_backends() -> None:
    ext = _ext.load_extension()
    if ext is None:
        return
    ops = torch.ops.fastkd
    torch.library.register_fake("fastkd::kd_forward")(fake_forward)
    torch.library.register_fake("fastkd::kd_forward_inplace")(fake_forward_inplace)
    torch.library.register_fake("fastkd::row_stats")(fake_row_stats)
    torch.library.register_fake("fastkd::scale_grad_")(fake_scale_grad_)
    register_backend(KernelBackend("cpu", ops.kd_forward, ops.kd_forward_inplace, ops.scale_grad_,
                                   lambda device: device.type == "cpu"))
    if getattr(ext, "with_cuda", False):
        register_backend(KernelBackend("cuda", ops.kd_forward, ops.kd_forward_inplace, ops.scale_grad_,
                                       lambda device: device.type == "cuda"))


def _register_triton_backend() -> None:
    try:
        from .backends import triton as triton_backend
    except ModuleNotFoundError as exc:
        if exc.name == "triton" or (exc.name or "").startswith("triton."):
            return  # triton is optional; any other import error is a bug and surfaces
        raise
    register_backend(triton_backend.BACKEND)


_registered = False


def _register_all() -> bool:
    global _registered
    if not _registered:
        _registered = True
        _register_cpp_backends()
        _register_triton_backend()
    return True


# torch.compile runs this for real at trace time instead of tracing it (registering
# operators and fakes is not something a graph can contain). This is what
# torch.compiler.assume_constant_result does; set directly, because importing that
# decorator imports torch._dynamo (and Triton) at `import fastkd`.
_register_all._dynamo_marked_constant = True


# ---------------------------------------------------------------------------------------
# Autograd: forward runs the fused kernel, backward only rescales its stored gradient.

class FusedKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, grad_scale, backend_name, reduced, inplace, cfg):
        kernels = get_backend(backend_name)
        # fp16 cannot hold the scaled gradient: with reduction="mean" over thousands of
        # tokens most entries fall below its smallest subnormal, and no GradScaler brings
        # them back. So an fp16 gradient is stored unscaled (its entries are O(alpha T + 1))
        # and the scale is applied with grad_output in fp32 in backward, rounded once.
        deferred = student.dtype == torch.float16 and reduced
        kernel_scale = torch.ones_like(grad_scale) if deferred else grad_scale
        args = (labels, kernel_scale, None, cfg.divergence, cfg.inv_temperature, cfg.beta, cfg.div_weight,
                cfg.ce_weight, cfg.ignore_index, cfg.vocab_size)
        if inplace:
            loss_rows = kernels.forward_inplace(student, teacher, *args)
            grad = student
            if not torch.compiler.is_compiling():
                # The logits now hold their gradient: bump their version so that autograd
                # refuses any graph node that saved them ("modified by an inplace
                # operation"), as a mutating op does. (Compiled graphs record the
                # mutation themselves.)
                torch.autograd.graph.increment_version(student)
        else:
            loss_rows, grad = kernels.forward(student, teacher, *args)
        ctx.save_for_backward(grad, grad_scale if deferred else None)
        ctx.backend_name = backend_name
        if reduced:
            return loss_rows.sum() * grad_scale
        return loss_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "fastkd: the fused loss keeps one copy of its gradient and rescales it in place, "
                "so it can be backpropagated only once (retain_graph=True is not supported)")
        ctx.consumed = True
        grad, deferred_scale = ctx.saved_tensors
        factor = grad_output.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
        if deferred_scale is not None:
            factor = factor * deferred_scale
        get_backend(ctx.backend_name).scale_grad_(grad, factor)
        return (grad,) + (None,) * 7
