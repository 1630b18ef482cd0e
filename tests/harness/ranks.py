"""A pool of CPU ranks (gloo) that runs every distributed test of a session.

Starting a rank costs seconds (a process that imports torch and fastkd, then joins the
group), far more than most cases, so one pool of ``WORLD`` processes is spawned once per
pytest session (the ``gloo_ranks`` fixture, harness/fixtures.py; started on first use)
and every test sends it its case:

    values = gloo_ranks.run(fn, *args, size=None, timeout=CALL_TIMEOUT_S)

calls ``fn(ctx, *args)`` in each rank of a group and returns their return values in
group-rank order. ``fn`` must be a module-level function of an importable module (the
ranks import it by name); arguments and return values are pickled. The group:

* ``size=None`` (all ``WORLD`` ranks): ``ctx.group`` is None, the default group, as under
  ``torchrun``;
* ``size=k < WORLD``: the LAST k ranks, in a subgroup made when the pool starts, so a
  rank's group rank differs from its global rank (the others wait for the next call).

``ctx`` is a :class:`RankContext`: ``rank`` and ``world`` within the call's group,
``group``, ``global_rank``, and ``subgroup(ranks)`` for cases that need groups of their
own (made on first use; call it from a ``size=None`` case, in the same order on every
rank, as torch.distributed wants).

A failure fails the test with every rank's traceback, and never hangs it: a rank that
raises is reported at once, ranks that do not answer within ``GRACE_S`` of a failure or
within the call's ``timeout`` are reported as waiting (a rank that failed before a
collective leaves its peers waiting in it), and a collective that waits ``TIMEOUT_S``
raises in the rank. After any failure the pool is killed (its ranks may be out of step
in their collectives) and the next call starts a fresh one.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4
TIMEOUT_S = 60         # a collective that waits longer raises in the rank
CALL_TIMEOUT_S = 300   # a call that runs longer fails (a hang), and the pool is killed
START_TIMEOUT_S = 300  # starting the ranks (a loaded machine imports torch slowly)
GRACE_S = 10           # after one rank fails, how long the others get to answer


class RankContext:
    """What a case knows about where it runs."""

    def __init__(self, rank: int, world: int, group, global_rank: int, global_world: int, whole: bool):
        self.rank, self.world, self.group = rank, world, group
        self.global_rank, self.global_world = global_rank, global_world
        self._whole = whole

    def subgroup(self, ranks: Tuple[int, ...]):
        """The process group of these global ranks (made once per pool, on first use)."""
        key = tuple(ranks)
        if key not in _SUBGROUPS:
            if not self._whole:  # the ranks outside this call would never join the new group
                raise RuntimeError("ctx.subgroup makes a new group only in a call on every rank (size=None)")
            _SUBGROUPS[key] = dist.new_group(list(key))
        return _SUBGROUPS[key]


_SUBGROUPS: Dict[Tuple[int, ...], object] = {}  # in each rank: the groups made so far


def _serve(rank: int, world: int, init_file: str, inbox, outbox) -> None:
    """A rank's loop: run the calls it is sent."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    tails = {size: dist.new_group(list(range(world - size, world))) for size in range(2, world)}
    outbox.put(("ready", -1, rank, None))
    while True:  # until the parent kills the process
        call_id, size, call = inbox.get()
        try:
            fn, args = pickle.loads(call)
            first = world - size
            ctx = RankContext(rank - first, size, None if size == world else tails[size], rank, world,
                              size == world)
            answer = ("ok", call_id, rank, pickle.dumps(fn(ctx, *args)))
        except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
            answer = ("failed", call_id, rank, f"rank {rank} (global):\n{traceback.format_exc()}")
        outbox.put(answer)


class Ranks:
    """``WORLD`` gloo ranks, started on the first call and kept for the next ones."""

    def __init__(self, world: int = WORLD):
        self.world = world
        self._procs: Optional[list] = None
        self._calls = 0

    def run(self, fn: Callable, *args, size: Optional[int] = None, timeout: float = CALL_TIMEOUT_S) -> List:
        __tracebackhide__ = True  # pytest shows the ranks' tracebacks, not this loop
        size = self.world if size is None else size
        if not 2 <= size <= self.world:
            raise ValueError(f"size must be in [2, {self.world}], got {size}")
        self._start()
        self._calls += 1
        job = (self._calls, size, pickle.dumps((fn, args)))  # pickled here: an error raises here
        members = range(self.world - size, self.world)
        for rank in members:
            self._inboxes[rank].put(job)
        values, failed = {}, {}
        deadline = time.monotonic() + timeout
        while len(values) + len(failed) < size:
            try:
                wait = min(1.0, max(deadline - time.monotonic(), 0.01))
                kind, call_id, rank, payload = self._outbox.get(timeout=wait)
            except queue.Empty:
                dead = [r for r in members if not self._procs[r].is_alive() and r not in values and r not in failed]
                for r in dead:
                    failed[r] = f"rank {r} (global): its process died (exit code {self._procs[r].exitcode})"
                    deadline = min(deadline, time.monotonic() + GRACE_S)
                if time.monotonic() > deadline:
                    break
                continue
            if call_id != self._calls:
                continue
            if kind == "ok":
                values[rank] = pickle.loads(payload)
            else:
                failed[rank] = payload
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if failed or len(values) < size:
            waited = round(timeout if not failed else GRACE_S)
            silent = [f"rank {r} (global): no answer (still waiting, after {waited} s: in a collective "
                      "that a failed or diverging rank never joined?)"
                      for r in members if r not in values and r not in failed]
            self.close()  # out of step: the next call starts a fresh pool
            raise AssertionError(f"{getattr(fn, '__name__', fn)} on {size} ranks failed:\n"
                                 + "\n".join([failed[r] for r in sorted(failed)] + silent))
        return [values[r] for r in members]

    def _start(self) -> None:
        if self._procs is not None:
            return
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="fastkd-ranks-")
        init_file = os.path.join(self._tmp, "rendezvous")
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        self._outbox = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, self.world, init_file, self._inboxes[r], self._outbox),
                                   daemon=True) for r in range(self.world)]
        for p in self._procs:
            p.start()
        ready, deadline = set(), time.monotonic() + START_TIMEOUT_S
        while len(ready) < self.world:
            try:
                ready.add(self._outbox.get(timeout=1.0)[2])
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the {self.world} gloo ranks did not start (dead: {dead}, "
                                       f"ready: {sorted(ready)})")

    def close(self) -> None:
        """Kill the ranks: nothing in them needs an orderly exit, and waiting for one
        (leaving the group, unloading torch) costs seconds."""
        if self._procs is None:
            return
        for p in self._procs:
            p.kill()
        for p in self._procs:
            p.join(timeout=5)
        for q in self._inboxes + [self._outbox]:
            q.close()
            q.cancel_join_thread()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._procs = None
