"""What a Hugging Face causal LM does to its logits after the LM head, as fastkd settings.

Some model families post-process ``lm_head(last_hidden_state)`` in their ``forward``:
Gemma 2 soft-caps it, Cohere and Granite rescale it. A fused-linear loss, which computes
the logits itself from the hidden states and the head's weight, must apply the same
transform or it distils other distributions than the models' (Liger's fused linear
losses ignored Gemma 2's ``final_logit_softcapping``: TRL issue 6629). fastkd's loss
description has the transform (``logit_scale`` m and ``softcap`` c: ``s' = c tanh(m s / c)``,
``m s`` without a cap; ``teacher_logit_scale`` / ``teacher_softcap`` for the teacher), so
this module only has to read it off a model: :func:`head_transform`. Both integrations
(``KDTrainer(fused_linear=True)`` and TRL's ``FastKDGKDTrainer``) decide with it.

Only families whose ``forward`` was read in the installed transformers (5.24) are known
(``FAMILIES``, keyed by ``config.model_type``); every known family's transform is checked
against the model's own logits on a tiny model in the tests. A config of any other family
that carries one of the attributes in ``POSTPROCESSING_ATTRS`` with a non-neutral value
(a Llama config with ``final_logit_softcapping`` set, which Llama ignores; a multimodal
wrapper whose forward was not read) is unknown: :class:`UnknownHeadTransform`. The same
attribute name means different things in different families (Granite divides by
``logits_scaling``, HyperCLOVA X multiplies by it), which is why the family decides.

This module imports neither transformers nor TRL.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..config import SAME_AS_STUDENT
from ..reference import transform_logits

__all__ = ["HeadTransform", "UnknownHeadTransform", "head_transform", "FAMILIES", "POSTPROCESSING_ATTRS",
           "fused_linear_logit_settings", "check_no_double_transform", "LOGIT_SETTINGS"]

# How a family's forward uses its attribute (each read in transformers 5.24's XForCausalLM.forward).
SOFTCAP = "softcap"      # if c is not None: logits = tanh(logits / c) * c      -> softcap=c
MULTIPLY = "multiply"    # logits = logits * m                                  -> logit_scale=m
DIVIDE = "divide"        # logits = logits / d                                  -> logit_scale=1/d

# config.model_type -> (config attribute, how forward applies it, where forward reads the
# value when not from the config: an attribute path on the model, copied there at __init__).
FAMILIES: Dict[str, Tuple[str, str, Optional[str]]] = {
    "gemma2": ("final_logit_softcapping", SOFTCAP, None),        # Gemma2ForCausalLM
    "gemma3_text": ("final_logit_softcapping", SOFTCAP, None),   # Gemma3ForCausalLM (text only)
    "vaultgemma": ("final_logit_softcapping", SOFTCAP, None),    # VaultGemmaForCausalLM
    "nanochat": ("final_logit_softcapping", SOFTCAP, None),      # NanoChatForCausalLM
    "cohere": ("logit_scale", MULTIPLY, "logit_scale"),          # CohereForCausalLM: self.logit_scale
    "cohere2": ("logit_scale", MULTIPLY, "logit_scale"),         # Cohere2ForCausalLM
    "granite": ("logits_scaling", DIVIDE, None),                 # GraniteForCausalLM
    "granitemoe": ("logits_scaling", DIVIDE, None),              # GraniteMoeForCausalLM
    "granitemoeshared": ("logits_scaling", DIVIDE, None),        # GraniteMoeSharedForCausalLM
    "hyperclovax": ("logits_scaling", MULTIPLY, None),           # HyperCLOVAXForCausalLM (muP: multiplies)
    "falcon_h1": ("lm_head_multiplier", MULTIPLY, "model.lm_head_multiplier"),  # FalconH1ForCausalLM
    "cohere2_moe": ("logit_scale", MULTIPLY, "logit_scale"),     # Cohere2MoeForCausalLM
}

# Config attributes with which some model's forward changes the logits after its LM head,
# and their neutral values. On a family not in FAMILIES, any other value is unknown.
POSTPROCESSING_ATTRS: Tuple[Tuple[str, Any], ...] = (
    ("final_logit_softcapping", None),
    ("logit_scale", 1.0),
    ("logits_scaling", 1.0),
    ("lm_head_multiplier", 1.0),
    ("output_logits_multiplier", 1.0),
    ("output_multiplier", 1.0),
)

# The four settings of fastkd's loss description a head transform fills in.
LOGIT_SETTINGS = ("logit_scale", "softcap", "teacher_logit_scale", "teacher_softcap")


@dataclass(frozen=True)
class HeadTransform:
    """A model's logits as a function of its LM head's output ``s``: ``softcap tanh(logit_scale s /
    softcap)``, or ``logit_scale s`` without a cap (fastkd's ``logit_scale`` / ``softcap``).

    ``source`` says where it was read (for error messages); empty for a plain head.
    """

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    source: str = ""

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None

    def settings(self, role: str = "student") -> Dict[str, Any]:
        """The transform as fastkd settings: ``logit_scale`` / ``softcap`` for the student,
        ``teacher_logit_scale`` / ``teacher_softcap`` for the teacher."""
        prefix = {"student": "", "teacher": "teacher_"}[role]
        return {f"{prefix}logit_scale": self.logit_scale, f"{prefix}softcap": self.softcap}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from its LM head's output (the loss's own transform)."""
        return transform_logits(logits, self.logit_scale, self.softcap)

    def describe(self) -> str:
        return self.source or "a plain linear head"


class UnknownHeadTransform(ValueError):
    """A config attribute that may post-process the logits, on a family whose forward fastkd
    has not read: the transform cannot be established."""

    def __init__(self, model_type, attribute: str, value):
        self.model_type, self.attribute, self.value = model_type, attribute, value
        super().__init__(
            f"config.{attribute}={value!r} on a {model_type!r} model: its forward may transform the "
            "logits after the LM head with it, and fastkd knows that transform only for the families "
            f"whose forward it has read ({', '.join(FAMILIES)})")


def _unwrapped(model):
    """A PEFT model's base model (its forward is the one that transforms the logits)."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
        return model.get_base_model()
    return model


def _configs_of(model) -> Tuple[Any, Any]:
    """(the model's own config, its text config)."""
    config = getattr(model, "config", None)
    text = config
    if config is not None and hasattr(config, "get_text_config"):
        try:
            text = config.get_text_config()
        except Exception:  # some configs' text lookup needs sub-configs they lack
            text = config
    return config, text


def _attribute_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def _positive(model_type, attribute: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < float(value) < math.inf):
        raise ValueError(f"config.{attribute}={value!r} of a {model_type!r} model: fastkd's logit transform "
                         "needs a finite positive number")
    return float(value)


def head_transform(model) -> HeadTransform:
    """The transform ``model``'s forward applies to ``lm_head(last_hidden_state)``.

    Read from ``model.config`` (its ``model_type`` picks the family in ``FAMILIES``);
    the identity for a module without a config and for a family that post-processes
    nothing. Raises :class:`UnknownHeadTransform` (a ``ValueError``) for a config of
    another family that sets one of ``POSTPROCESSING_ATTRS``, and ``ValueError`` for a
    known attribute that is not a finite positive number.

    >>> head_transform(gemma2)       # final_logit_softcapping=30.0
    HeadTransform(logit_scale=1.0, softcap=30.0, source='config.final_logit_softcapping=30.0 (gemma2)')
    """
    model = _unwrapped(model)
    config, text = _configs_of(model)
    if config is None:
        return HeadTransform()
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        for cfg in (text, config) if text is not config else (config,):
            for attribute, neutral in POSTPROCESSING_ATTRS:
                value = getattr(cfg, attribute, neutral)
                if value is not None and value != neutral:
                    raise UnknownHeadTransform(model_type, attribute, value)
        return HeadTransform()
    attribute, how, model_attribute = family
    value = getattr(config, attribute, None)
    if model_attribute is not None:  # the copy forward reads (made at __init__), where the model has one
        read = _attribute_path(model, model_attribute)
        value = value if read is None else read
    source = f"config.{attribute}={value!r} ({model_type})"
    if how == SOFTCAP:
        return HeadTransform() if value is None else HeadTransform(softcap=_positive(model_type, attribute, value),
                                                                   source=source)
    value = 1.0 if value is None else _positive(model_type, attribute, value)
    scale = value if how == MULTIPLY else 1.0 / value
    return HeadTransform() if scale == 1.0 else HeadTransform(logit_scale=scale, source=source)


# ---------------------------------------------------------------------------------------
# The rules of the integrations: where the transforms come from, and no transform twice.

def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def fused_linear_logit_settings(student: HeadTransform, teacher: HeadTransform, given: Mapping[str, Any],
                                caller: str = "fused-linear mode") -> Dict[str, Any]:
    """The four logit settings of a fused-linear loss between two models: the student's
    transform as ``logit_scale`` / ``softcap`` and the teacher's as ``teacher_logit_scale`` /
    ``teacher_softcap``, always all four (a teacher's ``SAME_AS_STUDENT`` default would
    give a plain teacher the student's cap).

    ``given``: the settings the user passed (any keys; the four are looked at). Each of the
    four must equal what the models' configs say (``SAME_AS_STUDENT`` for a teacher's
    means the student's): the fused loss computes the logits, so the transforms are the
    models' and cannot be chosen; otherwise ``ValueError``.
    """
    derived = {**student.settings("student"), **teacher.settings("teacher")}
    for name in LOGIT_SETTINGS:
        if name not in given:
            continue
        value = given[name]
        role, model = ("teacher", teacher) if name.startswith("teacher_") else ("student", student)
        if value is SAME_AS_STUDENT:
            value, shown = derived[name[len("teacher_"):]], f"{name}=SAME_AS_STUDENT (the student's)"
        else:
            shown = f"{name}={value!r}"
        if not _same(value, derived[name]):
            raise ValueError(
                f"{caller}: {shown} was given, but the {role}'s own logits have {name.replace('teacher_', '')}="
                f"{derived[name]!r} ({model.describe()}). In fused-linear mode the loss computes the logits "
                "from the LM heads and applies the transforms the models' configs define (logit_scale, "
                f"softcap, teacher_logit_scale, teacher_softcap); leave {name} out")
    return derived


def check_no_double_transform(student: Optional[HeadTransform], teacher: Optional[HeadTransform], cfg,
                              caller: str = "logits mode") -> None:
    """Refuse a loss that would transform a model's logits a second time.

    In logits mode the loss reads the models' own logits, already soft-capped / scaled by
    their forward; a ``softcap`` (``logit_scale``) setting that applies to the side of a
    model whose config already soft-caps (scales) would apply it twice. ``cfg``: the
    loss's ``KDConfig``; ``None`` for a side whose transform is unknown (not checked).
    """
    sides = (("student", student, cfg.logit_scale, cfg.softcap, ""),
             ("teacher", teacher, cfg.teacher_scale, cfg.teacher_cap, "teacher_"))
    for role, model, scale, cap, prefix in sides:
        if model is None:
            continue
        for kind, own, applied in (("softcap", model.softcap is not None, cap is not None),
                                   ("logit_scale", model.logit_scale != 1.0, scale != 1.0)):
            if not (own and applied):
                continue
            name = prefix + kind
            value = cap if kind == "softcap" else scale
            inherited = prefix and getattr(cfg, name) is SAME_AS_STUDENT
            how = (f"{name} (by default the student's {kind}) is {value!r}" if inherited
                   else f"{name}={value!r} was given")
            raise ValueError(
                f"{caller}: {how}, but the {role}'s logits already have it applied by the model "
                f"({model.describe()}); the loss reads those logits, so it would apply {kind} twice. "
                f"Pass {name}={'None' if kind == 'softcap' else '1.0'}")
