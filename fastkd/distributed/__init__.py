"""fastkd over torch.distributed: the KD loss on vocabulary-sharded (tensor-parallel) logits
and LM heads, and the token count of a data-parallel step."""
from .data_parallel import global_num_items, local_num_items
from .fused_linear import vocab_parallel_fused_linear_kd_loss
from .vocab_parallel import vocab_parallel_kd_loss

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_fused_linear_kd_loss", "global_num_items", "local_num_items"]
