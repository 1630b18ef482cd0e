"""What one table row runs: forward + backward of one implementation on one case."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Runner:
    fn: Callable[[], torch.Tensor]       # the loss
    leaves: List[torch.Tensor]           # tensors that receive gradients; leaves[0]'s is checked
    compile_s: Optional[float] = None    # one-off torch.compile cost, when there is one

    def run(self) -> torch.Tensor:
        loss = self.fn()
        loss.backward()
        return loss.detach()

    def clear(self) -> None:
        for x in self.leaves:
            x.grad = None

    @property
    def checked_grad(self) -> torch.Tensor:
        """The gradient compared across rows: of the student logits (kd) or hidden states (fused_linear)."""
        return self.leaves[0].grad


class InplaceRunner(Runner):
    """inplace_backward takes logits a model computed (a non-leaf) and overwrites them: each
    run gets a fresh copy of the leaf, made in clear() outside the timed region, as the LM
    head's matmul would have written it (pages already touched)."""

    def __init__(self, make_loss: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor):
        super().__init__(lambda: make_loss(self.logits), [leaf])
        self.logits = leaf.clone()

    def clear(self) -> None:
        super().clear()
        self.logits = self.leaves[0].clone()


@dataclass
class Impl:
    name: str             # row label, e.g. "fastkd[cpu]", "eager", "liger"
    kind: str             # "fastkd" or "baseline"
    build: Callable       # inputs -> Runner (may raise: the row records the error)
