"""Data parallelism: global_num_items and the DDP/FSDP recipe, on 4 CPU ranks (gloo).

The recipe (fastkd/distributed/data_parallel.py): every micro-batch's loss gets
``num_items=global_num_items(<the step's labels>)`` and is multiplied by the world size.
Under DDP (and FSDP2's fully_shard) with gradient accumulation its gradient must equal the single-process gradient
of the mean over the concatenation of every rank's micro-batches; the per-micro-batch
mean must not (so the comparison can fail). The session's pool of 4 ranks
(harness/ranks.py) runs each case as its own test.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd.distributed.data_parallel import global_num_items, local_num_items

V, H, ROWS, MICRO = 37, 12, 10, 3
KD = dict(divergence="forward_kl", temperature=2.0, alpha=0.5)


# ---------------------------------------------------------------------------------------
# Data: every rank can rebuild every rank's micro-batches (seeded by rank), so each rank
# computes the single-process reference itself.

def micro_batches(rank: int, dtype=torch.float64, seed: int = 0):
    """Rank ``rank``'s step: MICRO (inputs [ROWS, H], teacher logits [ROWS, V], labels)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    out = []
    for m in range(MICRO):
        # Drawn in float64 and rounded, so every dtype sees the same numbers.
        x = torch.randn(ROWS, H, generator=g, dtype=torch.float64).to(dtype)
        t = (2 * torch.randn(ROWS, V, generator=g, dtype=torch.float64)).to(dtype)
        labels = torch.randint(0, V, (ROWS,), generator=g)
        # Very uneven valid counts: micro-batch m of rank r ignores (3r + 4m) % ROWS rows.
        labels[: (3 * rank + 4 * m) % ROWS] = -100
        out.append((x, t, labels))
    return out


def new_model(dtype):
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, V)).to(dtype)


class KDModel(torch.nn.Module):
    """The loss inside forward, as DDP wants it: forward(x, teacher, labels, num_items) -> loss."""

    def __init__(self, dtype, fused_linear=False, sparse_k=None, **kd):
        super().__init__()
        self.net = new_model(dtype)
        self.fused_linear, self.sparse_k, self.kd = fused_linear, sparse_k, kd or KD

    def forward(self, x, t, labels, num_items=None):
        if self.sparse_k is not None:
            # A top-k teacher, as one recorded offline: its k best ids and their log-probs.
            logprobs, ids = torch.log_softmax(t / self.kd["temperature"], dim=-1).topk(self.sparse_k, dim=-1)
            return fastkd.sparse_kd_loss(self.net(x), ids, logprobs, labels, num_items=num_items, **self.kd)
        if not self.fused_linear:
            return fastkd.kd_loss(self.net(x), t, labels, num_items=num_items, **self.kd)
        # The last Linear as an LM head; the teacher's "logits" t = t_hidden @ t_weight.T
        # with t_hidden = t and t_weight = identity.
        hidden = self.net[1](self.net[0](x))
        eye = torch.eye(t.shape[1], dtype=t.dtype)
        return fastkd.fused_linear_kd_loss(hidden, self.net[2].weight, t, eye, labels,
                                           student_bias=self.net[2].bias, num_items=num_items, **self.kd)


def grads(module) -> list:
    return [p.grad.detach().clone() for p in module.parameters()]


def single_process_grads(ranks, dtype, **model_kw) -> list:
    """The gradient of the step's mean over the concatenation of ``ranks``' micro-batches."""
    model = KDModel(dtype, **model_kw)
    x, t, labels = (torch.cat(parts) for parts in zip(*[mb for r in ranks for mb in micro_batches(r, dtype)]))
    model(x, t, labels).backward()
    return grads(model)


def ddp_step(rank, dtype, recipe: str, group=None, **model_kw) -> list:
    """One accumulated DDP step over this rank's micro-batches; the averaged gradients."""
    model = torch.nn.parallel.DistributedDataParallel(KDModel(dtype, **model_kw), process_group=group)
    world = dist.get_world_size(group)
    step = micro_batches(rank, dtype)
    num_items = global_num_items([labels for _, _, labels in step], group=group)
    for i, (x, t, labels) in enumerate(step):
        last = i == len(step) - 1
        with (torch.enable_grad() if last else model.no_sync()):   # one gradient all-reduce per step
            if recipe == "fastkd":          # global count, times the world size
                loss = model(x, t, labels, num_items=num_items) * world
            elif recipe == "no_world_factor":
                loss = model(x, t, labels, num_items=num_items)
            elif recipe == "per_micro_batch_mean":   # the pitfall
                loss = model(x, t, labels) / len(step)
            loss.backward()
    return grads(model.module)


def fsdp_step(rank, dtype) -> list:
    """The recipe under FSDP2 (fully_shard), which averages gradients over ranks like DDP."""
    from torch.distributed.fsdp import fully_shard

    model = KDModel(dtype)
    fully_shard(model)
    world = dist.get_world_size()
    step = micro_batches(rank, dtype)
    num_items = global_num_items([labels for _, _, labels in step])
    for i, (x, t, labels) in enumerate(step):
        model.set_requires_gradient_sync(i == len(step) - 1)   # reduce once, after the last
        (model(x, t, labels, num_items=num_items) * world).backward()
    return [p.grad.full_tensor() for p in model.parameters()]


def assert_grads_close(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"parameter {i}: {m}")


def relative_error(got, want) -> float:
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(got, want)) ** 0.5
    return num / sum(float(b.pow(2).sum()) for b in want) ** 0.5


# ---------------------------------------------------------------------------------------
# The cases (run in every rank): ``case_<name>(ctx)``, ctx a harness.ranks.RankContext.

def data_parallel_group(ctx):
    """This rank's data-parallel group of {0, 2} and {1, 3}, and its ranks: the layout of
    2-way tensor parallelism x 2-way data parallelism, where ranks 0 and 1 would hold the
    same tokens. Both groups are made on every rank, in the same order."""
    groups = [ctx.subgroup((r, r + 2)) for r in range(ctx.world // 2)]
    return groups[ctx.rank % 2], [ctx.rank % 2, ctx.rank % 2 + 2]


class CountingAllReduce:
    def __init__(self):
        self.calls = 0
        self.original = dist.all_reduce

    def __enter__(self):
        def counting(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)
        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def expected_count(ranks, seed=0) -> int:
    return sum(int((labels != -100).sum()) for r in ranks for _, _, labels in micro_batches(r, seed=seed))


def case_count_world(ctx):
    rank, world = ctx.rank, ctx.world
    step = [labels for _, _, labels in micro_batches(rank)]
    with CountingAllReduce() as counter:
        n = global_num_items(step)
    assert counter.calls == 1, counter.calls
    assert n.dim() == 0 and n.dtype == torch.int64, (n.shape, n.dtype)
    assert int(n) == expected_count(range(world)), (int(n), expected_count(range(world)))
    assert int(local_num_items(step)) == expected_count([rank])
    # One tensor instead of a list; int32 labels; another ignore_index.
    assert int(global_num_items(step[0].to(torch.int32))) == sum(
        int((labels != -100).sum()) for r in range(world) for labels in [micro_batches(r)[0][2]])
    alt = [torch.where(labels == -100, torch.full_like(labels, V), labels) for labels in step]
    assert int(global_num_items(alt, ignore_index=V)) == expected_count(range(world))


def case_count_group(ctx):
    dp_group, dp_ranks = data_parallel_group(ctx)
    step = [labels for _, _, labels in micro_batches(ctx.rank)]
    with CountingAllReduce() as counter:
        n = global_num_items(step, group=dp_group)
    assert counter.calls == 1
    assert int(n) == expected_count(dp_ranks), (int(n), expected_count(dp_ranks), dp_ranks)


def case_count_empty_step(ctx):
    labels = torch.full((2, 5), -100)
    assert int(global_num_items([labels, labels[:0]])) == 1   # clamped, as kd_loss's own mean


def case_count_errors_before_any_collective(ctx):
    bad = [([], ValueError, "non-empty"), ((torch.zeros(3),), TypeError, "int64"),
           ("labels", TypeError, "list/tuple"), ([torch.zeros(3, dtype=torch.int64), 3], TypeError, r"labels\[1\]"),
           (torch.zeros(3, dtype=torch.int64), TypeError, "ignore_index")]
    with CountingAllReduce() as counter:
        for i, (labels, error, match) in enumerate(bad):
            kwargs = {"ignore_index": 1.5} if i == len(bad) - 1 else {}
            with pytest.raises(error, match=match):
                global_num_items(labels, **kwargs)
    assert counter.calls == 0


def case_ddp_recipe_float64(ctx):
    rank, world = ctx.rank, ctx.world
    want = single_process_grads(range(world), torch.float64)
    assert_grads_close(ddp_step(rank, torch.float64, "fastkd"), want, rtol=1e-12, atol=1e-14)


def case_ddp_recipe_float32(ctx):
    rank, world = ctx.rank, ctx.world
    want = single_process_grads(range(world), torch.float64)
    got = ddp_step(rank, torch.float32, "fastkd")
    assert_grads_close([g.double() for g in got], want, rtol=2e-5, atol=1e-6)


def case_ddp_pitfalls_fail_the_comparison(ctx):
    rank, world = ctx.rank, ctx.world
    want = single_process_grads(range(world), torch.float64)
    # Without the world factor DDP's average leaves exactly 1/world of the gradient.
    no_factor = ddp_step(rank, torch.float64, "no_world_factor")
    assert_grads_close([g * world for g in no_factor], want, rtol=1e-12, atol=1e-14)
    # Per-micro-batch means weigh tokens unevenly: clearly off (measured ~10-30% here).
    err = relative_error(ddp_step(rank, torch.float64, "per_micro_batch_mean"), want)
    assert err > 0.05, err


def case_fsdp2_recipe_float64(ctx):
    rank, world = ctx.rank, ctx.world
    want = single_process_grads(range(world), torch.float64)
    assert_grads_close(fsdp_step(rank, torch.float64), want, rtol=1e-12, atol=1e-14)


def case_ddp_recipe_fused_linear_jsd(ctx):
    rank, world = ctx.rank, ctx.world
    kw = dict(fused_linear=True, divergence="jsd", beta=0.3, temperature=1.5, alpha=0.7)
    want = single_process_grads(range(world), torch.float64, **kw)
    assert_grads_close(ddp_step(rank, torch.float64, "fastkd", **kw), want, rtol=1e-12, atol=1e-14)


def case_ddp_recipe_sparse_teacher(ctx):
    """The same recipe with a top-k teacher (sparse_kd_loss, tail="bucket"): the count is
    the same global_num_items of the same labels; the per-micro-batch means still fail."""
    rank, world = ctx.rank, ctx.world
    kw = dict(sparse_k=5, divergence="reverse_kl", temperature=1.5, alpha=0.6, tail="bucket")
    want = single_process_grads(range(world), torch.float64, **kw)
    assert_grads_close(ddp_step(rank, torch.float64, "fastkd", **kw), want, rtol=1e-12, atol=1e-14)
    got32 = ddp_step(rank, torch.float32, "fastkd", **kw)
    assert_grads_close([g.double() for g in got32], want, rtol=2e-5, atol=1e-6)
    err = relative_error(ddp_step(rank, torch.float64, "per_micro_batch_mean", **kw), want)
    assert err > 0.05, err


def case_ddp_over_a_data_parallel_subgroup(ctx):
    dp_group, dp_ranks = data_parallel_group(ctx)
    want = single_process_grads(dp_ranks, torch.float64)
    assert_grads_close(ddp_step(ctx.rank, torch.float64, "fastkd", group=dp_group), want, rtol=1e-12, atol=1e-14)


CASES = ("count_world", "count_group", "count_empty_step", "count_errors_before_any_collective",
         "ddp_recipe_float64", "ddp_recipe_float32", "ddp_pitfalls_fail_the_comparison",
         "fsdp2_recipe_float64", "ddp_recipe_fused_linear_jsd", "ddp_recipe_sparse_teacher",
         "ddp_over_a_data_parallel_subgroup")


@pytest.mark.parametrize("name", CASES)
def test_data_parallel(gloo_ranks, name):
    gloo_ranks.run(globals()[f"case_{name}"])
