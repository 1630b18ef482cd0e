"""Backward of every fused loss: the stored gradient times grad_output, in place.

``grad[row] *= grad_output`` (a scalar, or one value per row for reduction="none").
grad_output is read on the device and a program returns without touching memory where it
is exactly 1: no host synchronisation, so CUDA graphs and torch.compile keep working.
"""
import torch
import triton
import triton.language as tl

from .. import check_scale_grad_args
from .launch import SCALE_BLOCK, kernel_launch
from .rows import row_base


@triton.jit
def scale_grad_kernel(G, GO, g_stride, go_stride, width, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row] *= grad_output (scalar, or one value per row); nothing is touched where it is 1."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        go = tl.load(GO + row * go_stride).to(tl.float32)
    else:
        go = tl.load(GO).to(tl.float32)
    if go != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ptrs = row_base(G, row, g_stride) + cols
        g = tl.load(ptrs, mask=cols < width).to(tl.float32)
        tl.store(ptrs, (g * go).to(G.dtype.element_ty), mask=cols < width)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    if grad.numel() == 0:
        return
    check_scale_grad_args(grad, grad_output)
    n, width = grad.shape
    per_row = grad_output.numel() != 1
    go = grad_output.reshape(-1)
    grid = (n, triton.cdiv(width, SCALE_BLOCK))
    with kernel_launch(grad.device):  # quiet: the interpreter warns where fp16 overflows (inf, as on the GPU)
        scale_grad_kernel[grid](grad, go, grad.stride(0), go.stride(0) if per_row else 0, width,
                                PER_ROW=per_row, BLOCK=SCALE_BLOCK, num_warps=8)
