"""``sparse_kd_loss`` and ``SparseKDLoss``: distillation from a sparse (top-k or sampled) teacher.

The teacher is given per token as K ids and their log-probabilities (what vLLM/sglang
return, or a teacher cache holds), not as logits over the vocabulary. The math of the
three tails and four divergences is pinned in ``fastkd/sparse_reference.py`` and
docs/sparse.md. The settings are those of :class:`fastkd.config.SparseKDConfig`
(``KDConfig``'s and ``tail``); tensors are checked in ``fastkd/_checks.py``; the backend is
chosen in ``fastkd/_dispatch.py`` (``auto`` skips backends without sparse kernels).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._autograd import fused_sparse_kd_loss
from ._checks import check_sparse_kd_args
from ._dispatch import backend_for, check_backend_name
from .api import _inplace_wanted
from .config import SparseKDConfig, check_bool, make_config, takes_settings
from .stats import sparse_stats_rows, stats_result


def sparse_kd_loss_with_config(student_logits, teacher_ids, teacher_logprobs, labels, cfg: SparseKDConfig,
                               num_items=None, inplace_backward: bool = False,
                               backend: str = "auto", return_stats: bool = False):
    """:func:`sparse_kd_loss` with the settings already validated into ``cfg``."""
    check_bool("return_stats", return_stats)
    cfg, num_items = check_sparse_kd_args(student_logits, teacher_ids, teacher_logprobs, labels, cfg, num_items)
    inplace = _inplace_wanted(student_logits, inplace_backward)
    kernels = backend_for(backend, student_logits.device, student_logits.dtype, teacher_logprobs.dtype,
                          op="sparse", cfg=cfg, stats=return_stats)
    lead = student_logits.shape[:-1]
    if kernels.differentiable_sparse_loss is not None:
        loss = kernels.differentiable_sparse_loss(student_logits, teacher_ids, teacher_logprobs, labels, cfg,
                                                  num_items)
        if not return_stats:
            return loss
        K = teacher_ids.shape[-1]
        table = sparse_stats_rows(student_logits.reshape(-1, student_logits.shape[-1]), teacher_ids.reshape(-1, K),
                                  teacher_logprobs.reshape(-1, K), None if labels is None else labels.reshape(-1),
                                  cfg)
        return loss, stats_result(table, labels, cfg, lead, sparse=True)
    out = fused_sparse_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels, cfg, num_items,
                               kernels.name, inplace, with_stats=return_stats)
    return (out[0], stats_result(out[1], labels, cfg, lead, sparse=True)) if return_stats else out


@takes_settings(after=("num_items", "inplace_backward", "backend", "return_stats"), config=SparseKDConfig)
def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    num_items=None,
    inplace_backward: bool = False,
    backend: str = "auto",
    return_stats: bool = False,
    **settings,
):
    """Distillation loss against a sparse teacher (K ids per token), fused with its gradient.

    Per token, the teacher's support S holds K ids with log-probabilities log p (used as
    given: the teacher at the distillation temperature); the student is q = softmax(s/T)
    over the vocabulary; P = sum_S p, Q = sum_S q. ``tail="bucket"`` (default) adds one bin
    holding 1 - P and 1 - Q (the full-vocabulary divergence against the implicit teacher
    p~ = p on S, q (1-P)/(1-Q) off S); ``renorm`` renormalises both sides over S; ``none``
    is sum_S p (log p - log q) (forward KL only, biased). Random-sampling KD is ``bucket``
    with log-weights summing to 1. Then, as ``kd_loss``:
    ``loss = alpha * T^2 * D + (1 - alpha) * CE(s, labels)``.

    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on ``torch``/``cpu``).
        teacher_ids: ``[..., K]`` int32/int64 token ids; an id < 0 is an empty slot
            (variable K per token; its log-prob is ignored). An id >= ``vocab_size`` or an
            id twice in one token is a ValueError (checked on CPU tensors; elsewhere the
            row's loss is NaN).
        teacher_logprobs: ``[..., K]`` float log-probabilities of those ids (``-inf``
            allowed); a constant, no grad.
        labels: ``[...]`` int64 targets for the CE term; ``ignore_index`` drops a token
            from every term. Required when ``alpha != 1``.
        {settings}
        num_items: the denominator of ``reduction="mean"``, as in :func:`fastkd.kd_loss`.
        inplace_backward: write the gradient into the student-logits buffer, as in
            :func:`fastkd.kd_loss` (the overwrite happens in this forward call).
        backend: ``auto``, ``cpu`` or ``torch`` (and ``triton``/``cuda`` where their
            sparse kernels exist); ``auto`` skips backends without sparse kernels.
        return_stats: also return the per-token diagnostics of the same pass: ``(loss,
            fastkd.SparseKDStats)`` (the teacher's and the student's mass P and Q on the
            support, the student's entropy, top-1 agreement, the unweighted divergence;
            docs/diagnostics.md).
    """
    cfg = make_config("sparse_kd_loss", config=SparseKDConfig, **settings)
    return sparse_kd_loss_with_config(student_logits, teacher_ids, teacher_logprobs, labels, cfg, num_items,
                                      inplace_backward, backend, return_stats)


class SparseKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`sparse_kd_loss`: settings fixed (and validated) at construction.

    >>> crit = SparseKDLoss(divergence="forward_kl", tail="bucket", temperature=1.0)
    >>> loss = crit(student_logits, teacher_ids, teacher_logprobs, labels)
    """

    def __init__(self, divergence: str = "forward_kl", *, inplace_backward: bool = False, backend: str = "auto",
                 **settings):
        super().__init__()
        self.config = make_config("SparseKDLoss", config=SparseKDConfig, divergence=divergence, **settings)
        self.inplace_backward = check_bool("inplace_backward", inplace_backward)
        check_backend_name(backend)
        self.backend = backend

    def forward(self, student_logits, teacher_ids, teacher_logprobs, labels=None, num_items=None, *,
                return_stats: bool = False):
        return sparse_kd_loss_with_config(student_logits, teacher_ids, teacher_logprobs, labels, self.config,
                                          num_items, self.inplace_backward, self.backend, return_stats)

    def extra_repr(self) -> str:
        options = dict(self.config.changed_settings(), inplace_backward=self.inplace_backward, backend=self.backend)
        return ", ".join(f"{k}={v!r}" for k, v in options.items())


takes_settings(SparseKDLoss.__init__, after=("inplace_backward", "backend"), config=SparseKDConfig)
