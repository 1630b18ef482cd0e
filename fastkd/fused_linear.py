"""Fused linear KD loss: hidden states and LM-head weights in, the loss out, logits never whole.

``fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)``
equals ``kd_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, labels)``
but never holds the ``[tokens, vocab]`` logits of either side. It walks over the tokens in
chunks; for each chunk it

1. computes the chunk's student and teacher logits with a matmul whose *output* is fp32
   (fp32 accumulation alone is not enough: a public fused-linear JSD that rounds its
   logits to bf16 shows 4-23% gradient error, and tests/test_fused_linear.py measures
   25-60% for a student close to its teacher, where q - p is smaller than the rounding
   error of logits of size ~10);
2. runs the fused kernel in place (``forward_inplace``), which turns the student logits
   chunk into d loss / d logits, already multiplied by the reduction's scale;
3. folds that into the parameter gradients with matmuls: ``grad_hidden[chunk] = dlogits @ W``,
   ``grad_weight += dlogits.T @ hidden[chunk]``, ``grad_bias += dlogits.sum(0)``.

All of it happens in the forward of one autograd Function; backward only multiplies the
stored gradients by ``grad_output`` in place (skipped without a host sync when it is 1).
``reduction="none"`` is the exception: a per-token ``grad_output`` cannot be applied to an
already-summed weight gradient, so that reduction recomputes the chunks in backward.

File order: launch decisions (chunk size, matmul mode), the per-side projection, the
chunk loop, the autograd Function, argument checks, the public function and module.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from ._checks import (check_float_tensor, check_labels, check_num_items, check_same_tokens, check_teacher_weights,
                      is_single_teacher_call, reduction_scale, resolve_vocab_size, teacher_weight_rows)
from ._dispatch import backend_for, check_backend_name, get_backend
from .backends import STATS_WIDTH
from .config import KDConfig, check_bool, make_config, takes_settings
from .stats import stats_result

LOW_PRECISION = (torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------
# Launch decisions, in one place.

# Budget for the two logits chunks (student + teacher, fp32) that exist at one time.
# On CUDA it is 1/16 of the device's memory capped at 512 MiB: at V = 128256 that is
# 523 rows per chunk, large enough for the matmuls to run at tensor-core speed, and with
# the bf16 weight gradient (V * H * 2 bytes, 0.5 GiB at H = 2048) the whole op stays near
# 1 GiB of extra memory. The budget depends on the device, never on the memory free at
# the moment, so a given shape always gets the same chunks (and bitwise the same result).
# On the CPU the matmuls are efficient from a few dozen rows on, so a small budget costs
# nothing and keeps the buffers cache- and page-fault-friendly.
CUDA_CHUNK_BUDGET_CAP = 512 << 20
CUDA_CHUNK_BUDGET_FRACTION = 16
CPU_CHUNK_BUDGET = 64 << 20


def chunk_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(CUDA_CHUNK_BUDGET_CAP, total // CUDA_CHUNK_BUDGET_FRACTION)
    return CPU_CHUNK_BUDGET


def auto_chunk_size(n_rows: int, vocab_size: int, student_logits_dtype: torch.dtype,
                    teacher_logits_dtype: Union[None, torch.dtype, Tuple[torch.dtype, ...]],
                    device: torch.device) -> int:
    """Rows per chunk: as many as fit the budget, then evened out over the chunks.

    ``rows = budget // (V * (bytes of a student + a teacher logit))`` (of every teacher's
    logit, for several teachers: ``teacher_logits_dtype`` a tuple); with
    ``k = ceil(N / rows)`` chunks, each gets ``ceil(N / k)`` rows, so there is no tiny
    tail chunk and small N runs as a single chunk.
    """
    if n_rows <= 0:
        return 1
    if teacher_logits_dtype is None:  # a sparse teacher
        teacher_bytes = 0
    elif isinstance(teacher_logits_dtype, torch.dtype):
        teacher_bytes = _itemsize(teacher_logits_dtype)
    else:
        teacher_bytes = sum(_itemsize(d) for d in teacher_logits_dtype)
    row_bytes = vocab_size * (_itemsize(student_logits_dtype) + teacher_bytes)
    rows = max(1, chunk_budget_bytes(device) // row_bytes)
    n_chunks = -(-n_rows // rows)
    return -(-n_rows // n_chunks)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Can ``torch.mm(a, b, out_dtype=torch.float32)`` run for this device and input dtype?"""
    try:
        a = torch.zeros((2, 2), dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_mode(weight: torch.Tensor) -> str:
    """How one side computes fp32 logits (and, for the student, its gradients).

    ``same``    fp32/fp64 parameters: plain matmuls in their own dtype.
    ``native``  bf16/fp16 on a device whose BLAS writes fp32 output (CUDA): the matmuls
                read the parameters as they are; the gradient matmuls read dlogits cast to
                the parameter dtype, and the weight gradient accumulates in that dtype.
    ``upcast``  bf16/fp16 elsewhere (CPU): the weight is converted to fp32 once per call
                (V * H * 4 bytes) and everything runs in fp32.
    """
    if weight.dtype not in LOW_PRECISION:
        return "same"
    if weight.device.type == "cuda" and _mm_out_dtype_supported("cuda", weight.dtype):
        return "native"
    return "upcast"


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """bias + a @ b with low-precision inputs and an fp32 result (fp32 accumulation)."""
    if bias is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    # The dtype-out addmm sizes its result like `bias`: give it the 2-D (broadcast) shape.
    return torch.addmm(bias.expand(a.shape[0], b.shape[1]), a, b, out_dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# One side's projection hidden -> logits, restricted to the first vocab_size rows.

class Projection:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], vocab_size: int, mode: str):
        self.mode = mode
        self.weight = weight[:vocab_size]
        self.bias = None if bias is None else bias[:vocab_size]
        if mode == "upcast":
            self.weight = self.weight.float()
            self.bias = None if self.bias is None else self.bias.float()
        self.weight_t = self.weight.t()
        # fp64 parameters give fp64 logits (the float64 test path); all else gives fp32.
        self.logits_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

    def logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        if self.mode == "native":
            return _mm_fp32(hidden, self.weight_t, self.bias)
        if self.mode == "upcast":
            hidden = hidden.float()
        if self.bias is None:
            return torch.mm(hidden, self.weight_t, out=out)
        return torch.addmm(self.bias, hidden, self.weight_t, out=out)


# ---------------------------------------------------------------------------------------
# The teacher of one call, chunk by chunk: dense (hidden states and LM head -> logits) or
# sparse (K ids and log-probs per token, fused_linear_sparse_kd_loss). Each gives the
# kernel's teacher arguments for a chunk of rows.

class DenseTeacher:
    """Logits chunks ``hidden @ weight.T + bias`` (in a reused buffer where the matmul can
    write into one); the last chunk's buffer is dead once the kernel ran, a spare."""

    def __init__(self, plan: "Plan", ht, wt, bt, n: int):
        mode = matmul_mode(wt)
        self.projection = Projection(wt, bt, plan.head_rows, mode)
        self.hidden = ht
        self.buf = None
        if mode != "native" and n > 0:
            chunk = max(1, min(plan.chunk_size, n))
            self.buf = torch.empty((chunk, plan.head_rows), dtype=self.projection.logits_dtype, device=ht.device)
        self.spare = None

    def chunk(self, start: int, end: int) -> tuple:
        out = None if self.buf is None else self.buf[:end - start]
        self.spare = self.projection.logits(self.hidden[start:end], out)
        return (self.spare,)


class DenseTeachers:
    """Several dense teachers (each its hidden states and head) and their weights [K, N]:
    a chunk is the K logits chunks and the weights' columns."""

    def __init__(self, plan: "Plan", flat: tuple, n: int):
        *heads, self.weights = flat
        self.teachers = [DenseTeacher(plan, *heads[i:i + 3], n) for i in range(0, len(heads), 3)]
        self.spare = None

    def chunk(self, start: int, end: int) -> tuple:
        logits = tuple(t.chunk(start, end)[0] for t in self.teachers)
        self.spare = self.teachers[0].spare  # dead once the kernel ran, as a single teacher's
        return logits, self.weights[:, start:end]


class SparseTeacher:
    def __init__(self, ids, logprobs):
        self.ids, self.logprobs = ids, logprobs
        self.spare = None

    def chunk(self, start: int, end: int) -> tuple:
        return self.ids[start:end], self.logprobs[start:end]


# ---------------------------------------------------------------------------------------
# The chunk loop.

# (student chunk, teacher chunk, labels, grad_scale) -> loss rows, the gradient written over
# the student chunk; or -> (loss rows, gradient) for a kernel that cannot write in place.
KernelFn = Callable[..., Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]


def _kernel_fn(plan: "Plan") -> KernelFn:
    """(student chunk, *teacher chunk, labels, grad_scale) -> loss rows; grad written in place."""
    kernels = get_backend(plan.backend)
    cfg = plan.cfg
    # return_stats: the kernels' stats forms, returning (loss rows, stats rows).
    if plan.with_stats and plan.op == "sparse":
        return lambda student, ids, logprobs, labels, grad_scale: kernels.sparse_forward_stats_inplace(
            student, ids, logprobs, labels, grad_scale, cfg)
    if plan.with_stats:
        return lambda student, teacher, labels, grad_scale: kernels.forward_stats_inplace(
            student, teacher, labels, grad_scale, cfg)
    if plan.op == "sparse":
        return lambda student, ids, logprobs, labels, grad_scale: kernels.sparse_forward_inplace(
            student, ids, logprobs, labels, grad_scale, cfg)
    if plan.op == "multi":
        return lambda student, teachers, weights, labels, grad_scale: kernels.multi_forward_inplace(
            student, teachers, weights, labels, grad_scale, cfg)
    return lambda student, teacher, labels, grad_scale: kernels.forward_inplace(
        student, teacher, labels, grad_scale, cfg)


@dataclass(frozen=True)
class Plan:
    """Everything about a call that is not a tensor."""

    cfg: KDConfig
    backend: str
    chunk_size: int
    student_matmul: str  # matmul_mode of the student's head (a teacher's is its own, DenseTeacher)
    want_hidden_grad: bool
    want_weight_grad: bool
    want_bias_grad: bool
    op: str = "dense"  # "sparse": the teacher tensors are (ids, logprobs); "multi": K dense teachers
    # The vocab-parallel loss (fastkd/distributed/fused_linear.py) runs this same loop on
    # one rank's slice of the LM head: its kernel (the per-shard phases and their
    # collectives) replaces the backend's, the head's rows are the slice's (not
    # cfg.vocab_size, which is global there), and the hidden-state gradient, a partial
    # sum over the slice's columns, is all-reduced over the ranks once the loop is done.
    kernel: Optional[KernelFn] = None
    columns: Optional[int] = None
    reduce_hidden_grad: Optional[Callable[[torch.Tensor], None]] = None
    # return_stats=True: the loop also collects the kernel's per-token diagnostics (one teacher).
    with_stats: bool = False

    @property
    def head_rows(self) -> int:
        """The LM heads' rows the loop projects onto: ``cfg.vocab_size``, or a rank's slice."""
        return self.cfg.vocab_size if self.columns is None else self.columns

    @property
    def reduced(self) -> bool:
        return self.cfg.reduction != "none"

    @property
    def any_grad(self) -> bool:
        return self.want_hidden_grad or self.want_weight_grad or self.want_bias_grad


def chunked_loss(plan: Plan, hs, ws, bs, teacher_tensors: tuple, labels, grad_scale,
                 row_scale: Optional[torch.Tensor], with_grads: bool):
    """Loss rows [N] fp32 and, when ``with_grads``, (grad_hidden, grad_weight, grad_bias);
    with ``plan.with_stats``, (loss rows, stats rows [N, STATS_WIDTH]) in place of the loss rows.

    ``teacher_tensors`` are (hidden, weight, bias) of a dense teacher, (ids, logprobs) of
    a sparse one, or (hidden, weight, bias) of each of K dense teachers followed by their
    weights [K, N] (``plan.op``). ``grad_scale`` (device scalar) is folded into the kernel's
    gradient; ``row_scale`` ([N] or None) multiplies each row's gradient afterwards
    (``reduction="none"``).
    """
    cfg = plan.cfg
    V = plan.head_rows
    n = hs.shape[0]
    student = Projection(ws, bs, V, plan.student_matmul)
    if plan.op == "sparse":
        teacher = SparseTeacher(*teacher_tensors)
    elif plan.op == "multi":
        teacher = DenseTeachers(plan, teacher_tensors, n)
    else:
        teacher = DenseTeacher(plan, *teacher_tensors, n)
    kernel = _kernel_fn(plan) if plan.kernel is None else plan.kernel

    want_h = with_grads and plan.want_hidden_grad
    want_w = with_grads and plan.want_weight_grad
    want_b = with_grads and plan.want_bias_grad
    grad_h = torch.empty_like(hs) if want_h else None
    # The first chunk writes the weight gradient, the others add to it: no zero-fill pass
    # over [V, H] except for rows past vocab_size (or when there are no tokens at all).
    grad_w = None
    if want_w:
        grad_w = torch.empty_like(ws)
        grad_w[V if n > 0 else 0:].zero_()
    grad_b = torch.zeros(bs.shape, dtype=student.logits_dtype, device=bs.device) if want_b else None
    # The fp32 weight gradient of the upcast mode is summed over chunks in fp32 and cast
    # once at the end; the native mode accumulates in the parameter dtype (one rounding
    # per chunk) because an fp32 copy of [V, H] would double the op's memory.
    separate_acc = want_w and plan.student_matmul == "upcast"
    acc_w = None
    if want_w:
        acc_w = torch.empty(student.weight.shape, dtype=torch.float32, device=ws.device) \
            if separate_acc else grad_w[:V]

    loss = torch.empty((n,), dtype=student.logits_dtype, device=hs.device)  # float64 stays float64
    stats = torch.empty((n, STATS_WIDTH), dtype=loss.dtype, device=hs.device) if plan.with_stats else None
    chunk = max(1, min(plan.chunk_size, n))
    # A reused buffer where the matmul can write into it (the native mode allocates per
    # chunk; CUDA's caching allocator hands back the same blocks).
    s_buf = None
    if plan.student_matmul != "native" and n > 0:
        s_buf = torch.empty((chunk, V), dtype=student.logits_dtype, device=hs.device)

    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        rows = end - start
        h_s = hs[start:end]
        s_logits = student.logits(h_s, None if s_buf is None else s_buf[:rows])
        teacher_args = teacher.chunk(start, end)
        lab = None if labels is None else labels[start:end]
        out = kernel(s_logits, *teacher_args, lab, grad_scale)
        if stats is not None:
            out, stats[start:end] = out
        # d loss / d logits: the kernel overwrote the student logits with it, or returned it.
        loss[start:end], dlogits = out if isinstance(out, tuple) else (out, s_logits)
        if not with_grads or not plan.any_grad:
            continue
        if row_scale is not None:
            dlogits.mul_(row_scale[start:end, None].to(dlogits.dtype))
        if want_b:
            grad_b[:V] += dlogits.sum(0)
        if plan.student_matmul == "native":
            dl = _low_precision_copy(dlogits, teacher.spare, ws.dtype)
            if want_h:
                torch.mm(dl, student.weight, out=grad_h[start:end])
            if want_w:
                _accumulate(acc_w, dl.t(), h_s, first=start == 0)
        else:
            if want_h:
                if plan.student_matmul == "upcast":
                    grad_h[start:end] = torch.mm(dlogits, student.weight)
                else:
                    torch.mm(dlogits, student.weight, out=grad_h[start:end])
            if want_w:
                _accumulate(acc_w, dlogits.t(), h_s.float() if plan.student_matmul == "upcast" else h_s,
                            first=start == 0)
    if separate_acc and n > 0:
        grad_w[:V] = acc_w
    if want_h and plan.reduce_hidden_grad is not None:
        plan.reduce_hidden_grad(grad_h)
    if want_b:
        grad_b = grad_b.to(bs.dtype)
    return (loss if stats is None else (loss, stats)), (grad_h, grad_w, grad_b)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def _low_precision_copy(dlogits: torch.Tensor, spare: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dlogits cast to ``dtype`` for the gradient matmuls, stored in the dead teacher chunk.

    The teacher logits are not needed once the kernel has run; their fp32 buffer holds the
    half-width copy with room to spare, which saves a [chunk, V] allocation.
    """
    rows, width = dlogits.shape
    if spare is not None and spare.dtype == torch.float32 and spare.is_contiguous() and spare.shape == dlogits.shape:
        out = spare.view(dtype)[:, :width]
        out.copy_(dlogits)
        return out
    return dlogits.to(dtype)


# ---------------------------------------------------------------------------------------
# Autograd.

class FusedLinearKDFunction(torch.autograd.Function):
    """``teacher``: the teacher tensors of :func:`chunked_loss` (``plan.op``); constants."""

    @staticmethod
    def forward(ctx, hs, ws, bs, labels, grad_scale, plan: Plan, *teacher):
        ctx.plan = plan
        ctx.n_teacher = len(teacher)
        with torch.autocast(hs.device.type, enabled=False):
            if plan.reduced:
                loss_rows, grads = chunked_loss(plan, hs, ws, bs, teacher, labels, grad_scale,
                                                None, with_grads=plan.any_grad)
                ctx.save_for_backward(*grads)
                return _with_stats(ctx, loss_rows, lambda rows: rows.sum() * grad_scale)
            # reduction="none": the per-token grad_output arrives only in backward (which
            # runs the loop again, without the stats: they came from this forward).
            loss_rows, _ = chunked_loss(plan, hs, ws, bs, teacher, labels, grad_scale,
                                        None, with_grads=False)
            ctx.save_for_backward(hs, ws, bs, labels, grad_scale, *teacher)
            return _with_stats(ctx, loss_rows, lambda rows: rows)

    @staticmethod
    def backward(ctx, grad_output, *_grad_stats):
        plan: Plan = dataclasses.replace(ctx.plan, with_stats=False)
        if plan.reduced:
            if getattr(ctx, "consumed", False):
                raise RuntimeError(
                    "fastkd: fused_linear_kd_loss keeps one copy of its gradients and rescales them "
                    "in place, so it can be backpropagated only once (retain_graph=True is not "
                    "supported with a reduced loss)")
            ctx.consumed = True
            grads = ctx.saved_tensors
            for g in grads:
                if g is not None:
                    _scale_(g, grad_output, plan.backend)
            grad_h, grad_w, grad_b = grads
        else:
            hs, ws, bs, labels, grad_scale, *teacher = ctx.saved_tensors
            with torch.autocast(hs.device.type, enabled=False):
                _, (grad_h, grad_w, grad_b) = chunked_loss(
                    plan, hs, ws, bs, tuple(teacher), labels, grad_scale,
                    grad_output.reshape(-1), with_grads=True)
        return (grad_h, grad_w, grad_b, None, None, None) + (None,) * ctx.n_teacher


def _with_stats(ctx, out, loss_of):
    """The Function's outputs: ``loss_of(loss rows)``, and the stats rows (no gradient) when
    the plan collects them."""
    if not ctx.plan.with_stats:
        return loss_of(out)
    rows, stats = out
    ctx.mark_non_differentiable(stats)
    return loss_of(rows), stats


def _scale_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """grad *= grad_output in place, with no host sync (the kernels skip it when it is 1)."""
    if grad.numel() == 0:
        return
    get_backend(backend).scale_grad_(grad.view(1, -1) if grad.dim() == 1 else grad, grad_output)


# ---------------------------------------------------------------------------------------
# Argument checks: the tensors here; the settings, labels and num_items as in kd_loss.

def _check_parameter(name: str, x, dims: int) -> None:
    want = "[V, H]" if dims == 2 else "[V]"
    check_float_tensor(name, x, want)
    if x.dim() != dims:
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def _check_side(side: str, hidden, weight, bias, index: str = "") -> None:
    """One side's hidden states, head and bias; ``index`` ("[k]") names one of several teachers."""
    h_name, w_name, b_name = (f"{side}_{part}{index}" for part in ("hidden", "weight", "bias"))
    check_float_tensor(h_name, hidden, "[..., H]")
    _check_parameter(w_name, weight, dims=2)
    if bias is not None:
        _check_parameter(b_name, bias, dims=1)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(
            f"{w_name} must have shape [V, {H}] to match the last dimension of {h_name} "
            f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{b_name} must have shape [{weight.shape[0]}] (one entry per row of "
                         f"{w_name}), got {tuple(bias.shape)}")
    for name, x in ((w_name, weight), (b_name, bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {h_name} is on {hidden.device}")


def _check_side_dtypes(side: str, hidden, weight, bias, index: str = "") -> None:
    for name, x in ((f"{side}_weight{index}", weight), (f"{side}_bias{index}", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(
                f"{name} is {x.dtype} but {side}_hidden{index} is {hidden.dtype}; they must match "
                "(or run under torch.autocast, which casts both)")


def _teacher_heads(teacher_hidden, teacher_weight, teacher_bias) -> Tuple[tuple, Tuple[str, ...]]:
    """The teachers as (hidden, weight, bias) triples and their names' index ("" for one
    teacher given as tensors, "[k]" for sequences): one teacher, or K given as sequences of
    hidden states, heads and (None or) biases."""
    def seq(x):
        return isinstance(x, (list, tuple))
    if not seq(teacher_hidden) and not seq(teacher_weight):
        if seq(teacher_bias):
            raise TypeError("teacher_bias is a sequence but teacher_hidden and teacher_weight are tensors (one "
                            "teacher); pass one bias tensor or None")
        return ((teacher_hidden, teacher_weight, teacher_bias),), ("",)
    if not (seq(teacher_hidden) and seq(teacher_weight)):
        raise TypeError("several teachers take teacher_hidden and teacher_weight both as sequences (each teacher "
                        f"its hidden states and LM head), got {type(teacher_hidden).__name__} and "
                        f"{type(teacher_weight).__name__}")
    K = len(teacher_hidden)
    if K == 0 or len(teacher_weight) != K:
        raise ValueError(f"teacher_hidden and teacher_weight must be sequences of the same length K >= 1 (one "
                         f"entry per teacher), got {K} and {len(teacher_weight)}")
    if teacher_bias is None:
        biases = (None,) * K
    elif seq(teacher_bias) and len(teacher_bias) == K:
        biases = tuple(teacher_bias)
    else:
        raise ValueError(f"with {K} teachers, teacher_bias must be None or a sequence of {K} (a tensor or None "
                         f"each), got {type(teacher_bias).__name__}"
                         + (f" of length {len(teacher_bias)}" if seq(teacher_bias) else ""))
    return tuple(zip(teacher_hidden, teacher_weight, biases)), tuple(f"[{k}]" for k in range(K))


def _autocast_side(device_type: str, *tensors):
    """Under torch.autocast, cast a side to the autocast dtype as nn.Linear would (float64 stays)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x if x is None or x.dtype == torch.float64 else x.to(dtype) for x in tensors)


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f"chunk_size must be 'auto' or a positive int, got {chunk_size!r}")
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be 'auto' or a positive int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be 'auto' or a positive int, got {chunk_size}")


# ---------------------------------------------------------------------------------------
# Public API.

@takes_settings(after=("num_items", "inplace_backward", "chunk_size", "backend", "return_stats"))
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_weights=None,
    num_items=None,
    inplace_backward: bool = False,
    chunk_size: Union[str, int] = "auto",
    backend: str = "auto",
    return_stats: bool = False,
    **settings,
):
    """KD loss from hidden states and LM-head weights, without materialising the logits.

    Equal to ``kd_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, labels, ...)`` (same keywords, same
    meaning), computed over chunks of tokens so that only ``chunk x V`` logits of each side
    exist at a time. Gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``.

    Args:
        student_hidden: ``[..., Hs]`` final hidden states of the student.
        student_weight: ``[Vs, Hs]`` the student's LM head (``lm_head.weight``).
        teacher_hidden: ``[..., Ht]`` (same leading shape; Ht may differ from Hs). A
            constant: if it requires grad, that is an error (compute the teacher under
            ``torch.no_grad()`` or pass ``.detach()``), as in ``kd_loss``.
        teacher_weight: ``[Vt, Ht]``; Vt may differ from Vs when ``vocab_size`` is given.
            ``teacher_weight`` and ``teacher_bias`` may require grad (a frozen teacher
            module's parameters usually still do): they are used as constants, no
            gradient is computed for them and their ``.grad`` stays ``None``.
            Several teachers: ``teacher_hidden`` and ``teacher_weight`` sequences of K
            (each teacher its hidden states and LM head; hidden sizes, dtypes and head
            widths may differ), ``teacher_bias`` None or a sequence of K (None entries
            allowed). Sequences of one, without ``teacher_weights``, are the single teacher.
        teacher_weights: the weights of several teachers, as in :func:`fastkd.kd_loss`
            (None: uniform; K numbers; a ``[K, ...]`` tensor per token). Not to be confused
            with ``teacher_weight``, the LM head(s).
        labels, num_items, and the settings: as in :func:`fastkd.kd_loss`, on the logits
            ``hidden @ weight.T + bias``. ``vocab_size`` restricts both heads to their
            first ``vocab_size`` rows (the rest of the student's weight and bias get zero
            gradient).
        {settings}
        inplace_backward: accepted for keyword compatibility with ``kd_loss`` and has no
            effect: the chunk logits are internal buffers and always receive their
            gradient in place; the caller's tensors are never overwritten.
        chunk_size: tokens per chunk, or ``"auto"``: the two fp32 logits chunks (student
            and teacher, ``rows * V * 8`` bytes) fill a budget of 64 MiB on the CPU and
            ``min(512 MiB, device memory / 16)`` on CUDA; the N tokens are then split into
            ``k = ceil(N / rows)`` equal chunks, so small N runs as one chunk. The rule
            depends on shapes and the device only, so results are reproducible.
        backend: ``auto`` (as ``kd_loss``: ``cuda`` -> ``triton`` -> ``torch`` on CUDA,
            ``cpu`` -> ``torch`` on the CPU), ``cuda``, ``triton``, ``cpu`` or ``torch``
            (chunked too, each chunk's loss and gradient by the reference and autograd).
        return_stats: also return the per-token diagnostics, as :func:`fastkd.kd_loss`:
            ``(loss, fastkd.KDStats)``, collected chunk by chunk from the kernel's pass.
            One teacher only.

    Precision: logits are computed with fp32 output from the inputs as they are (bf16 /
    fp16 matmuls write fp32 on CUDA; on the CPU the low-precision weights are converted to
    fp32 once per call), and the kernel reads them in fp32. Gradients have their inputs'
    dtypes. With bf16/fp16 parameters on CUDA, the gradient matmuls read d loss/d logits
    rounded to the parameter dtype and the weight gradient accumulates in that dtype,
    as a bf16 ``nn.Linear`` backward would. Under ``torch.autocast`` both sides are cast
    to the autocast dtype first, as ``nn.Linear`` would be; without it, each side's
    hidden, weight and bias must share one dtype.

    ``reduction="none"`` recomputes the chunk logits in backward (about twice the matmul
    work of the other reductions), since a per-token ``grad_output`` cannot be applied to
    a weight gradient already summed over tokens. The reduced forms keep one copy of their
    gradients and can be backpropagated once (no ``retain_graph=True``).
    """
    cfg = make_config("fused_linear_kd_loss", **settings)
    return fused_linear_kd_loss_with_config(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, cfg,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_weights=teacher_weights, num_items=num_items,
        inplace_backward=inplace_backward, chunk_size=chunk_size, backend=backend, return_stats=return_stats)


def fused_linear_kd_loss_with_config(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                     cfg: KDConfig, *, student_bias=None, teacher_bias=None, teacher_weights=None,
                                     num_items=None, inplace_backward=False, chunk_size="auto",
                                     backend="auto", return_stats=False):
    """:func:`fused_linear_kd_loss` with the settings already validated into ``cfg``."""
    check_bool("inplace_backward", inplace_backward)
    check_bool("return_stats", return_stats)
    _check_chunk_size(chunk_size)
    heads, index = _teacher_heads(teacher_hidden, teacher_weight, teacher_bias)
    several = not is_single_teacher_call(len(heads), teacher_weights)
    if several and return_stats:
        raise ValueError(f"return_stats takes one teacher, got {len(heads)} (several teachers' diagnostics: "
                         "call fastkd.kd_stats once per teacher)")
    _check_side("student", student_hidden, student_weight, student_bias)
    for (ht, wt, bt), i in zip(heads, index):
        _check_side("teacher", ht, wt, bt, i)
        check_same_tokens("student_hidden", student_hidden, f"teacher_hidden{i}", ht)
    device = student_hidden.device
    student_hidden, student_weight, student_bias = _autocast_side(
        device.type, student_hidden, student_weight, student_bias)
    heads = tuple(_autocast_side(device.type, *head) for head in heads)
    _check_side_dtypes("student", student_hidden, student_weight, student_bias)
    for head, i in zip(heads, index):
        _check_side_dtypes("teacher", *head, i)

    lead = student_hidden.shape[:-1]
    # Each teacher's head against the settings as given: every width must match the
    # student's, or vocab_size fit them all.
    cfg = [resolve_vocab_size(cfg, student_weight.shape[0], wt.shape[0], "student_weight (the student's LM head)",
                              f"teacher_weight{i} (the teacher's LM head)")
           for (_, wt, _), i in zip(heads, index)][0]
    check_labels(labels, lead, device, cfg)
    num_items = check_num_items(num_items, cfg.reduction)
    if several:
        teacher_weights = check_teacher_weights(teacher_weights, len(heads), lead, device, labels, cfg)
    name = backend_for(backend, device, student_hidden.dtype, *(ht.dtype for ht, _, _ in heads), what="inputs",
                       cfg=cfg, several_teachers=len(heads) if several else 0, stats=return_stats).name

    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_args = tuple(x for ht, wt, bt in heads
                         for x in (ht.detach().reshape(-1, ht.shape[-1]), wt.detach(),
                                   None if bt is None else bt.detach()))
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    n = hs.shape[0]
    loss_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    if several:
        teacher_args += (teacher_weight_rows(teacher_weights, len(heads), n, device, loss_dtype),)
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(
            n, cfg.vocab_size, loss_dtype,
            tuple(torch.float64 if wt.dtype == torch.float64 else torch.float32 for _, wt, _ in heads), device)
    grad_enabled = torch.is_grad_enabled()
    plan = Plan(
        cfg=cfg, backend=name, chunk_size=chunk_size,
        student_matmul=matmul_mode(student_weight),
        want_hidden_grad=grad_enabled and student_hidden.requires_grad,
        want_weight_grad=grad_enabled and student_weight.requires_grad,
        want_bias_grad=grad_enabled and student_bias is not None and student_bias.requires_grad,
        op="multi" if several else "dense",
        with_stats=return_stats,
    )
    grad_scale = reduction_scale(flat_labels, n, cfg, num_items, device, loss_dtype)
    out = FusedLinearKDFunction.apply(hs, student_weight, student_bias, flat_labels, grad_scale, plan, *teacher_args)
    return linear_loss_result(out, cfg, labels, lead)


def linear_loss_result(out, cfg, labels, lead, sparse: bool = False):
    """The fused-linear Function's output as the caller gets it: the loss (per token in the
    token shape for ``reduction="none"``), with its stats object when it returned a table."""
    loss, table = out if isinstance(out, tuple) else (out, None)
    loss = loss if cfg.reduction != "none" else loss.reshape(lead)
    return loss if table is None else (loss, stats_result(table, labels, cfg, lead, sparse=sparse))


class FusedLinearKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_linear_kd_loss`: keywords fixed at construction.

    >>> crit = FusedLinearKDLoss(divergence="forward_kl", temperature=2.0)
    >>> loss = crit(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
    """

    def __init__(self, divergence: str = "forward_kl", *, inplace_backward: bool = False,
                 chunk_size: Union[str, int] = "auto", backend: str = "auto", **settings):
        super().__init__()
        self.config = make_config("FusedLinearKDLoss", divergence=divergence, **settings)
        self.inplace_backward = check_bool("inplace_backward", inplace_backward)
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        check_backend_name(backend)
        self.backend = backend

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                student_bias=None, teacher_bias=None, teacher_weights=None, num_items=None, return_stats=False):
        return fused_linear_kd_loss_with_config(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, self.config,
            student_bias=student_bias, teacher_bias=teacher_bias, teacher_weights=teacher_weights,
            num_items=num_items, inplace_backward=self.inplace_backward, chunk_size=self.chunk_size,
            backend=self.backend, return_stats=return_stats)

    def extra_repr(self) -> str:
        options = dict(self.config.changed_settings(), inplace_backward=self.inplace_backward,
                       chunk_size=self.chunk_size, backend=self.backend)
        return ", ".join(f"{k}={v!r}" for k, v in options.items())


takes_settings(FusedLinearKDLoss.__init__, after=("inplace_backward", "chunk_size", "backend"))
