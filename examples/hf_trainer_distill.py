"""Distil a tiny Llama with ``fastkd``'s ``KDTrainer`` (a ``transformers.Trainer``), on the CPU.

Everything is built here, nothing is downloaded:

1. a random "language" (documents with a hidden topic that shapes their word
   frequencies, plus word-to-word habits), so there is something to learn;
2. a teacher, a small Llama (``LlamaConfig`` -> ``AutoModelForCausalLM.from_config``)
   trained by a plain ``transformers.Trainer`` on plenty of that text;
3. the same student twice, on a small share of the text, with the same seed, data order
   and optimizer: by a plain ``Trainer`` (the model's own cross-entropy), and by
   ``fastkd.integrations.transformers.KDTrainer`` (forward KL to the teacher mixed with
   cross-entropy);
4. held-out cross-entropy (nats/token) of the teacher and both students.

    python examples/hf_trainer_distill.py            # default run (30-60 s on a shared 2-core VM)
    python examples/hf_trainer_distill.py --quick    # reduced run, ~20 s (used by the test)
    python examples/hf_trainer_distill.py --fused    # KDTrainer(fused_linear=True)

Whether KD helps depends on the regime; the script prints the comparison as measured,
whichever way it goes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # shared cores: sleep, do not spin

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
import transformers  # noqa: E402

from fastkd.integrations.transformers import KDTrainer  # noqa: E402


@dataclass
class Settings:
    vocab: int = 509
    seq_len: int = 32
    batch: int = 16
    teacher_hidden: int = 96
    teacher_seqs: int = 4800          # seen once: 300 steps
    student_hidden: int = 32
    student_seqs: int = 128           # 37x less than the teacher
    student_steps: int = 200          # 25 epochs of the small set
    heldout_seqs: int = 256
    lr: float = 6e-3
    temperature: float = 1.0
    alpha: float = 0.9


DEFAULT = Settings()
QUICK = Settings(teacher_hidden=64, teacher_seqs=1600, student_steps=100, heldout_seqs=128)


# --------------------------------------------------------------------------- the language

def make_language(vocab, rng, topics=6, successors=3, p_habit=0.5):
    """Topic word distributions [K, V] (Zipf-like, own order per topic) and successor tables."""
    zipf = np.arange(1, vocab + 1, dtype=np.float64) ** -1.2
    topic_probs = np.stack([zipf[rng.permutation(vocab)] for _ in range(topics)])
    topic_probs /= topic_probs.sum(1, keepdims=True)
    succ = rng.integers(0, vocab, size=(vocab, successors))
    succ_p = rng.dirichlet(np.full(successors, 0.5), size=vocab)
    return topic_probs, succ, succ_p, p_habit


def sample(language, n, length, rng):
    """``n`` documents: each token is a habit of the previous one, or a word of the topic."""
    topic_probs, succ, succ_p, p_habit = language
    vocab = topic_probs.shape[1]
    topic = rng.integers(0, len(topic_probs), size=n)
    cum = np.cumsum(topic_probs[topic], 1)                                     # [n, V]
    words = np.minimum((cum[:, None, :] < rng.random((n, length, 1))).sum(-1), vocab - 1)
    habit = rng.random((n, length)) < p_habit
    slot_u = rng.random((n, length))
    succ_cum = np.cumsum(succ_p, 1)
    x = np.empty((n, length), dtype=np.int64)
    x[:, 0] = words[:, 0]
    for t in range(1, length):
        prev = x[:, t - 1]
        slot = np.minimum((succ_cum[prev] < slot_u[:, t, None]).sum(1), succ.shape[1] - 1)
        x[:, t] = np.where(habit[:, t], succ[prev, slot], words[:, t])
    return x


def as_dataset(x):
    ids = x.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


# --------------------------------------------------------------------------- models, training

def tiny_llama(vocab, hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config)


def training_args(out, cfg, steps, seed):
    return transformers.TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=cfg.batch, learning_rate=cfg.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, seed=seed,
        data_seed=seed, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)


@torch.no_grad()
def heldout_loss(model, x, batch=64):
    """Mean next-token cross-entropy in nats over every predicted token of ``x``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(x), batch):
        ids = torch.from_numpy(x[start:start + batch])
        loss = model(input_ids=ids, labels=ids).loss          # HF's own causal-LM loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total, count = total + loss.item() * n, count + n
    return total / count


class HeldoutCurve(transformers.TrainerCallback):
    """Held-out loss every ``every`` optimizer steps (and at the end)."""

    def __init__(self, x, every):
        self.x, self.every, self.points = x, every, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.points.append((state.global_step, heldout_loss(model, self.x)))
            model.train()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (about 20 s on 2 cores), used by the test")
    ap.add_argument("--fused", action="store_true", help="KDTrainer(fused_linear=True): logits never materialised")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else DEFAULT
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    wall = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    language = make_language(cfg.vocab, rng)
    heldout = sample(language, cfg.heldout_seqs, cfg.seq_len, rng)
    teacher_data = sample(language, cfg.teacher_seqs, cfg.seq_len, rng)
    student_data = sample(language, cfg.student_seqs, cfg.seq_len, rng)

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        teacher = tiny_llama(cfg.vocab, cfg.teacher_hidden, 2, args.seed)
        trainer = transformers.Trainer(model=teacher, train_dataset=as_dataset(teacher_data),
                                       args=training_args(out, cfg, cfg.teacher_seqs // cfg.batch, args.seed))
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        teacher_s = time.perf_counter() - t0

        students = {}
        times = {}
        for name in ("ce", "kd"):
            t0 = time.perf_counter()
            student = tiny_llama(cfg.vocab, cfg.student_hidden, 1, args.seed + 1)
            common = dict(model=student, args=training_args(out, cfg, cfg.student_steps, args.seed + 1),
                          train_dataset=as_dataset(student_data))
            if name == "ce":
                trainer = transformers.Trainer(**common)
            else:
                trainer = KDTrainer(**common, teacher_model=teacher, fused_linear=args.fused,
                                    divergence="forward_kl", temperature=cfg.temperature, alpha=cfg.alpha)
            trainer.remove_callback(transformers.PrinterCallback)
            curve = HeldoutCurve(heldout, every=max(1, cfg.student_steps // 8))
            trainer.add_callback(curve)
            trainer.train()
            students[name] = curve.points
            times[name] = time.perf_counter() - t0

    best = {name: min(points, key=lambda p: p[1]) for name, points in students.items()}
    m = {
        "teacher": heldout_loss(teacher, heldout),
        "ce_student": students["ce"][-1][1],
        "kd_student": students["kd"][-1][1],
        "ce_student_best": best["ce"][1],
        "kd_student_best": best["kd"][1],
        "uniform": math.log(cfg.vocab),
        "seconds": time.perf_counter() - wall,
    }
    # Judged on each student's best held-out point, so an overfitting CE-only student is
    # not what KD is compared against (early stopping, generous to both).
    m["kd_helps"] = m["kd_student_best"] < m["ce_student_best"]

    mode = " (--quick)" if args.quick else ""
    print(f"\nheld-out: {cfg.heldout_seqs * (cfg.seq_len - 1)} predicted tokens, vocabulary {cfg.vocab}, "
          f"seed {args.seed}{mode}")
    print(f"{'model':<44}{'final loss':>11}{'ppl':>7}{'best loss (step)':>19}{'train s':>9}")
    print(f"{'uniform guess':<44}{m['uniform']:>11.4f}{math.exp(m['uniform']):>7.1f}")
    print(f"{f'teacher  Llama d={cfg.teacher_hidden} x2, {cfg.teacher_seqs} seqs':<44}{m['teacher']:>11.4f}"
          f"{math.exp(m['teacher']):>7.1f}{'':>19}{teacher_s:>9.1f}")
    kd_name = "KDTrainer" + (" fused" if args.fused else "")
    for label, name in ((f"student  Llama d={cfg.student_hidden} x1, CE (Trainer)", "ce"),
                        (f"student  Llama d={cfg.student_hidden} x1, {kd_name}", "kd")):
        final, (step, low) = m[f"{name}_student"], best[name]
        print(f"{label:<44}{final:>11.4f}{math.exp(final):>7.1f}{f'{low:.4f} ({step})':>19}{times[name]:>9.1f}")
    print(f"(students: {cfg.student_seqs} training seqs, {cfg.student_steps} steps of {cfg.batch}, held-out loss "
          f"every {max(1, cfg.student_steps // 8)} steps; KD = forward_kl, T={cfg.temperature}, alpha={cfg.alpha})")
    print(f"\nKD helps: {'yes' if m['kd_helps'] else 'no'} (best held-out {m['kd_student_best']:.4f} vs "
          f"{m['ce_student_best']:.4f} nats/token, {m['ce_student_best'] - m['kd_student_best']:+.4f})")
    print(f"total {m['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=1)
    return m


if __name__ == "__main__":
    main()
