"""What every row of a case computes: one distillation loss, fixed by a few settings."""
from __future__ import annotations

from dataclasses import dataclass

# fastkd's default, and the one value at which every JSD convention in the wild agrees
# (Liger's chunked loss puts beta on the other side of the mixture).
BETA = 0.5


@dataclass(frozen=True)
class LossSpec:
    divergence: str
    temperature: float
    alpha: float = 1.0   # < 1 adds (1 - alpha) * CE with the case's labels
    beta: float = BETA

    @property
    def uses_labels(self) -> bool:
        return self.alpha != 1.0

    def kwargs(self) -> dict:
        """The keywords of fastkd.kd_loss / fastkd.reference.kd_loss / fused_linear_kd_loss."""
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta, alpha=self.alpha)

    def labels(self, inputs):
        """The labels argument: the case's labels when the loss has a CE term, else None."""
        return inputs.labels if self.uses_labels else None
