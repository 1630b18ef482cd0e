"""Turning a teacher's full distribution into a sparse one: top-k, or RS-KD samples.

Both functions take the teacher's log-probabilities over the whole vocabulary at the
distillation temperature (``log_softmax(logits / T)``, ``[..., V]``) and return a support
of ids with log-probabilities, ``[..., K]``, in the layout ``fastkd.sparse_kd_loss`` reads:
int64 ids, id -1 marks an empty slot (its log-probability is -inf here, and ignored by the
loss anyway).

Top-k
-----
``topk_logprobs`` keeps the k most likely ids and their true log-probabilities (they sum to
P <= 1; the loss's ``tail`` decides what to do with the missing 1 - P).

Random-sampling KD (RS-KD; Anshumann et al., ACL 2025, arXiv 2503.16870)
------------------------------------------------------------------------
Draw n ids i.i.d. from the proposal pi ∝ p^tau, count each distinct id (c_j draws of id
j), and give it the importance weight

    w_j = c_j · p_j / pi_j / Σ_i c_i · p_i / pi_i          (normalised to sum 1)

For tau = 1 (the proposal is the teacher itself, the paper's main setting) this is
w_j = c_j / n, and E[w_j] = p_j exactly: the weights are an unbiased estimate of the
teacher distribution, and so is the forward-KL gradient q - w of ``tail="bucket"`` with
P = Σ w = 1 (the tail bin is empty on the teacher side; off the samples p̃ = 0).

For tau != 1 the normalisation divides by a random sum (self-normalised importance
sampling): the weights still sum to 1, which ``tail="bucket"`` needs, but E[w_j] = p_j
only up to an O(1/n) bias. Normalising by the known constant instead (w_j = c_j p_j /
(n pi_j)) would be unbiased but would not sum to 1, and a tail bin of mass 1 - Σ w < 0
has no meaning. tau < 1 flattens the proposal (more distinct ids per draw, more of the
tail seen); tau = 1 is the unbiased choice.

Distinct ids number at most n (fewer when the teacher is peaked); the result is padded to
width n with id -1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["topk_logprobs", "rskd_sample", "EMPTY_ID"]

EMPTY_ID = -1   # an empty slot of a sparse teacher


def _check_logprobs(name: str, logprobs) -> None:
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor [..., V], got "
                        f"{type(logprobs).__name__ if not isinstance(logprobs, torch.Tensor) else logprobs.dtype}")
    if logprobs.dim() == 0 or logprobs.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logprobs.shape)}")


def topk_logprobs(logprobs: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely ids of each row and their log-probabilities, most likely first.

    ``logprobs``: ``[..., V]`` full-vocabulary log-probabilities. Returns ``(ids int64,
    logprobs)`` of shape ``[..., k]`` (k is capped at V: slots past V are empty, id -1).
    Ids whose probability is exactly 0 (log-prob -inf) are returned as empty slots.
    """
    _check_logprobs("logprobs", logprobs)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    width = min(k, logprobs.shape[-1])
    values, ids = logprobs.topk(width, dim=-1, sorted=True)
    ids = ids.masked_fill(values == float("-inf"), EMPTY_ID)
    if width < k:
        pad = (*values.shape[:-1], k - width)
        ids = torch.cat([ids, ids.new_full(pad, EMPTY_ID)], -1)
        values = torch.cat([values, values.new_full(pad, float("-inf"))], -1)
    return ids, values


def rskd_sample(logprobs: torch.Tensor, n_samples: int, *, proposal_exponent: float = 1.0,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """RS-KD: ``n_samples`` draws per row from ∝ p^tau, distinct ids with log importance weights.

    ``logprobs``: ``[..., V]`` the teacher's full log-probabilities at the distillation
    temperature. ``proposal_exponent`` is tau (1: draw from the teacher itself, unbiased;
    see the module docstring for tau != 1). Returns ``(ids int64, log_weights float32)`` of
    shape ``[..., n_samples]``: the distinct ids in increasing order, then empty slots (id
    -1, log-weight -inf). The weights of a row sum to 1. Pass them to
    ``fastkd.sparse_kd_loss(..., tail="bucket")``.
    """
    _check_logprobs("logprobs", logprobs)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    tau = float(proposal_exponent)
    if not tau > 0 or tau == float("inf"):
        raise ValueError(f"proposal_exponent must be a finite number > 0, got {proposal_exponent!r}")
    lead, vocab = logprobs.shape[:-1], logprobs.shape[-1]
    logp = logprobs.reshape(-1, vocab).float()
    rows = logp.shape[0]
    if rows == 0:
        return (torch.empty(*lead, n_samples, dtype=torch.int64, device=logprobs.device),
                torch.empty(*lead, n_samples, dtype=torch.float32, device=logprobs.device))

    # The proposal, normalised in log space (exp of -inf is an exact 0: never drawn).
    log_pi = (tau * logp).log_softmax(-1)
    draws = torch.multinomial(log_pi.exp(), n_samples, replacement=True, generator=generator)

    # Distinct ids and their counts, by sorting each row's draws: a run of equal ids is one
    # distinct id; run r of a row goes to slot r.
    draws, _ = draws.sort(-1)
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(-1) - 1
    counts = torch.zeros(rows, n_samples, dtype=torch.float32, device=logp.device)
    counts.scatter_add_(1, slot, torch.ones_like(counts))
    ids = torch.full_like(draws, EMPTY_ID).scatter_(1, slot, draws)
    filled = counts > 0

    if tau == 1.0:
        # w_j = c_j / n exactly (log 0 = -inf at the empty slots).
        log_w = (counts / n_samples).log()
    else:
        # log w_j = log c_j + log p_j - log pi_j, normalised over the filled slots.
        safe_ids = ids.clamp_min(0)
        log_w = counts.log() + logp.gather(1, safe_ids) - log_pi.gather(1, safe_ids)
        log_w = log_w.masked_fill(counts == 0, float("-inf"))
        log_w = log_w - log_w.logsumexp(-1, keepdim=True)
    return ids.reshape(*lead, n_samples), log_w.reshape(*lead, n_samples)
