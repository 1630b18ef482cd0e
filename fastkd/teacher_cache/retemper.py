"""Re-tempering a sparse teacher: log-probabilities recorded at T0, wanted at T1.

With a = T0 / T1, the teacher at T1 is p1_j = p0_j^a / Z with Z = Σ_V p0_i^a over the whole
vocabulary (softmax(t/T1) = softmax(a · t/T0)). A sparse record holds p0 on its support S
only, so Z splits into the known Σ_S p0^a and the unknown tail Σ_{i∉S} p0_i^a, of which only
the sum R = 1 - Σ_S p0 is known.

* ``tail="renorm"``: exact. The renormalised teacher p1/P1 on S is p0^a / Σ_S p0^a: the
  tail cancels. The result is a log-softmax over S of a · log p0 and sums to 1 on S.
* ``tail="bucket"``: the tail term is estimated, so the result is an approximation wherever
  R > 0 and T1 != T0 (it is exact when R = 0, e.g. K = V). Two estimates, which bracket
  the truth when every tail probability is at most the smallest kept one (true of a top-k
  record):

  - ``tail_model="uniform"`` (default): the tail spread evenly over the m = V - K ids off S,
    Σ_tail p0^a ≈ m · (R/m)^a. For a < 1 (T1 > T0, flattening) this is the largest value
    the tail can take, for a > 1 (sharpening) the smallest: concavity/convexity of x^a.
  - ``tail_model="min_kept"``: the tail made of R / p_min ids each at the smallest kept
    probability p_min, Σ_tail p0^a ≈ R · p_min^(a-1): the other extreme.

  The true P1 = Σ_S p1 lies between the two results' Σ_S exp(log p1). The error matters
  most for a flat teacher with a small k, and grows with |log a|.

RS-KD weights (``mode="rskd"`` caches) are not log-probabilities and cannot be re-tempered
this way: re-weighting samples drawn at T0 needs p0 of each sampled id, which the cache does
not store. Record a separate cache at the temperature you train at.
"""
from __future__ import annotations

import math

import torch

__all__ = ["retemper"]

TAIL_MODELS = ("uniform", "min_kept")


def _positive(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def retemper(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *, from_temperature: float,
             to_temperature: float, tail: str = "renorm", vocab_size: int = None,
             tail_model: str = "uniform") -> torch.Tensor:
    """Log-probabilities on the same support, at ``to_temperature`` instead of ``from_temperature``.

    ``teacher_ids``/``teacher_logprobs``: ``[..., K]``, id < 0 an empty slot (its output is
    -inf). ``tail="renorm"`` is exact and returns log-probabilities that sum to 1 on the
    support (what ``sparse_kd_loss(tail="renorm")`` uses). ``tail="bucket"`` (and
    ``"none"``, which reads the same values) needs ``vocab_size`` (the teacher's vocabulary,
    to count the ids off the support) and approximates the tail: see the module docstring.
    float64 stays float64; other dtypes are computed and returned in float32.
    """
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("teacher_ids must be an int64 (or int32) tensor [..., K]")
    if not isinstance(teacher_logprobs, torch.Tensor) or not teacher_logprobs.is_floating_point():
        raise TypeError("teacher_logprobs must be a floating tensor [..., K]")
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() == 0:
        raise ValueError(f"teacher_ids and teacher_logprobs must have the same shape [..., K], got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}")
    t0, t1 = _positive("from_temperature", from_temperature), _positive("to_temperature", to_temperature)
    if tail not in ("renorm", "bucket", "none"):
        raise ValueError(f"tail must be 'renorm', 'bucket' or 'none', got {tail!r}")
    if tail_model not in TAIL_MODELS:
        raise ValueError(f"tail_model must be one of {TAIL_MODELS}, got {tail_model!r}")
    dtype = torch.float64 if teacher_logprobs.dtype == torch.float64 else torch.float32
    empty = teacher_ids < 0
    logp = teacher_logprobs.to(dtype).masked_fill(empty, float("-inf"))
    a = t0 / t1
    scaled = a * logp                                      # log p0^a on S
    if tail == "renorm":
        return scaled.log_softmax(-1).masked_fill(empty, float("-inf"))

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"tail={tail!r} needs vocab_size, the teacher's vocabulary size (an int >= 1), "
                         f"to estimate the tail; got {vocab_size!r}")
    kept = (~empty).sum(-1, keepdim=True)
    if bool((kept > vocab_size).any()):
        raise ValueError(f"a row has more filled slots than vocab_size={vocab_size}")
    if t0 == t1:
        return logp
    log_kept_mass = logp.logsumexp(-1, keepdim=True)      # log P0, -inf for an empty row
    # log R = log(1 - P0) without cancellation: log(-expm1(log P0)); P0 >= 1 means no tail.
    log_rest = torch.where(log_kept_mass < 0, (-torch.expm1(log_kept_mass.clamp_max(0))).log(),
                           torch.full_like(log_kept_mass, float("-inf")))
    off = (vocab_size - kept).to(dtype)                    # ids off the support
    if tail_model == "uniform":
        log_tail = a * log_rest + (1 - a) * off.log()      # m · (R/m)^a
    else:
        log_min = logp.masked_fill(empty, float("inf")).amin(-1, keepdim=True)
        log_min = torch.where(torch.isfinite(log_min), log_min, torch.zeros_like(log_min))
        log_tail = log_rest + (a - 1) * log_min            # R · p_min^(a-1)
    # No tail ids (K = V) or no tail mass: an exact zero, never inf - inf.
    log_tail = torch.where((off > 0) & (log_rest > float("-inf")), log_tail,
                           torch.full_like(log_tail, float("-inf")))
    log_z = torch.logaddexp(scaled.logsumexp(-1, keepdim=True), log_tail)
    return (scaled - log_z).masked_fill(empty, float("-inf"))
