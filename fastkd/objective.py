"""``DistillationLoss``: one objective over the three families of knowledge distillation.

    total = Σ_k w_k(step) · L_k

over the terms k the objective was built with:

* ``logits`` — response-based KD on the output distributions (Hinton et al., 2015):
  :func:`fastkd.kd_loss` on the student's and teacher's logits, or, with
  ``fused_linear=True``, :func:`fastkd.fused_linear_kd_loss` on their last hidden states
  and LM heads (the ``[tokens, vocab]`` logits never exist). Its value is kd_loss's:
  ``alpha · T² · D(p, q) + (1 − alpha) · CE``, so the hard-label cross-entropy is part of
  this term (``alpha < 1``).
* ``helper`` — the same loss against a second, intermediate-size model, a teacher
  assistant (Mirzadeh et al., 2020, "Improved Knowledge Distillation via Teacher
  Assistant"). fastkd has no multi-teacher loss yet; a second logits term with its own
  weight is the fallback issue 14 allows. By default it uses the logits term's settings
  with ``alpha = 1`` (the cross-entropy is already counted once, in ``logits``).
* feature terms — hint-based KD on intermediate hidden states (FitNets, Romero et al.,
  2015): ``nn.Module`` s called as ``term(student_hidden_states, teacher_hidden_states,
  labels, num_items=num_items)`` with the two models' ``hidden_states`` tuples, such as
  :class:`fastkd.FeatureDistillation`. They are submodules of the objective, so their
  learned projections are in ``objective.parameters()``: give those to the optimizer.
* relation terms — relational KD on the geometry of a batch (Park et al., 2019, RKD;
  Tung & Mori, 2019, similarity-preserving): ``nn.Module`` s called as ``term(student,
  teacher, labels)`` with one layer of each model (``relation_layers``, the last hidden
  state by default), such as :class:`fastkd.RelationDistillation`.

Not supported yet: sparse (top-k) teachers — fastkd has no sparse teacher loss, so the
logits term needs the teacher's full logits (or its hidden state and LM head) — and
several teachers in one logits term (use ``helper`` for a second model).

Weights and schedules: each weight is a number or a callable ``step -> number`` (≥ 0).
The objective counts steps itself: ``objective.step()`` after each optimizer step (a plain
loop), or ``forward(..., step=trainer_state.global_step)`` (Hugging Face Trainer, which
knows the step), which also sets the count. Several forward calls of one optimizer step
(gradient accumulation) therefore share one weight. The count is saved in
``state_dict()``, so a resumed run continues its schedules.

The returned ``terms`` dict holds, detached, each term's *unweighted* value under its name
and the weighted sum under ``"total"``; ``objective.current_weights()`` gives the weights
that multiplied them.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ._outputs import Outputs, read_outputs
from .api import KDLoss
from .config import check_bool, check_int, check_number, make_config
from .fused_linear import FusedLinearKDLoss

Weight = Union[float, Callable[[int], float]]
LOGITS, HELPER, TOTAL = "logits", "helper", "total"


class DistillationLoss(torch.nn.Module):
    """Weighted sum of logits, helper (teacher-assistant), feature and relation KD terms.

    >>> objective = DistillationLoss(
    ...     temperature=2.0, alpha=0.5,                                 # the logits term (kd_loss settings)
    ...     features=FeatureDistillation({2: 4}, 256, 512, kind="cosine"),
    ...     relations=RelationDistillation("rkd_distance"),
    ...     weights={"features": lambda step: 1.0 if step < 500 else 0.1, "relations": 0.5})
    >>> out_s = student(input_ids, output_hidden_states=True)
    >>> with torch.no_grad():
    ...     out_t = teacher(input_ids, output_hidden_states=True)
    >>> total, terms = objective(out_s, out_t, labels)
    >>> total.backward(); optimizer.step(); objective.step()

    Args:
        logits: include the logits term (``False``: features and relations only).
        fused_linear: compute the logits and helper terms with
            :func:`fastkd.fused_linear_kd_loss` from each side's last hidden state
            (``last_hidden_state`` or ``hidden_states[-1]``) and LM head (``forward``'s
            ``student_lm_head``, ``teacher_lm_head``, ``helper_lm_head``). The teacher's
            logits cannot be used there (that function takes hidden state + weight).
        features: an ``nn.Module`` (term name ``"features"``) or a mapping name -> module
            (term names = the keys) of feature terms.
        relations: the same for relation terms (default name ``"relations"``).
        relation_layers: ``(student_layer, teacher_layer)`` indices into the
            ``hidden_states`` tuples for every relation term, or a mapping term name -> pair.
            Default ``(-1, -1)``: the last hidden states (``last_hidden_state`` also serves).
        helper: ``None`` (no helper term), ``True`` (the logits settings with ``alpha=1``),
            or a dict of settings that override those for the helper term.
        weights: mapping term name -> weight (a number ≥ 0, or a callable step -> number);
            a term not named has weight 1. A weight of 0 still computes the term (its value
            is logged, and every parameter takes part in backward, as DDP requires).
        shift_labels: the labels are the *inputs'* tokens, as a Hugging Face causal LM takes
            them; the objective shifts them left by one (``labels[..., 1:]`` then one
            ``ignore_index``), so the logits at position i are scored against token i + 1 and
            the last position is ignored in every term. ``False``: labels are already aligned
            with the logits.
        inplace_backward, chunk_size, backend: as in :func:`fastkd.kd_loss` /
            :func:`fastkd.fused_linear_kd_loss`, for the logits and helper terms. With
            ``inplace_backward`` the logits term runs last (it overwrites the student's logits).
        **settings: the loss settings of :func:`fastkd.kd_loss` (``divergence``,
            ``temperature``, ``beta``, ``alpha``, ``t_squared``, ``ignore_index``,
            ``reduction``, ``vocab_size``) for the logits term. ``ignore_index`` also masks
            the feature and relation terms (a feature module with another ``ignore_index``
            is an error). ``reduction="none"`` is refused: the objective sums scalars.
    """

    def __init__(self, *, logits: bool = True, fused_linear: bool = False,
                 features: Union[None, torch.nn.Module, Mapping] = None,
                 relations: Union[None, torch.nn.Module, Mapping] = None,
                 relation_layers: Union[Tuple[int, int], Mapping] = (-1, -1),
                 helper: Union[None, bool, Mapping] = None,
                 weights: Optional[Mapping] = None, shift_labels: bool = False,
                 inplace_backward: bool = False, chunk_size: Union[str, int] = "auto", backend: str = "auto",
                 **settings):
        super().__init__()
        self.fused_linear = check_bool("fused_linear", fused_linear)
        self.shift_labels = check_bool("shift_labels", shift_labels)
        # Validated here even without a logits term: ignore_index masks every term.
        self.config = make_config("DistillationLoss", **settings)
        if self.config.reduction == "none":
            raise ValueError("reduction='none' gives a per-token loss, but DistillationLoss sums its terms into "
                             "one scalar: use 'mean', 'sum' or 'batchmean'")
        self.ignore_index = self.config.ignore_index
        options = dict(inplace_backward=inplace_backward, backend=backend)
        if fused_linear:
            options["chunk_size"] = chunk_size
        elif chunk_size != "auto":
            raise ValueError("chunk_size applies to fused_linear=True only")
        loss_cls = FusedLinearKDLoss if fused_linear else KDLoss

        self.logits_loss = loss_cls(**options, **settings) if check_bool("logits", logits) else None
        self.helper_loss = None
        if helper is not None and helper is not False:
            if helper is True:
                helper = {}
            if not isinstance(helper, Mapping):
                raise TypeError(f"helper must be None, True or a dict of loss settings, got {type(helper).__name__}")
            # Never in place: the logits term reads the student's logits after the helper term.
            helper_options = dict(options, inplace_backward=False)
            self.helper_loss = loss_cls(**helper_options, **{**settings, "alpha": 1.0, **helper})
        if self.logits_loss is None and self.helper_loss is None and set(settings) - {"ignore_index"}:
            raise ValueError(f"the loss settings {sorted(set(settings) - {'ignore_index'})} apply to the logits and "
                             "helper terms, and neither is on (logits=False, helper=None)")

        self.feature_terms = _terms("features", features)
        self.relation_terms = _terms("relations", relations)
        for name, term in self.feature_terms.items():
            term_ignore = _ignore_index_of(term, self.ignore_index)
            if term_ignore != self.ignore_index:
                raise ValueError(f"feature term {name!r} has ignore_index={term_ignore} but the objective has "
                                 f"ignore_index={self.ignore_index}; one label mask serves every term")
        self.relation_layers = _relation_layers(relation_layers, tuple(self.relation_terms))

        names = ([LOGITS] if self.logits_loss is not None else []) + ([HELPER] if self.helper_loss is not None else [])
        for name in [*self.feature_terms, *self.relation_terms]:
            if name in names or name == TOTAL:
                raise ValueError(f"term name {name!r} is used twice (or is reserved: {LOGITS}, {HELPER}, {TOTAL})")
            names.append(name)
        if not names:
            raise ValueError("DistillationLoss has no term: keep logits=True or give features, relations or helper")
        self.term_names = tuple(names)

        weights = {} if weights is None else weights
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping term name -> weight, got {type(weights).__name__}")
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(f"weights has unknown term {unknown[0]!r}; this objective's terms are {', '.join(names)}")
        self.term_weights: Dict[str, Weight] = {n: _check_weight(n, weights.get(n, 1.0)) for n in names}
        self.current_step = 0

    # ------------------------------------------------------------------ the step count

    def step(self, n: int = 1) -> int:
        """Advance the step count by ``n`` (call once per optimizer step); returns the new count."""
        self.current_step += _check_step("n", n)
        return self.current_step

    def current_weights(self, step: Optional[int] = None) -> Dict[str, float]:
        """Each term's weight at ``step`` (default: the current count)."""
        step = self.current_step if step is None else _check_step("step", step)
        return {name: _weight_at(name, w, step) for name, w in self.term_weights.items()}

    def get_extra_state(self):
        return {"step": self.current_step}

    def set_extra_state(self, state):
        self.current_step = _check_step("step", state["step"])

    # ------------------------------------------------------------------ forward

    def forward(self, student_outputs, teacher_outputs, labels: Optional[torch.Tensor] = None, *,
                helper_outputs=None, num_items=None, step: Optional[int] = None,
                student_lm_head=None, teacher_lm_head=None, helper_lm_head=None):
        """``(total, terms)``: the weighted sum, and each term's detached unweighted value.

        Args:
            student_outputs, teacher_outputs, helper_outputs: a model's outputs as it
                returned them (an object or dict with ``logits`` and, for feature and
                relation terms, ``hidden_states`` from ``output_hidden_states=True``), or
                a logits tensor when only logits terms are on. The teacher and helper are
                constants: their tensors must not require grad (run them under
                ``torch.no_grad()``).
            labels: ``[...]`` token labels with the student's leading shape (``[B, L]``);
                ``ignore_index`` drops a token from every term. See ``shift_labels``.
            num_items: the denominator of ``reduction="mean"`` for the logits, helper and
                feature terms (e.g. Trainer's ``num_items_in_batch``); relation terms
                compare sequences and do not use it.
            step: the training step for the weight schedules; also sets the count
                (``None``: use the count, advanced by :meth:`step`).
            student_lm_head, teacher_lm_head, helper_lm_head: with ``fused_linear=True``,
                each side's LM head: a module with ``.weight`` (and ``.bias``) or a weight
                tensor ``[V, H]``.
        """
        if step is not None:
            self.current_step = _check_step("step", step)
        student = read_outputs("student_outputs", student_outputs)
        teacher = read_outputs("teacher_outputs", teacher_outputs)
        helper = None
        if self.helper_loss is not None:
            if helper_outputs is None:
                raise ValueError("this DistillationLoss has a helper term: pass helper_outputs=")
            helper = read_outputs("helper_outputs", helper_outputs)
        elif helper_outputs is not None:
            raise ValueError("helper_outputs given, but this DistillationLoss has no helper term: "
                             "build it with helper=True")
        heads = {"student_lm_head": student_lm_head, "teacher_lm_head": teacher_lm_head,
                 "helper_lm_head": helper_lm_head}
        if not self.fused_linear:
            given = [k for k, v in heads.items() if v is not None]
            if given:
                raise ValueError(f"{given[0]} is only used with fused_linear=True")
        for side in (teacher, helper):
            if side is not None:
                _check_constant(side)
        labels = self._labels(labels, student)
        weights = self.current_weights()

        values = {}
        # Every term that reads the student's logits runs before the logits term, which may
        # overwrite them with their gradient (inplace_backward).
        relation_labels = self._relation_labels(labels)
        for name, term in self.relation_terms.items():
            s_layer, t_layer = self.relation_layers[name]
            why = f"relation term {name!r}"
            values[name] = term(student.layer(s_layer, why), teacher.layer(t_layer, why), relation_labels)
        for name, term in self.feature_terms.items():
            why = f"feature term {name!r}"
            values[name] = term(student.need_hidden_states(why), teacher.need_hidden_states(why), labels,
                                num_items=num_items)
        if self.helper_loss is not None:
            values[HELPER] = self._logits_term(self.helper_loss, student, helper, labels, num_items,
                                               student_lm_head, helper_lm_head, "helper_lm_head")
        if self.logits_loss is not None:
            values[LOGITS] = self._logits_term(self.logits_loss, student, teacher, labels, num_items,
                                               student_lm_head, teacher_lm_head, "teacher_lm_head")

        total = None
        for name in self.term_names:
            value = values[name]
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"term {name!r} returned {shape}, not a scalar tensor: the objective sums "
                                 "scalars (use a reduction other than 'none')")
            part = weights[name] * value
            total = part if total is None else total + part
        terms = {name: values[name].detach() for name in self.term_names}
        terms[TOTAL] = total.detach()
        return total, terms

    def _logits_term(self, loss, student: Outputs, other: Outputs, labels, num_items, student_head, other_head,
                     other_head_name: str):
        why = "the helper term" if other.name == "helper_outputs" else "the logits term"
        if not self.fused_linear:
            return loss(student.need_logits(why), other.need_logits(why), labels, num_items=num_items)
        s_weight, s_bias = _head("student_lm_head", student_head)
        o_weight, o_bias = _head(other_head_name, other_head)
        return loss(student.last_hidden(why), s_weight, other.last_hidden(why), o_weight, labels,
                    student_bias=s_bias, teacher_bias=o_bias, num_items=num_items)

    def _labels(self, labels, student: Outputs):
        if labels is None:
            return None
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        lead = _lead_shape(student)
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead} (the student's tokens: its logits or hidden states "
                             f"without the last dimension), got {tuple(labels.shape)}")
        if self.shift_labels and labels.dim() > 0 and labels.shape[-1] > 0:
            pad = torch.full_like(labels[..., :1], self.ignore_index)
            labels = torch.cat([labels[..., 1:], pad], dim=-1)
        return labels

    def _relation_labels(self, labels):
        # Relation terms pool hidden states over the tokens whose label is not -100 (their
        # one convention); with another ignore_index, hand them that mask in their terms.
        if labels is None or not self.relation_terms or self.ignore_index == -100:
            return labels
        return torch.where(labels == self.ignore_index, -100, 0)

    def extra_repr(self) -> str:
        weights = {n: (getattr(w, "__name__", "schedule") if callable(w) else w) for n, w in self.term_weights.items()}
        return (f"terms={self.term_names}, weights={weights}, step={self.current_step}, "
                f"fused_linear={self.fused_linear}, shift_labels={self.shift_labels}, "
                f"relation_layers={self.relation_layers}")


# ---------------------------------------------------------------------- checks

def _terms(kind: str, terms) -> torch.nn.ModuleDict:
    if terms is None:
        return torch.nn.ModuleDict()
    if isinstance(terms, torch.nn.Module):
        return torch.nn.ModuleDict({kind: terms})
    if not isinstance(terms, Mapping):
        raise TypeError(f"{kind} must be an nn.Module, a mapping name -> nn.Module, or None, "
                        f"got {type(terms).__name__}")
    for name, term in terms.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{kind} names must be non-empty strings without '.', got {name!r}")
        if not isinstance(term, torch.nn.Module):
            raise TypeError(f"{kind}[{name!r}] must be an nn.Module, got {type(term).__name__}")
    return torch.nn.ModuleDict(dict(terms))


def _ignore_index_of(term: torch.nn.Module, default: int) -> int:
    """The label value a feature term masks (FeatureDistillation keeps it in its ``spec``)."""
    for holder in (term, getattr(term, "spec", None)):
        value = getattr(holder, "ignore_index", None)
        if isinstance(value, int):
            return value
    return default


def _layer_pair(what: str, pair) -> Tuple[int, int]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{what} must be a pair (student_layer, teacher_layer) of ints, got {pair!r}")
    return check_int(f"{what}[0]", pair[0]), check_int(f"{what}[1]", pair[1])


def _relation_layers(layers, names) -> Dict[str, Tuple[int, int]]:
    if isinstance(layers, Mapping):
        unknown = [k for k in layers if k not in names]
        if unknown:
            raise ValueError(f"relation_layers has unknown term {unknown[0]!r}; the relation terms are {names}")
        return {n: _layer_pair(f"relation_layers[{n!r}]", layers.get(n, (-1, -1))) for n in names}
    pair = _layer_pair("relation_layers", layers)
    return {n: pair for n in names}


def _check_weight(name: str, weight) -> Weight:
    if callable(weight):
        return weight
    return check_number(f"weights[{name!r}]", weight, low=0.0)


def _weight_at(name: str, weight: Weight, step: int) -> float:
    if not callable(weight):
        return weight
    return check_number(f"weights[{name!r}]({step}) (the schedule's value)", weight(step), low=0.0)


def _check_step(name: str, step) -> int:
    if isinstance(step, torch.Tensor) or isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name} must be an int (the training step), got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"{name} must be >= 0, got {step}")
    return int(step)


def _check_constant(side: Outputs) -> None:
    for tensor in side.tensors():
        if tensor.requires_grad:
            raise ValueError(f"{side.name} has tensors that require grad, but a teacher is a constant in "
                             "distillation: run it under torch.no_grad() (or pass detached outputs)")


def _head(name: str, head):
    if head is None:
        raise ValueError(f"fused_linear=True needs {name}= (the model's lm_head module, or its weight tensor)")
    if isinstance(head, torch.Tensor):
        return head, None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a module with a .weight (an LM head) or a weight tensor, "
                        f"got {type(head).__name__}")
    return weight, getattr(head, "bias", None)


def _lead_shape(student: Outputs) -> Tuple[int, ...]:
    for x in (student.logits, student.last_hidden_state, *(student.hidden_states or ())[:1]):
        if x is not None:
            return tuple(x.shape[:-1])
    raise ValueError("student_outputs has no logits and no hidden states")
