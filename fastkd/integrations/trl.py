"""fastkd inside TRL's distillation trainers (written against trl 1.16).

The recipe is one line, run before the trainer's first step::

    from fastkd.integrations.trl import patch_gkd_trainer
    patch_gkd_trainer()      # GKDTrainer.generalized_jsd_loss now runs fastkd's fused kernels

or, to also keep the ``[tokens, vocab]`` logits from ever being materialised::

    from fastkd.integrations.trl import FastKDGKDTrainer     # a GKDTrainer subclass
    trainer = FastKDGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)

What it covers (``trl.experimental`` of trl 1.16):

* ``trl.experimental.gkd.GKDTrainer``: its static ``generalized_jsd_loss(student_logits,
  teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
  num_items_in_batch=None)``. :func:`generalized_jsd_loss` here returns the same values and
  gradients. ``patch_gkd_trainer()`` installs it on the class; :class:`FastKDGKDTrainer`
  has it and also computes ``compute_loss`` from hidden states and LM heads.
* ``trl.experimental.gold.GOLDTrainer``: the same static method with one more argument,
  ``logits_are_probs`` (before ``num_items_in_batch``); ``patch_gkd_trainer(GOLDTrainer)``
  installs :func:`gold_generalized_jsd_loss`, and :class:`FastKDGOLDTrainer` is the
  patched subclass (GOLD's ``compute_loss`` is kept: its cross-tokenizer ULD path needs
  the logits). ``logits_are_probs=True`` (the ULD matched-token term) takes
  probabilities, not logits: that call runs the unfused path below.
* Not covered: ``trl.DistillationTrainer`` (also ``trl.experimental.distillation``) has no
  such method; it already computes its divergence chunk by chunk from hidden states
  (``_chunked_divergence_loss``, which also returns the student entropy it logs). The
  server and async distillation trainers compare sparse top-k teacher log-probabilities,
  not dense logits.

TRL's conventions, as :func:`generalized_jsd_loss` reproduces them (and how it maps them
onto ``fastkd.kd_loss(..., divergence="jsd", t_squared=False)``):

* ``beta``: the mixture is ``m = beta * p_teacher + (1 - beta) * q_student`` and the loss
  ``beta * KL(p||m) + (1 - beta) * KL(q||m)``; ``beta == 0`` is ``KL(p||q)`` (forward) and
  ``beta == 1`` is ``KL(q||p)`` (reverse). This is fastkd's ``jsd`` as it is, special
  cases included: ``beta`` is passed through unchanged.
* ``temperature`` divides both logits; there is no ``T**2`` factor (``t_squared=False``).
  ``GKDTrainer.compute_loss`` does not pass its ``args.temperature`` (the sampling
  temperature) to the loss, so GKD trains with ``temperature=1``; ``GOLDTrainer`` passes it.
* ``labels``: only ``-100`` is ignored (any other value, even out of the vocabulary, is a
  valid token: the labels are turned into a mask before fastkd sees them).
* ``num_items_in_batch`` (a number or a tensor; a tensor stays a tensor, and on a GPU it is
  never read on the host): the loss is ``sum / num_items_in_batch``, whatever
  ``reduction`` says (even ``"none"``).
* ``reduction="batchmean"``: with labels ``sum / max(1, valid tokens)`` (fastkd's
  ``mean``); without labels ``sum / max(1, student_logits.size(0))``: the *batch*
  dimension of a 3-D input, not the token count.
* ``reduction="mean"``: ``sum / (valid tokens * V)`` (every element counts, the
  vocabulary too); NaN when there are no valid tokens, as ``torch.mean`` of nothing.
* ``reduction="sum"``: the sum over valid tokens.
* ``reduction="none"`` (or any other string): the element-wise ``[..., V]`` terms (with
  labels, ``[valid tokens, V]``, the valid rows). This one is not fused: it is computed with
  PyTorch operations and autograd.

Fused and not fused: :func:`generalized_jsd_loss` runs fastkd's fused kernel (loss and
gradient in one pass, the reduction's scale folded into the gradient, no ``[N, V]`` fp32
temporaries) except for element-wise results (``"none"`` without ``num_items_in_batch``), a
teacher that requires grad while autograd is on (TRL's loss differentiates the teacher
too; fastkd treats it as a constant), ``beta``/``temperature`` given as tensors or outside
their ranges, labels whose shape is not the logits' without ``V``, student and teacher of
different shapes (TRL broadcasts them), a ``num_items_in_batch`` that is ``<= 0`` on the
CPU (TRL gives inf/NaN; fastkd's check would raise) and GOLD's ``logits_are_probs=True``.
Those run the unfused path, which has TRL's values and gradients.

Differences that remain: the fused path returns a float32 loss for bfloat16/float16 logits
(TRL's is in the logits' dtype; the float32 one is the more accurate), and ``-inf`` logits
(masked vocabulary entries) give finite values on both of fastkd's paths, where TRL's
``F.kl_div`` gives NaN.

The fused-linear trainer (:class:`FastKDGKDTrainer`) runs the student's and the teacher's
backbones (``model.base_model``) for their last hidden states and calls
:func:`fastkd.fused_linear_kd_loss` with the LM heads (``get_output_embeddings()``), with
GKD's shift (hidden states ``[:, :-1]``, labels ``[:, 1:]``) and its reduction
(``batchmean`` with labels, or ``num_items_in_batch``): the same loss and student gradients
as ``GKDTrainer.compute_loss``, without the logits. A model that transforms its logits
after the head (Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``,
Granite's ``logits_scaling``: :data:`fastkd.integrations.heads.FAMILIES`) gets the same
transform in the loss (``logit_scale`` / ``softcap`` for the student, ``teacher_*`` for the
teacher, read from each model's config). It falls back to the logits path (with the fused
loss) when it cannot establish the logits as ``transform(lm_head(last_hidden_state))``: no
``nn.Linear`` output embedding, no separate ``base_model``, or a config attribute that may
post-process the logits (``final_logit_softcapping``, ``logit_scale``, ``output_multiplier``,
``lm_head_multiplier``, ``logits_scaling``, ...) on a family whose forward fastkd has not
read; under DeepSpeed or FSDP (their sharded LM heads are gathered only when called as
modules); and when ``compute_loss`` must return the outputs (evaluation with predictions).

This module imports ``trl`` (``import fastkd`` never does); the trainer classes import
``trl.experimental.gkd`` / ``trl.experimental.gold`` on first use.
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Iterable, List, NamedTuple, Optional, Tuple, Union

import torch

try:
    import trl as _trl  # noqa: F401  (the integration needs TRL; fail here with a clear message)
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "fastkd.integrations.trl needs TRL (`pip install trl`); `import fastkd` itself does not") from exc

from ..api import kd_loss
from ..fused_linear import fused_linear_kd_loss
from .heads import HeadTransform, fused_linear_logit_settings, head_transform

__all__ = ["generalized_jsd_loss", "gold_generalized_jsd_loss", "patch_gkd_trainer", "TRLPatch", "lm_head_parts",
           "LMHeadParts", "fused_linear_gkd_loss", "FastKDGKDTrainer", "FastKDGOLDTrainer"]

IGNORE_INDEX = -100  # the only label value TRL's loss ignores (hard-coded there)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------
# The loss.


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fusable_num_items(num_items) -> bool:
    """None, a positive finite number, or a one-element tensor (positive if it is on the CPU)."""
    if num_items is None:
        return True
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
            return False
        if num_items.device.type == "cpu":
            value = float(num_items.reshape(()))  # free on the CPU; fastkd reads it there too
            return 0.0 < value < math.inf
        return True  # a device tensor stays on the device, unread (as fastkd does)
    return _real(num_items) and 0.0 < float(num_items) < math.inf


def _fusable(student, teacher, labels, beta, temperature, reduction, num_items) -> bool:
    """Whether fastkd's fused kernel computes exactly what TRL's function does for this call."""
    if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)):
        return False
    if student.dtype not in _FLOAT_DTYPES or teacher.dtype not in _FLOAT_DTYPES:
        return False
    if student.dim() == 0 or student.shape != teacher.shape or student.shape[-1] == 0:
        return False
    if student.device != teacher.device:
        return False
    if teacher.requires_grad and torch.is_grad_enabled():
        return False  # TRL's loss differentiates the teacher too
    if not (_real(beta) and 0.0 <= float(beta) <= 1.0):
        return False
    if not (_real(temperature) and 0.0 < float(temperature) < math.inf):
        return False
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != student.shape[:-1]:
            return False
        if labels.device != student.device:
            return False
    if num_items is None and reduction not in ("batchmean", "sum", "mean"):
        return False  # element-wise result
    return _fusable_num_items(num_items)


def _fused_generalized_jsd(student, teacher, labels, beta, temperature, reduction, num_items):
    settings = dict(divergence="jsd", beta=float(beta), temperature=float(temperature), t_squared=False,
                    ignore_index=IGNORE_INDEX)
    teacher = teacher.detach()
    # TRL ignores exactly the -100 labels and reads no other label value: hand fastkd a
    # mask in label form (0 = a token that counts), so no label is checked against V.
    mask_labels = None if labels is None else torch.where(labels != IGNORE_INDEX, 0, IGNORE_INDEX)

    if num_items is not None:
        return kd_loss(student, teacher, mask_labels, reduction="mean", num_items=num_items, **settings)
    if reduction == "sum":
        return kd_loss(student, teacher, mask_labels, reduction="sum", **settings)
    if reduction == "batchmean":
        if mask_labels is not None:  # sum / max(1, valid tokens): fastkd's "mean"
            return kd_loss(student, teacher, mask_labels, reduction="mean", **settings)
        # sum / max(1, size(0)): the leading (batch) dimension, not the number of tokens
        return kd_loss(student, teacher, None, reduction="mean", num_items=max(student.shape[0], 1), **settings)
    # reduction == "mean": a mean over every element of [valid tokens, V].
    vocab = student.shape[-1]
    if mask_labels is None:
        n_elements = student.numel()
        loss = kd_loss(student, teacher, None, reduction="mean", num_items=max(n_elements, 1), **settings)
        return loss if n_elements > 0 else loss + math.nan
    n_valid = (mask_labels == 0).sum()
    loss = kd_loss(student, teacher, mask_labels, reduction="mean", num_items=n_valid.clamp_min(1) * vocab,
                   **settings)
    # No valid token: the mean of nothing is NaN, with a zero gradient (no host sync here).
    return torch.where(n_valid > 0, loss, torch.full_like(loss, math.nan))


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a * (log a - log b)`` element-wise, 0 where ``a`` is 0 (also for ``-inf`` log-probabilities)."""
    a = log_a.exp()
    return a * (log_a - log_b).masked_fill(a == 0, 0)


def _log_mixture(log_q: torch.Tensor, log_p: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``log(beta * p + (1 - beta) * q)``; entries where both are 0 stay ``-inf`` with no NaN gradient."""
    x = log_q + torch.log1p(-beta)
    y = log_p + torch.log(beta)
    dead = (x == -math.inf) & (y == -math.inf)
    return torch.logaddexp(x.masked_fill(dead, 0), y.masked_fill(dead, 0)).masked_fill(dead, -math.inf)


def _pointwise_generalized_jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta) -> torch.Tensor:
    """TRL's element-wise ``[..., V]`` terms from student (q) and teacher (p) log-probabilities."""
    if beta == 0:
        return _kl_terms(log_p, log_q)  # KL(p || q)
    if beta == 1:
        return _kl_terms(log_q, log_p)  # KL(q || p)
    beta = torch.as_tensor(beta, dtype=log_q.dtype, device=log_q.device)
    log_m = _log_mixture(log_q, log_p, beta)
    return beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)


def _reduce_as_trl(terms: torch.Tensor, labels, reduction: str, num_items):
    if labels is not None:
        keep = labels != IGNORE_INDEX
        terms = terms[keep]
    if num_items is not None:
        total = terms.sum()
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(total.device)
        return total / num_items
    if reduction == "batchmean":
        denom = keep.sum().clamp_min(1) if labels is not None else max(terms.size(0), 1)
        return terms.sum() / denom
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


def _unfused_generalized_jsd(student, teacher, labels, beta, temperature, reduction, num_items,
                             logits_are_probs=False):
    """The loss with PyTorch operations and autograd (element-wise results, and the cases the
    fused kernel does not take)."""
    if logits_are_probs:  # GOLD's probability inputs
        log_q = torch.log(student.clamp_min(1e-8))
        log_p = torch.log(teacher.clamp_min(1e-8))
    else:
        log_q = torch.log_softmax(student / temperature, dim=-1)
        log_p = torch.log_softmax(teacher / temperature, dim=-1)
    terms = _pointwise_generalized_jsd(log_q, log_p, beta)
    return _reduce_as_trl(terms, labels, reduction, num_items)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """``GKDTrainer.generalized_jsd_loss`` of trl 1.16, computed with fastkd's fused kernel.

    Same arguments, values and gradients (the module docstring lists TRL's conventions and
    when the element-wise, unfused path runs instead). ``student_logits`` and
    ``teacher_logits`` are ``[..., V]``; ``labels`` ``[...]`` with ``-100`` for ignored
    tokens; ``beta`` the mixture weight of the teacher (0: forward KL, 1: reverse KL);
    ``temperature`` divides both logits (no ``T**2``); ``reduction`` one of
    ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``; ``num_items_in_batch`` (number or
    tensor) replaces the reduction by ``sum / num_items_in_batch``.

    Returns a scalar (float32, float64 for float64 logits) on the fused path, and TRL's
    element-wise tensor for ``"none"``.
    """
    if _fusable(student_logits, teacher_logits, labels, beta, temperature, reduction, num_items_in_batch):
        return _fused_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                      num_items_in_batch)
    return _unfused_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                    num_items_in_batch)


def gold_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                              reduction="batchmean", logits_are_probs=False, num_items_in_batch=None):
    """``GOLDTrainer.generalized_jsd_loss`` of trl 1.16 (``logits_are_probs`` before
    ``num_items_in_batch``), with fastkd's fused kernel for logits.

    ``logits_are_probs=True`` takes probabilities (log of the inputs clamped to ``1e-8``,
    no softmax, no temperature): that call runs the unfused path.
    """
    if logits_are_probs:
        return _unfused_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                        num_items_in_batch, logits_are_probs=True)
    return generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                num_items_in_batch)


# ---------------------------------------------------------------------------------------
# Patching a trainer class.

_METHOD = "generalized_jsd_loss"
_GKD_PARAMS = ("student_logits", "teacher_logits", "labels", "beta", "temperature", "reduction",
               "num_items_in_batch")
_GOLD_PARAMS = ("student_logits", "teacher_logits", "labels", "beta", "temperature", "reduction",
                "logits_are_probs", "num_items_in_batch")
_REPLACEMENTS = {_GKD_PARAMS: generalized_jsd_loss, _GOLD_PARAMS: gold_generalized_jsd_loss}
_OURS = tuple(_REPLACEMENTS.values())


def _replacement_for(cls) -> Optional[callable]:
    """Our function for ``cls``'s ``generalized_jsd_loss`` signature (None: already ours)."""
    current = getattr(cls, _METHOD, None)
    if current is None:
        raise TypeError(f"{cls.__qualname__} has no {_METHOD} method to replace")
    if current in _OURS:
        return None
    params = tuple(inspect.signature(current).parameters)
    if params not in _REPLACEMENTS:
        raise TypeError(
            f"{cls.__qualname__}.{_METHOD} has the parameters {params}, which neither of the forms "
            f"fastkd reproduces has (trl 1.16's GKDTrainer {_GKD_PARAMS} and GOLDTrainer {_GOLD_PARAMS}); "
            "not patching a loss whose conventions have not been checked")
    if not isinstance(inspect.getattr_static(cls, _METHOD), staticmethod):
        raise TypeError(f"{cls.__qualname__}.{_METHOD} is not a staticmethod, as in trl 1.16; not patching it")
    return _REPLACEMENTS[params]


class TRLPatch:
    """What :func:`patch_gkd_trainer` changed, and the way back.

    ``restore()`` (or leaving a ``with`` block) puts back each class's original
    ``generalized_jsd_loss``; a second ``restore()`` does nothing, and so does one for a
    class whose method someone else has replaced since. ``classes`` lists the classes this
    handle changed (empty when they were already patched: patching is idempotent).
    """

    def __init__(self, changes: List[Tuple[type, bool, object]]):
        # (class, whether the class itself defined the method, that definition)
        self._changes = changes
        self._active = bool(changes)

    @property
    def classes(self) -> Tuple[type, ...]:
        return tuple(cls for cls, _, _ in self._changes)

    @property
    def active(self) -> bool:
        return self._active

    def restore(self) -> None:
        if not self._active:
            return
        for cls, had_own, original in reversed(self._changes):
            installed = cls.__dict__.get(_METHOD)
            if not (isinstance(installed, staticmethod) and installed.__func__ in _OURS):
                continue  # replaced again by someone else: leave theirs
            if had_own:
                setattr(cls, _METHOD, original)
            else:
                delattr(cls, _METHOD)
        self._active = False

    def __enter__(self) -> "TRLPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        names = ", ".join(cls.__qualname__ for cls in self.classes) or "nothing"
        return f"TRLPatch({names}, {'active' if self._active else 'restored'})"


def _gkd_trainer_class():
    from trl.experimental.gkd import GKDTrainer
    return GKDTrainer


def _gold_trainer_class():
    from trl.experimental.gold import GOLDTrainer
    return GOLDTrainer


def patch_gkd_trainer(trainer_cls: Union[None, type, Iterable[type]] = None) -> TRLPatch:
    """Make a TRL trainer class compute ``generalized_jsd_loss`` with fastkd.

    ``trainer_cls``: a class (or several) whose static ``generalized_jsd_loss`` has trl
    1.16's GKD or GOLD signature; ``None`` means ``trl.experimental.gkd.GKDTrainer``.
    Patching a class also patches its subclasses that do not define their own. Returns a
    :class:`TRLPatch` (also a context manager) whose ``restore()`` undoes it. Patching an
    already patched class changes nothing (the returned handle's ``restore()`` is a no-op).

    >>> patch = patch_gkd_trainer()                      # every GKDTrainer from now on
    >>> with patch_gkd_trainer(GOLDTrainer): trainer.train()   # only inside the block
    """
    if trainer_cls is None:
        classes = [_gkd_trainer_class()]
    elif isinstance(trainer_cls, type):
        classes = [trainer_cls]
    else:
        classes = list(trainer_cls)
    plan = []
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"trainer_cls must be a class or classes, got {cls!r}")
        replacement = _replacement_for(cls)  # checks every class before changing any
        if replacement is not None and all(cls is not c for c, _ in plan):
            plan.append((cls, replacement))
    changes = []
    for cls, replacement in plan:
        had_own = _METHOD in cls.__dict__
        changes.append((cls, had_own, cls.__dict__.get(_METHOD)))
        setattr(cls, _METHOD, staticmethod(replacement))
    return TRLPatch(changes)


# ---------------------------------------------------------------------------------------
# The fused-linear path: hidden states and LM heads, no logits.

class LMHeadParts(NamedTuple):
    """What the fused-linear path needs of a model: its logits are
    ``transform(lm_head(backbone(...).last_hidden_state))``."""

    backbone: torch.nn.Module
    lm_head: torch.nn.Linear
    transform: HeadTransform


def _lm_head_parts_or_reason(model) -> Tuple[Optional[LMHeadParts], str]:
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
        model = model.get_base_model()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        return None, f"its output embedding is a {type(head).__name__}, not an nn.Linear"
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        return None, "it has no backbone separate from the model (model.base_model)"
    try:
        transform = head_transform(model)
    except ValueError as exc:  # UnknownHeadTransform, or a known attribute fastkd cannot apply
        return None, str(exc)
    return LMHeadParts(backbone, head, transform), ""


def lm_head_parts(model) -> Optional[LMHeadParts]:
    """``(backbone, lm_head, transform)`` when ``model``'s logits are
    ``transform(lm_head(backbone(...).last_hidden_state))``.

    ``transform`` is the :class:`fastkd.integrations.heads.HeadTransform` the model's
    forward applies after its head (Gemma 2's softcap, Cohere's and Granite's scales: read
    from its config by :func:`fastkd.integrations.heads.head_transform`; the identity for
    a plain head). ``None`` when that cannot be established: no ``nn.Linear`` output
    embedding, no backbone separate from the model (``model.base_model``), or a config
    attribute that may transform the logits on a family whose forward fastkd has not read.
    A PEFT model is looked at through its base model (a LoRA-wrapped LM head is not an
    ``nn.Linear``: ``None``).
    """
    return _lm_head_parts_or_reason(model)[0]


def _unpack_parts(role: str, parts) -> LMHeadParts:
    # A bare (backbone, lm_head) pair says nothing of the transform after the head: taking
    # it as the identity is how fused losses silently dropped Gemma 2's softcap.
    if not (isinstance(parts, tuple) and len(parts) == 3 and isinstance(parts[2], HeadTransform)):
        raise TypeError(f"{role}_parts must be (backbone, lm_head, transform) as lm_head_parts(model) returns "
                        f"it, got {type(parts).__name__}" + (f" of length {len(parts)}" if isinstance(parts, tuple)
                                                             else ""))
    return LMHeadParts(*parts)


def _last_hidden_state(backbone, inputs) -> torch.Tensor:
    out = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def fused_linear_gkd_loss(student_parts, teacher_parts, inputs, *, beta: float, temperature: float = 1.0,
                          num_items_in_batch=None, chunk_size="auto", backend: str = "auto") -> torch.Tensor:
    """GKD's ``compute_loss`` value from hidden states: the logits are never materialised.

    ``student_parts`` / ``teacher_parts``: ``(backbone, lm_head, transform)`` from
    :func:`lm_head_parts`; each side's transform (softcap, scale) is applied to the logits
    the loss computes, as the model's forward applies it (the student's as ``logit_scale``
    / ``softcap``, the teacher's as ``teacher_logit_scale`` / ``teacher_softcap``).
    ``inputs``: the batch (``input_ids``, ``attention_mask``, ``labels``). Causal shift as
    GKD's: hidden states ``[:, :-1]``, labels ``[:, 1:]``; reduction as GKD's call of
    ``generalized_jsd_loss`` (``batchmean`` with labels, i.e. ``sum / max(1, valid)``, or
    ``sum / num_items_in_batch``). The teacher runs under ``torch.no_grad()``.
    """
    s_backbone, s_head, s_transform = _unpack_parts("student", student_parts)
    t_backbone, t_head, t_transform = _unpack_parts("teacher", teacher_parts)
    student_hidden = _last_hidden_state(s_backbone, inputs)[:, :-1]
    with torch.no_grad():
        teacher_hidden = _last_hidden_state(t_backbone, inputs)[:, :-1]
    labels = inputs["labels"][:, 1:]
    mask_labels = torch.where(labels != IGNORE_INDEX, 0, IGNORE_INDEX).to(student_hidden.device)
    teacher_hidden = teacher_hidden.to(student_hidden.device)
    settings = dict(divergence="jsd", beta=float(beta), temperature=float(temperature), t_squared=False,
                    ignore_index=IGNORE_INDEX, student_bias=s_head.bias, teacher_bias=t_head.bias,
                    chunk_size=chunk_size, backend=backend,
                    **fused_linear_logit_settings(s_transform, t_transform, {}))
    args = (student_hidden, s_head.weight, teacher_hidden, t_head.weight, mask_labels)
    if _fusable_num_items(num_items_in_batch):  # None too: sum / max(1, valid tokens)
        return fused_linear_kd_loss(*args, reduction="mean", num_items=num_items_in_batch, **settings)
    # A count <= 0 on the CPU: TRL's sum / n (inf or NaN), where fastkd's check would raise.
    return fused_linear_kd_loss(*args, reduction="sum", **settings) / num_items_in_batch


def _run_inside_wrapper(wrapper, inner, fn):
    """Run ``fn()`` inside ``wrapper``'s forward (DDP and friends see a forward of ``inner``)."""
    if wrapper is inner:
        return fn()
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")

    def redirected(*args, **kwargs):
        _restore()
        return fn()

    def _restore():
        if had_own:
            inner.forward = own
        else:
            inner.__dict__.pop("forward", None)

    inner.forward = redirected
    try:
        return wrapper()
    finally:
        _restore()


class _FusedLinearMixin:
    """``compute_loss`` from hidden states and LM heads, with the logits path as fallback."""

    fastkd_fused_linear: bool = True
    fastkd_chunk_size: Union[str, int] = "auto"
    fastkd_backend: str = "auto"

    def _fastkd_loss_temperature(self) -> float:
        return 1.0

    def _fastkd_parts(self, model):
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            # Sharded parameters are gathered by module hooks; the LM heads are never called
            # as modules on this path, so their weights would stay sharded.
            self._fastkd_warn_fallback("DeepSpeed / FSDP shard the LM heads")
            return None
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        found = []
        for role, module in (("student", student), ("teacher", teacher)):
            parts, why = _lm_head_parts_or_reason(module)
            if parts is None:
                self._fastkd_warn_fallback(f"the {role}'s logits cannot be computed from its last hidden state "
                                           f"and LM head ({why}; see fastkd.integrations.trl.lm_head_parts)")
                return None
            found.append(parts)
        return student, tuple(found)

    def _fastkd_warn_fallback(self, why: str) -> None:
        if not getattr(self, "_fastkd_fallback_warned", False):
            warnings.warn(f"fastkd: {why}; computing the loss from the logits instead", stacklevel=4)
            self._fastkd_fallback_warned = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        found = None if (return_outputs or not self.fastkd_fused_linear) else self._fastkd_parts(model)
        if found is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        student, (student_parts, teacher_parts) = found
        self.teacher_model.eval()

        def loss_fn():
            return fused_linear_gkd_loss(
                student_parts, teacher_parts, inputs, beta=self.beta,
                temperature=self._fastkd_loss_temperature(), num_items_in_batch=num_items_in_batch,
                chunk_size=self.fastkd_chunk_size, backend=self.fastkd_backend)

        with self.accelerator.autocast():
            return _run_inside_wrapper(model, student, loss_fn)


def _make_gkd_trainer():
    GKDTrainer = _gkd_trainer_class()

    class FastKDGKDTrainer(_FusedLinearMixin, GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` with fastkd's loss, computed from hidden states.

        ``compute_loss`` runs the student's and the teacher's backbones and
        :func:`fastkd.fused_linear_kd_loss` on their LM heads, so the ``[batch, seq, vocab]``
        logits of neither model are materialised; the loss and the student's gradients
        equal ``GKDTrainer``'s (JSD with ``args.beta``, temperature 1 as GKD's loss uses,
        ``batchmean`` over the completion tokens or ``num_items_in_batch``), logit
        softcaps and scales after the heads included (Gemma 2, Cohere, Granite: applied
        by the loss from the models' configs). Where the models do not allow it (see
        :func:`lm_head_parts`), or when the outputs are asked for, it falls back to the
        logits path with :func:`generalized_jsd_loss`.

        Extra keyword arguments: ``fused_linear`` (default True; False keeps the logits
        path, still with the fused loss), ``chunk_size`` and ``backend`` (passed to
        :func:`fastkd.fused_linear_kd_loss`).
        """

        generalized_jsd_loss = staticmethod(generalized_jsd_loss)

        def __init__(self, *args, fused_linear: bool = True, chunk_size: Union[str, int] = "auto",
                     backend: str = "auto", **kwargs):
            self.fastkd_fused_linear = fused_linear
            self.fastkd_chunk_size = chunk_size
            self.fastkd_backend = backend
            super().__init__(*args, **kwargs)

    FastKDGKDTrainer.__module__ = __name__
    return FastKDGKDTrainer


def _make_gold_trainer():
    GOLDTrainer = _gold_trainer_class()

    class FastKDGOLDTrainer(GOLDTrainer):
        """``trl.experimental.gold.GOLDTrainer`` with :func:`gold_generalized_jsd_loss`.

        Its ``compute_loss`` is GOLD's own (logits are materialised: the cross-tokenizer
        ULD path needs them); only the JSD is fused.
        """

        generalized_jsd_loss = staticmethod(gold_generalized_jsd_loss)

    FastKDGOLDTrainer.__module__ = __name__
    return FastKDGOLDTrainer


_LAZY = {"FastKDGKDTrainer": _make_gkd_trainer, "FastKDGOLDTrainer": _make_gold_trainer}


def __getattr__(name):
    # The trainer classes subclass trl.experimental classes, whose import is slow and noisy:
    # built on first access.
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
