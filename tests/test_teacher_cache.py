"""The teacher cache (fastkd.teacher_cache): format, round trip, crash and resume, checks,
the RS-KD sampler and re-tempering, against direct float64 formulas."""
import json
import math

import numpy as np
import pytest
import torch

import fastkd

from fastkd import teacher_cache as tc
from fastkd.teacher_cache import format as fmt

V = 61          # odd vocabulary
T = 2.0


def teacher_logits(n=7, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, length, V + 3, generator=g)   # 3 padded columns past V
    logits[0, 0, 5] = 40.0                                    # a very peaked row: P ~ 1
    return logits


def exact_logprobs(logits, temperature=T):
    return (logits[..., :V].double() / temperature).log_softmax(-1)


def write(path, logits, **kw):
    kw = {"k": 8, "vocab_size": V, "temperature": T, "shard_tokens": 20, **kw}
    with tc.TeacherCacheWriter(path, **kw) as writer:
        for lo in range(0, logits.shape[0], 3):               # batches of 3 sequences
            writer.add_logits(logits[lo: lo + 3], start=lo)
    return writer.manifest


def spacing_bound(x: torch.Tensor, dtype) -> torch.Tensor:
    """An upper bound on the gap between neighbouring values of ``dtype`` around x:
    |x| · 2^-mantissa_bits, or the smallest subnormal near 0."""
    info = torch.finfo(dtype)
    return x.abs() * info.eps + info.smallest_normal * info.eps


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_topk(tmp_path, dtype):
    logits = teacher_logits()
    manifest = write(tmp_path, logits, dtype=dtype)
    assert manifest["complete"] and manifest["sequences"] == 7 and manifest["tokens"] == 63
    # Shards close at the first sequence boundary at or past 20 tokens: 27 + 27 + 9 tokens.
    assert [s["tokens"] for s in manifest["shards"]] == [27, 27, 9]
    reader = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, logprob_dtype=torch.float64)
    ids, lp = reader.sequences(torch.arange(7))
    ref_ids, ref_lp = tc.topk_logprobs(exact_logprobs(logits), 8)
    assert ids.dtype == torch.int64 and ids.shape == (7, 9, 8)
    assert torch.equal(ids, ref_ids)
    # Rounded toward -inf: never above the exact value, at most one storage step below it.
    torch_dtype = fmt.LOGPROB_DTYPES[dtype][0]
    assert (lp <= ref_lp).all()
    assert ((ref_lp - lp) <= spacing_bound(ref_lp, torch_dtype)).all()
    # So a support's mass never exceeds 1, even for the row with P ~ 1.
    assert (lp.exp().sum(-1) <= 1).all()
    # Global token offsets and iteration give the same values, across shard boundaries.
    flat_ids, flat_lp = reader.tokens(15, 50)
    assert torch.equal(flat_ids, ids.reshape(-1, 8)[15:50]) and torch.equal(flat_lp, lp.reshape(-1, 8)[15:50])
    batches = list(reader.iter_batches(3))
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), ids)


def test_bfloat16_is_stored_as_uint16_bits_readable_by_numpy(tmp_path):
    logits = teacher_logits()
    manifest = write(tmp_path, logits, dtype="bfloat16")
    assert manifest["logprob_storage"] == "bfloat16 bits in uint16"
    raw = np.load(tmp_path / "shard-00000.logprobs.npy")
    assert raw.dtype == np.uint16 and raw.shape == (27, 8)
    values = torch.from_numpy(raw.view("<i2").copy()).view(torch.bfloat16)
    reader = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, logprob_dtype=None)
    assert torch.equal(values, reader.tokens(0, 27)[1])
    assert np.load(tmp_path / "shard-00000.ids.npy").dtype == np.int32


def test_variable_lengths_and_sparse_source(tmp_path):
    """add_sparse (a server's top-k): more than k slots keeps the k largest, fewer pads."""
    g = torch.Generator().manual_seed(3)
    full = exact_logprobs(3 * torch.randn(4, 6, V + 3, generator=g))
    ids20, lp20 = tc.topk_logprobs(full, 20)
    order = torch.randperm(20, generator=g)                   # slots in any order
    with tc.TeacherCacheWriter(tmp_path, k=8, vocab_size=V, temperature=T, shard_tokens=7) as w:
        w.add_sparse(ids20[:2, :, order], lp20[:2, :, order], start=0, lengths=[6, 4])
        w.add_sparse(ids20[2:, :, :5].int(), lp20[2:, :, :5].float(), start=2, lengths=torch.tensor([2, 6]))
    r = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, logprob_dtype=torch.float64)
    assert r.lengths.tolist() == [6, 4, 2, 6] and r.num_tokens == 18
    ids, lp = r.sequences([1, 2])
    assert ids.shape == (2, 4, 8)                             # the longest of the two
    assert torch.equal(ids[0], ids20[1, :4, :8]) and torch.equal(ids[1, :2, :5], ids20[2, :2, :5])
    assert (ids[1, :2, 5:] == -1).all() and (lp[1, :2, 5:] == -math.inf).all()
    assert (ids[1, 2:] == -1).all()                           # past the sequence: empty slots
    torch.testing.assert_close(lp[0], lp20[1, :4, :8], atol=2e-3, rtol=0)
    ids3, _ = r.sequences(3, length=6)
    assert ids3.shape == (6, 8) and torch.equal(ids3[:, :5], ids20[3, :, :5])
    with pytest.raises(ValueError, match="more than length"):
        r.sequences([3], length=4)
    with pytest.raises(IndexError, match="4 sequences"):
        r.sequences([4])


# --------------------------------------------------------------------------- crash and resume

def counting_teacher(logits, calls):
    def teacher(batch):
        calls.append(int(batch[0, 0]))
        return logits[batch[:, 0]]
    return teacher


def batches_of(n, size=3):
    seqs = torch.arange(n)[:, None].expand(n, 2)              # row i "is" sequence i
    return list(seqs.split(size))


@pytest.mark.parametrize("crash_at", ["shard_file", "manifest"])
def test_crash_mid_shard_then_resume(tmp_path, monkeypatch, crash_at):
    logits = teacher_logits()
    settings = dict(k=8, vocab_size=V, temperature=T, shard_tokens=20)
    clean = tmp_path / "clean"
    tc.write_teacher_cache(clean, counting_teacher(logits, []), batches_of(7), **settings)

    crashed = tmp_path / "crashed"
    real_npy, real_manifest = fmt.write_npy, fmt.write_manifest
    state = {"npy": 0, "manifest": 0}

    def failing_npy(path, array):
        state["npy"] += 1
        if crash_at == "shard_file" and state["npy"] == 5:   # shard 1: ids done, logprobs half-written
            with open(path.with_name(path.name + fmt.TMP_SUFFIX), "wb") as f:
                f.write(b"\x93NUMPY partial")
            raise OSError("simulated crash")
        return real_npy(path, array)

    def failing_manifest(directory, manifest):
        state["manifest"] += 1
        if crash_at == "manifest" and state["manifest"] == 3:  # creation, shard 0, then shard 1's commit
            raise OSError("simulated crash")
        return real_manifest(directory, manifest)

    monkeypatch.setattr(fmt, "write_npy", failing_npy)
    monkeypatch.setattr(fmt, "write_manifest", failing_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        tc.write_teacher_cache(crashed, counting_teacher(logits, []), batches_of(7), **settings)
    monkeypatch.undo()

    # What the crash left: shard 0 listed, shard 1's files on disk but not listed.
    manifest = tc.read_manifest(crashed)
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0]
    left = {p.name for p in crashed.iterdir()}
    assert ("shard-00001.ids.npy" in left) and (
        "shard-00001.logprobs.npy.tmp" in left if crash_at == "shard_file" else "shard-00001.logprobs.npy" in left)
    with pytest.raises(ValueError, match="incomplete"):
        tc.TeacherCacheReader(crashed, vocab_size=V, temperature=T)
    partial = tc.TeacherCacheReader(crashed, vocab_size=V, temperature=T, allow_incomplete=True)
    assert partial.num_sequences == 3                       # only the committed shard reads
    with pytest.raises(IndexError):
        partial.sequences([3])

    # Resume: the committed sequences are not recomputed; the result is the clean cache.
    calls = []
    manifest = tc.write_teacher_cache(crashed, counting_teacher(logits, calls), batches_of(7), **settings)
    assert calls == [3, 6]                                  # batches [0:3] skipped
    assert manifest["complete"] and not any(p.name.endswith(".tmp") for p in crashed.iterdir())
    clean_manifest = tc.read_manifest(clean)
    assert [s["files"] for s in manifest["shards"]] == [s["files"] for s in clean_manifest["shards"]]
    again = []
    tc.write_teacher_cache(crashed, counting_teacher(logits, again), batches_of(7), **settings)
    assert again == []                                      # complete: nothing to do


def test_resume_rskd_draws_what_an_uninterrupted_run_draws(tmp_path, monkeypatch):
    logits = teacher_logits()
    settings = dict(k=16, vocab_size=V, temperature=T, shard_tokens=20, mode="rskd", seed=5)
    tc.write_teacher_cache(tmp_path / "clean", counting_teacher(logits, []), batches_of(7, 2), **settings)
    real = fmt.write_npy
    count = {"n": 0}

    def failing(path, array):
        count["n"] += 1
        if count["n"] == 4:
            raise OSError("simulated crash")
        return real(path, array)

    monkeypatch.setattr(fmt, "write_npy", failing)
    with pytest.raises(OSError):
        tc.write_teacher_cache(tmp_path / "cut", counting_teacher(logits, []), batches_of(7, 2), **settings)
    monkeypatch.undo()
    # Resumed with another batch size: sequences are seeded one by one, so the draws agree.
    tc.write_teacher_cache(tmp_path / "cut", counting_teacher(logits, []), batches_of(7, 3), **settings)
    a = tc.TeacherCacheReader(tmp_path / "clean", vocab_size=V, temperature=T).sequences(range(7))
    b = tc.TeacherCacheReader(tmp_path / "cut", vocab_size=V, temperature=T).sequences(range(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_writer_input_errors(tmp_path):
    w = tc.TeacherCacheWriter(tmp_path, k=4, vocab_size=V, temperature=T)
    ids = torch.tensor([[[1, 2, 3, 4]]])
    lp = torch.full((1, 1, 4), -2.0)
    with pytest.raises(ValueError, match="gap"):
        w.add_sparse(ids, lp, start=1)
    with pytest.raises(ValueError, match="duplicate"):
        w.add_sparse(torch.tensor([[[1, 2, 2, -1]]]), lp, start=0)
    with pytest.raises(ValueError, match="vocab_size"):
        w.add_sparse(torch.tensor([[[1, 2, V, -1]]]), lp, start=0)
    with pytest.raises(ValueError, match="<= 0"):
        w.add_sparse(ids, lp.abs(), start=0)
    with pytest.raises(ValueError, match="fewer than"):
        w.add_logits(torch.zeros(1, 2, V - 1), start=0)
    w.add_sparse(ids, lp, start=0)
    w.add_sparse(ids, lp, start=0)                          # already taken: skipped
    assert w.next_sequence == 1 and w.done(0, 1) and not w.done(0, 2)
    w.close()
    with pytest.raises(ValueError, match="complete"):
        w.add_sparse(ids, lp, start=1)
    with pytest.raises(ValueError, match="temperature=2.0, not 1.0"):
        tc.TeacherCacheWriter(tmp_path, k=4, vocab_size=V, temperature=1.0)
    with pytest.raises(ValueError, match="mode"):
        tc.TeacherCacheWriter(tmp_path / "x", k=4, vocab_size=V, mode="dense")
    with pytest.raises(ValueError, match="dtype"):
        tc.TeacherCacheWriter(tmp_path / "x", k=4, vocab_size=V, dtype="int8")


# --------------------------------------------------------------------------- reader checks

def test_manifest_mismatch_errors(tmp_path):
    write(tmp_path, teacher_logits())
    tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, mode="topk")
    with pytest.raises(ValueError, match=f"vocab_size={V}, but the student has vocab_size={V + 3}"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V + 3, temperature=T)
    with pytest.raises(ValueError, match="temperature=2.0, not the requested temperature=1.0.*retemper"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=1.0)
    with pytest.raises(ValueError, match="mode='topk', not mode='rskd'"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, mode="rskd")
    with pytest.raises(ValueError, match="verify"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, verify="sometimes")
    with pytest.raises(FileNotFoundError):
        tc.TeacherCacheReader(tmp_path / "nothing", vocab_size=V, temperature=T)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(ValueError, match="format_version=99"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T)


def test_checksum_corruption_detected(tmp_path):
    write(tmp_path, teacher_logits())
    target = tmp_path / "shard-00002.logprobs.npy"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01                                          # one bit of one stored value
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00002.logprobs.npy does not match its sha256"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T)
    lazy = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, verify="lazy")
    lazy.tokens(0, 54)                                        # shards 0 and 1 are intact
    with pytest.raises(ValueError, match="shard-00002.logprobs.npy does not match"):
        lazy.sequences([6])
    with pytest.raises(ValueError, match="sha256"):
        lazy.verify()
    unchecked = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, verify="none")
    unchecked.sequences([6])                                  # asked not to check: reads
    target.write_bytes(bytes(data[:-2]))                      # a truncated file: size differs
    with pytest.raises(ValueError, match="bytes, the manifest says"):
        tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, verify="none")


@pytest.mark.parametrize("k, dtype, payload", [(64, "float16", 384), (128, "float16", 768),
                                               (64, "bfloat16", 384), (128, "float32", 1024)])
def test_bytes_per_token(tmp_path, k, dtype, payload):
    g = torch.Generator().manual_seed(0)
    vocab = 300
    with tc.TeacherCacheWriter(tmp_path, k=k, vocab_size=vocab, dtype=dtype) as w:
        w.add_logits(torch.randn(4, 50, vocab, generator=g), start=0)
    r = tc.TeacherCacheReader(tmp_path, vocab_size=vocab, temperature=1.0)
    assert r.payload_bytes_per_token == payload
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.npy"))
    assert r.bytes_per_token == on_disk / 200
    # Three .npy headers and 8 bytes of length per sequence on top of the payload.
    assert payload < r.bytes_per_token < payload + (3 * 128 + 4 * 8) / 200 + 1e-9


# --------------------------------------------------------------------------- sparsify

def test_topk_logprobs():
    lp = torch.tensor([[-1.0, -3.0, -0.5, -math.inf, -2.0]])
    ids, vals = tc.topk_logprobs(lp, 3)
    assert ids.tolist() == [[2, 0, 4]] and vals.tolist() == [[-0.5, -1.0, -2.0]]
    ids, vals = tc.topk_logprobs(lp, 7)                       # past V, and the -inf entry: empty
    assert ids.tolist() == [[2, 0, 4, 1, -1, -1, -1]] and (vals[0, 4:] == -math.inf).all()


def weights_as_dense(ids, log_w, vocab):
    w = log_w.exp().double().masked_fill(ids < 0, 0)
    return torch.zeros(ids.shape[0], vocab, dtype=torch.float64).scatter_add_(1, ids.clamp_min(0), w)


def test_rskd_sampler_is_unbiased_at_tau_1():
    vocab, n, draws = 12, 8, 20000
    p = torch.softmax(1.5 * torch.randn(vocab, generator=torch.Generator().manual_seed(0)), -1).double()
    g = torch.Generator().manual_seed(1)
    ids, log_w = tc.rskd_sample(p.log().expand(draws, vocab), n, generator=g)
    assert ids.shape == (draws, n) and log_w.dtype == torch.float32
    filled = ids >= 0
    # Distinct ids in increasing order, then empty slots; the weights sum to 1 and are c/n.
    assert (filled[:, :-1] | ~filled[:, 1:]).all()
    assert ((ids[:, 1:] > ids[:, :-1]) | ~filled[:, 1:]).all()
    assert (log_w[~filled] == -math.inf).all()
    torch.testing.assert_close(log_w.exp().double().sum(-1), torch.ones(draws, dtype=torch.float64))
    counts = log_w.exp() * n
    assert torch.allclose(counts[filled], counts[filled].round(), atol=1e-5)
    # E[w_j] = p_j: w_j = c_j/n with c_j ~ Binomial(n, p_j), so the mean of `draws` draws has
    # standard deviation sqrt(p_j (1 - p_j) / (n draws)); allow 5 of them.
    mean = weights_as_dense(ids, log_w, vocab).mean(0)
    sigma = (p * (1 - p) / (n * draws)).sqrt()
    assert ((mean - p).abs() < 5 * sigma).all(), ((mean - p) / sigma)
    # Fails for a biased estimator: the top-8 renormalised teacher is far outside that band.
    top = torch.zeros_like(p).scatter_(0, p.topk(8).indices, p.topk(8).values)
    assert ((top / top.sum() - p).abs() > 5 * sigma).any()


def test_rskd_sampler_tau_other_than_1_is_consistent():
    """tau != 1: self-normalised importance weights, bias O(1/n) (docs/offline.md)."""
    vocab, draws = 12, 20000
    p = torch.softmax(1.5 * torch.randn(vocab, generator=torch.Generator().manual_seed(0)), -1).double()
    errors = []
    for n in (8, 64):
        ids, log_w = tc.rskd_sample(p.log().expand(draws, vocab), n, proposal_exponent=0.5,
                                    generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(log_w.exp().double().sum(-1), torch.ones(draws, dtype=torch.float64),
                                   rtol=0, atol=1e-6)          # float32 weights
        errors.append((weights_as_dense(ids, log_w, vocab).mean(0) - p).abs().max().item())
    # Measured 0.035 at n=8 and 0.0045 at n=64 (noise ~0.001): the bias falls like 1/n.
    assert errors[1] < errors[0] / 4 and errors[1] < 0.01, errors


def test_rskd_cache(tmp_path):
    logits = teacher_logits()
    with tc.TeacherCacheWriter(tmp_path, k=32, vocab_size=V, temperature=T, mode="rskd", shard_tokens=20) as w:
        w.add_logits(logits, start=0)
    manifest = tc.read_manifest(tmp_path)
    assert manifest["n_samples"] == 32 and manifest["proposal_exponent"] == 1.0
    assert all(s["width"] < 32 for s in manifest["shards"])      # trimmed to the filled slots
    r = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T, mode="rskd", logprob_dtype=torch.float64)
    ids, log_w = r.sequences(range(7))
    assert ids.shape[-1] == r.width == max(s["width"] for s in manifest["shards"])
    mass = log_w.exp().sum(-1)
    assert (mass <= 1).all() and (mass > 1 - 32 * 2e-3).all()    # sums to 1 up to fp16 rounding
    assert ids[0, 0, 0] == 5 and ids[0, 0, 1] == -1              # the peaked row: one id, weight 1
    # The ids are draws of the teacher: none has probability below 1e-12 at T.
    p = exact_logprobs(logits).exp()
    assert (p.gather(-1, ids.clamp_min(0))[ids >= 0] > 1e-12).all()


# --------------------------------------------------------------------------- re-tempering

def test_retemper_renorm_is_exact():
    logits = teacher_logits()[..., :V].double()
    t0, t1 = 2.0, 0.7
    ids, lp0 = tc.topk_logprobs((logits / t0).log_softmax(-1), 10)
    ids[0, 1, 7:] = -1                                         # empty slots
    lp0[0, 1, 7:] = 123.0                                      # whatever they hold is ignored
    out = tc.retemper(ids, lp0, from_temperature=t0, to_temperature=t1, tail="renorm")
    p1 = (logits / t1).log_softmax(-1).gather(-1, ids.clamp_min(0)).masked_fill(ids < 0, -math.inf)
    expected = p1.log_softmax(-1)                              # teacher at t1, renormalised on S
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out.dtype == torch.float64 and (out[0, 1, 7:] == -math.inf).all()


def test_retemper_bucket():
    logits = teacher_logits()[..., :V].double()
    full0 = (logits / 2.0).log_softmax(-1)
    ids, lp0 = tc.topk_logprobs(full0, 10)
    for t1 in (0.7, 5.0):
        true_mass = (logits / t1).log_softmax(-1).gather(-1, ids).exp().sum(-1)
        uniform = tc.retemper(ids, lp0, from_temperature=2.0, to_temperature=t1, tail="bucket", vocab_size=V)
        extreme = tc.retemper(ids, lp0, from_temperature=2.0, to_temperature=t1, tail="bucket", vocab_size=V,
                              tail_model="min_kept")
        lo = torch.minimum(uniform.exp().sum(-1), extreme.exp().sum(-1))
        hi = torch.maximum(uniform.exp().sum(-1), extreme.exp().sum(-1))
        assert ((lo <= true_mass + 1e-12) & (true_mass <= hi + 1e-12)).all()   # the two bracket the truth
        assert (hi - lo > 1e-3).any()                                          # ... and differ
        # Ratios within the support are exact in either model.
        torch.testing.assert_close(uniform.diff(dim=-1), (lp0 * 2.0 / t1).diff(dim=-1), rtol=0, atol=1e-12)
    # Same temperature: unchanged. Full support (K = V): exact, no tail.
    same = tc.retemper(ids, lp0, from_temperature=2.0, to_temperature=2.0, tail="bucket", vocab_size=V)
    assert torch.equal(same, lp0)
    all_ids, all_lp = tc.topk_logprobs(full0, V)
    out = tc.retemper(all_ids, all_lp, from_temperature=2.0, to_temperature=0.5, tail="bucket", vocab_size=V)
    torch.testing.assert_close(out, (logits / 0.5).log_softmax(-1).gather(-1, all_ids), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs vocab_size"):
        tc.retemper(ids, lp0, from_temperature=2.0, to_temperature=1.0, tail="bucket")
    with pytest.raises(ValueError, match="to_temperature"):
        tc.retemper(ids, lp0, from_temperature=2.0, to_temperature=0.0)


# --------------------------------------------------------------------------- with the loss

def test_rskd_gradient_through_sparse_kd_loss_is_unbiased():
    """bucket with RS-KD weights (P = 1): the forward-KL gradient q - w averages to q - p."""
    from fastkd.sparse import sparse_kd_loss
    vocab, n, draws = 12, 8, 4000
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(1.5 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    s = torch.randn(vocab, generator=g, dtype=torch.float64)
    ids, log_w = tc.rskd_sample(p.log().expand(draws, vocab), n, generator=g)
    student = s.expand(draws, vocab).clone().requires_grad_()
    sparse_kd_loss(student, ids, log_w.double(), tail="bucket", reduction="sum").backward()
    dense = s.clone().requires_grad_()
    fastkd.kd_loss(dense[None], p.log()[None], reduction="sum", backend="torch").backward()
    sigma = (p * (1 - p) / (n * draws)).sqrt()               # the gradient's noise is that of w
    err = student.grad.mean(0) - dense.grad
    assert (err.abs() < 5 * sigma).all(), err / sigma
    # The renormalised top-8 teacher is biased: far outside that band.
    top_ids, top_lp = tc.topk_logprobs(p.log()[None], 8)
    biased = s.clone()[None].requires_grad_()
    sparse_kd_loss(biased, top_ids, top_lp, tail="renorm", reduction="sum").backward()
    assert ((biased.grad[0] - dense.grad).abs() > 5 * sigma).any()


def test_full_support_cache_gives_the_dense_loss(tmp_path):
    """A cache with k = V (float32 values) through sparse_kd_loss equals kd_loss on the logits."""
    from fastkd.sparse import sparse_kd_loss
    logits = teacher_logits(n=3, length=5)
    with tc.TeacherCacheWriter(tmp_path, k=V, vocab_size=V, temperature=T, dtype="float32") as w:
        w.add_logits(logits, start=0)
    ids, lp = tc.TeacherCacheReader(tmp_path, vocab_size=V, temperature=T).sequences(range(3))
    s = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    kw = dict(temperature=T, alpha=0.7)
    sparse = sparse_kd_loss(s, ids, lp.double(), labels, tail="bucket", **kw)
    dense = fastkd.reference.kd_loss(s, logits[..., :V].double(), labels, **kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=0)   # float32 storage, rounded down


def test_logprobs_source_lengths_and_pickling(tmp_path):
    """add_logprobs stores what add_logits does; write_teacher_cache's lengths; a pickled
    reader (DataLoader workers) carries no shard data and reads the same."""
    import pickle
    logits = teacher_logits(n=4, length=6)
    with tc.TeacherCacheWriter(tmp_path / "a", k=5, vocab_size=V, temperature=T) as w:
        w.add_logits(logits, start=0)
    with tc.TeacherCacheWriter(tmp_path / "b", k=5, vocab_size=V, temperature=T) as w:
        w.add_logprobs(exact_logprobs(logits).float(), start=0)
    a = tc.TeacherCacheReader(tmp_path / "a", vocab_size=V, temperature=T)
    b = tc.TeacherCacheReader(tmp_path / "b", vocab_size=V, temperature=T)
    assert torch.equal(a.sequences(range(4))[0], b.sequences(range(4))[0])
    torch.testing.assert_close(a.sequences(range(4))[1], b.sequences(range(4))[1], atol=2e-3, rtol=0)

    data = torch.arange(4)[:, None].expand(4, 7)
    tc.write_teacher_cache(tmp_path / "c", lambda x: logits[x[:, 0], :, :], data.split(2), k=5, vocab_size=V,
                           temperature=T, lengths=lambda x: 3 + x[:, 0] % 2)
    c = tc.TeacherCacheReader(tmp_path / "c", vocab_size=V, temperature=T)
    assert c.lengths.tolist() == [3, 4, 3, 4] and c.num_tokens == 14
    assert torch.equal(c.sequences(1)[0], a.sequences(1)[0][:4])

    a.sequences(range(4))                                   # maps the shards
    assert a._maps
    copy = pickle.loads(pickle.dumps(a))
    assert not copy._maps                                   # no shard data travelled
    assert torch.equal(copy.sequences(range(4))[0], a.sequences(range(4))[0])
