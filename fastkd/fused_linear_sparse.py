"""Fused linear sparse KD: student hidden states and LM head in, a sparse teacher, no logits.

``fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs)``
equals ``sparse_kd_loss(student_hidden @ student_weight.T + student_bias, teacher_ids,
teacher_logprobs, ...)`` but holds at most one chunk of student logits: the chunk loop,
matmul modes, autograd Function and checks are those of ``fastkd/fused_linear.py`` (its
``chunked_loss`` takes the teacher as a "side": a dense projection there, the chunk's ids
and log-probs here). No teacher model or teacher logits exist at all, so the whole
chunk budget goes to the student: the memory-cheapest way to distil at a 262k vocabulary.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._checks import check_sparse_kd_args, reduction_scale
from ._dispatch import backend_for, check_backend_name
from .config import SparseKDConfig, check_bool, make_config, takes_settings
from .fused_linear import (FusedLinearKDFunction, Plan, _autocast_side, _check_chunk_size, _check_side,
                           _check_side_dtypes, auto_chunk_size, linear_loss_result, matmul_mode)


@takes_settings(after=("num_items", "inplace_backward", "chunk_size", "backend", "return_stats"),
                config=SparseKDConfig)
def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    num_items=None,
    inplace_backward: bool = False,
    chunk_size: Union[str, int] = "auto",
    backend: str = "auto",
    return_stats: bool = False,
    **settings,
):
    """Sparse-teacher KD loss from hidden states and the student's LM head, logits never whole.

    Equal to ``sparse_kd_loss(student_hidden @ student_weight.T + student_bias, teacher_ids,
    teacher_logprobs, labels, ...)`` (same keywords, same meaning), computed over chunks of
    tokens so that only ``chunk x V`` student logits exist at a time. Gradients flow to
    ``student_hidden``, ``student_weight`` and ``student_bias``.

    Args:
        student_hidden: ``[..., H]`` final hidden states of the student.
        student_weight: ``[V, H]`` the student's LM head; ``vocab_size`` uses its first rows.
        teacher_ids, teacher_logprobs: ``[..., K]``, as in :func:`fastkd.sparse_kd_loss`.
        labels, num_items, and the settings: as in :func:`fastkd.sparse_kd_loss`.
        {settings}
        inplace_backward: accepted for keyword compatibility; no effect (the chunk logits
            are internal buffers and always receive their gradient in place).
        chunk_size: tokens per chunk, or ``"auto"``: the fp32 student logits chunk fills the
            budget of :func:`fastkd.fused_linear_kd_loss` (64 MiB on the CPU,
            ``min(512 MiB, device memory / 16)`` on CUDA) alone, there being no teacher chunk.
        backend: as :func:`fastkd.sparse_kd_loss` (``auto`` skips backends without sparse kernels).
        return_stats: also return the per-token diagnostics, as :func:`fastkd.sparse_kd_loss`:
            ``(loss, fastkd.SparseKDStats)``.

    Precision and ``reduction="none"`` (which recomputes the chunks in backward) as in
    :func:`fastkd.fused_linear_kd_loss`.
    """
    cfg = make_config("fused_linear_sparse_kd_loss", config=SparseKDConfig, **settings)
    return fused_linear_sparse_kd_loss_with_config(
        student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, cfg, student_bias=student_bias,
        num_items=num_items, inplace_backward=inplace_backward, chunk_size=chunk_size, backend=backend,
        return_stats=return_stats)


def fused_linear_sparse_kd_loss_with_config(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                                            cfg: SparseKDConfig, *, student_bias=None, num_items=None,
                                            inplace_backward=False, chunk_size="auto",
                                            backend="auto", return_stats=False):
    """:func:`fused_linear_sparse_kd_loss` with the settings already validated into ``cfg``."""
    check_bool("inplace_backward", inplace_backward)
    check_bool("return_stats", return_stats)
    _check_chunk_size(chunk_size)
    _check_side("student", student_hidden, student_weight, student_bias)
    device = student_hidden.device
    student_hidden, student_weight, student_bias = _autocast_side(
        device.type, student_hidden, student_weight, student_bias)
    _check_side_dtypes("student", student_hidden, student_weight, student_bias)
    cfg, num_items = check_sparse_kd_args(student_hidden, teacher_ids, teacher_logprobs, labels, cfg, num_items,
                                          student_name="student_hidden", student_width=student_weight.shape[0])
    name = backend_for(backend, device, student_hidden.dtype, teacher_logprobs.dtype, what="inputs",
                       op="sparse", cfg=cfg, stats=return_stats).name

    lead = student_hidden.shape[:-1]
    K = teacher_ids.shape[-1]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ids = teacher_ids.reshape(-1, K).contiguous()
    logprobs = teacher_logprobs.detach().reshape(-1, K).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    n = hs.shape[0]
    logits_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(n, cfg.vocab_size, logits_dtype, None, device)
    grad_enabled = torch.is_grad_enabled()
    plan = Plan(
        cfg=cfg, backend=name, chunk_size=chunk_size,
        student_matmul=matmul_mode(student_weight),
        want_hidden_grad=grad_enabled and student_hidden.requires_grad,
        want_weight_grad=grad_enabled and student_weight.requires_grad,
        want_bias_grad=grad_enabled and student_bias is not None and student_bias.requires_grad,
        op="sparse",
        with_stats=return_stats,
    )
    grad_scale = reduction_scale(flat_labels, n, cfg, num_items, device,
                                 torch.float64 if torch.float64 in (logits_dtype, logprobs.dtype) else torch.float32)
    out = FusedLinearKDFunction.apply(hs, student_weight, student_bias, flat_labels, grad_scale, plan, ids, logprobs)
    return linear_loss_result(out, cfg, labels, lead, sparse=True)


class FusedLinearSparseKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_linear_sparse_kd_loss`: keywords fixed at construction.

    >>> crit = FusedLinearSparseKDLoss(tail="bucket", temperature=1.0)
    >>> loss = crit(student_hidden, student.lm_head.weight, teacher_ids, teacher_logprobs, labels)
    """

    def __init__(self, divergence: str = "forward_kl", *, inplace_backward: bool = False,
                 chunk_size: Union[str, int] = "auto", backend: str = "auto", **settings):
        super().__init__()
        self.config = make_config("FusedLinearSparseKDLoss", config=SparseKDConfig, divergence=divergence,
                                  **settings)
        self.inplace_backward = check_bool("inplace_backward", inplace_backward)
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        check_backend_name(backend)
        self.backend = backend

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, *,
                student_bias=None, num_items=None, return_stats=False):
        return fused_linear_sparse_kd_loss_with_config(
            student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, self.config,
            student_bias=student_bias, num_items=num_items, inplace_backward=self.inplace_backward,
            chunk_size=self.chunk_size, backend=self.backend, return_stats=return_stats)

    def extra_repr(self) -> str:
        options = dict(self.config.changed_settings(), inplace_backward=self.inplace_backward,
                       chunk_size=self.chunk_size, backend=self.backend)
        return ", ".join(f"{k}={v!r}" for k, v in options.items())


takes_settings(FusedLinearSparseKDLoss.__init__, after=("inplace_backward", "chunk_size", "backend"),
               config=SparseKDConfig)
