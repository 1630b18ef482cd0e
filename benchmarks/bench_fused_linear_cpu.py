"""Timing and peak memory of fused_linear_kd_loss against materialised logits (CPU first).

    python benchmarks/bench_fused_linear_cpu.py                 # N=4096 Hs=256 Ht=384 V=32000 fp32
    python benchmarks/bench_fused_linear_cpu.py --n 1024 --repeat 5
    # the issue's GPU target (not yet run on a GPU):
    python benchmarks/bench_fused_linear_cpu.py --device cuda --dtype bfloat16 \
        --n 8192 --hs 2048 --ht 4096 --v 128256 --repeat 20 --modes fused,eager

On CUDA, peak memory is torch.cuda.max_memory_allocated above the allocation with the
inputs in place, and time is wall time between synchronisations.

Each implementation runs forward + backward in its own subprocess, so that its peak
memory is not polluted by the others: VmHWM (reset through /proc/self/clear_refs) minus
the RSS with the inputs allocated, over the first full-size step (after a warm-up on 8
tokens). Time: median of --repeat further steps.

    fused         fastkd.fused_linear_kd_loss (chunk_size="auto", backend="auto")
    eager         logits = h @ W.T materialised, fastkd.reference.kd_loss (pure PyTorch)
    eager+kernel  logits materialised, fastkd.kd_loss (the fused loss kernel on [N, V])
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = ("fused", "eager", "eager+kernel")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_one(args) -> dict:
    import torch

    import fastkd
    from fastkd import reference

    torch.manual_seed(0)
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    cuda = dev.type == "cuda"
    hs = torch.randn(args.n, args.hs, device=dev).to(dtype).requires_grad_(True)
    ws = (torch.randn(args.v, args.hs, device=dev) * 3 / args.hs ** 0.5).to(dtype).requires_grad_(True)
    ht = torch.randn(args.n, args.ht, device=dev).to(dtype)
    wt = (torch.randn(args.v, args.ht, device=dev) * 3 / args.ht ** 0.5).to(dtype)
    labels = torch.randint(0, args.v, (args.n,), device=dev)
    kw = dict(divergence=args.divergence, temperature=args.temperature, alpha=args.alpha)

    def step(rows=args.n):
        h_s, h_t, lab = hs[:rows], ht[:rows], labels[:rows]
        if args.mode == "fused":
            loss = fastkd.fused_linear_kd_loss(h_s, ws, h_t, wt, lab, **kw)
        else:
            s_logits = h_s @ ws.T
            with torch.no_grad():
                t_logits = h_t @ wt.T
            fn = reference.kd_loss if args.mode == "eager" else fastkd.kd_loss
            loss = fn(s_logits, t_logits, lab, **kw)
        loss.backward()
        hs.grad = ws.grad = None
        if cuda:
            torch.cuda.synchronize()
        return loss

    # Warm-up on 8 tokens (thread pools, lazy init, cuBLAS handles) without touching the
    # full-size memory, so that the first full-size step below shows the whole increase:
    # glibc keeps freed blocks under its (dynamic, <= 32 MiB) mmap threshold resident.
    step(8)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        base = _status("VmRSS")
    step()
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"mode": args.mode, "ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "peak_extra_mib": (peak - base) / 2 ** 20,
            "threads": torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--hs", type=int, default=256)
    p.add_argument("--ht", type=int, default=384)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    logits_mib = args.n * args.v * 4 / 2 ** 20
    print(f"N={args.n} Hs={args.hs} Ht={args.ht} V={args.v} {args.dtype} on {args.device} {args.divergence} "
          f"T={args.temperature} alpha={args.alpha}, forward+backward, median of {args.repeat}; "
          f"one fp32 [N, V] logits tensor = {logits_mib:.0f} MiB")
    print(f"{'implementation':<14} {'time ms':>9} {'min ms':>9} {'peak extra MiB':>15} {'x logits':>9}")
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("mode", "modes")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{mode:<14} {r['ms']:>9.1f} {r['min_ms']:>9.1f} {r['peak_extra_mib']:>15.0f} "
              f"{r['peak_extra_mib'] / logits_mib:>9.2f}   ({r['threads']})")


if __name__ == "__main__":
    main()
