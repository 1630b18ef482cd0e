"""``kd_loss`` and ``KDLoss``: the public logits-distillation loss.

The loss settings are the fields of :class:`fastkd.config.KDConfig` (declared once there,
listed in these signatures from it); the calls' tensors are checked in
``fastkd/_checks.py``; the backend is chosen in ``fastkd/_dispatch.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._autograd import fused_kd_loss, fused_multi_kd_loss
from ._checks import as_teachers, check_kd_args, check_multi_kd_args
from ._dispatch import backend_for, check_backend_name
from .config import KDConfig, check_bool, make_config, takes_settings
from .stats import stats_result, stats_rows


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


def kd_loss_with_config(student_logits, teacher_logits, labels, cfg: KDConfig, num_items=None,
                        inplace_backward: bool = False, backend: str = "auto", teacher_weights=None,
                        return_stats: bool = False):
    """:func:`kd_loss` with the settings already validated into ``cfg`` (``KDLoss`` uses it)."""
    check_bool("return_stats", return_stats)
    teachers = as_teachers(student_logits, teacher_logits, teacher_weights)
    if teachers.single is None:
        if return_stats:
            raise ValueError(f"return_stats takes one teacher, got {len(teachers.logits)} (several teachers' "
                             "diagnostics: call fastkd.kd_stats once per teacher)")
        return _multi_teacher_loss(student_logits, teachers, labels, cfg, num_items, inplace_backward, backend)
    teacher_logits = teachers.single
    cfg, num_items = check_kd_args(student_logits, teacher_logits, labels, cfg, num_items)
    inplace = _inplace_wanted(student_logits, inplace_backward)
    kernels = backend_for(backend, student_logits.device, student_logits.dtype, teacher_logits.dtype, cfg=cfg,
                          stats=return_stats)
    lead = student_logits.shape[:-1]
    if kernels.differentiable_loss is not None:
        loss = kernels.differentiable_loss(student_logits, teacher_logits, labels, cfg, num_items)
        if not return_stats:
            return loss
        table = stats_rows(student_logits.reshape(-1, student_logits.shape[-1]),
                           teacher_logits.reshape(-1, teacher_logits.shape[-1]),
                           None if labels is None else labels.reshape(-1), cfg)
        return loss, stats_result(table, labels, cfg, lead)
    out = fused_kd_loss(student_logits, teacher_logits, labels, cfg, num_items, kernels.name, inplace,
                        with_stats=return_stats)
    return (out[0], stats_result(out[1], labels, cfg, lead)) if return_stats else out


def _multi_teacher_loss(student_logits, teachers, labels, cfg, num_items, inplace_backward, backend):
    """Several teachers (docs/multi_teacher.md): a backend's fused several-teachers forward,
    or the torch backend's autograd graph."""
    cfg, weights, num_items = check_multi_kd_args(student_logits, teachers, labels, cfg, num_items)
    inplace = _inplace_wanted(student_logits, inplace_backward)
    kernels = backend_for(backend, student_logits.device, student_logits.dtype,
                          *(t.dtype for t in teachers.logits), cfg=cfg,
                          several_teachers=len(teachers.logits))
    if kernels.differentiable_multi_loss is not None:
        return kernels.differentiable_multi_loss(student_logits, teachers.logits, weights, labels, cfg, num_items)
    return fused_multi_kd_loss(student_logits, teachers.logits, weights, labels, cfg, num_items, kernels.name,
                               inplace)


@takes_settings(after=("num_items", "inplace_backward", "backend", "return_stats"))
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_weights=None,
    num_items=None,
    inplace_backward: bool = False,
    backend: str = "auto",
    return_stats: bool = False,
    **settings,
):
    """Knowledge-distillation loss between student and teacher logits, fused with its gradient.

    ``loss = alpha * T^2 * D(softmax(t/T), softmax(s/T)) + (1 - alpha) * CE(s, labels)`` per
    token, with D one of ``forward_kl`` (KL(p||q), default), ``reverse_kl`` (KL(q||p)),
    ``jsd`` (beta-generalised Jensen-Shannon, TRL convention) or ``tvd`` (total variation).

    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on ``torch``/``cpu``).
        teacher_logits: ``[..., V]`` (or wider, with ``vocab_size``); a constant, no grad.
            Several teachers: a sequence of K tensors ``[..., V_k]`` (dtypes may differ;
            widths too, then ``vocab_size`` is needed) or one ``[K, ..., V]`` tensor (one
            more leading dimension than the student), combined as ``teacher_mode`` says
            (docs/multi_teacher.md). A sequence of one tensor is the single teacher.
        labels: ``[...]`` int64 targets for the CE term; ``ignore_index`` drops a token
            from every term. Required when ``alpha != 1``.
        teacher_weights: with several teachers, None (uniform 1/K), K numbers, or a
            ``[K, ...]`` tensor of per-token weights (the student's token shape; one-hot per
            token routes each token to one teacher). >= 0; in ``mixture`` mode they sum to
            1 per token (checked for numbers and CPU tensors, within 1e-6; a GPU tensor is
            not read, which would synchronise). A teacher with weight 0 in a row is not
            used there, whatever its logits hold. Several teachers run on the ``torch``
            backend until the kernels read them (``auto`` picks it; naming another
            backend raises NotImplementedError).
        {settings}
        num_items: the denominator of ``reduction="mean"`` instead of the number of valid
            tokens (a number or a one-element tensor; e.g. Trainer's ``num_items_in_batch``).
        inplace_backward: write the gradient into the student-logits buffer (no extra
            memory). The overwrite happens in this forward call, not in backward: any
            later read of those logits (a second loss taken after this call, logging)
            sees the gradient, and nothing can detect that. Graph nodes that saved the
            logits earlier are caught: their backward raises autograd's "modified by an
            inplace operation" error. A leaf that requires grad (an ``nn.Parameter``) is
            refused. Only active when autograd wants the logits' gradient.
        backend: ``auto``, ``cuda``, ``triton``, ``cpu`` or ``torch`` (see docs/backends.md).
        return_stats: also return the per-token diagnostics of the same pass: ``(loss,
            fastkd.KDStats)`` (teacher and student entropy, top-1 agreement, the unweighted
            divergence; docs/diagnostics.md). One teacher only.
    """
    cfg = make_config("kd_loss", **settings)
    return kd_loss_with_config(student_logits, teacher_logits, labels, cfg, num_items, inplace_backward, backend,
                               teacher_weights, return_stats)


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`: settings fixed (and validated) at construction.

    >>> crit = KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
    >>> loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, divergence: str = "forward_kl", *, inplace_backward: bool = False, backend: str = "auto",
                 **settings):
        super().__init__()
        # Validated now, so a bad setting fails here and not at the first forward.
        self.config = make_config("KDLoss", divergence=divergence, **settings)
        self.inplace_backward = check_bool("inplace_backward", inplace_backward)
        check_backend_name(backend)
        self.backend = backend

    def forward(self, student_logits, teacher_logits, labels=None, num_items=None, *, teacher_weights=None,
                return_stats: bool = False):
        return kd_loss_with_config(student_logits, teacher_logits, labels, self.config, num_items,
                                   self.inplace_backward, self.backend, teacher_weights, return_stats)

    def extra_repr(self) -> str:
        options = dict(self.config.changed_settings(), inplace_backward=self.inplace_backward, backend=self.backend)
        return ", ".join(f"{k}={v!r}" for k, v in options.items())


takes_settings(KDLoss.__init__, after=("inplace_backward", "backend"))
