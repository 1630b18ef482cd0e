"""Running an op: the float64 reference and a backend, each giving loss and gradients."""
from __future__ import annotations

import torch

import fastkd
from fastkd import reference

from harness.cases import Case, LinearCase
from harness.inputs import IGNORE_INDEX


def reference_result(student, teacher, labels, device=None, **kw):
    """Loss and gradient of fastkd.reference in float64 on ``device`` (default: the
    student's; a GPU computes the reference at 262k columns fast)."""
    device = student.device if device is None else device
    s64 = student.detach().to(device, torch.float64).requires_grad_(True)
    t64 = teacher.detach().to(device, torch.float64)
    lab = None if labels is None else labels.to(device)
    loss = reference.kd_loss(s64, t64, lab, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s64) if s64.numel() else (torch.zeros_like(s64),)
    return loss.detach(), grad


def backend_result(student, teacher, labels, backend, inplace=False, **kw):
    """Loss and gradient of a backend, in float64 on the student's device; the student
    keeps its layout (strides)."""
    s = (student.detach().clone() if inplace else student.detach()).requires_grad_(True)
    x = s * 1 if inplace else s  # in-place backward writes into a non-leaf's buffer
    loss = fastkd.kd_loss(x, teacher, labels, backend=backend, inplace_backward=inplace, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s) if s.numel() else (torch.zeros_like(s),)
    return loss.detach().double(), grad.double()


def case_kwargs(case: Case) -> dict:
    return dict(case.kwargs(), ignore_index=IGNORE_INDEX)


def reference_loss_and_grad(case: Case, s, t, labels):
    """The float64 reference for a case, on the CPU."""
    kw = case_kwargs(case)
    if isinstance(kw["num_items"], torch.Tensor):
        kw["num_items"] = kw["num_items"].cpu()
    return reference_result(s, t, labels, "cpu", **kw)


def run_backend(case: Case, backend: str, s, t, labels):
    """Loss and gradient from a backend, both moved to float64 on the CPU."""
    loss, grad = backend_result(s, t, labels, backend, inplace=case.inplace, **case_kwargs(case))
    return loss.cpu(), grad.cpu()


# ---------------------------------------------------------------------------------------
# fused_linear_kd_loss

def student_params(inp):
    return [inp[k] for k in ("student_hidden", "student_weight", "student_bias") if inp[k] is not None]


def reduce_for_grad(loss):
    """A fixed, non-uniform grad_output for reduction='none' (so per-token scaling is tested)."""
    if loss.dim() == 0:
        return loss
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return (loss * w).sum()


def linear_reference_result(case: LinearCase, inp):
    """Float64 reference loss and gradients on materialised logits of the same values."""
    s = {k: None if inp[k] is None else inp[k].detach().double() for k in inp if k != "labels"}
    params = [s[k].requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias")
              if s[k] is not None]
    s_logits = s["student_hidden"] @ s["student_weight"].T
    t_logits = s["teacher_hidden"] @ s["teacher_weight"].T
    if s["student_bias"] is not None:
        s_logits = s_logits + s["student_bias"]
        t_logits = t_logits + s["teacher_bias"]
    loss = reference.kd_loss(s_logits, t_logits, inp["labels"], **case.kwargs())
    grads = torch.autograd.grad(reduce_for_grad(loss), params)
    return loss.detach(), grads


def linear_backend_result(case: LinearCase, inp, backend="cpu"):
    loss = fastkd.fused_linear_kd_loss(**inp, chunk_size=case.chunk_size, backend=backend, **case.kwargs())
    grads = torch.autograd.grad(reduce_for_grad(loss), student_params(inp))
    return loss.detach().double(), [g.double() for g in grads]


def reference_row_stats(s, t, temperature, with_ce):
    """The row statistics [max_s, sum exp_s, max_t, sum exp_t, sum exp_raw] in float64,
    as torch.ops.fastkd.row_stats defines them (logits / T, anchored at their row max)."""
    a = s.double() / temperature
    b = t.double() / temperature
    ms, mt = a.max(-1).values, b.max(-1).values
    zs = (a - ms[:, None]).exp().sum(-1)
    zt = (b - mt[:, None]).exp().sum(-1)
    zr = (s.double() - temperature * ms[:, None]).exp().sum(-1) if with_ce else torch.zeros_like(zs)
    return torch.stack([ms, zs, mt, zt, zr], dim=1)
