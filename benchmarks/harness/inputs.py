"""Random inputs of one case, drawn once and shared by every implementation.

Logits ~ N(0, LOGIT_STD^2) (docs/measuring.md: a realistic spread; never zeros, which
would make exp/log trivially cheap). Each implementation trains on its own clone of the
student side (`fresh_student`), so no row sees another's gradient or overwrite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Tuple

import torch

LOGIT_STD = 3.0


def random_logits(n: int, v: int, dtype, device, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, v, generator=gen, device=device) * LOGIT_STD).to(dtype)


def random_labels(n: int, v: int, device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, v, (n,), generator=gen, device=device)


@dataclass
class KDInputs:
    """`--op kd`: student and teacher logits [N, V]."""
    student: torch.Tensor   # base copy
    teacher: torch.Tensor
    labels: torch.Tensor    # [N], used when the loss has a CE term

    def fresh_student(self) -> torch.Tensor:
        return self.student.clone().requires_grad_(True)

    def head(self, rows: int) -> "KDInputs":
        return KDInputs(self.student[:rows], self.teacher[:rows], self.labels[:rows])


@dataclass
class LinearInputs:
    """`--op fused_linear`: hidden states and LM-head weights; logits come from their matmuls."""
    student_hidden: torch.Tensor   # [N, Hs]
    student_weight: torch.Tensor   # [V, Hs]
    teacher_hidden: torch.Tensor   # [N, Ht]
    teacher_weight: torch.Tensor   # [V, Ht]
    labels: torch.Tensor           # [N]: the CE term's, and Liger's chunked loss (its CE weight is 0)

    def fresh_student(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return (self.student_hidden.clone().requires_grad_(True),
                self.student_weight.clone().requires_grad_(True))

    def head(self, rows: int) -> "LinearInputs":
        return replace(self, student_hidden=self.student_hidden[:rows],
                       teacher_hidden=self.teacher_hidden[:rows], labels=self.labels[:rows])


def make_inputs(op: str, shape, dtype, device, seed: int):
    """The inputs of one case: `shape` is (N, V) for kd, (N, Hs, Ht, V) for fused_linear."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if op == "kd":
        n, v = shape
        student, teacher = random_logits(n, v, dtype, device, gen), random_logits(n, v, dtype, device, gen)
        return KDInputs(student, teacher, random_labels(n, v, device, gen))
    n, hs, ht, v = shape

    # Hidden ~ N(0, 1), weights ~ N(0, LOGIT_STD^2 / H): logits come out ~ N(0, LOGIT_STD^2).
    def weight(h):
        return (torch.randn(v, h, generator=gen, device=device) * (LOGIT_STD / math.sqrt(h))).to(dtype)
    return LinearInputs(
        torch.randn(n, hs, generator=gen, device=device).to(dtype), weight(hs),
        torch.randn(n, ht, generator=gen, device=device).to(dtype), weight(ht),
        random_labels(n, v, device, gen))
