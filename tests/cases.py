"""One generator of test cases, shared by every backend.

A :class:`Case` describes the inputs (shapes, dtypes, special entries) and the loss
keywords; :func:`make_inputs` draws them (seeded); :func:`check_case` runs a backend and
compares loss and gradient with ``fastkd.reference`` in float64. A new backend only has
to be added to the backend list in ``conftest.py`` to get the whole suite.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

import fastkd
from fastkd import reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Case:
    lead: Tuple[int, ...] = (37,)       # token dims: [N] or [B, S]
    vocab: int = 1001                   # odd, not a power of two
    student_dtype: torch.dtype = torch.float32
    teacher_dtype: Optional[torch.dtype] = None  # None: same as the student
    divergence: str = "forward_kl"
    temperature: float = 2.0
    beta: float = 0.5
    alpha: float = 1.0
    t_squared: bool = True
    reduction: str = "mean"
    labels: bool = True
    ignore_frac: float = 0.2            # fraction of tokens with label == ignore_index
    neg_inf: Optional[str] = None       # None | "both" | "teacher" | "student": masked vocab entries
    nan_row: bool = False               # a NaN in one valid student row
    teacher_pad: int = 0                # extra teacher columns past vocab_size
    vocab_size: Optional[int] = None
    noncontiguous: bool = False
    num_items: Optional[float] = None
    inplace: bool = False

    @property
    def id(self) -> str:
        parts = [self.divergence, self.reduction, str(self.student_dtype).split(".")[-1],
                 f"T{self.temperature}", f"a{self.alpha}"]
        if self.divergence == "jsd":
            parts.append(f"b{self.beta}")
        defaults = Case()
        for f in ("lead", "vocab", "teacher_dtype", "t_squared", "labels", "ignore_frac", "neg_inf",
                  "nan_row", "teacher_pad", "vocab_size", "noncontiguous", "num_items", "inplace"):
            if getattr(self, f) != getattr(defaults, f):
                parts.append(f"{f}={getattr(self, f)}".replace(" ", ""))
        return "-".join(parts)

    def replace(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)

    def kwargs(self) -> dict:
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                    alpha=self.alpha, t_squared=self.t_squared, reduction=self.reduction,
                    num_items=self.num_items, vocab_size=self.vocab_size)


def _logits(shape, generator) -> torch.Tensor:
    """Logits ~ N(0, 3^2), with a quarter of the rows sharply peaked on one entry."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3.0
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] > 0:
        peaked = torch.rand(rows.shape[0], generator=generator) < 0.25
        where = torch.randint(0, shape[-1], (rows.shape[0],), generator=generator)
        rows[peaked, where[peaked]] += 15.0
    return x


def make_inputs(case: Case, device="cpu", seed: int = 0):
    """(student, teacher, labels) for a case; student requires grad."""
    g = torch.Generator().manual_seed(seed)
    V = case.vocab
    Vt = V + case.teacher_pad
    s = _logits(case.lead + (V,), g)
    t = _logits(case.lead + (Vt,), g)
    n_cols = case.vocab_size or V
    if case.neg_inf is not None and s.numel() > 0:
        masked = torch.rand(n_cols, generator=g) < 0.1
        masked[0] = False  # keep at least one live entry so every row is a distribution
        if case.neg_inf in ("both", "student"):
            s[..., :n_cols][..., masked] = float("-inf")
        if case.neg_inf in ("both", "teacher"):
            t[..., :n_cols][..., masked] = float("-inf")
    labels = None
    if case.labels:
        labels = torch.randint(0, n_cols, case.lead, generator=g)
        if case.neg_inf in ("both", "student") and labels.numel() > 0:
            labels = torch.zeros_like(labels)  # column 0 is never masked: finite CE
        drop = torch.rand(case.lead, generator=g) < case.ignore_frac
        labels[drop] = -100
    if case.nan_row and s.numel() > 0:
        flat = s.reshape(-1, V)
        valid_rows = (labels.reshape(-1) != -100).nonzero() if labels is not None else torch.tensor([[0]])
        flat[valid_rows[0, 0], 3] = float("nan")
    tdt = case.teacher_dtype or case.student_dtype
    s = s.to(device=device, dtype=case.student_dtype)
    t = t.to(device=device, dtype=tdt)
    if case.noncontiguous:
        # Same values, other layouts: the student with stride 2 along the vocabulary (the
        # kernels need a copy), the teacher a row-strided slice of a wider buffer (no copy).
        s_buf = torch.zeros(s.shape[:-1] + (2 * s.shape[-1],), device=device, dtype=s.dtype)
        s_buf[..., ::2] = s
        s = s_buf[..., ::2]
        t_buf = torch.zeros(t.shape[:-1] + (t.shape[-1] + 5,), device=device, dtype=t.dtype)
        t_buf[..., 2:2 + t.shape[-1]] = t
        t = t_buf[..., 2:2 + t.shape[-1]]
    if labels is not None:
        labels = labels.to(device)
    return s.detach().requires_grad_(True), t, labels


def reference_loss_and_grad(case: Case, s, t, labels):
    s64 = s.detach().to("cpu", torch.float64).requires_grad_(True)
    t64 = t.detach().to("cpu", torch.float64)
    lab = None if labels is None else labels.cpu()
    kw = case.kwargs()
    if isinstance(kw["num_items"], torch.Tensor):
        kw["num_items"] = kw["num_items"].cpu()
    loss = reference.kd_loss(s64, t64, lab, ignore_index=-100, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s64) if s64.numel() else (torch.zeros_like(s64),)
    return loss.detach(), grad


def run_backend(case: Case, backend: str, s, t, labels):
    """Loss and gradient from a backend, both moved to float64 on the CPU."""
    student = s
    if case.inplace:
        # inplace_backward overwrites the logits: hand it a copy that is a non-leaf.
        student = s.detach().clone().requires_grad_(True)
        leaf = student
        student = student * 1  # the gradient lands in this intermediate's buffer
    loss = fastkd.kd_loss(student, t, labels, backend=backend, inplace_backward=case.inplace,
                          ignore_index=-100, **case.kwargs())
    if student.numel():
        (grad,) = torch.autograd.grad(loss.sum(), leaf if case.inplace else student)
    else:
        grad = torch.zeros_like(student)
    return loss.detach().to("cpu", torch.float64), grad.to("cpu", torch.float64)


def fp32_reference_grad_error(case: Case, s, t, labels, ref_grad, device="cpu") -> float:
    """Gradient error of fastkd.reference run in float32 (PyTorch's own fp32 accuracy) on
    `device` (its reductions differ: CPU fp32 sums are far less accurate at large V)."""
    s32 = s.detach().to(device, torch.float32).requires_grad_(True)
    kw = case.kwargs()
    loss = reference.kd_loss(s32, t.detach().to(device, torch.float32), None if labels is None else labels.to(device),
                             ignore_index=-100, **kw)
    (g,) = torch.autograd.grad(loss.sum(), s32)
    return rel_err(g.to("cpu", torch.float64), ref_grad.cpu())


def fp32_grad_tolerance(case: Case, s, t, labels, ref_grad, floor: float = 1e-5, factor: float = 2.0,
                        device="cpu") -> float:
    """Gradient tolerance of an fp32 case: ``floor``, or ``factor`` x PyTorch's own fp32
    error on the same input (fp32_reference_grad_error on `device`) where that is larger."""
    return max(floor, factor * fp32_reference_grad_error(case, s, t, labels, ref_grad, device))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, treating matching non-finite entries as equal."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    same_nonfinite = (~torch.isfinite(ref)) & ((out == ref) | (torch.isnan(out) & torch.isnan(ref)))
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ"
    out = torch.where(same_nonfinite, torch.zeros_like(out), out)
    ref = torch.where(same_nonfinite, torch.zeros_like(ref), ref)
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def tolerances(case: Case) -> Tuple[float, float]:
    low = case.student_dtype in LOW_PRECISION or (case.teacher_dtype in LOW_PRECISION)
    return (1e-2, 2e-2) if low else (1e-5, 1e-5)


def check_case(case: Case, backend: str, device="cpu", seed: int = 0) -> None:
    s, t, labels = make_inputs(case, device, seed)
    ref_loss, ref_grad = reference_loss_and_grad(case, s, t, labels)
    loss, grad = run_backend(case, backend, s, t, labels)
    loss_tol, grad_tol = tolerances(case)
    assert loss.shape == ref_loss.shape
    assert grad.shape == ref_grad.shape
    e_loss, e_grad = rel_err(loss, ref_loss), rel_err(grad, ref_grad)
    if e_grad >= grad_tol and not any(d in LOW_PRECISION for d in (case.student_dtype, case.teacher_dtype)):
        # Saturated rows (low T, JSD/reverse KL) have gradients below fp32's resolution of
        # their own terms: there even PyTorch's fp32 autograd misses 1e-5 (1.9e-5 to 5.7e-5
        # over seeds for JSD at T=0.5). Accept up to 2x what careful fp32 PyTorch achieves.
        grad_tol = max(grad_tol, 2.0 * fp32_reference_grad_error(case, s, t, labels, ref_grad))
    assert e_loss < loss_tol, f"loss rel err {e_loss:.3g} (got {loss.flatten()[:4]}, ref {ref_loss.flatten()[:4]})"
    assert e_grad < grad_tol, f"grad rel err {e_grad:.3g}"


# ---------------------------------------------------------------------------------------
# The case lists. Each is small enough for the Triton interpreter on a CPU.

BASE = Case(alpha=0.6)

GRID_DIV_RED_DTYPE = [
    BASE.replace(divergence=d, reduction=r, student_dtype=dt)
    for d, r, dt in itertools.product(DIVERGENCES, REDUCTIONS, (torch.float32, torch.bfloat16, torch.float16))
]

GRID_TEMPERATURE = [
    Case(divergence=d, temperature=T, alpha=a)
    for d, T, a in itertools.product(DIVERGENCES, (0.5, 1.0, 2.0, 4.0), (1.0, 0.6))
]

GRID_BETA = [
    Case(divergence="jsd", beta=b, alpha=a)
    for b, a in itertools.product((0.0, 0.1, 0.5, 0.9, 1.0), (1.0, 0.6))
]

SPECIAL = [
    Case(lead=(3, 13)),                                           # [batch, seq, V]
    Case(lead=(3, 13), divergence="jsd", reduction="none"),
    Case(noncontiguous=True, alpha=0.6),
    Case(lead=(3, 7), noncontiguous=True, divergence="reverse_kl"),
    Case(ignore_frac=1.0, alpha=0.6),                              # all ignored: loss 0, grad 0
    Case(ignore_frac=1.0, reduction="none"),
    Case(lead=(0,)),                                              # empty batch
    Case(lead=(0,), reduction="sum"),
    Case(labels=False),
    Case(labels=False, reduction="sum", t_squared=False),
    Case(student_dtype=torch.bfloat16, teacher_dtype=torch.float32),
    Case(student_dtype=torch.float32, teacher_dtype=torch.bfloat16, divergence="jsd"),
    Case(student_dtype=torch.float16, teacher_dtype=torch.bfloat16, divergence="reverse_kl"),
    Case(teacher_pad=7, vocab_size=1001, alpha=0.6),                # padded teacher vocabulary
    Case(teacher_pad=3, vocab_size=990, divergence="tvd"),          # both sides cut
    Case(num_items=50.0, alpha=0.6),
    Case(inplace=True, alpha=0.6),
    Case(inplace=True, divergence="jsd", student_dtype=torch.bfloat16),
    Case(inplace=True, lead=(2, 9), divergence="tvd", reduction="none"),
    Case(vocab=3, lead=(5,)),
    Case(vocab=1, lead=(4,), divergence="reverse_kl"),              # one-entry vocabulary: D = 0
] + [
    Case(divergence=d, neg_inf=where, alpha=0.6)
    for d, where in [("forward_kl", "both"), ("reverse_kl", "both"), ("jsd", "both"), ("tvd", "both"),
                     ("forward_kl", "teacher"), ("jsd", "teacher"), ("tvd", "teacher"),
                     ("reverse_kl", "student"), ("jsd", "student"), ("tvd", "student")]
] + [
    Case(divergence=d, nan_row=True, reduction=r)
    for d, r in [("forward_kl", "none"), ("jsd", "mean"), ("reverse_kl", "sum"), ("tvd", "none")]
]

ALL_CASES = GRID_DIV_RED_DTYPE + GRID_TEMPERATURE + GRID_BETA + SPECIAL

# fp32 centred divergences at a real vocabulary size: the gradient must be within
# fp32_grad_tolerance (1e-5, or 2x PyTorch's fp32 error) of float64. Pure divergence (no
# CE term to dilute the error); four rows, so that the Triton interpreter runs them too.
LARGE_VOCAB_CENTRED = [
    Case(lead=(4,), vocab=32000, divergence=d, temperature=T, beta=b, alpha=1.0, labels=False, reduction="sum")
    for d, T, b in [("reverse_kl", 1.0, 0.5), ("reverse_kl", 0.5, 0.5), ("jsd", 2.0, 0.5), ("jsd", 1.0, 0.5),
                    ("jsd", 0.5, 0.5), ("jsd", 1.0, 0.9)]
]
