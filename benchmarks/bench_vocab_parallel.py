"""The vocab-parallel loss on gloo ranks (CPU): its cost against one rank's local fused kernel.

    python benchmarks/bench_vocab_parallel.py [--ranks 2] [--shape 512x32000] [--divergences forward_kl,jsd]
                                              [--alpha 1.0] [--reps 7] [--threads 1] [--backend cpu]

Each rank holds [N, V / ranks] of both logits. Per divergence, forward + backward, the
median and minimum over interleaved repetitions (on a shared machine, both sides meet the
same load) of:

    local      fastkd.kd_loss on the rank's own slice (the fused kernel, no communication):
               what the vocab-parallel loss cannot beat
    parallel   fastkd.distributed.vocab_parallel_kd_loss(..., vocab_start=...) on the slice
    + handshake  the same without vocab_start= (one all_gather of the slices' widths)

and the collectives' share of the parallel call (time inside torch.distributed calls,
measured by wrapping them), with the exact floats each collective moves per row.
Rank 0 prints; every rank computes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastkd  # noqa: E402
from fastkd.distributed import vocab_parallel_kd_loss  # noqa: E402


class CollectiveClock:
    """Wraps the collectives the loss calls; accumulates their wall time and records
    (name, floats per row) of each call."""

    NAMES = ("all_reduce", "all_gather")

    def __init__(self):
        self.seconds = 0.0
        self.calls = []
        self.saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            op = kwargs.get("op")
            per_row = tensor.shape[1] if tensor.dim() == 2 else f"{tensor.numel()} per rank"
            self.calls.append((name, "" if op is None else str(op).split(".")[-1], per_row, tensor.element_size()))
            return out
        return wrapper

    def restore(self):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def bench(rank, world, store_path, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    n, v = (int(x) for x in args.shape.split("x"))
    width = v // world
    start = rank * width
    g = torch.Generator().manual_seed(args.seed)
    s_full = torch.randn(n, v, generator=g) * 3
    t_full = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g) if args.alpha != 1.0 else None
    s = s_full[:, start:start + width].contiguous()
    t = t_full[:, start:start + width].contiguous()
    kw = dict(alpha=args.alpha, temperature=2.0, backend=args.backend)
    local_labels = None if labels is None else labels.clamp(max=width - 1)

    def local(div):
        x = s.clone().requires_grad_(True)
        fastkd.kd_loss(x, t, local_labels, divergence=div, **kw).backward()

    def parallel(div, explicit=True):
        x = s.clone().requires_grad_(True)
        vocab_parallel_kd_loss(x, t, labels, divergence=div, vocab_start=start if explicit else None,
                               **kw).backward()

    rows = []
    for div in args.divergences.split(","):
        impls = {"local": lambda: local(div), "parallel": lambda: parallel(div),
                 "+ handshake": lambda: parallel(div, explicit=False)}
        for fn in impls.values():  # warm-up (extension load, buffers)
            fn()
        times = {name: [] for name in impls}
        comm = []
        for _ in range(args.reps):
            for name, fn in impls.items():
                dist.barrier()
                clock = CollectiveClock() if name == "parallel" else None
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                if clock is not None:
                    clock.restore()
                    comm.append(clock.seconds)
                    calls = clock.calls
        rows.append((div, {k: (statistics.median(x), min(x)) for k, x in times.items()}, statistics.median(comm),
                     calls))
    if rank == 0:
        print(f"vocab-parallel KD loss, gloo, {world} ranks x {args.threads} thread(s), [{n}, {v}] fp32 "
              f"(each rank [{n}, {width}]), T = 2, alpha = {args.alpha}, backend {args.backend}; "
              "forward + backward, ms (median / min over "
              f"{args.reps} interleaved reps). Rough numbers: a shared machine.")
        print(f"{'divergence':<11} {'local':>15} {'parallel':>15} {'+ handshake':>15} {'ratio':>6} "
              f"{'collectives':>12}  collectives (floats per row)")
        for div, t, comm, calls in rows:
            ratio = t["parallel"][0] / t["local"][0]
            share = comm / t["parallel"][0]
            cells = "  ".join(f"{t[k][0] * 1e3:7.1f}/{t[k][1] * 1e3:6.1f}" for k in ("local", "parallel", "+ handshake"))
            what = ", ".join(f"{name} {op} {per_row} x {size} B".replace("  ", " ") for name, op, per_row, size in calls)
            print(f"{div:<11} {cells} {ratio:6.2f} {comm * 1e3:7.2f} ({share:4.0%})  {what}")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--shape", default="512x32000")
    parser.add_argument("--divergences", default="forward_kl,reverse_kl,jsd,tvd")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store = os.path.join(tempfile.mkdtemp(), "store")
    mp.spawn(bench, args=(args.ranks, store, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
