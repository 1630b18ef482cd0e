"""Logits, feature and relation distillation in one objective (``fastkd.DistillationLoss``), on the CPU.

What it demonstrates
--------------------
The setting of ``examples/distill_tiny_lm.py`` (its language, models and training loop,
imported from it): a data-rich teacher (d=128) and a student (d=64) that sees little data.
The student is narrower than the teacher, so feature distillation needs learned
projections; ``FeatureDistillation`` owns them and ``DistillationLoss`` registers them, so
they train with the student. Four students, same seed, same batches in the same order:

1. CE only — hard labels, plain cross-entropy;
2. logits KD — ``kd_loss`` term (forward KL, T=1, alpha=0.9, as in distill_tiny_lm.py);
3. + features — plus a cosine loss between the student's and teacher's hidden states
   after each block (student block i -> teacher block i), through a learned 64->128
   projection, with a weight that falls linearly from 1 to 0 over training (FitNets'
   "hints first" idea as a schedule);
4. + relations — plus RKD distance (Park et al., 2019) between the pairwise distances of
   the mean-pooled last hidden states of the batch's sequences, with the paper's weight 25.

The weights were not tuned on the results (docs/objective.md says how they were chosen and
what a first relation weight of 1 gave): the point is to show the objective and report
what each term does at this scale, not to make a term win. At this scale, neither the
feature nor the relation term helps.

    python examples/distill_features.py            # default run
    python examples/distill_features.py --quick    # reduced run (used by the test)

Runtime on the 2-core AMD EPYC VM of CI (2026-11-24), with one other job running: default
49 s (156 s under a load average of 6), ``--quick`` 25 s. The script sets
``OMP_WAIT_POLICY=PASSIVE`` as distill_tiny_lm.py does (and for the same reason).

Run it from the repository root with ``PYTHONPATH=.`` if fastkd is not installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # why: see distill_tiny_lm.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fastkd import resolve_backend  # noqa: E402
from fastkd.features import FeatureDistillation  # noqa: E402
from fastkd.objective import DistillationLoss  # noqa: E402
from fastkd.relations import RelationDistillation  # noqa: E402


def _load_tiny_lm():
    """examples/ is not a package: import distill_tiny_lm.py by path (as its test does)."""
    name = "distill_tiny_lm"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "distill_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module               # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tiny = _load_tiny_lm()

# Term settings, fixed before the first run (not tuned on the results).
FEATURE_KIND = "cosine"           # scale-free: the two widths' activations differ in size
FEATURE_WEIGHT = 1.0              # at step 0, falling linearly to 0 at the last step
RELATION_KIND = "rkd_distance"
RELATION_WEIGHT = 25.0            # Park et al.'s lambda for the distance loss


class TinyLMWithHidden(tiny.TinyLM):
    """distill_tiny_lm's TinyLM (same parameters, same logits) that can also return its hidden states.

    ``model(x)`` returns the logits, as TinyLM does; ``model(x, output_hidden_states=True)``
    returns an object with ``.logits`` and ``.hidden_states`` laid out as a Hugging Face
    model's: the embeddings, then one entry per block, the last one after the final norm.
    """

    def forward(self, x, output_hidden_states: bool = False):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        states = [h]
        for block in self.blocks:
            h = block(h)
            states.append(h)
        states[-1] = self.norm(h)
        logits = self.head(states[-1])
        if not output_hidden_states:
            return logits
        return SimpleNamespace(logits=logits, hidden_states=tuple(states))


class StudentWithObjective(nn.Module):
    """The student and its objective in one module, so that ``tiny.train``'s optimizer
    (built from ``model.parameters()``) also trains the objective's projections."""

    def __init__(self, student, objective):
        super().__init__()
        self.student, self.objective = student, objective


class ObjectiveStep:
    """One training step with ``DistillationLoss`` against the frozen teacher."""

    def __init__(self, teacher):
        self.teacher, self.last_terms = teacher, None

    def __call__(self, pair, x, y):
        with torch.no_grad():                                   # the teacher is a constant
            t_out = self.teacher(x, output_hidden_states=True)
        s_out = pair.student(x, output_hidden_states=True)
        total, terms = pair.objective(s_out, t_out, y)
        total.backward()
        pair.objective.step()                                   # advances the weight schedules
        self.last_terms = {k: float(v) for k, v in terms.items()}


def build_objective(variant, cfg, steps):
    """The objective of one student variant: "kd", "features" or "relations" (features too)."""
    settings = dict(divergence="forward_kl", temperature=cfg.temperature, alpha=cfg.alpha)
    if variant == "kd":
        return DistillationLoss(**settings)
    layers = 2                                                   # TinyLM's default depth
    features = FeatureDistillation({i: i for i in range(1, layers + 1)}, cfg.student_dim, cfg.teacher_dim,
                                   kind=FEATURE_KIND)

    def feature_weight(step):
        return FEATURE_WEIGHT * max(0.0, 1.0 - step / steps)

    weights = {"features": feature_weight}
    relations = None
    if variant == "relations":
        relations = RelationDistillation(RELATION_KIND)
        weights["relations"] = RELATION_WEIGHT
    return DistillationLoss(features=features, relations=relations, weights=weights, **settings)


def verdict(gain, noise):
    if gain > noise:
        return f"helped ({gain:+.4f})"
    if gain < -noise:
        return f"hurt ({gain:+.4f})"
    return f"no clear effect ({gain:+.4f}, within +-{noise})"


# Differences smaller than this are not read as an effect: the held-out loss of one
# variant spans 0.027-0.033 nats/token over three student initialisations with the same
# data and teacher (quick mode, seed 0; docs/objective.md).
NOISE = 0.03

QUICK = tiny.QUICK


def prepare(cfg, seed):
    """Language, held-out text, the trained teacher and the students' batches, exactly as
    distill_tiny_lm.py makes them (same seeds, same order)."""
    rng = np.random.default_rng(seed)
    source = tiny.TopicBigramSource(cfg.vocab, rng)
    length = cfg.seq_len + 1
    heldout = source.sample(cfg.heldout_seqs, length, rng)
    teacher_data = source.sample(cfg.teacher_steps * cfg.batch, length, rng)
    student_data = source.sample(cfg.student_train_seqs, length, rng)
    heldout, teacher_data, student_data = map(torch.from_numpy, (heldout, teacher_data, student_data))

    torch.manual_seed(seed)
    teacher = TinyLMWithHidden(cfg.vocab, cfg.teacher_dim, cfg.seq_len)
    tiny.train(teacher, teacher_data.split(cfg.batch), tiny.ce_step, lr=cfg.lr)
    teacher.requires_grad_(False)

    shuffle = np.random.default_rng(seed + 1)
    epochs = -(-cfg.student_steps * cfg.batch // cfg.student_train_seqs)
    order = np.concatenate([shuffle.permutation(cfg.student_train_seqs) for _ in range(epochs)])
    order = torch.from_numpy(order[: cfg.student_steps * cfg.batch]).view(cfg.student_steps, cfg.batch)
    return SimpleNamespace(source=source, heldout=heldout, teacher=teacher,
                           batches=[student_data[idx] for idx in order])


def train_student(setup, cfg, variant, init_seed):
    """One student ("ce", "kd", "features" or "relations") from the weights ``init_seed`` gives.

    Returns the student, its objective's terms at the last step and the number of the
    objective's own (projection) parameters.
    """
    torch.manual_seed(init_seed)
    student = TinyLMWithHidden(cfg.vocab, cfg.student_dim, cfg.seq_len)
    if variant == "ce":
        tiny.train(student, setup.batches, tiny.ce_step, lr=cfg.lr)
        return student, None, 0
    # Built after the student, so the projections' initialisation does not change the student's.
    objective = build_objective(variant, cfg, cfg.student_steps)
    step = ObjectiveStep(setup.teacher)
    tiny.train(StudentWithObjective(student, objective), setup.batches, step, lr=cfg.lr)
    return student, step.last_terms, sum(p.numel() for p in objective.parameters())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (about 25 s on 2 cores), used by the test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else tiny.DEFAULT
    wall = time.perf_counter()

    setup = prepare(cfg, args.seed)
    results = {"optimal": setup.source.optimal_loss(setup.heldout.numpy()),
               "teacher": tiny.heldout_loss(setup.teacher, setup.heldout)}
    final_terms, n_projection_params = {}, 0
    for variant in ("ce", "kd", "features", "relations"):
        # Every student starts from the same weights and sees the same batches.
        student, terms, n_params = train_student(setup, cfg, variant, args.seed + 1)
        results[variant] = tiny.heldout_loss(student, setup.heldout)
        final_terms[variant] = terms
        n_projection_params = max(n_projection_params, n_params)
    results["vocab"] = cfg.vocab
    results["seconds"] = time.perf_counter() - wall
    results["backend"] = resolve_backend("auto", torch.device("cpu"))
    results["final_terms"] = final_terms

    mode = " (--quick)" if args.quick else ""
    print(f"\nheld-out: {cfg.heldout_seqs * cfg.seq_len} tokens, vocabulary {cfg.vocab}, seed {args.seed}{mode}")
    print(f"{'model':<44}{'loss (nats/tok)':>16}{'perplexity':>12}")
    rows = [("Bayes-optimal (knows the source)", "optimal"),
            (f"teacher  d={cfg.teacher_dim}, {cfg.teacher_steps * cfg.batch} seqs", "teacher"),
            (f"student  d={cfg.student_dim}, CE only", "ce"),
            (f"student  d={cfg.student_dim}, logits KD", "kd"),
            (f"student  d={cfg.student_dim}, logits + features", "features"),
            (f"student  d={cfg.student_dim}, logits + features + relations", "relations")]
    for name, key in rows:
        print(f"{name:<44}{results[key]:>16.4f}{math.exp(results[key]):>12.1f}")
    print(f"(students: {cfg.student_train_seqs} training seqs, {cfg.student_steps} steps, fastkd backend "
          f"{results['backend']};\n logits = forward_kl, T={cfg.temperature}, alpha={cfg.alpha}; "
          f"features = {FEATURE_KIND} after both blocks through {cfg.student_dim}->{cfg.teacher_dim} projections "
          f"({n_projection_params} parameters), weight {FEATURE_WEIGHT} -> 0 linearly;\n relations = "
          f"{RELATION_KIND} on mean-pooled last hidden states, weight {RELATION_WEIGHT})")
    last = final_terms["relations"]
    print("last step's terms (unweighted) of the last student: "
          + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    print(f"logits KD vs CE only: {verdict(results['ce'] - results['kd'], NOISE)}")
    print(f"features on top of logits KD: {verdict(results['kd'] - results['features'], NOISE)}")
    print(f"relations on top of features: {verdict(results['features'] - results['relations'], NOISE)}")
    print(f"total {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
