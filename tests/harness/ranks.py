"""Running a function on several CPU ranks (gloo), once per test file.

``run_ranks(fn, world_size)`` spawns ``world_size`` processes with
``torch.multiprocessing``, joins them into one gloo process group (file rendezvous, so
there is no port to race for) and calls ``fn(rank, world_size)`` in each; it returns the
ranks' return values, in rank order. ``fn`` must be a module-level function of an
importable module (the children import it by name).

A test file runs many cases inside one process group (starting processes and importing
torch dominates the cost): ``run_cases(cases, rank)`` runs each case and records
``None`` or the failure's text, so one failing case does not hide the others, and the
parent turns each record into its own pytest test. A case that fails on one rank before
a collective leaves the other ranks waiting: the group's timeout (``TIMEOUT_S``) ends
that wait with an error instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60     # a collective that waits longer raises (a rank failed before it)
RUN_LIMIT_S = 600  # the whole run: past it the ranks are killed and the run fails


def _child(rank: int, world_size: int, init_file: str, out_dir: str, fn: Callable) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = fn(rank, world_size)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int) -> List:
    """``[fn(0, W), ..., fn(W - 1, W)]``, each computed in its own process of a gloo group."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_child, args=(world_size, init_file, tmp, fn), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + RUN_LIMIT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                raise TimeoutError(f"the {world_size} ranks ran past {RUN_LIMIT_S} s; killed")
        return [pickle.loads(Path(tmp, f"{rank}.pkl").read_bytes()) for rank in range(world_size)]


def run_cases(cases: Dict[str, Callable[[int, int], None]], rank: int, world_size: int) -> Dict[str, Optional[str]]:
    """Each case called as ``case(rank, world_size)``: ``{name: None or the failure's traceback}``."""
    results = {}
    for name, case in cases.items():
        try:
            case(rank, world_size)
            results[name] = None
        except Exception:  # noqa: BLE001 (recorded, reported by the parent as this case's failure)
            results[name] = f"rank {rank}:\n{traceback.format_exc()}"
    return results


def failures(per_rank: List[Dict[str, Optional[str]]], name: str) -> List[str]:
    """The failure texts of case ``name`` over the ranks (empty: it passed everywhere)."""
    missing = [rank for rank, results in enumerate(per_rank) if name not in results]
    if missing:
        return [f"case {name!r} did not run on ranks {missing}"]
    return [results[name] for results in per_rank if results[name] is not None]
