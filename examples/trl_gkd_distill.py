"""TRL's GKD trainer with fastkd: the one-line patch and the fused-linear trainer, on the CPU.

What it runs
------------
Tiny random Llama models built from configs (nothing is downloaded): a teacher whose LM
head is scaled up so that its next-token distributions are peaked, as a trained model's
are, and a smaller student. The same student (same seed, same batches) is trained three
times with ``trl.experimental.gkd.GKDTrainer`` (generalised JSD, ``beta=0.5``, off-policy:
``lmbda=0``):

1. ``TRL``: the trainer as TRL ships it;
2. ``patched``: after ``fastkd.integrations.trl.patch_gkd_trainer()`` (one line: TRL's
   ``generalized_jsd_loss`` becomes fastkd's fused kernel, same conventions);
3. ``fused-linear``: ``fastkd.integrations.trl.FastKDGKDTrainer``, whose ``compute_loss``
   runs both backbones and ``fastkd.fused_linear_kd_loss`` on the LM heads, so the
   ``[batch, seq, vocab]`` logits are never materialised.

It prints the loss of every step for the three runs side by side (the patched run
reproduces TRL's numbers; the fused-linear one equals them to float32 rounding), then the
time of the loss alone, forward + backward, on the same logits: TRL's own
``generalized_jsd_loss`` against fastkd's, at the training batch's shape and (not in
``--quick``) at a larger one.

    python examples/trl_gkd_distill.py            # full run: 53 s measured (below)
    python examples/trl_gkd_distill.py --quick    # 24 s measured (used by the test)

Needs ``trl`` (written against trl 1.16), ``transformers``, ``datasets`` and ``tokenizers``.
Times measured on a 2-core CPU VM shared with other jobs (load average about 8, 2026-11-24);
10-13 s of either run is importing TRL. The per-step times of such tiny models are mostly
their own layers and the machine's noise; the loss-alone table is the comparison that
isolates what fastkd changes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/distill_tiny_lm.py
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402


@dataclass
class Settings:
    vocab: int = 2053
    seq_len: int = 48
    prompt_len: int = 16         # prompt tokens are labelled -100, as GKD's collator does
    batch: int = 8
    rows: int = 64
    data_vocab: int = 64         # the text uses the first ids only, so a few steps can show learning
    steps: int = 16
    student_dim: int = 64
    teacher_dim: int = 96
    teacher_sharpness: float = 10.0   # LM-head scale of the random teacher: peaked distributions
    beta: float = 0.5
    lr: float = 1e-2
    timing_shapes: tuple = ((8, 47, 2053), (2, 256, 32000))
    timing_reps: int = 3


QUICK = Settings(vocab=1031, seq_len=24, prompt_len=8, batch=4, rows=16, data_vocab=32, steps=3, student_dim=32,
                 teacher_dim=48, timing_shapes=((4, 23, 1031),), timing_reps=3)


# --------------------------------------------------------------------------- models and data

def build_model(vocab: int, hidden: int, seed: int, head_scale: float = 1.0):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def build_tokenizer(vocab: int):
    """A word-level tokenizer over ``w3 .. w{vocab-1}`` (GKDTrainer wants a processing class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_dataset(s: Settings, seed: int):
    """Pre-tokenised prompt + completion rows; prompts and padding labelled -100."""
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 3 + s.data_vocab, (s.rows, s.seq_len), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.randint(s.seq_len - s.seq_len // 4, s.seq_len + 1, (s.rows,), generator=g)
    mask[torch.arange(s.seq_len)[None, :] >= lengths[:, None]] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, : s.prompt_len] = -100
    labels[mask == 0] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


# --------------------------------------------------------------------------- training

def train(trainer_cls, s: Settings, seed: int, out_dir: str):
    """Per-step losses and the median seconds of a training step of one GKD run."""
    from trl.experimental.gkd import GKDConfig
    args = GKDConfig(output_dir=out_dir, per_device_train_batch_size=s.batch, max_steps=s.steps,
                     learning_rate=s.lr, lmbda=0.0, beta=s.beta, seq_kd=False, logging_strategy="no", report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=seed, max_length=None, disable_tqdm=True,
                     log_level="error")
    trainer = trainer_cls(model=build_model(s.vocab, s.student_dim, seed),
                          teacher_model=build_model(s.vocab, s.teacher_dim, seed + 1, s.teacher_sharpness),
                          args=args, train_dataset=build_dataset(s, seed), processing_class=build_tokenizer(s.vocab),
                          data_collator=collate)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for callback in (PrinterCallback, ProgressCallback):  # the script prints its own table
        trainer.remove_callback(callback)
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*a, **kw):  # the loss of every step, unrounded (one micro-batch per step)
        loss = compute_loss(*a, **kw)
        losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss
    trainer.compute_loss = recording
    step_times = StepTimer()
    trainer.add_callback(step_times)
    trainer.train()
    return losses, statistics.median(step_times.seconds)


def _step_timer_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, update)."""

        def __init__(self):
            self.seconds, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer


def StepTimer():  # noqa: N802  (transformers is imported lazily, like the other heavy imports)
    return _step_timer_class()()


# --------------------------------------------------------------------------- loss timing

def time_loss(fn, student, teacher, labels, reps: int, beta: float) -> float:
    """Median milliseconds of forward + backward of the loss alone."""
    times = []
    for _ in range(reps + 1):  # the first call warms up (allocations, the extension's load)
        s = student.detach().requires_grad_(True)
        start = time.perf_counter()
        fn(s, teacher, labels, beta=beta).backward()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def loss_timings(s: Settings, trl_loss, fastkd_loss):
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in s.timing_shapes:
        student = torch.randn(shape, generator=g) * 3
        teacher = torch.randn(shape, generator=g) * 3
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
        labels[:, : shape[1] // 3] = -100
        trl_ms = time_loss(trl_loss, student, teacher, labels, s.timing_reps, s.beta)
        ours_ms = time_loss(fastkd_loss, student, teacher, labels, s.timing_reps, s.beta)
        err = abs(float(fastkd_loss(student, teacher, labels, beta=s.beta))
                  - float(trl_loss(student.double(), teacher.double(), labels, beta=s.beta)))
        rows.append({"shape": shape, "trl_ms": trl_ms, "fastkd_ms": ours_ms, "abs_err": err})
    return rows


# --------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (about 15-30 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    opts = parser.parse_args(argv)
    s = QUICK if opts.quick else Settings()
    if opts.steps is not None:
        s = Settings(**{**s.__dict__, "steps": opts.steps})

    t0 = time.perf_counter()
    import fastkd
    from fastkd.integrations import trl as fastkd_trl
    from trl.experimental.gkd import GKDTrainer
    trl_loss = GKDTrainer.generalized_jsd_loss  # TRL's own, taken before any patch
    import_s = time.perf_counter() - t0

    backend = fastkd.resolve_backend("auto", torch.device("cpu"))
    print(f"GKD on tiny random Llama models: vocabulary {s.vocab}, student d={s.student_dim}, "
          f"teacher d={s.teacher_dim}, {s.batch}x{s.seq_len} tokens/step, beta={s.beta}, "
          f"fastkd backend {backend} (imports {import_s:.1f} s)")

    runs = {}
    with tempfile.TemporaryDirectory(prefix="fastkd_trl_") as tmp:
        runs["TRL"] = train(GKDTrainer, s, opts.seed, os.path.join(tmp, "trl"))
        with fastkd_trl.patch_gkd_trainer():              # the one line
            runs["patched"] = train(GKDTrainer, s, opts.seed, os.path.join(tmp, "patched"))
        runs["fused-linear"] = train(fastkd_trl.FastKDGKDTrainer, s, opts.seed, os.path.join(tmp, "fused"))
    restored = GKDTrainer.generalized_jsd_loss is trl_loss

    names = list(runs)
    print("\nloss per step (generalised JSD, batchmean over completion tokens)")
    print("step  " + "  ".join(f"{n:>13}" for n in names))
    for step in range(s.steps):
        print(f"{step + 1:>4}  " + "  ".join(f"{runs[n][0][step]:>13.6f}" for n in names))
    print("ms/step" + "  ".join(f"{1e3 * runs[n][1]:>12.1f}" for n in names) + "   (median)")
    first = {n: runs[n][0][0] for n in names}
    rel = {n: abs(first[n] - first["TRL"]) / abs(first["TRL"]) for n in names}
    print("step-1 loss vs TRL: " + ", ".join(f"{n} {rel[n]:.1e}" for n in names[1:]) + " (relative)")

    print("\nloss alone, forward + backward, same logits (median ms)")
    print(f"{'shape [B, S, V]':>20}  {'TRL':>9}  {'fastkd':>9}  {'speed-up':>8}  |fastkd - TRL fp64|")
    timings = loss_timings(s, trl_loss, fastkd_trl.generalized_jsd_loss)
    for row in timings:
        shape = "x".join(map(str, row["shape"]))
        print(f"{shape:>20}  {row['trl_ms']:>9.2f}  {row['fastkd_ms']:>9.2f}  "
              f"{row['trl_ms'] / row['fastkd_ms']:>7.1f}x  {row['abs_err']:.1e}")
    print(f"\npatch restored after the with-block: {'yes' if restored else 'NO'}")
    return {"losses": {n: runs[n][0] for n in names}, "seconds_per_step": {n: runs[n][1] for n in names},
            "step1_rel_diff": rel, "timings": timings, "restored": restored, "backend": backend}


if __name__ == "__main__":
    main()
