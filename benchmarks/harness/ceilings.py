"""What the machine allows, measured in the same run, and the floor of each op
(docs/measuring.md): no implementation can be faster than its floor."""
from __future__ import annotations

from typing import Dict

import torch

from .timing import median_seconds

FLOOR_RULES = {
    "kd": "3·N·V·bytes / copy bandwidth",
    "fused_linear": "2·N·V·(Hs+Ht) + 4·N·V·Hs FLOPs / matmul throughput",
}


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of a large same-device copy, counting read + write."""
    numel = (8 if quick else (256 if device.type == "cpu" else 1024)) * 2 ** 20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    secs = median_seconds(lambda: dst.copy_(src), device, reps=7 if device.type == "cpu" else 20, warmup=2)
    return 2 * src.numel() * src.element_size() / secs


def matmul_throughput(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """FLOP/s of a large square matmul in `dtype`: the ceiling of the fused-linear op."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    secs = median_seconds(lambda: a @ b, device, reps=5 if device.type == "cpu" else 20, warmup=1)
    return 2.0 * n ** 3 / secs


def measure_ceilings(op: str, device: torch.device, dtype: torch.dtype, quick: bool) -> Dict[str, float]:
    """The ceilings `floor_seconds` of `op` needs."""
    machine = {"copy_bandwidth_Bps": copy_bandwidth(device, quick)}
    if op == "fused_linear":
        machine["matmul_flops"] = matmul_throughput(device, dtype, quick)
    return machine


def floor_seconds(op: str, shape, dtype: torch.dtype, machine: Dict) -> float:
    """kd: read s and t once, write ds once = 3*N*V*bytes at the measured copy bandwidth.
    fused_linear: the matmul FLOPs (two forward logits, grad_hidden, grad_weight) at the
    measured matmul throughput; the loss itself is noise next to them."""
    if op == "kd":
        n, v = shape
        return 3 * n * v * torch.finfo(dtype).bits // 8 / machine["copy_bandwidth_Bps"]
    n, hs, ht, v = shape
    flops = 2 * n * v * (hs + ht) + 2 * 2 * n * v * hs
    return flops / machine["matmul_flops"]
