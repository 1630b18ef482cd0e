"""Feature distillation: the student's intermediate hidden states follow the teacher's.

Per token, with student features ``s`` and teacher features ``t`` (length H, the same
width; :class:`FeatureDistillation` first maps the student into the teacher's width with a
learned projection ``s -> W s``):

    mse         sum_h (s_h - t_h)^2                    (FitNets, Romero et al. 2015: the squared L2
                                                        distance of hinted features)
    cosine      1 - s.t / (max(|s|, eps) max(|t|, eps))  (eps = 1e-8, the clamp of
                                                        torch.nn.functional.cosine_similarity)
    l1          sum_h |s_h - t_h|
    smooth_l1   sum_h smooth_l1(s_h - t_h; beta)        (PyTorch's convention: 0.5 d^2 / beta where
                                                        |d| < beta, else |d| - 0.5 beta; beta = 0 is l1)

and the loss is ``1/N sum_tokens value`` (``reduction="mean"``: N valid tokens). Note that
``F.mse_loss(s, t)`` divides by N * H, i.e. it is ``mse / H`` here; likewise
``F.l1_loss`` and ``F.smooth_l1_loss``. Summing over H keeps the loss of one token the
squared distance of its feature vectors, whatever the width.

``normalize=True`` standardises each side per token over H before the distance,
``x_hat = (x - mean(x)) / sqrt(var(x) + 1e-5)`` (biased variance: ``F.layer_norm`` without
affine parameters), so that a teacher whose hidden states are orders of magnitude larger
than the student's (common: LLM residual streams grow with depth and hold outlier
dimensions of size ~1e3) does not dominate. The teacher's statistics are constants.

Tokens, masks and reductions are those of ``kd_loss`` (docs/semantics.md): ``labels ==
ignore_index`` removes a token, ``mean`` divides by max(1, valid tokens) or ``num_items``,
``sum``, ``batchmean`` (by all token rows) and ``none`` (per token, 0 where ignored). The
teacher is a constant: a teacher tensor that requires grad is an error, as in ``kd_loss``.

Memory. One autograd Function walks over the tokens in chunks; per chunk it computes the
per-token loss and d loss / d student in one pass (in fp32, or float64 for float64
input) and writes the gradient, already multiplied by the reduction's scale, into one
preallocated tensor of the student's shape and dtype. That tensor is the only
``[N, H]``-sized allocation; the fp32 temporaries are ``[chunk, H]``. Backward only
multiplies the stored gradient by ``grad_output`` (skipped on the CPU when it is 1);
``reduction="none"`` computes the values in forward and the gradient in backward. With
a projection, each chunk is projected, its loss and gradient computed, the gradient
taken back through the projection and the weight gradient accumulated: the projected
``[N, H_teacher]`` tensor never exists (the pattern of ``fused_linear.py``).

Why no C++ kernel: every kind is a few elementwise operations and one row reduction, so
the work is memory-bound, and the chunks' temporaries (2 MiB on the CPU) stay in cache
between their passes. Measured (docs/features.md: N = 8192, H = 4096, fp32, forward +
backward, a shared 2-vCPU AMD EPYC), eager ``feature_loss`` is 2-6x faster than plain
autograd ``((s - t)**2).sum(-1).mean()`` (mse: 62 vs 211 ms) with one [N, H] buffer
instead of four or five; under torch.compile it runs as one chunk and inductor fuses it
into the kernels a hand-written one would be (plain and ours then time alike). What a
C++ kernel could still save is the passes over cached data, a factor well under the
cost of the layers whose features are distilled.

File order: settings, the per-chunk math, the chunk loop, the autograd Function, the
argument checks, ``feature_loss``, ``FeatureDistillation``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import check_float_tensor, check_label_tensor, check_num_items, check_same_tokens, reduction_scale
from .config import KDConfig, check_bool, check_int, check_number, make_config

KINDS = ("mse", "cosine", "l1", "smooth_l1")
PROJECTIONS = ("auto", "always", "none")
PROJECTION_INITS = ("xavier_uniform", "orthogonal", "identity")

# F.layer_norm's default eps and F.cosine_similarity's, so that the standardisation and
# the cosine agree with the PyTorch functions users know.
NORMALIZE_EPS = 1e-5
COSINE_EPS = 1e-8

# Bytes of one fp32 [chunk, H] temporary. On the CPU a few of these live at once and stay
# in the L2/L3 caches between the passes of a chunk; larger chunks measured no faster
# (docs/features.md). On CUDA each chunk is ~10 kernel launches, so chunks are larger.
CPU_CHUNK_BYTES = 2 << 20
CUDA_CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------
# Settings.

@dataclass(frozen=True)
class FeatureSpec:
    """The validated settings of a feature loss (no tensors)."""

    kind: str
    smooth_l1_beta: float
    normalize: bool
    chunk_size: Optional[int]
    cfg: KDConfig  # reduction and ignore_index, in the form the shared helpers read

    @property
    def reduction(self) -> str:
        return self.cfg.reduction

    @property
    def ignore_index(self) -> int:
        return self.cfg.ignore_index


def _check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    chunk_size = check_int("chunk_size", chunk_size, allow_none=True)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be None (automatic) or a positive int, got {chunk_size}")
    return chunk_size


def make_spec(caller: str, kind="mse", smooth_l1_beta=1.0, normalize=False, chunk_size=None,
              ignore_index=-100, reduction="mean") -> FeatureSpec:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return FeatureSpec(
        kind=kind,
        smooth_l1_beta=check_number("smooth_l1_beta", smooth_l1_beta, low=0.0),
        normalize=check_bool("normalize", normalize),
        chunk_size=_check_chunk_size(chunk_size),
        cfg=make_config(caller, reduction=reduction, ignore_index=ignore_index),
    )


def chunk_rows(n_rows: int, width: int, device: torch.device, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size``, or as many as fit the budget, evened out over chunks."""
    if n_rows <= 0:
        return 1
    if chunk_size is not None:
        return min(chunk_size, n_rows)
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = max(1, budget // (4 * max(1, width)))
    n_chunks = -(-n_rows // rows)
    return -(-n_rows // n_chunks)


# ---------------------------------------------------------------------------------------
# One chunk: per-token loss and d loss / d student of [c, H] features in the compute dtype.
#
# The gradient comes back as (g, factor) with d loss / d s = g * factor, factor a number
# or a [c, 1] column: the constant 2 of mse and the standardisation's 1/sigma are folded
# into the one multiply that writes the chunk's gradient (each pass over a chunk costs
# about as much as the arithmetic of a pass).

def _standardize(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """((x - mean) * rstd, rstd) per row, rstd = 1/sqrt(var + eps) of shape [c, 1].

    ``native_layer_norm`` gives both in one pass over x (``var_mean`` measured ~10x
    slower on rows of a few thousand entries on the CPU).
    """
    x_hat, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
    return x_hat, rstd


def _standardize_backward_(g: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """g - mean(g) - x_hat * mean(g * x_hat), in place: the layer-norm backward without its
    factor rstd (which the caller folds into the write)."""
    width = g.shape[-1]
    mean_gx = torch.linalg.vecdot(g, x_hat, dim=-1).unsqueeze(-1).div_(-width)
    return g.sub_(g.mean(dim=-1, keepdim=True)).addcmul_(x_hat, mean_gx)


def _distance(s: torch.Tensor, t: torch.Tensor, plan: "Plan", beta: Optional[torch.Tensor], want_grad: bool):
    """Per-token value [c] and, when ``want_grad``, (g, factor) with gradient g * factor.

    ``beta`` (smooth_l1) is a device scalar: a float setting read inside the autograd
    Function would be a free symbolic value under torch.compile(dynamic=True), which
    dynamo cannot lift into the Function's graph. For the same reason the eps constants
    come from the plan (built in the caller), not from this module's globals.
    """
    kind, eps = plan.spec.kind, plan.cosine_eps
    if kind == "cosine":
        dot = torch.linalg.vecdot(s, t, dim=-1)
        s_norm = torch.linalg.vector_norm(s, dim=-1)
        ns = s_norm.clamp_min(eps)
        nt = torch.linalg.vector_norm(t, dim=-1).clamp_min(eps)
        inv = 1.0 / (ns * nt)
        cos = dot * inv
        if not want_grad:
            return 1.0 - cos, None
        # d(1 - cos)/ds = cos * s / ns^2 - t / (ns nt); below eps the clamped norm is the
        # constant eps, so the first term vanishes (the gradient of the value computed).
        a = torch.where(s_norm >= eps, cos / (ns * ns), 0.0)
        g = (s * a.unsqueeze(-1)).addcmul_(t, inv.unsqueeze(-1), value=-1.0)
        return 1.0 - cos, (g, 1.0)
    d = s - t
    if kind == "mse":
        value = torch.linalg.vector_norm(d, dim=-1).square()
        return value, ((d, 2.0) if want_grad else None)
    if kind == "l1":
        value = d.abs().sum(-1)
        return value, ((d.sign_(), 1.0) if want_grad else None)
    # smooth_l1. beta = 0 needs no special case: |d| < 0 never holds, so both branches
    # below select the l1 forms (the unselected 1/beta terms are discarded by where).
    a = d.abs()
    quadratic = a < beta
    value = torch.where(quadratic, (0.5 / beta) * a * a, a - 0.5 * beta).sum(-1)
    if not want_grad:
        return value, None
    return value, (torch.where(quadratic, d / beta, d.sign()), 1.0)


def chunk_loss(s: torch.Tensor, t: torch.Tensor, plan: "Plan", beta: Optional[torch.Tensor],
               want_grad: bool):
    """Per-token loss [c] and (g, factor) or None, standardising first if asked."""
    if not plan.spec.normalize:
        return _distance(s, t, plan, beta, want_grad)
    s_hat, rstd = _standardize(s, plan.normalize_eps)
    t_hat, _ = _standardize(t, plan.normalize_eps)
    value, grad = _distance(s_hat, t_hat, plan, beta, want_grad)
    if grad is None:
        return value, None
    g, factor = grad
    return value, (_standardize_backward_(g, s_hat), rstd * factor)


# ---------------------------------------------------------------------------------------
# The chunk loop.

@dataclass(frozen=True)
class Plan:
    """Everything about a call that is not a tensor."""

    spec: FeatureSpec
    chunk: Optional[int]  # rows per chunk; None: all rows in one chunk (under torch.compile)
    compute_dtype: torch.dtype
    reduced: bool
    want_student_grad: bool
    want_weight_grad: bool
    # fp16 gradients are stored without the reduction's scale (1/N would push most entries
    # below fp16's smallest subnormal) and scaled in fp32 in backward, as kd_loss does.
    deferred_scale: bool
    normalize_eps: float = NORMALIZE_EPS
    cosine_eps: float = COSINE_EPS

    @property
    def any_grad(self) -> bool:
        return self.want_student_grad or self.want_weight_grad


def chunked_loss(plan: Plan, student, teacher, weight, labels, beta, row_coef, with_grads: bool):
    """Loss rows [N] (compute dtype, 0 at ignored tokens) and, when ``with_grads``,
    (grad_student [N, Hs] in the student's dtype, grad_weight [Ht, Hs] in its dtype).

    ``row_coef`` (a device scalar or [N]) multiplies every row's gradient.
    """
    spec, dtype = plan.spec, plan.compute_dtype
    n = student.shape[0]
    want_s = with_grads and plan.want_student_grad
    want_w = with_grads and plan.want_weight_grad
    grad_s = None
    # The weight gradient ([Ht, Hs], small) is summed over chunks in the compute dtype.
    acc_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_w else None
    w = None if weight is None else weight.to(dtype)
    loss = torch.empty((n,), dtype=dtype, device=student.device)
    per_row_coef = isinstance(row_coef, torch.Tensor) and row_coef.dim() == 1

    if plan.chunk is None:
        bounds = ((0, n),)
    else:
        bounds = tuple((start, min(start + plan.chunk, n)) for start in range(0, n, plan.chunk))
    single = len(bounds) == 1
    if want_s and not single:
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)

    for start, end in bounds:
        s_c = student[start:end].to(dtype)
        t_c = teacher[start:end].to(dtype)
        p_c = s_c if w is None else s_c @ w.t()
        value, grad = chunk_loss(p_c, t_c, plan, beta, want_s or want_w)
        valid = None if labels is None else (labels[start:end] != spec.ignore_index)
        loss[start:end] = value if valid is None else torch.where(valid, value, 0.0)
        if grad is None:
            continue
        g, factor = grad
        coef = row_coef[start:end].unsqueeze(-1) if per_row_coef else row_coef
        coef = coef * factor
        if valid is not None:
            # Fills, not a multiply by the mask: an ignored token's NaN (in g, or in its
            # factor 1/sigma) must not leak.
            ignored = ~valid.unsqueeze(-1)
            g = g.masked_fill_(ignored, 0.0)
            coef = coef.masked_fill(ignored, 0.0) if coef.dim() == 2 else coef
        if w is not None:
            g = g.mul_(coef)
            if want_w:
                acc_w.addmm_(g.t(), s_c)
            if not want_s:
                continue
            if single:
                grad_s = (g @ w).to(student.dtype)
            elif grad_s.dtype == dtype:
                torch.mm(g, w, out=grad_s[start:end])
            else:
                grad_s[start:end] = g @ w
        elif single:
            # One chunk: its gradient is the buffer (no second [N, H] tensor).
            grad_s = g.mul_(coef) if g.dtype == student.dtype else (g * coef).to(student.dtype)
        else:
            # The scale, the mask's zeros and the cast to the student's dtype in one write.
            torch.mul(g, coef, out=grad_s[start:end])
    grad_w = None
    if want_w:
        grad_w = acc_w if acc_w.dtype == weight.dtype else acc_w.to(weight.dtype)
    return loss, grad_s, grad_w


# ---------------------------------------------------------------------------------------
# Autograd.

def _scale_(grad: Optional[torch.Tensor], factor: torch.Tensor) -> bool:
    """grad *= factor in place; returns whether it wrote (False when skipped)."""
    if grad is None or grad.numel() == 0:
        return False
    # On the CPU reading the factor costs no synchronisation, and it is 1 after a plain
    # loss.backward(): skip that pass over [N, H]. On a GPU (and while compiling) always
    # multiply: reading it would synchronise.
    if factor.device.type == "cpu" and not torch.compiler.is_compiling() and factor.item() == 1.0:
        return False
    grad.mul_(factor)
    return True


class FeatureLossFunction(torch.autograd.Function):
    """Reduced losses: forward computes the loss and the gradients (scaled by the reduction),
    backward multiplies them by ``grad_output`` in place. ``reduction="none"``: forward
    computes the per-token loss only and backward computes the gradients with each row
    scaled by its ``grad_output`` (a per-token factor cannot be applied to a projection's
    weight gradient already summed over tokens, and nothing [N, H] is held in between).
    """

    @staticmethod
    def forward(ctx, student, teacher, weight, labels, grad_scale, beta, plan: Plan):
        ctx.plan = plan
        with torch.autocast(student.device.type, enabled=False):
            if plan.reduced:
                coef = torch.ones_like(grad_scale) if plan.deferred_scale else grad_scale
                loss_rows, grad_s, grad_w = chunked_loss(plan, student, teacher, weight, labels, beta, coef,
                                                         with_grads=plan.any_grad)
                ctx.save_for_backward(grad_s, grad_w, grad_scale if plan.deferred_scale else None)
                ctx.scaled_in_place = False
                return loss_rows.sum() * grad_scale
            loss_rows, _, _ = chunked_loss(plan, student, teacher, weight, labels, beta, None,
                                          with_grads=False)
            ctx.save_for_backward(student, teacher, weight, labels, beta)
            return loss_rows

    @staticmethod
    def backward(ctx, grad_output):
        plan: Plan = ctx.plan
        if not plan.reduced:
            student, teacher, weight, labels, beta = ctx.saved_tensors
            with torch.autocast(student.device.type, enabled=False):
                _, grad_s, grad_w = chunked_loss(plan, student, teacher, weight, labels, beta,
                                                 grad_output.to(plan.compute_dtype), with_grads=True)
            return grad_s, None, grad_w, None, None, None, None
        if ctx.scaled_in_place:
            raise RuntimeError(
                "fastkd: feature_loss keeps one copy of its gradient and has rescaled it in place by the "
                "first backward's grad_output, so it cannot be backpropagated again (retain_graph=True "
                "works only while grad_output is 1 on the CPU)")
        grad_s, grad_w, deferred = ctx.saved_tensors
        factor = grad_output.to(plan.compute_dtype)
        if deferred is not None:
            factor = factor * deferred
        wrote_s = _scale_(grad_s, factor)
        wrote_w = _scale_(grad_w, factor)
        ctx.scaled_in_place = wrote_s or wrote_w
        return grad_s, None, grad_w, None, None, None, None


# ---------------------------------------------------------------------------------------
# Argument checks.

def _check_mask_labels(labels, lead_shape, device) -> Optional[torch.Tensor]:
    """Labels as a token mask: None, or an integer tensor of the features' leading shape.

    Only ``labels == ignore_index`` is read, so there is no range check (unlike kd_loss,
    whose labels also index the vocabulary). Returns the labels flattened to int64 [N].
    """
    if labels is None:
        return None
    check_label_tensor(labels, lead_shape, device, "features", "hidden")
    return labels.reshape(-1).to(torch.int64)


def _check_features(student, teacher, student_name: str, teacher_name: str) -> None:
    check_float_tensor(student_name, student, "[..., H]")
    check_float_tensor(teacher_name, teacher, "[..., H]")
    check_same_tokens(student_name, student, teacher_name, teacher)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (the test path), float32 otherwise."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def _chunk_plan(n, hs, ht, device, chunk_size, projected: bool) -> Optional[int]:
    """Rows per chunk, or None for a single chunk.

    Under torch.compile, without a projection and without an explicit ``chunk_size``, the
    loss runs as one chunk: inductor fuses the per-token arithmetic into a few kernels
    that hold no [N, H] fp32 temporaries anyway, and a Python loop over the tokens would
    specialise the graph on N (recompiling the whole compiled region for every sequence
    length under ``dynamic=True``). With a projection the loop stays: the projected
    [N, H_teacher] states would otherwise exist, so that graph is specialised on N.
    """
    if torch.compiler.is_compiling() and chunk_size is None and not projected:
        return None
    return chunk_rows(n, max(hs, ht), device, chunk_size)


def feature_term(student, teacher, flat_labels, spec: FeatureSpec, num_items, *, weight=None,
                 layer_weight=1.0, student_name="student", teacher_name="teacher") -> torch.Tensor:
    """One feature loss on checked labels (``flat_labels``: int64 [N] or None) and checked
    ``num_items``, times ``layer_weight``; ``weight`` [Ht, Hs] projects the student first."""
    _check_features(student, teacher, student_name, teacher_name)
    hs, ht = student.shape[-1], teacher.shape[-1]
    if weight is None and hs != ht:
        raise ValueError(
            f"{student_name} has width {hs} but {teacher_name} has width {ht}; the features must have the "
            "same width (project the student first: FeatureDistillation learns one projection per layer pair)")
    if weight is not None:
        if weight.shape != (ht, hs):
            raise ValueError(f"the projection of {student_name} must have shape [{ht}, {hs}], "
                             f"got {tuple(weight.shape)}")
        if weight.device != student.device:
            raise ValueError(f"the projection is on {weight.device} but {student_name} is on {student.device}")
    lead = student.shape[:-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    n = s2.shape[0]
    dtype = _compute_dtype(student, teacher, weight)
    grad_enabled = torch.is_grad_enabled()
    want_w = grad_enabled and weight is not None and weight.requires_grad
    reduced = spec.reduction != "none"
    plan = Plan(
        spec=spec,
        chunk=_chunk_plan(n, hs, ht, student.device, spec.chunk_size, weight is not None),
        compute_dtype=dtype,
        reduced=reduced,
        want_student_grad=grad_enabled and student.requires_grad,
        want_weight_grad=want_w,
        deferred_scale=reduced and torch.float16 in (student.dtype, None if weight is None else weight.dtype),
    )
    grad_scale = reduction_scale(flat_labels, n, spec.cfg, num_items, student.device, dtype)
    beta = None
    if spec.kind == "smooth_l1":
        beta = torch.full((), spec.smooth_l1_beta, dtype=dtype, device=student.device)
    if reduced:
        # The layer weight is folded into the scale the gradient is written with, so the
        # weighted sum of FeatureDistillation costs no extra pass over [N, H] in backward.
        return FeatureLossFunction.apply(s2, t2, weight, flat_labels, grad_scale * layer_weight, beta, plan)
    out = FeatureLossFunction.apply(s2, t2, weight, flat_labels, grad_scale, beta, plan).reshape(lead)
    return out if isinstance(layer_weight, numbers.Real) and layer_weight == 1.0 else out * layer_weight


# ---------------------------------------------------------------------------------------
# Public function.

def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    kind: str = "mse",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    smooth_l1_beta: float = 1.0,
    normalize: bool = False,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Feature-distillation loss between student and teacher hidden states of one width.

    ``loss = 1/N sum_tokens value(s, t)`` with, per token (H the hidden width):

    * ``mse``: ``sum_h (s_h - t_h)^2`` (FitNets). ``F.mse_loss`` is this divided by H.
    * ``cosine``: ``1 - s.t / (max(|s|, 1e-8) max(|t|, 1e-8))``. The clamp is that of
      ``F.cosine_similarity``, whose values this matches. A zero vector gives cosine 0
      (value 1) and a finite gradient: the gradient of the clamped formula, which below
      the clamp is ``-t / (1e-8 |t|)`` (large; PyTorch's is of the same size). Mask such
      tokens (padding) with ``labels`` rather than rely on it.
    * ``l1``: ``sum_h |s_h - t_h|`` (gradient ``sign``, 0 at 0).
    * ``smooth_l1``: ``sum_h`` of ``0.5 d^2 / beta`` where ``|d| < beta`` else
      ``|d| - 0.5 beta`` (``d = s - t``, ``beta = smooth_l1_beta``; PyTorch's convention,
      ``beta = 0`` is ``l1``).

    Args:
        student: ``[..., H]`` student features (float32/64, bfloat16, float16).
        teacher: ``[..., H]`` teacher features, same leading shape. A constant: if it
            requires grad that is an error (as in ``kd_loss``); compute it under
            ``torch.no_grad()`` or pass ``.detach()``.
        labels: ``[...]`` integer token mask: a token whose label is ``ignore_index`` is
            removed (zero loss and gradient). None: every token counts. Only equality with
            ``ignore_index`` is read (no vocabulary range check).
        kind: ``mse`` (default), ``cosine``, ``l1`` or ``smooth_l1``.
        ignore_index: label value that drops a token.
        reduction: ``mean`` (sum over valid tokens / max(1, valid tokens), or / ``num_items``),
            ``sum``, ``batchmean`` (/ number of token rows) or ``none`` (per token ``[...]``).
        num_items: the denominator of ``mean`` (a number or a one-element tensor), for
            gradient accumulation over micro-batches.
        smooth_l1_beta: ``beta >= 0`` of ``smooth_l1``.
        normalize: standardise each side per token over H first (``F.layer_norm`` without
            affine parameters, eps 1e-5); the teacher's statistics are constants.
        chunk_size: tokens per chunk; None picks chunks whose fp32 ``[chunk, H]``
            temporaries are 2 MiB (CPU) or 64 MiB (CUDA). Results do not depend on it
            beyond rounding.

    Returns the reduced loss (a scalar, float32, or float64 for float64 input), or the
    per-token loss for ``reduction="none"``. Computed in fp32 (float64 for float64 input)
    in chunks; the gradient has the student's dtype and is the only ``[N, H]`` buffer.
    """
    spec = make_spec("feature_loss", kind=kind, smooth_l1_beta=smooth_l1_beta, normalize=normalize,
                     chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction)
    _check_features(student, teacher, "student", "teacher")
    flat_labels = _check_mask_labels(labels, student.shape[:-1], student.device)
    num_items = check_num_items(num_items, spec.reduction)
    return feature_term(student, teacher, flat_labels, spec, num_items)


# ---------------------------------------------------------------------------------------
# Module: several (student layer, teacher layer) pairs of Hugging Face hidden states.

LayerMap = Union[Dict[int, int], Sequence[Tuple[int, int]]]


def _layer_pairs(layer_map) -> Tuple[Tuple[int, int], ...]:
    if isinstance(layer_map, dict):
        items = list(layer_map.items())
    elif isinstance(layer_map, (list, tuple)):
        items = list(layer_map)
    else:
        raise TypeError("layer_map must be a dict {student_layer: teacher_layer} or a sequence of "
                        f"(student_layer, teacher_layer) pairs, got {type(layer_map).__name__}")
    if not items:
        raise ValueError("layer_map must map at least one student layer to a teacher layer, got an empty map")
    pairs = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"layer_map entries must be (student_layer, teacher_layer) pairs, got {item!r}")
        for index in item:
            if isinstance(index, bool) or not isinstance(index, numbers.Integral):
                raise TypeError(f"layer_map indices must be ints (indices into output_hidden_states), "
                                f"got {index!r} in {tuple(item)!r}")
        pairs.append((int(item[0]), int(item[1])))
    return tuple(pairs)


def _layer_weights(layer_weights, n_pairs: int) -> Tuple[float, ...]:
    if layer_weights is None:
        return (1.0 / n_pairs,) * n_pairs
    if isinstance(layer_weights, (str, bytes)) or not isinstance(layer_weights, Sequence):
        raise TypeError(f"layer_weights must be None or a sequence of {n_pairs} numbers, "
                        f"got {type(layer_weights).__name__}")
    if len(layer_weights) != n_pairs:
        raise ValueError(f"layer_weights must have one entry per layer_map pair ({n_pairs}), "
                         f"got {len(layer_weights)}")
    return tuple(check_number(f"layer_weights[{i}]", w, low=0.0) for i, w in enumerate(layer_weights))


def _projection_mode(projection) -> str:
    if projection is None:
        return "none"
    if not isinstance(projection, str) or projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS} or None, got {projection!r}")
    return projection


def _hidden_size(name: str, value) -> int:
    value = check_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def init_projection_(weight: torch.Tensor, init: str) -> None:
    """Initialise a projection weight [H_teacher, H_student] in place (see FeatureDistillation)."""
    with torch.no_grad():
        if init == "xavier_uniform":
            nn.init.xavier_uniform_(weight)
        elif init == "orthogonal":
            nn.init.orthogonal_(weight)
        else:  # identity: checked square at construction
            nn.init.eye_(weight)


def _hidden_tuple(name: str, states) -> Sequence[torch.Tensor]:
    if isinstance(states, (list, tuple)):
        return states
    if states is None:
        raise TypeError(f"{name} is None: run the model with output_hidden_states=True and pass "
                        "outputs.hidden_states")
    raise TypeError(f"{name} must be a tuple or list of [..., H] tensors (a Hugging Face model's "
                    f"outputs.hidden_states), got {type(states).__name__}")


def _resolve(name: str, states: Sequence[torch.Tensor], index: int, pair: Tuple[int, int]) -> int:
    n = len(states)
    if not -n <= index < n:
        raise ValueError(
            f"layer_map pair {pair}: index {index} is out of range for {name}, which has {n} entries "
            f"(valid indices {-n}..{n - 1}; index 0 is the embeddings, i the output of block i)")
    return index % n


class FeatureDistillation(nn.Module):
    """Feature distillation over pairs of layers of Hugging Face ``output_hidden_states``.

    ``loss = sum_k layer_weights[k] * feature_loss(P_k(h_s[i_k]), h_t[j_k], labels)`` for the
    pairs ``(i_k, j_k)`` of ``layer_map``, where ``P_k`` is a learned linear projection
    ``H_student -> H_teacher`` (no bias) when there is one, else the identity.

    Args:
        layer_map: which student layer follows which teacher layer: ``{student_layer:
            teacher_layer}`` or a sequence of ``(student_layer, teacher_layer)`` pairs
            (a sequence allows one student layer to follow several teacher layers).
            Indices into ``output_hidden_states`` tuples: 0 is the embeddings, ``i`` the
            output of block ``i``; negative indices count from the end, resolved against
            each tuple's length at forward time.
        student_hidden_size, teacher_hidden_size: the widths H_s and H_t.
        kind, normalize, ignore_index, reduction, chunk_size: as in :func:`feature_loss`;
            with a projection, ``normalize`` standardises the projected student.
        layer_weights: one non-negative weight per pair; None gives ``1/len(layer_map)``
            each, so the loss is the mean over pairs and keeps the scale of one pair as
            layers are added.
        projection: ``"auto"`` (default) creates a projection per pair only if the widths
            differ; ``"always"`` creates them also for equal widths; ``None``/``"none"``
            never (then differing widths are an error). The projections are
            ``nn.Linear(H_s, H_t, bias=False)`` in ``self.projections`` (an
            ``nn.ModuleList`` aligned with the pairs), so ``module.parameters()`` holds
            them: give them to the optimizer with the student's parameters.
        projection_init: ``"xavier_uniform"`` (default; Glorot & Bengio 2010: variance
            ``2 / (H_s + H_t)``, which keeps the size of the features roughly across
            widths, where ``nn.Linear``'s default init shrinks them by about ``sqrt(3)``),
            ``"orthogonal"`` (Saxe et al. 2014: a norm-preserving map when ``H_t >= H_s``)
            or ``"identity"`` (square only: training starts as plain feature matching,
            with ``projection="always"``).

    ``forward(student_hidden_states, teacher_hidden_states, labels=None, num_items=None)``
    takes the two tuples (or lists) of ``[..., H]`` tensors, e.g. ``outputs.hidden_states``
    of a model run with ``output_hidden_states=True``, and ``labels`` ``[...]`` as token
    mask (positions of the hidden states: for padding, ``labels = attention_mask`` mapped
    to ``ignore_index`` where it is 0). It returns a scalar (``none``: the weighted sum of
    the per-token losses ``[...]``).

    Memory: each pair's loss holds one gradient of its student layer's shape from forward
    to backward; the projected student states are never materialised (projection, loss
    and both gradients happen per chunk of tokens).
    """

    def __init__(self, layer_map: LayerMap, student_hidden_size: int, teacher_hidden_size: int, *,
                 kind: str = "mse", normalize: bool = False, layer_weights: Optional[Sequence[float]] = None,
                 projection: Optional[str] = "auto", projection_init: str = "xavier_uniform",
                 ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None):
        super().__init__()
        self.pairs = _layer_pairs(layer_map)
        self.student_hidden_size = _hidden_size("student_hidden_size", student_hidden_size)
        self.teacher_hidden_size = _hidden_size("teacher_hidden_size", teacher_hidden_size)
        self.spec = make_spec("FeatureDistillation", kind=kind, normalize=normalize, chunk_size=chunk_size,
                              ignore_index=ignore_index, reduction=reduction)
        self.layer_weights = _layer_weights(layer_weights, len(self.pairs))
        self.projection = _projection_mode(projection)
        if not isinstance(projection_init, str) or projection_init not in PROJECTION_INITS:
            raise ValueError(f"projection_init must be one of {PROJECTION_INITS}, got {projection_init!r}")
        self.projection_init = projection_init
        hs, ht = self.student_hidden_size, self.teacher_hidden_size
        project = self.projection == "always" or (self.projection == "auto" and hs != ht)
        if self.projection == "none" and hs != ht:
            raise ValueError(
                f"student_hidden_size={hs} and teacher_hidden_size={ht} differ but projection={projection!r}: "
                "feature distillation between different widths needs a projection (use projection='auto')")
        if project and projection_init == "identity" and hs != ht:
            raise ValueError(f"projection_init='identity' needs equal widths, got student_hidden_size={hs} and "
                             f"teacher_hidden_size={ht}; use 'xavier_uniform' or 'orthogonal'")
        self.projections = nn.ModuleList()
        if project:
            for _ in self.pairs:
                linear = nn.Linear(hs, ht, bias=False)
                init_projection_(linear.weight, projection_init)
                self.projections.append(linear)

    def forward(self, student_hidden_states, teacher_hidden_states, labels=None, num_items=None) -> torch.Tensor:
        students = _hidden_tuple("student_hidden_states", student_hidden_states)
        teachers = _hidden_tuple("teacher_hidden_states", teacher_hidden_states)
        resolved = [(_resolve("student_hidden_states", students, i, (i, j)),
                     _resolve("teacher_hidden_states", teachers, j, (i, j))) for i, j in self.pairs]
        first = students[resolved[0][0]]
        check_float_tensor(f"student_hidden_states[{resolved[0][0]}]", first, "[..., H]")
        flat_labels = _check_mask_labels(labels, first.shape[:-1], first.device)
        num_items = check_num_items(num_items, self.spec.reduction)
        total = None
        for k, (i, j) in enumerate(resolved):
            s_name, t_name = f"student_hidden_states[{i}]", f"teacher_hidden_states[{j}]"
            student, teacher = students[i], teachers[j]
            _check_features(student, teacher, s_name, t_name)
            self._check_width(s_name, student, self.student_hidden_size, "student_hidden_size")
            self._check_width(t_name, teacher, self.teacher_hidden_size, "teacher_hidden_size")
            if student.shape[:-1] != first.shape[:-1]:
                raise ValueError(f"{s_name} has leading (token) shape {tuple(student.shape[:-1])} but "
                                 f"student_hidden_states[{resolved[0][0]}] has {tuple(first.shape[:-1])}")
            weight = self.projections[k].weight if len(self.projections) else None
            term = feature_term(student, teacher, flat_labels, self.spec, num_items, weight=weight,
                                layer_weight=self.layer_weights[k], student_name=s_name, teacher_name=t_name)
            total = term if total is None else total + term
        return total

    @staticmethod
    def _check_width(name: str, x: torch.Tensor, width: int, setting: str) -> None:
        if x.shape[-1] != width:
            raise ValueError(f"{name} has width {x.shape[-1]} but {setting}={width}")

    def extra_repr(self) -> str:
        options = {"layer_map": self.pairs, "student_hidden_size": self.student_hidden_size,
                   "teacher_hidden_size": self.teacher_hidden_size, "kind": self.spec.kind}
        if self.spec.normalize:
            options["normalize"] = True
        if self.spec.reduction != "mean":
            options["reduction"] = self.spec.reduction
        return ", ".join(f"{k}={v!r}" for k, v in options.items())
