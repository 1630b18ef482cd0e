"""Offline distillation: record a teacher's top-k to disk once, train students from the cache.

On the tiny language model of ``examples/distill_tiny_lm.py`` (its data source, model,
training loop and scoring are imported from it, not copied): the teacher is trained, then
run once over the students' training set, and its sparse distributions are written with
``fastkd.teacher_cache``. The same student (same seed, same batches in the same order) is
then trained from each cache with ``fastkd.sparse_kd_loss``:

* ``bucket`` at two k (the K kept ids plus one tail bin: the default tail),
* ``renorm`` (both sides renormalised over the kept ids),
* RS-KD (random-sampling KD: samples of the teacher with importance weights, ``bucket``),

next to hard labels only (CE) and online dense KD (``fastkd.kd_loss`` against the teacher's
full logits, computed at every step). Every KD student uses forward KL, T = 1, alpha = 0.9,
as the dense example. The table gives held-out loss and the bytes each token of the cache
takes on disk.

    python examples/offline_distill.py            # default run (vocabulary 2053)
    python examples/offline_distill.py --quick    # reduced run (used by the test)

Runtime on a 2-core AMD EPYC VM that other jobs shared (rough): the default run took 82 s
of CPU time (3.4 minutes of wall time at a load average of 11), ``--quick`` 17 s (34 s of
wall time); most of it is the [tokens, vocab] work of training, as in the dense example.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_tiny_lm as tiny  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastkd  # noqa: E402
from fastkd import teacher_cache  # noqa: E402
from fastkd.sparse import sparse_kd_loss  # noqa: E402

DEFAULT = tiny.DEFAULT
# Smaller than the dense example's quick run: six students here instead of two.
QUICK = replace(tiny.QUICK, vocab=1031, teacher_steps=80, student_steps=40, heldout_seqs=48)

# (row label, cache, tail): the students trained from a cache. k and n are chosen so that
# the small top-k and the RS-KD cache have about the same bytes per token.
K_SMALL, K_LARGE, RSKD_SAMPLES = 8, 64, 32
CACHES = {  # name -> writer settings
    f"top{K_SMALL}": dict(mode="topk", k=K_SMALL),
    f"top{K_LARGE}": dict(mode="topk", k=K_LARGE),
    f"rskd{RSKD_SAMPLES}": dict(mode="rskd", k=RSKD_SAMPLES, seed=0),
}
STUDENTS = [
    (f"bucket, k={K_SMALL}", f"top{K_SMALL}", "bucket"),
    (f"bucket, k={K_LARGE}", f"top{K_LARGE}", "bucket"),
    (f"renorm, k={K_SMALL}", f"top{K_SMALL}", "renorm"),
    (f"renorm, k={K_LARGE}", f"top{K_LARGE}", "renorm"),
    (f"RS-KD, {RSKD_SAMPLES} samples", f"rskd{RSKD_SAMPLES}", "bucket"),
]


class CachedKDStep:
    """One KD step against the cached sparse teacher of the batch's sequences."""

    def __init__(self, reader, tail, cfg):
        self.reader, self.tail, self.cfg = reader, tail, cfg
        self.slots = []                                   # filled slots per token, for the table

    def __call__(self, model, index, x, y):
        ids, logprobs = self.reader.sequences(index)      # [B, L, W], aligned with x
        self.slots.append((ids >= 0).sum(-1).float().mean().item())
        loss = sparse_kd_loss(model(x), ids, logprobs, y, tail=self.tail, divergence="forward_kl",
                              temperature=self.cfg.temperature, alpha=self.cfg.alpha)
        loss.backward()


def train_indexed(model, data, order, step, lr):
    """``tiny.train`` over batches of ``data[order[i]]``, passing each batch's sequence indices on."""
    batches = [data[idx] for idx in order]
    indices = iter(order)
    tiny.train(model, batches, lambda m, x, y: step(m, next(indices), x, y), lr=lr)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Runtime on a 2-core AMD EPYC VM (rough: measured while other jobs shared it): default "
               "82 s of CPU time (3.4 minutes of wall time at a load average of 11), --quick 17 s of CPU "
               "time (34 s wall at the same load).")
    ap.add_argument("--quick", action="store_true",
                    help="reduced run (vocabulary 1031, fewer steps; 17 s of CPU time), used by the tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="where to write the caches (default: a temporary directory)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else DEFAULT
    wall = time.perf_counter()

    # The data and the teacher, as in distill_tiny_lm.py.
    rng = np.random.default_rng(args.seed)
    source = tiny.TopicBigramSource(cfg.vocab, rng)
    length = cfg.seq_len + 1
    heldout = torch.from_numpy(source.sample(cfg.heldout_seqs, length, rng))
    teacher_data = torch.from_numpy(source.sample(cfg.teacher_steps * cfg.batch, length, rng))
    student_data = torch.from_numpy(source.sample(cfg.student_train_seqs, length, rng))
    torch.manual_seed(args.seed)
    teacher = tiny.TinyLM(cfg.vocab, cfg.teacher_dim, cfg.seq_len)
    tiny.train(teacher, teacher_data.split(cfg.batch), tiny.ce_step, lr=cfg.lr)
    teacher.requires_grad_(False)
    seconds = {"teacher training": time.perf_counter() - wall}

    # Record the teacher once over the students' training set (inputs: all but the last token).
    tmp = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="fastkd-offline-")
    root = Path(args.cache_dir or tmp.name)
    readers = {}
    start = time.perf_counter()
    for name, settings in CACHES.items():
        teacher_cache.write_teacher_cache(
            root / name, lambda seqs: teacher(seqs[:, :-1]), student_data.split(cfg.batch),
            vocab_size=cfg.vocab, temperature=cfg.temperature, dtype="float16", shard_tokens=1 << 14,
            **settings)
        readers[name] = teacher_cache.TeacherCacheReader(root / name, vocab_size=cfg.vocab,
                                                         temperature=cfg.temperature)
    seconds["recording 3 caches"] = time.perf_counter() - start

    # The students: one training set, reshuffled every epoch, the same order for all.
    shuffle = np.random.default_rng(args.seed + 1)
    epochs = -(-cfg.student_steps * cfg.batch // cfg.student_train_seqs)
    order = np.concatenate([shuffle.permutation(cfg.student_train_seqs) for _ in range(epochs)])
    order = torch.from_numpy(order[: cfg.student_steps * cfg.batch]).view(cfg.student_steps, cfg.batch)

    def new_student():
        torch.manual_seed(args.seed + 1)
        return tiny.TinyLM(cfg.vocab, cfg.student_dim, cfg.seq_len)

    rows = []       # (label, held-out loss, bytes per token, filled slots per token, seconds)
    start = time.perf_counter()
    model = new_student()
    train_indexed(model, student_data, order, lambda m, i, x, y: tiny.ce_step(m, x, y), cfg.lr)
    rows.append(("CE only (no teacher)", tiny.heldout_loss(model, heldout), 0.0, 0.0, time.perf_counter() - start))

    start = time.perf_counter()
    model = new_student()
    dense = tiny.KDStep(teacher, cfg)
    train_indexed(model, student_data, order, lambda m, i, x, y: dense(m, x, y), cfg.lr)
    rows.append(("online dense KD (kd_loss)", tiny.heldout_loss(model, heldout), None, float(cfg.vocab),
                 time.perf_counter() - start))

    for label, cache, tail in STUDENTS:
        start = time.perf_counter()
        model = new_student()
        step = CachedKDStep(readers[cache], tail, cfg)
        train_indexed(model, student_data, order, step, cfg.lr)
        rows.append((label, tiny.heldout_loss(model, heldout), readers[cache].bytes_per_token,
                     float(np.mean(step.slots)), time.perf_counter() - start))
    seconds["students"] = sum(r[4] for r in rows)

    m = {"optimal": source.optimal_loss(heldout.numpy()), "teacher": tiny.heldout_loss(teacher, heldout),
         "students": {r[0]: r[1] for r in rows},
         "bytes_per_token": {name: r.bytes_per_token for name, r in readers.items()},
         "payload_bytes_per_token": {name: r.payload_bytes_per_token for name, r in readers.items()},
         "dense_fp16_bytes_per_token": 2 * cfg.vocab, "backend": fastkd.resolve_backend("auto", torch.device("cpu"))}

    tokens = cfg.student_train_seqs * cfg.seq_len
    print(f"\nvocabulary {cfg.vocab}; students: {cfg.student_train_seqs} training seqs ({tokens} tokens), "
          f"{cfg.student_steps} steps; held-out {cfg.heldout_seqs * cfg.seq_len} tokens; seed {args.seed}"
          f"{' (--quick)' if args.quick else ''}")
    print(f"KD: forward_kl, T={cfg.temperature}, alpha={cfg.alpha}; caches in fp16 log-probs + int32 ids")
    print(f"{'student':<28}{'held-out loss':>14}{'vs dense KD':>13}{'cache B/token':>15}{'ids/token':>11}"
          f"{'train s':>9}")
    dense_loss = m["students"]["online dense KD (kd_loss)"]
    for label, loss, bpt, slots, secs in rows:
        bytes_text = "(teacher)" if bpt is None else "-" if bpt == 0 else f"{bpt:.1f}"
        slots_text = "-" if slots == 0 else f"{slots:.1f}"
        print(f"{label:<28}{loss:>14.4f}{loss - dense_loss:>+13.4f}{bytes_text:>15}{slots_text:>11}{secs:>9.1f}")
    print(f"{'teacher':<28}{m['teacher']:>14.4f}")
    print(f"{'Bayes-optimal':<28}{m['optimal']:>14.4f}")
    print(f"(storing the dense teacher in fp16 would take {m['dense_fp16_bytes_per_token']} B/token; "
          f"top-k costs k x 6 B/token plus the .npy headers and 8 B per sequence)")
    print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
          + f"; total {time.perf_counter() - wall:.1f} s")
    if tmp is not None:
        tmp.cleanup()
    return m


if __name__ == "__main__":
    main()
