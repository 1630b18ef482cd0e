"""fastkd.distributed.vocab_parallel_kd_loss on real process groups: gloo ranks on the CPU.

The session's pool of ranks (harness/ranks.py, the ``gloo_ranks`` fixture) runs each
case on 4 ranks (the default group) or 2 (a subgroup of the last two ranks, passed as
``group=``); a rank that finds a problem raises, which fails the test with the rank's
message, and a hang fails it after a timeout.

Against single-process ground truth, every rank builds the full logits from one seed and
passes its columns: the loss must equal ``fastkd.reference.kd_loss`` on the whole logits
and each rank's gradient must be its slice of the reference gradient (float64 on the cpu
and torch backends: 1e-10; float32: the design's 1e-5 relative norm; Triton under the
interpreter, float32).
"""
import math
import os

import pytest

import torch
import torch.distributed as dist

import fastkd
from fastkd.distributed import vocab_parallel_kd_loss
from harness.backends import kernel_backend, supports

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


# ---------------------------------------------------------------------------------------
# Cases.

def split_widths(total, world, uneven):
    if not uneven:
        base = [total // world] * world
        base[-1] += total - sum(base)
        return base
    # Uneven, including a narrow slice: [1, 2, ...] weights.
    weights = list(range(1, world + 1))
    widths = [max(1, total * w // sum(weights)) for w in weights]
    widths[-1] += total - sum(widths)
    return widths


def make_logits(n, v, dtype, seed, peaked=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    if peaked and n > 3:
        t[1, 5] += 40.0  # a very peaked teacher row
        s[2, 7] += 40.0  # a very peaked student row
        s[0, 3] = float("-inf")  # a masked entry on both sides
        t[0, 3] = float("-inf")
    return s.to(dtype), t.to(dtype)


def make_labels(n, vocab_size, seed, ignored=True):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab_size, (n,), generator=g)
    if ignored == "all":
        labels[:] = -100
    elif ignored:
        labels[::4] = -100
    return labels


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(ctx, *, backend, dtype, n=9, v=61, uneven=False, vocab_size=None, labels=True,
               ignored=True, explicit_start=False, tol=None, num_items=None, seed=0, **settings):
    rank, world = ctx.rank, ctx.world
    s_full, t_full = make_logits(n, v, dtype, seed)
    counted = vocab_size or v
    lab = make_labels(n, counted, seed, ignored) if labels else None
    widths = split_widths(v, world, uneven)
    start = sum(widths[:rank])
    width = widths[rank]

    s_ref = s_full.double().clone().requires_grad_(True)
    ref = fastkd.reference.kd_loss(s_ref, t_full.double(), lab, vocab_size=vocab_size, num_items=num_items,
                                   **settings)
    ref.sum().backward()

    s_shard = s_full[:, start:start + width].clone().requires_grad_(True)
    out = vocab_parallel_kd_loss(s_shard, t_full[:, start:start + width], lab, backend=backend, group=ctx.group,
                                 vocab_start=start if explicit_start else None, vocab_size=vocab_size,
                                 num_items=num_items, **settings)
    out.sum().backward()
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
    what = (f"backend={backend} dtype={dtype} widths={widths} vocab_size={vocab_size} labels={labels} "
            f"explicit_start={explicit_start} num_items={num_items} {settings}")
    assert out.shape == ref.shape, what
    err_loss = rel(out.detach(), ref.detach())
    err_grad = rel(s_shard.grad, s_ref.grad[:, start:start + width])
    assert err_loss <= tol and err_grad <= tol, f"{what}: loss err {err_loss:.2e}, grad err {err_grad:.2e}"
    # The loss is the same on every rank.
    gathered = [torch.empty_like(out.detach()) for _ in range(world)]
    dist.all_gather(gathered, out.detach().contiguous(), group=ctx.group)
    assert all(torch.equal(x, gathered[0]) for x in gathered), what


def cases_cpu(ctx):
    """Every divergence, CE mix, ignored tokens, uneven shards, padded vocab, reductions and
    num_items, on the cpu and torch backends in float64 and the cpu backend in float32."""
    rank, world = ctx.rank, ctx.world
    for divergence in DIVERGENCES:
        for alpha, temperature in ((1.0, 2.0), (0.6, 1.0), (0.3, 0.7)):
            for backend in ("cpu", "torch"):
                check_case(ctx, backend=backend, dtype=torch.float64, divergence=divergence, alpha=alpha,
                           temperature=temperature, uneven=alpha == 0.6)
            check_case(ctx, backend="cpu", dtype=torch.float32, divergence=divergence, alpha=alpha,
                       temperature=temperature, uneven=True)
        # Padded vocabulary: the last columns (all of the last rank's, at 4 ranks) do not count.
        # (At 2 ranks the uneven slices are [20, 41], at 4 [6, 12, 18, 25]: vocab_size 15 or 30
        # leaves the last rank nothing that counts.)
        for vocab_size in (50, 15 if world == 2 else 30):
            check_case(ctx, backend="cpu", dtype=torch.float64, divergence=divergence, alpha=0.5,
                       vocab_size=vocab_size, uneven=True)
        check_case(ctx, backend="cpu", dtype=torch.float64, divergence=divergence, explicit_start=True,
                   uneven=True, alpha=0.5, beta=0.3)
    for reduction in ("mean", "sum", "batchmean", "none"):
        check_case(ctx, backend="cpu", dtype=torch.float64, divergence="jsd", alpha=0.5,
                   reduction=reduction)
        check_case(ctx, backend="cpu", dtype=torch.float64, divergence="forward_kl", labels=False,
                   reduction=reduction)
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="reverse_kl", alpha=0.5, num_items=37.0)
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="tvd", num_items=torch.tensor(5.0))
    # Every token ignored: zero loss and gradient, not NaN.
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="jsd", alpha=0.5, ignored="all")
    # No tokens at all.
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="jsd", alpha=0.5, n=0)
    check_case(ctx, backend="cpu", dtype=torch.float32, divergence="reverse_kl", n=0, labels=False)
    # bf16 logits: the design's low-precision tolerances against float64.
    check_case(ctx, backend="cpu", dtype=torch.bfloat16, divergence="forward_kl", alpha=0.5, tol=2e-2)
    # JSD at beta 0 / 1 is forward / reverse KL.
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="jsd", beta=0.0)
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="jsd", beta=1.0, alpha=0.5)
    # Leading dimensions [B, L, V_local].
    s, t = make_logits(6, 30, torch.float64, 5)
    lab = make_labels(6, 30, 5)
    widths = split_widths(30, world, True)
    a = sum(widths[:rank])
    out = vocab_parallel_kd_loss(s[:, a:a + widths[rank]].reshape(2, 3, -1), t[:, a:a + widths[rank]].reshape(2, 3, -1),
                                 lab.reshape(2, 3), divergence="tvd", alpha=0.5, reduction="none", group=ctx.group)
    ref = fastkd.reference.kd_loss(s, t, lab, divergence="tvd", alpha=0.5, reduction="none")
    assert out.shape == (2, 3) and rel(out.reshape(-1), ref) < 1e-10
    # A row whose first slice is all -inf (masked there) is an ordinary row; a NaN logit in
    # the last slice makes its row's loss NaN on every rank, the others stay numbers.
    s, t = make_logits(4, 30, torch.float64, 6)
    s[1, :widths[0]] = float("-inf")
    t[1, :widths[0]] = float("-inf")
    s[2, -1] = float("nan")
    for divergence in DIVERGENCES:
        x = s[:, a:a + widths[rank]].clone().requires_grad_(True)
        out = vocab_parallel_kd_loss(x, t[:, a:a + widths[rank]], divergence=divergence, reduction="none",
                                     group=ctx.group)
        out.sum().backward()
        ref = fastkd.reference.kd_loss(s, t, divergence=divergence, reduction="none")
        assert torch.isnan(out[2]) and torch.isnan(x.grad[2]).all(), (divergence, out)
        keep = torch.tensor([0, 1, 3])
        assert rel(out[keep], ref[keep]) < 1e-10, (divergence, out, ref)


def peaked_reverse_kl(ctx):
    """A student row with q_max = 1 - 1e-7: the peaked entry's gradient (itself ~1e-7) must be
    as precise in fp32 as the single-process kernel's. Its centring sum, taken from round 2
    instead of the split row sums of round 3, got that entry 100% wrong."""
    n, v = 2, 64
    s = torch.zeros(n, v, dtype=torch.float64)
    s[:, 5] = math.log(63 / 1e-7)
    t = torch.randn(n, v, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s_ref = s.clone().requires_grad_(True)
    fastkd.reference.kd_loss(s_ref, t, divergence="reverse_kl").backward()
    single = s.float().clone().requires_grad_(True)
    fastkd.kd_loss(single, t.float(), divergence="reverse_kl", backend="cpu").backward()
    widths = split_widths(v, ctx.world, False)
    start, width = sum(widths[:ctx.rank]), widths[ctx.rank]
    shard = s.float()[:, start:start + width].clone().requires_grad_(True)
    vocab_parallel_kd_loss(shard, t.float()[:, start:start + width], divergence="reverse_kl",
                           backend="cpu", group=ctx.group).backward()
    if start <= 5 < start + width:
        exact = s_ref.grad[:, 5]
        err = ((shard.grad[:, 5 - start].double() - exact).abs() / exact.abs()).max().item()
        err_single = ((single.grad[:, 5].double() - exact).abs() / exact.abs()).max().item()
        assert err < max(10 * err_single, 1e-5), (err, err_single)


def test_reverse_kl_keeps_a_peaked_rows_gradient(gloo_ranks):
    gloo_ranks.run(peaked_reverse_kl, size=2)


def test_vocab_parallel_matches_single_process_2_ranks(gloo_ranks):
    gloo_ranks.run(cases_cpu, size=2)


def test_vocab_parallel_matches_single_process_4_ranks(gloo_ranks):
    gloo_ranks.run(cases_cpu)


# ---------------------------------------------------------------------------------------
# Collectives per call: a few floats per row in 2 rounds (forward/reverse KL, CE) or 3
# (JSD, TVD), plus the handshake without vocab_start=. An all-gather of logits fails here.

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv", "barrier")


class CountCollectives:
    """Replaces torch.distributed's collectives with recording wrappers: (name, op, shape)."""

    def __enter__(self):
        self.calls = []
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else (args[0] if args else None)
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
            op = kwargs.get("op")
            self.calls.append((name, None if op is None else str(op).split(".")[-1], shape))
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def expected_rounds(divergence, ce, n, handshake, found):
    """The collectives of one call: (name, op, shape), shape [N, floats per row]."""
    from fastkd.distributed.layout import HEADER_WIDTH

    calls = [("all_gather", None, (HEADER_WIDTH,))] if handshake else []
    calls.append(("all_reduce", "MAX", (n, 2)))  # max_s, max_t
    kl = divergence in ("forward_kl", "reverse_kl")
    # sumexp_s, sumexp_t [, KL value term] [, CE: sumexp_raw, label logit [, label found]]
    calls.append(("all_reduce", "SUM", (n, 2 + kl + 2 * ce + (ce and found))))
    if divergence != "forward_kl":
        calls.append(("all_reduce", "SUM", (n, 5)))  # the row sums (reverse KL: split at a peaked entry)
    return calls


def collective_counts(ctx):
    n, v = 9, 61
    s, t = make_logits(n, v, torch.float32, 0)
    widths = split_widths(v, ctx.world, True)
    a, w = sum(widths[:ctx.rank]), widths[ctx.rank]
    for divergence in DIVERGENCES:
        for alpha in (1.0, 0.5):
            for explicit in (False, True):
                labels = make_labels(n, v, 0) if alpha != 1.0 else None
                with CountCollectives() as counted:
                    loss = vocab_parallel_kd_loss(s[:, a:a + w].clone().requires_grad_(True), t[:, a:a + w], labels,
                                                  divergence=divergence, alpha=alpha, backend="cpu",
                                                  vocab_start=a if explicit else None, group=ctx.group)
                    loss.backward()  # backward communicates nothing
                want = expected_rounds(divergence, alpha != 1.0, n, not explicit, explicit)
                assert counted.calls == want, (divergence, alpha, explicit, counted.calls, want)


def test_collectives_per_call(gloo_ranks):
    gloo_ranks.run(collective_counts, size=2)


# ---------------------------------------------------------------------------------------
# Bad input: every rank raises the same error (no rank waits in a collective), and the
# group still works afterwards.

def expect_same_error(ctx, kind, fragment, call):
    try:
        call()
    except (TypeError, ValueError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = "no error"
    messages = [None] * ctx.world
    dist.all_gather_object(messages, message, group=ctx.group)
    assert all(m == messages[0] for m in messages), f"ranks raised different errors: {messages}"
    assert message.startswith(kind.__name__) and fragment in message, f"expected {kind.__name__} '{fragment}', got {message}"


def bad_inputs(ctx):
    rank, world = ctx.rank, ctx.world
    n, v = 9, 61
    s, t = make_logits(n, v, torch.float64, 0)
    widths = split_widths(v, world, False)
    a, w = sum(widths[:rank]), widths[rank]
    ss, ts = s[:, a:a + w], t[:, a:a + w]
    labels = make_labels(n, v, 0)
    other = 1 if rank == 1 else 0  # what only rank 1 does differently

    def call(student=ss, teacher=ts, lab=labels, **kw):
        return lambda: vocab_parallel_kd_loss(student, teacher, lab, backend="cpu", group=ctx.group, **kw)

    extra_row = torch.cat([ss, ss[:1]]), torch.cat([ts, ts[:1]]), torch.cat([labels, labels[:1]])
    expect_same_error(ctx, ValueError, "disagree on the rows (tokens): 10 on rank 1, 9 on rank 0",
                      call(*extra_row) if other else call())
    out_of_range = labels.clone()
    out_of_range[1] = v
    expect_same_error(ctx, ValueError, f"labels must be in [0, {v}) or equal ignore_index=-100; found {v}",
                      call(lab=out_of_range, alpha=0.5))
    expect_same_error(ctx, ValueError, "labels must be in [0, 50)", call(alpha=0.5, vocab_size=50))
    expect_same_error(ctx, ValueError, "disagree on the student dtype: torch.float32 on rank 1",
                      call(student=ss.float()) if other else call())
    expect_same_error(ctx, ValueError, "rank 1: teacher_shard requires grad",
                      call(teacher=ts.clone().requires_grad_(True)) if other else call())
    expect_same_error(ctx, ValueError, "disagree on whether student_shard requires grad (with grad mode on): "
                      "yes on rank 1, no on rank 0", call(student=ss.clone().requires_grad_(True)) if other else call())
    expect_same_error(ctx, ValueError, "disagree on the loss settings",
                      call(temperature=2.0) if other else call())
    shuffled = labels.flip(0)
    expect_same_error(ctx, ValueError, "disagree on the labels", call(lab=shuffled) if other else call())
    expect_same_error(ctx, ValueError, f"vocab_size must be in [1, {v}]", call(vocab_size=v + 1))
    expect_same_error(ctx, ValueError, "rank 1: alpha=0.5 mixes in a hard-label cross-entropy",
                      call(lab=None, alpha=0.5) if other else call(alpha=0.5))
    expect_same_error(ctx, TypeError, "rank 0: student_shard must be a torch.Tensor",
                      call(student=ss.tolist()) if rank == 0 else call())
    expect_same_error(ctx, ValueError, "rank 1: student_shard and teacher_shard must hold the same",
                      call(teacher=ts[:, :-1]) if other else call())
    # With vocab_start= there is no handshake: what every rank sees alike raises before any
    # collective, and a label that no slice holds gives NaN, not a number.
    negative = labels.clone()
    negative[2] = -5
    with CountCollectives() as counted:
        expect_same_error(ctx, ValueError, "labels must be in [0, 61) or equal ignore_index=-100; found -5",
                          call(lab=negative, alpha=0.5, vocab_start=a, vocab_size=v))
    assert [c[0] for c in counted.calls] == ["all_gather_object"], counted.calls  # the test's own
    nowhere = labels.clone()
    nowhere[1] = v + 3
    loss = vocab_parallel_kd_loss(ss, ts, nowhere, alpha=0.5, vocab_start=a, backend="cpu", reduction="none",
                                  group=ctx.group)
    assert torch.isnan(loss[1]) and not torch.isnan(loss[0]), loss
    # The group is still in step.
    check_case(ctx, backend="cpu", dtype=torch.float64, divergence="jsd", alpha=0.5)


def test_bad_input_raises_alike_on_every_rank(gloo_ranks):
    gloo_ranks.run(bad_inputs, size=2)


# ---------------------------------------------------------------------------------------
# The Triton shard phases (under TRITON_INTERPRET=1 without a GPU), single-block and
# multi-block (a forced small block), through the same pool of ranks.

def cases_triton(ctx):
    """End to end through the Triton phases (their per-phase parity with the torch backend's
    is test_shard_phases_match_the_torch_backend): the multi-block path (a forced small
    block) for every divergence with the CE term, the single-block path padded."""
    from fastkd.backends.triton import launch

    launch.BLOCK_OVERRIDE = 16
    try:
        for divergence in DIVERGENCES:
            check_case(ctx, backend="triton", dtype=torch.float32, divergence=divergence, alpha=0.5,
                       temperature=0.7, uneven=True)
    finally:
        launch.BLOCK_OVERRIDE = None
    check_case(ctx, backend="triton", dtype=torch.float32, divergence="jsd", alpha=0.3, temperature=2.0,
               vocab_size=50, explicit_start=True, beta=0.2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the gloo ranks hold CPU tensors: Triton runs on them under TRITON_INTERPRET=1 only")
def test_triton_shard_phases_2_ranks(gloo_ranks):
    pytest.importorskip("triton")
    gloo_ranks.run(cases_triton, size=2)


# ---------------------------------------------------------------------------------------
# Each backend's shard phases against the torch backend's (fastkd/backends/reference_shard.py)
# on the same slice, in one process: given the same global statistics and row sums, the
# same outputs. (What a new backend, or the CUDA one on a GPU, must match.)

PHASE_BACKENDS = [pytest.param("cpu", "cpu", id="cpu"),
                  pytest.param("triton", "cpu", id="triton-interpreted"),
                  pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu)]


def shard_inputs(divergence, alpha, device, dtype):
    from fastkd.backends import reference_shard

    n, v, a, w = 7, 90, 30, 45  # the slice: columns [30, 75), of which 40 count (vocab_size 70)
    s, t = make_logits(n, v, torch.float64, 1)
    labels = make_labels(n, 70, 1)
    labels[1], labels[2] = 31, 74 - 5  # labels inside the slice too
    cfg = fastkd.make_config(divergence=divergence, alpha=alpha, temperature=0.8, beta=0.3)
    full = reference_shard.row_stats(s[:, :70], t[:, :70], cfg.with_vocab_size(70))
    stats = full[:, :5].contiguous()
    if divergence in ("reverse_kl", "jsd", "tvd"):
        sums = reference_shard.row_sums(s[:, :70], t[:, :70], stats, cfg.with_vocab_size(70))
    else:
        sums = None
    local = cfg.with_vocab_size(40)
    exact = (s[:, a:a + w].contiguous(), t[:, a:a + w].contiguous(), labels, stats, sums)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    given = (s[:, a:a + w].to(device, dtype).contiguous(), t[:, a:a + w].to(device, dtype).contiguous(),
             labels.to(device), stats.to(device, acc), None if sums is None else sums.to(device, acc))
    return exact, given, local, a


@pytest.mark.parametrize("backend,device", PHASE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_shard_phases_match_the_torch_backend(backend, device, divergence, alpha):
    from fastkd.backends import reference_shard

    if not supports(backend, device):
        pytest.skip(f"{backend} does not run on {device} here")
    phases = kernel_backend(backend).shard
    (s, t, labels, stats, sums), (gs, gt, glabels, gstats, gsums), cfg, start = shard_inputs(
        divergence, alpha, device, torch.float32)
    scale = torch.full((), 0.25, dtype=torch.float64)
    want = reference_shard.row_stats(s, t, cfg)
    got = phases.row_stats(gs, gt, cfg)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel(got.cpu(), want) < 1e-5, (got, want)
    if divergence in ("jsd", "tvd"):
        want = reference_shard.row_sums(s, t, stats, cfg)
        got = phases.row_sums(gs, gt, gstats, cfg)
        assert rel(got.cpu(), want) < 1e-5, (got, want)
    want = reference_shard.write_grad(s, t, labels, scale, stats, sums, start, cfg)
    got = phases.write_grad(gs, gt, glabels, scale.to(device, torch.float32), gstats, gsums, start, cfg)
    assert got.shape == gs.shape and rel(got.cpu(), want) < 1e-5
    assert torch.count_nonzero(got[:, 40:]) == 0  # past vocab_size


def test_cpu_shard_phases_are_exact_in_float64():
    from fastkd.backends import reference_shard

    phases = kernel_backend("cpu").shard
    for divergence in DIVERGENCES:
        (s, t, labels, stats, sums), _, cfg, start = shard_inputs(divergence, 0.5, "cpu", torch.float64)
        assert rel(phases.row_stats(s, t, cfg), reference_shard.row_stats(s, t, cfg)) < 1e-12
        if divergence in ("jsd", "tvd"):
            assert rel(phases.row_sums(s, t, stats, cfg), reference_shard.row_sums(s, t, stats, cfg)) < 1e-12
        scale = torch.full((), 0.25, dtype=torch.float64)
        got = phases.write_grad(s, t, labels, scale, stats, sums, start, cfg)
        assert rel(got, reference_shard.write_grad(s, t, labels, scale, stats, sums, start, cfg)) < 1e-12


def test_shard_operators_pass_opcheck():
    """Schemas, fake implementations (torch.compile) and dispatch of the C++ shard operators."""
    kernel_backend("cpu")  # loads the extension and registers the fakes
    ops = torch.ops.fastkd
    for divergence in ("forward_kl", "jsd"):
        (s, t, labels, stats, sums), _, cfg, start = shard_inputs(divergence, 0.5, "cpu", torch.float64)
        ints, floats = cfg.kernel_settings()
        torch.library.opcheck(ops.shard_row_stats.default, (s, t, ints, floats))
        if sums is not None:
            torch.library.opcheck(ops.shard_row_sums.default, (s, t, stats, ints, floats))
        torch.library.opcheck(ops.shard_write_grad.default,
                              (s, t, labels, torch.ones((), dtype=torch.float64), stats, sums, start, ints, floats))
