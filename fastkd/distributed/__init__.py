"""fastkd over torch.distributed: the KD loss on vocabulary-sharded (tensor-parallel) logits."""
from .vocab_parallel import vocab_parallel_kd_loss

__all__ = ["vocab_parallel_kd_loss"]
