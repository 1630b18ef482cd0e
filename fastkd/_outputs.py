"""Reading a model's outputs: Hugging Face ``ModelOutput`` objects, dicts, namespaces, tensors.

:class:`fastkd.DistillationLoss` takes what a model returned, as it is. This file turns
one side's outputs (student, teacher or helper) into the three things the objective's
terms read: the logits, the per-layer hidden states and the last hidden state.

* a tensor is the logits (the logits-only case: ``kd_loss`` on two tensors);
* a mapping (a plain dict, or a ``transformers`` ``ModelOutput``, which is an
  ``OrderedDict``) is read by key;
* any other object (``types.SimpleNamespace``, a dataclass) is read by attribute.

Accepted names: ``logits`` ``[..., V]``; ``hidden_states``, a tuple of ``[..., H]``
tensors, one per layer with the embeddings first, as ``output_hidden_states=True``
returns it; ``last_hidden_state`` (a base model's output, for the fused-linear logits
term). A plain ``dict`` with another key is an error (a typo such as ``hidden_state``
would otherwise read as "no hidden states"), except for the other keys Hugging Face
outputs carry (``loss``, ``past_key_values``, ``attentions``...), which are ignored.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

OUTPUT_KEYS = ("logits", "hidden_states", "last_hidden_state")
# Keys of transformers' causal-LM and base-model outputs that no term reads.
IGNORED_KEYS = ("loss", "aux_loss", "router_logits", "past_key_values", "attentions", "cross_attentions",
                "pooler_output")


@dataclass
class Outputs:
    """One side's outputs, read and type-checked. ``name`` is the argument, for errors."""

    name: str
    logits: Optional[torch.Tensor]
    hidden_states: Optional[Tuple[torch.Tensor, ...]]
    last_hidden_state: Optional[torch.Tensor]

    def tensors(self):
        """Every tensor a term may read (for the teacher-is-a-constant check)."""
        found = [self.logits, self.last_hidden_state, *(self.hidden_states or ())]
        return [t for t in found if t is not None]

    def need_logits(self, why: str) -> torch.Tensor:
        if self.logits is None:
            raise ValueError(f"{self.name} has no logits, which {why} needs: pass the model's output "
                             "(with .logits), a dict with 'logits', or the logits tensor")
        return self.logits

    def need_hidden_states(self, why: str) -> Tuple[torch.Tensor, ...]:
        if self.hidden_states is None:
            raise ValueError(f"{self.name} has no hidden_states, which {why} needs: call the model with "
                             "output_hidden_states=True (a Hugging Face model then returns them as "
                             ".hidden_states), or pass a dict with 'hidden_states'")
        return self.hidden_states

    def layer(self, index: int, why: str) -> torch.Tensor:
        """``hidden_states[index]``; the last layer may also come from ``last_hidden_state``."""
        if self.hidden_states is None and index == -1 and self.last_hidden_state is not None:
            return self.last_hidden_state
        states = self.need_hidden_states(why)
        if not -len(states) <= index < len(states):
            raise ValueError(f"{why} reads layer {index} of {self.name}.hidden_states, which has "
                             f"{len(states)} entries (embeddings first, then one per layer)")
        return states[index]

    def last_hidden(self, why: str) -> torch.Tensor:
        """The final hidden state (the LM head's input): ``last_hidden_state`` or ``hidden_states[-1]``."""
        if self.last_hidden_state is not None:
            return self.last_hidden_state
        if self.hidden_states is not None:
            return self.hidden_states[-1]
        raise ValueError(f"{self.name} has neither last_hidden_state nor hidden_states, which {why} needs: "
                         "pass a base model's output (e.g. model.model(...) of a Hugging Face causal LM) or "
                         "call the model with output_hidden_states=True")


def read_outputs(name: str, outputs) -> Outputs:
    """``outputs`` (tensor, mapping or object) as :class:`Outputs`; ``name`` names the argument."""
    if isinstance(outputs, torch.Tensor):
        return Outputs(name, _tensor(name, outputs), None, None)
    if isinstance(outputs, (tuple, list)):
        raise TypeError(
            f"{name} is a {type(outputs).__name__}, whose entries have no names (a Hugging Face model called "
            "with return_dict=False returns one); pass the model's output object (return_dict=True, the "
            "default), a dict with 'logits' / 'hidden_states', or the logits tensor")
    if isinstance(outputs, Mapping):
        if type(outputs) is dict:
            unknown = [k for k in outputs if k not in OUTPUT_KEYS and k not in IGNORED_KEYS]
            if unknown:
                raise ValueError(f"{name} has unknown key {unknown[0]!r}; the keys read are "
                                 f"{', '.join(OUTPUT_KEYS)} (and {', '.join(IGNORED_KEYS)} are ignored)")

        def get(key):
            return outputs.get(key)
    elif outputs is None:
        raise TypeError(f"{name} must be a model's outputs (an object or dict with .logits / .hidden_states) "
                        "or a logits tensor, got None")
    else:
        def get(key):
            return getattr(outputs, key, None)
    logits = get("logits")
    last = get("last_hidden_state")
    states = get("hidden_states")
    if states is not None:
        if not isinstance(states, (tuple, list)) or not all(isinstance(h, torch.Tensor) for h in states):
            raise TypeError(f"{name}.hidden_states must be a tuple of tensors (one per layer, as "
                            f"output_hidden_states=True returns them), got {type(states).__name__}")
        states = tuple(states)
    return Outputs(name,
                   None if logits is None else _tensor(f"{name}.logits", logits),
                   states,
                   None if last is None else _tensor(f"{name}.last_hidden_state", last))


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x
