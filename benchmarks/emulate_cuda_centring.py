"""fp32 emulation of the CUDA kernels' reverse-KL / JSD gradient against float64.

No GPU needed. The kernels' base-2 formulas (csrc/cuda/kd_device.cuh) run in fp32 with
torch on the CPU (torch's exp2/log2 stand in for MUFU.EX2/LG2), and each row sum is
accumulated in the order a kernel uses:

  two-pass  thread x of T threads owns packs x, x + T, ...; old: one serial fp32 sum per
            thread; new: fp32 per sweep iteration (U = 2 packs), the iterations' partials
            added without rounding error (TwoSum, emulated in fp64), then a fp32 tree
  cluster   C CTAs x 256 threads x 8 packs per thread: serial fp32 per thread, then trees

and the centring is the old one (h - sum q h, peaked entry q > 1/2) or the new one
(h - sum q h / sum q, peaked entry q > 1/2 + 2^-10). Inputs: tests/harness (logits
N(0, 3^2), a quarter of the rows peaked), 8 rows; bf16 rows are rounded to bf16 and
compared with float64 on the rounded values. Prints the relative norm error of the
gradient. Usage: python benchmarks/emulate_cuda_centring.py [V dtype kernel] ...
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness.cases import Case  # noqa: E402
from harness.inputs import make_inputs  # noqa: E402

from fastkd import reference  # noqa: E402

LOG2E = 1.4426950408889634


def tree(x):
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.cat([x, torch.zeros_like(x[..., :1])], -1)
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def twopass_sum(x, threads, per_iter, compensated):
    n, v = x.shape
    its = -(-v // (threads * per_iter))
    xp = torch.zeros(n, its * threads * per_iter, dtype=torch.float32)
    xp[:, :v] = x
    xp = xp.view(n, its, threads, per_iter)
    if compensated:
        part = torch.zeros(n, its, threads, dtype=torch.float32)
        for e in range(per_iter):
            part = part + xp[..., e]
        acc = part.double().sum(1).float()
    else:
        acc = torch.zeros(n, threads, dtype=torch.float32)
        for i in range(its):
            for e in range(per_iter):
                acc = acc + xp[:, i, :, e]
    return tree(acc).view(-1, 1)


def cluster_sum(x, clusters, vec, packs=8, threads=256):
    n, v = x.shape
    xp = torch.zeros(n, clusters * packs * threads * vec, dtype=torch.float32)
    xp[:, :v] = x
    xp = xp.view(n, clusters, packs, threads, vec)
    acc = torch.zeros(n, clusters, threads, dtype=torch.float32)
    for k in range(packs):
        for j in range(vec):
            acc = acc + xp[:, :, k, :, j]
    return tree(tree(acc)).view(-1, 1)


def gradient(s, t, divergence, temperature, summer, new, beta=0.5):
    c = torch.tensor(LOG2E / temperature, dtype=torch.float32)

    def lse2(x):
        a = x.max(-1, keepdim=True).values * c
        return a + torch.log2(summer(torch.exp2(x * c - a)))

    lq = s * c - lse2(s)
    lp = t * c - lse2(t)
    q = torch.exp2(lq)
    if divergence == "jsd":
        u, w = lp + math.log2(beta), lq + math.log2(1 - beta)
        hi = torch.maximum(u, w)
        h, scale = lq - (hi + torch.log2(1 + torch.exp2(torch.minimum(u, w) - hi))), 1 - beta
    else:
        h, scale = lq - lp, 1.0
    h = torch.where(q == 0, torch.zeros_like(h), h) * math.log(2)
    big = q > (0.5 + 2.0 ** -10 if new else 0.5)
    qh = q * h
    small_q, small_qh = summer(torch.where(big, 0, q)), summer(torch.where(big, 0, qh))
    big_qh, big_q = summer(torch.where(big, qh, 0)), summer(torch.where(big, q, 0))
    if new:
        mass = small_q + big_q
        mean, small_q, small_qh = (small_qh + big_qh) / mass, small_q / mass, small_qh / mass
    else:
        mean = small_qh + big_qh
    return (scale * q * torch.where(big, h * small_q - small_qh, h - mean) * temperature).double()


def main(argv):
    configs = [a.split(",") for a in argv] or [
        ["32000", "fp32", "twopass"], ["262144", "fp32", "twopass"], ["128256", "bf16", "twopass"],
        ["32000", "fp32", "cluster"], ["128256", "bf16", "cluster"]]
    for vocab, dtype, kernel in configs:
        vocab = int(vocab)
        vec = 4 if dtype == "fp32" else 8
        if kernel == "twopass":
            threads = 64
            while threads < 1024 and threads * 16 < -(-vocab // vec):
                threads *= 2
            old = lambda x: twopass_sum(x, threads, 2 * vec, False)  # noqa: E731
            new = lambda x: twopass_sum(x, threads, 2 * vec, True)  # noqa: E731
            name = f"two-pass ({threads} threads)"
        else:
            clusters = -(-vocab // (256 * 8 * vec))
            old = new = lambda x: cluster_sum(x, clusters, vec)  # noqa: E731
            name = f"cluster (C = {clusters})"
        for divergence, temperature in (("reverse_kl", 1.0), ("reverse_kl", 0.5), ("jsd", 2.0), ("jsd", 1.0),
                                        ("jsd", 0.5)):
            case = Case(lead=(8,), vocab=vocab, divergence=divergence, temperature=temperature, labels=False)
            s, t, _ = make_inputs(case)
            s, t = s.detach().float(), t.float()
            if dtype == "bf16":
                s, t = s.bfloat16().float(), t.bfloat16().float()
            s64 = s.double().requires_grad_(True)
            loss = reference.kd_loss(s64, t.double(), None, divergence=divergence, temperature=temperature,
                                     reduction="sum")
            (ref,) = torch.autograd.grad(loss, s64)

            def err(g):
                return ((g - ref).norm() / ref.norm()).item()

            print(f"{name:22s} V={vocab:<6d} {dtype:4s} {divergence:10s} T={temperature}: "
                  f"old {err(gradient(s, t, divergence, temperature, old, False)):.1e}  "
                  f"new {err(gradient(s, t, divergence, temperature, new, True)):.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
