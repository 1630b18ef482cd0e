"""``kd_loss`` and ``KDLoss``: argument checks, backend choice and dispatch, in one place."""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import ops, reference
from ._args import KDConfig, check_bool, check_kd_args, make_config, reduction_scale

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def check_backend_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: ``auto`` (or ``FASTKD_BACKEND``) resolved for ``device``.

    An explicitly requested backend that cannot run on ``device`` is an error, not a
    silent fallback.
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
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if name == "torch":
                return name
            kernels = ops.get_backend(name)
            if kernels is not None and kernels.supports(device):
                return name
        return "torch"
    if backend == "torch":
        return backend
    kernels = ops.get_backend(backend)
    if kernels is None:
        why = {"triton": "triton is not installed",
               "cuda": "fastkd._C was built without CUDA kernels",
               "cpu": "fastkd._C could not be loaded or built"}[backend]
        raise ValueError(f"{source}{backend!r} is not available: {why}")
    if not kernels.supports(device):
        hint = " (set TRITON_INTERPRET=1 before importing fastkd to run Triton on the CPU)" if backend == "triton" else ""
        raise ValueError(f"{source}{backend!r} cannot run on {device.type} tensors{hint}")
    return backend


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit stride along V (a view when the layout allows it)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _inplace_wanted(student: torch.Tensor, inplace_backward: bool) -> bool:
    """Whether to overwrite the student logits with their gradient; refuses a leaf."""
    check_bool("inplace_backward", inplace_backward)
    # Writing the gradient over the logits only makes sense when autograd wants it.
    if not (inplace_backward and student.requires_grad and torch.is_grad_enabled()):
        return False
    base = student._base if student._base is not None else student
    if student.is_leaf or (base.is_leaf and base.requires_grad):  # a view of a Parameter too
        raise ValueError(
            "inplace_backward=True would overwrite student_logits, a leaf tensor that requires grad "
            "(e.g. an nn.Parameter), whose values autograd and the optimizer still need; pass the "
            "logits a model computed (a non-leaf), or inplace_backward=False")
    return True


def fused_loss(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
               cfg: KDConfig, num_items, backend: str, inplace: bool) -> torch.Tensor:
    """Run a kernel backend on validated input; returns the reduced loss (or per-token loss)."""
    lead = student.shape[:-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    # In the loss's dtype: a float32 scale would cost float64 input its 1e-12 precision.
    grad_scale = reduction_scale(flat_labels, s2.shape[0], cfg, num_items, student.device,
                                 ops.loss_dtype(student, teacher))
    reduced = cfg.reduction != "none"
    out = ops.FusedKDLoss.apply(s2, t2.detach(), flat_labels, grad_scale, backend, reduced, inplace, cfg)
    return out if reduced else out.reshape(lead)


def kd_loss_with_config(student_logits, teacher_logits, labels, cfg: KDConfig, num_items=None,
                        inplace_backward: bool = False, backend: str = "auto") -> torch.Tensor:
    """:func:`kd_loss` with the settings already validated into ``cfg`` (``KDLoss`` uses it)."""
    cfg, num_items = check_kd_args(student_logits, teacher_logits, labels, cfg, num_items)
    inplace = _inplace_wanted(student_logits, inplace_backward)
    name = resolve_backend(backend, student_logits.device)
    if name == "torch":
        return reference.kd_loss_with_config(student_logits, teacher_logits, labels, cfg, num_items)
    if student_logits.dtype == torch.float64 and name != "cpu":
        raise TypeError(f"float64 logits are supported by the 'cpu' and 'torch' backends, not {name!r}")
    return fused_loss(student_logits, teacher_logits, labels, cfg, num_items, name, inplace)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 1.0,
    t_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    vocab_size: Optional[int] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Knowledge-distillation loss between student and teacher logits, fused with its gradient.

    ``loss = alpha * T^2 * D(softmax(t/T), softmax(s/T)) + (1 - alpha) * CE(s, labels)`` per
    token, with D one of ``forward_kl`` (KL(p||q), default), ``reverse_kl`` (KL(q||p)),
    ``jsd`` (beta-generalised Jensen-Shannon, TRL convention) or ``tvd`` (total variation).

    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on ``torch``/``cpu``).
        teacher_logits: ``[..., V]`` (or wider, with ``vocab_size``); a constant, no grad.
        labels: ``[...]`` int64 targets for the CE term; ``ignore_index`` drops a token
            from every term. Required when ``alpha != 1``.
        temperature: softens both distributions; ``t_squared`` scales D by T^2 (Hinton).
        reduction: ``mean`` over valid tokens (``num_items`` overrides the denominator),
            ``sum``, ``batchmean`` (sum / number of tokens), or ``none`` (per token).
        vocab_size: only the first ``vocab_size`` columns of each side count (padded
            vocabularies); the student's extra columns get zero gradient.
        inplace_backward: write the gradient into the student-logits buffer (no extra
            memory). The overwrite happens in this forward call, not in backward: any
            later read of those logits (a second loss taken after this call, logging)
            sees the gradient, and nothing can detect that. Graph nodes that saved the
            logits earlier are caught: their backward raises autograd's "modified by an
            inplace operation" error. A leaf that requires grad (an ``nn.Parameter``) is
            refused. Only active when autograd wants the logits' gradient.
        backend: ``auto``, ``cuda``, ``triton``, ``cpu`` or ``torch`` (see README).
    """
    cfg = make_config(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                      t_squared=t_squared, ignore_index=ignore_index, reduction=reduction,
                      vocab_size=vocab_size)
    return kd_loss_with_config(student_logits, teacher_logits, labels, cfg, num_items, inplace_backward, backend)


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`: keywords fixed at construction.

    >>> crit = KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
    >>> loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, divergence: str = "forward_kl", *, temperature: float = 1.0, beta: float = 0.5,
                 alpha: float = 1.0, t_squared: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", vocab_size: Optional[int] = None,
                 inplace_backward: bool = False, backend: str = "auto"):
        super().__init__()
        # Validated now, so a bad setting fails here and not at the first forward.
        self.config = make_config(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                                  t_squared=t_squared, ignore_index=ignore_index, reduction=reduction,
                                  vocab_size=vocab_size)
        self.inplace_backward = check_bool("inplace_backward", inplace_backward)
        check_backend_name(backend)
        self.backend = backend
        self.kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                           t_squared=t_squared, ignore_index=ignore_index, reduction=reduction,
                           vocab_size=vocab_size, inplace_backward=inplace_backward, backend=backend)

    def forward(self, student_logits, teacher_logits, labels=None, num_items=None):
        return kd_loss_with_config(student_logits, teacher_logits, labels, self.config, num_items,
                                   self.inplace_backward, self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
