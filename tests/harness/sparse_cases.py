"""Inputs of the sparse-teacher kernel tests (tests/test_sparse_triton.py, tests/test_sparse_gpu.py):
a student, a teacher's top-k (or a whole-vocabulary support), labels, and the float64
reference's loss rows and gradient for them.

Every maker draws from a seeded generator on the target device. A row of the support
holds K ids with their log-probabilities; the first row has empty slots (id -1) whose
log-prob is NaN (a kernel must never read it as a number), the second a -inf log-prob.
"""
from __future__ import annotations

import torch

from harness.inputs import IGNORE_INDEX, logits

import fastkd
from fastkd import sparse_reference
from fastkd.config import SparseKDConfig, make_config


def sparse_inputs(n, vocab, k, dtype=torch.float32, seed=0, device="cpu", *, width=None, close=0.0,
                  empty_slots=2, ignore_frac=0.2, ids_dtype=torch.int64, lp_dtype=None, neg_inf=True):
    """(student [n, width], ids [n, k], logprobs [n, k], labels [n]).

    ``width`` (default ``vocab``): the student's columns (a padded vocabulary when wider).
    ``neg_inf``: the second row's fourth slot gets a -inf log-prob. ``close``: the teacher's logits are the student's plus ``close`` times noise (0: an
    unrelated teacher), so a small ``close`` gives a student that nearly equals its
    teacher (Q -> P, D -> 0). ``k == vocab``: a random permutation of the whole vocabulary.
    """
    width = width or vocab
    g = torch.Generator(device=device).manual_seed(seed)
    s = logits((n, width), None, g)
    if close:
        t = s[:, :vocab] + close * torch.randn((n, vocab), generator=g, device=device)
    else:
        t = logits((n, vocab), None, g)
    log_p = torch.log_softmax(t.double(), -1)
    if k >= vocab:
        ids = torch.argsort(torch.rand((n, vocab), generator=g, device=device), -1)[:, :k]
    else:
        ids = log_p.topk(k, -1).indices
        # Shuffle the slots: kernels must not assume sorted ids.
        perm = torch.argsort(torch.rand((n, k), generator=g, device=device), -1)
        ids = ids.gather(-1, perm)
    lps = log_p.gather(-1, ids).to(lp_dtype or (torch.float32 if dtype == torch.float64 else dtype))
    ids = ids.clone()
    if empty_slots and n > 0:
        ids[0, :empty_slots] = -1
        lps[0, :empty_slots] = float("nan")
    if neg_inf and n > 1 and k > 3:  # (reverse KL of such a row is +inf)
        lps[1, 3] = float("-inf")
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    labels[torch.rand((n,), generator=g, device=device) < ignore_frac] = IGNORE_INDEX
    return s.to(dtype), ids.to(ids_dtype), lps, labels


def sparse_config(**settings):
    return make_config(config=SparseKDConfig, **settings)


def reference_rows_and_grad(s, ids, lps, labels, vocab, grad_scale=1.0, **settings):
    """float64 reference: loss rows [n] and d(sum rows * grad_scale)/ds [n, width] (0 past vocab)."""
    cfg = sparse_config(**settings).with_vocab_size(vocab)
    s64 = s.detach().double().requires_grad_(True)
    rows = sparse_reference.sparse_loss_per_row(s64[:, :vocab], ids, lps.double(), labels, cfg)
    (grad,) = torch.autograd.grad(rows.sum() * grad_scale, s64)
    return rows.detach(), grad


def kernel_settings(vocab, **settings):
    return sparse_config(**settings).with_vocab_size(vocab).kernel_settings()


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "non-finite entries differ"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


__all__ = ["sparse_inputs", "sparse_config", "reference_rows_and_grad", "kernel_settings", "rel_err", "fastkd"]
