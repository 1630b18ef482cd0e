"""fastkd.integrations.transformers: KDTrainer against fastkd's own functions and HF's own loss.

Tiny random Llama models built from configs (no downloads), CPU, fp32.
"""
import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import fastkd  # noqa: E402
from fastkd.integrations.transformers import KDTrainer, shift_causal_labels  # noqa: E402

from harness import processes

V = 97          # odd vocabulary
L = 12          # sequence length
# Valid-label lengths of the samples: every split into micro-batches of 2 has unequal
# token counts (18|4, 14|8, 12|10), so a per-micro-batch mean would weigh tokens wrongly.
LENGTHS = (11, 7, 3, 1)


def tiny_llama(hidden, seed, vocab=V, **config):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def batch_tensors(n=4, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, L), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for i in range(n):
        k = lengths[i % len(lengths)]
        labels[i, k + 1:] = -100   # k valid targets after the shift (positions 1..k)
        mask[i, k + 1:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def as_dataset(batch):
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=4, max_steps=1, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", max_grad_norm=0.0, seed=42, disable_tqdm=True,
                logging_strategy="no")
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(32, 0), tiny_llama(48, 1)


def make_trainer(tmp_path, student, teacher, batch=None, args=None, **kd):
    return KDTrainer(model=student, teacher_model=teacher, args=args or training_args(tmp_path),
                     train_dataset=None if batch is None else as_dataset(batch), **kd)


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------
# The loss against fastkd's functions and HF's own causal-LM loss.

def test_shift_matches_hf_causal_lm_loss(models):
    # alpha=0 leaves only the cross-entropy: it must be exactly HF's own loss for the model.
    student, _ = models
    b = batch_tensors()
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    hf = student(**b).loss
    ours = fastkd.kd_loss(logits, logits.detach(), shift_causal_labels(b["labels"]), alpha=0.0)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)


SETTINGS = [
    dict(divergence="forward_kl", temperature=2.0, alpha=0.5),
    dict(divergence="jsd", beta=0.3, temperature=1.0),
    dict(divergence="reverse_kl", temperature=1.5, alpha=0.8, t_squared=False),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["divergence"])
def test_compute_loss_equals_kd_loss_by_hand(tmp_path, models, settings):
    student, teacher = models
    trainer = make_trainer(tmp_path, student, teacher, **settings)
    b = batch_tensors()
    student.zero_grad()
    loss = trainer.compute_loss(student, dict(b))
    loss.backward()
    g_trainer = grads_of(student)

    # By hand: the logits at positions 0..L-2 against the labels at 1..L-1.
    student.zero_grad()
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = fastkd.kd_loss(s[:, :-1], t[:, :-1], b["labels"][:, 1:], **settings)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    for g, r in zip(g_trainer, grads_of(student)):
        assert rel(g, r) < 1e-5
    # And against the float64 ground truth on the same logits.
    ref64 = fastkd.reference.kd_loss(s[:, :-1].double(), t[:, :-1].double(), b["labels"][:, 1:], **settings)
    assert abs(loss.item() - ref64.item()) < 1e-5 * abs(ref64.item())
    student.zero_grad()


def test_inplace_backward_option(tmp_path, models):
    student, teacher = models
    b = batch_tensors()
    grads = []
    for inplace in (False, True):
        trainer = make_trainer(tmp_path, student, teacher, kd_kwargs=dict(temperature=2.0, inplace_backward=inplace))
        student.zero_grad()
        trainer.compute_loss(student, dict(b)).backward()
        grads.append(grads_of(student))
    student.zero_grad()
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_shift_labels_in_batch_used_as_is(tmp_path, models):
    student, teacher = models
    trainer = make_trainer(tmp_path, student, teacher, temperature=2.0, alpha=0.5)
    b = batch_tensors()
    with torch.no_grad():
        expected = trainer.compute_loss(student, dict(b))
        shifted = dict(b, shift_labels=shift_causal_labels(b["labels"]), labels=torch.full_like(b["labels"], 5))
        torch.testing.assert_close(trainer.compute_loss(student, shifted), expected)


# ---------------------------------------------------------------------------------------
# Gradient accumulation: the loss is normalised by the step's token count.

class RecordingKDTrainer(KDTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append((inputs["labels"].clone(), num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class GradientCapture(transformers.TrainerCallback):
    """Copies the model's accumulated gradients just before the optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def one_step_gradients(tmp_path, student, teacher, batch, accumulation):
    model = copy.deepcopy(student)
    args = training_args(tmp_path, per_device_train_batch_size=4 // accumulation,
                         gradient_accumulation_steps=accumulation)
    capture = GradientCapture(model)
    trainer = RecordingKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=as_dataset(batch),
                                 callbacks=[capture], temperature=2.0, alpha=0.5)
    trainer.seen = []
    trainer.train()
    return capture.grads, trainer.seen


def test_gradient_accumulation_equals_full_batch(tmp_path, models):
    student, teacher = models
    b = batch_tensors()
    g_full, seen_full = one_step_gradients(tmp_path, student, teacher, b, accumulation=1)
    g_accum, seen_accum = one_step_gradients(tmp_path, student, teacher, b, accumulation=2)

    # Trainer's num_items_in_batch is the step's count of valid *shifted* labels.
    assert len(seen_accum) == 2 and len(seen_full) == 1
    n_valid = sum(LENGTHS)
    for labels, num_items in seen_full + seen_accum:
        assert int(num_items) == n_valid
    assert sorted(int((lab[:, 1:] != -100).sum()) for lab, _ in seen_accum) != [n_valid // 2] * 2

    for n in g_full:
        assert rel(g_accum[n], g_full[n]) < 1e-5, n

    # The full-batch gradient by hand, and the per-micro-batch-mean pitfall, which differs.
    def grad_of_mean(rows):
        model = copy.deepcopy(student)
        sub = {k: v[rows] for k, v in b.items()}
        s = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        with torch.no_grad():
            t = teacher(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        fastkd.kd_loss(s, t, shift_causal_labels(sub["labels"]), temperature=2.0, alpha=0.5).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    by_hand = grad_of_mean(list(range(4)))
    for n in g_full:
        assert rel(g_full[n], by_hand[n]) < 1e-5, n
    row_of = {tuple(b["labels"][i].tolist()): i for i in range(4)}
    micro = [[row_of[tuple(r.tolist())] for r in lab] for lab, _ in seen_accum]
    g1, g2 = grad_of_mean(micro[0]), grad_of_mean(micro[1])
    naive = {n: (g1[n] + g2[n]) / 2 for n in g1}
    assert max(rel(naive[n], g_full[n]) for n in g_full) > 1e-2


# ---------------------------------------------------------------------------------------
# Fused-linear mode: same loss and gradients, the logits never materialised.

def check_fused_equals_logits_path(tmp_path, student, teacher, batch, **kd):
    """One step in logits mode and one in fused-linear mode: the same loss and student
    gradients, the teacher untouched. Returns the fused trainer and the logits-mode loss."""
    results = []
    for fused in (False, True):
        trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused, **kd)
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        results.append((loss.detach(), grads_of(student)))
    (loss_ref, g_ref), (loss_fused, g_fused) = results
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-6, atol=1e-7)
    for g, r in zip(g_fused, g_ref):
        assert rel(g, r) < 1e-5
    assert all(p.grad is None for p in teacher.parameters())
    return trainer, loss_ref


def tiny_from(config_cls, seed, **config):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(vocab_size=V, **config))


@pytest.mark.parametrize("case", ["plain", "tied", "padded_teacher_vocab", "qwen2", "gpt2"])
def test_fused_linear_equals_logits_path(tmp_path, case):
    kd = dict(divergence="forward_kl", temperature=2.0, alpha=0.5)
    if case == "qwen2":
        student, teacher = tiny_from("Qwen2Config", 0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2), tiny_llama(48, 1)
    elif case == "gpt2":   # tied head, learned positions, a different decoder
        student, teacher = tiny_from("GPT2Config", 0, n_embd=32, n_layer=1, n_head=4), tiny_llama(48, 1)
    elif case == "tied":
        student, teacher = tiny_llama(32, 0, tie_word_embeddings=True), tiny_llama(48, 1)
    elif case == "padded_teacher_vocab":
        student, teacher = tiny_llama(32, 0), tiny_llama(48, 1, vocab=V + 11)
        kd["vocab_size"] = V
    else:
        student, teacher = tiny_llama(32, 0), tiny_llama(48, 1)
    b = batch_tensors()
    check_fused_equals_logits_path(tmp_path, student, teacher, b, **kd)


def test_fused_linear_never_builds_full_logits(tmp_path, models):
    student, teacher = models
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=True, temperature=2.0)
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, i, o: shapes.append(tuple(o.shape)))
             for m in (student, teacher)]
    try:
        trainer.compute_loss(student, batch_tensors()).backward()
    finally:
        for h in hooks:
            h.remove()
        student.zero_grad()
    assert shapes and all(s[1] == 1 for s in shapes), shapes   # [B, 1, V]: the last position only


# ---------------------------------------------------------------------------------------
# Training runs: the student learns, the teacher stays as it was.

@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_three_step_train_run(tmp_path, fused):
    student, teacher = tiny_llama(32, 0), tiny_llama(48, 1)
    teacher.train()   # KDTrainer must switch it to eval mode
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    b = batch_tensors()
    args = training_args(tmp_path, max_steps=3, learning_rate=3e-2, optim="adamw_torch", logging_steps=1,
                         logging_strategy="steps", max_grad_norm=1.0)
    trainer = make_trainer(tmp_path, student, teacher, batch=b, args=args, temperature=2.0, alpha=0.5,
                           fused_linear=fused)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # one 4-sample batch, seen three times

    # The logged loss of step 1 is the loss of the untouched models on the whole batch.
    with torch.no_grad():
        s = tiny_llama(32, 0)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        first = fastkd.kd_loss(s, t, shift_causal_labels(b["labels"]), temperature=2.0, alpha=0.5).item()
    assert abs(losses[0] - first) < 1e-4 * abs(first)

    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}

    # Saving writes the student only.
    trainer.save_model(str(tmp_path / "saved"))
    saved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert saved.config.hidden_size == 32
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, student.state_dict()[k])


def test_evaluate_reports_the_kd_loss(tmp_path, models):
    student, teacher = models
    b = batch_tensors()
    for fused in (False, True):
        trainer = KDTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                            eval_dataset=as_dataset(b), temperature=2.0, alpha=0.5, fused_linear=fused)
        metrics = trainer.evaluate()
        with torch.no_grad():
            expected = trainer.compute_loss(student, dict(b), num_items_in_batch=None).item()
        assert abs(metrics["eval_loss"] - expected) < 1e-5 * abs(expected)


# ---------------------------------------------------------------------------------------
# Clear errors.

def test_error_different_vocab_without_vocab_size(tmp_path, models):
    student, _ = models
    teacher = tiny_llama(48, 1, vocab=V + 11)
    with pytest.raises(ValueError, match=f"pass vocab_size={V}"):
        make_trainer(tmp_path, student, teacher)
    with pytest.raises(ValueError, match="larger than"):
        make_trainer(tmp_path, student, teacher, vocab_size=V + 1)


def test_error_unknown_logit_postprocessing_in_fused_linear(tmp_path):
    # A family whose forward fastkd has not read (Llama ignores this attribute, but another
    # model might not): fused-linear mode cannot know the transform and refuses.
    student = tiny_llama(32, 0, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 on a 'llama' model"):
        make_trainer(tmp_path, student, tiny_llama(48, 1), fused_linear=True)
    make_trainer(tmp_path, student, tiny_llama(48, 1), fused_linear=False)   # the logits path is fine


def test_error_head_that_rescales_logits(tmp_path):
    # A head the config check cannot see: the first fused step compares the model's own logits.
    student, teacher = tiny_llama(32, 0), tiny_llama(48, 1)
    student.lm_head.register_forward_hook(lambda mod, i, out: out * 2.0)
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=True)
    with pytest.raises(ValueError, match="not its decoder output times its LM head"):
        trainer.compute_loss(student, batch_tensors())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(reduction="sum"), ValueError, "reduction='mean'"),
    (dict(kd_kwargs={"temperatur": 2.0}), TypeError, "unknown loss keyword 'temperatur'"),
    (dict(temperatur=2.0), TypeError, "temperatur"),   # a direct keyword: Trainer's own error
    (dict(chunk_size=8), ValueError, "fused_linear=True only"),
    (dict(ignore_index=0), ValueError, "ignore_index=-100"),
    (dict(compute_loss_func=lambda *a, **k: 0), ValueError, "compute_loss_func"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(kd_kwargs={"alpha": 0.5}, alpha=0.3), TypeError, "both in kd_kwargs"),
])
def test_error_bad_arguments(tmp_path, models, kw, exc, match):
    student, teacher = models
    with pytest.raises(exc, match=match):
        make_trainer(tmp_path, student, teacher, **kw)


def test_error_missing_teacher_labels_and_label_smoothing(tmp_path, models):
    student, teacher = models
    with pytest.raises(TypeError, match="teacher_model"):
        KDTrainer(model=student, args=training_args(tmp_path))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        make_trainer(tmp_path, student, teacher, args=training_args(tmp_path, label_smoothing_factor=0.1))
    trainer = make_trainer(tmp_path, student, teacher, kd_kwargs={"temperature": 2.0})
    b = batch_tensors()
    del b["labels"]
    with pytest.raises(ValueError, match="needs `labels`"):
        trainer.compute_loss(student, b)


def test_import_fastkd_does_not_import_transformers():
    code = "import sys, fastkd; assert 'transformers' not in sys.modules and 'trl' not in sys.modules"
    processes.run([sys.executable, "-c", code], check=True, timeout=300)


def test_bf16_mixed_precision_step(tmp_path, models):
    # Accelerate runs the prepared student under autocast; the teacher and the fused head
    # matmuls get the same autocast. One step each way: the losses agree to bf16 precision.
    student, teacher = models
    b = batch_tensors()
    losses = {}
    for fused in (False, True):
        args = training_args(tmp_path, bf16=True, logging_steps=1, logging_strategy="steps")
        trainer = make_trainer(tmp_path, copy.deepcopy(student), teacher, batch=b, args=args,
                               temperature=2.0, alpha=0.5, fused_linear=fused)
        trainer.train()
        losses[fused] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    with torch.no_grad():
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        fp32 = fastkd.kd_loss(s, t, shift_causal_labels(b["labels"]), temperature=2.0, alpha=0.5).item()
    for loss in losses.values():
        assert abs(loss - fp32) < 2e-2 * fp32, (losses, fp32)


def test_data_parallel_scaling_matches_trainer(tmp_path, models, monkeypatch):
    # With N processes Trainer's num_items_in_batch counts every process's tokens and DDP
    # averages gradients, so the loss is multiplied by N (as Trainer.compute_loss does).
    student, teacher = models
    trainer = make_trainer(tmp_path, student, teacher, temperature=2.0)
    b = batch_tensors()
    n = int((b["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        one = trainer.compute_loss(student, dict(b), num_items_in_batch=torch.tensor(3 * n))
        monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 3))
        three = trainer.compute_loss(student, dict(b), num_items_in_batch=torch.tensor(3 * n))
        unscaled = trainer.compute_loss(student, dict(b))
    torch.testing.assert_close(one * 3, three)
    torch.testing.assert_close(three, unscaled)   # the local mean, as each rank's share


# ---------------------------------------------------------------------------------------
# Logits post-processed after the LM head (Gemma 2's softcap, Cohere's and Granite's scales):
# fused-linear mode applies the models' transforms, read from their configs.

from fastkd.integrations.heads import FAMILIES, HeadTransform, head_transform  # noqa: E402
from fastkd.integrations.transformers import _check_head_reproduces_logits  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def with_large_logits(model, factor=20.0):
    # Random tiny models have logits of size ~0.5, where a cap of 3 changes nothing: scale
    # the head so the logits reach ~10 and the transforms matter.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def tiny_gemma2(seed, cap=3.0):
    return with_large_logits(tiny_from("Gemma2Config", seed, head_dim=8, final_logit_softcapping=cap, **SMALL))


def tiny_cohere(seed, scale=0.25):
    return with_large_logits(tiny_from("CohereConfig", seed, logit_scale=scale, **SMALL))


def tiny_granite(seed, scaling=0.25):   # logits / 0.25: logit_scale 4
    return tiny_from("GraniteConfig", seed, logits_scaling=scaling, **SMALL)


# Every family of heads.FAMILIES: the config class and a non-neutral value of its attribute.
FAMILY_CONFIGS = {
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=3.0)),
    "vaultgemma": ("VaultGemmaConfig", dict(head_dim=8, final_logit_softcapping=3.0)),
    "nanochat": ("NanoChatConfig", dict(final_logit_softcapping=3.0)),
    "cohere": ("CohereConfig", dict(logit_scale=4.0)),
    "cohere2": ("Cohere2Config", dict(logit_scale=4.0)),
    "cohere2_moe": ("Cohere2MoeConfig", dict(logit_scale=4.0)),
    "granite": ("GraniteConfig", dict(logits_scaling=3.0)),
    "granitemoe": ("GraniteMoeConfig", dict(logits_scaling=3.0, num_local_experts=2, num_experts_per_tok=1)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(logits_scaling=3.0, num_local_experts=2,
                                                        num_experts_per_tok=1)),
    "falcon_h1": ("FalconH1Config", dict(lm_head_multiplier=4.0)),
    "hyperclovax": ("HyperCLOVAXConfig", dict(logits_scaling=4.0)),
}


def test_head_transform_reproduces_every_known_family():
    """Each family's transform, applied to its LM head's output, is the model's own logits
    (what its forward in the installed transformers computes), and differs from the raw head."""
    assert set(FAMILY_CONFIGS) == set(FAMILIES)
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    for family, (config_cls, extra) in FAMILY_CONFIGS.items():
        model = with_large_logits(tiny_from(config_cls, 0, **extra, **SMALL))
        assert model.config.model_type == family
        transform = head_transform(model)
        assert not transform.is_identity, family
        captured = []
        hook = model.get_decoder().register_forward_hook(lambda mod, args, out: captured.append(out))
        with torch.no_grad():
            logits = model(input_ids=ids, logits_to_keep=1).logits
            hook.remove()
            raw = model.get_output_embeddings()(captured[0].last_hidden_state[:, -1:])
        torch.testing.assert_close(transform.apply(raw), logits, rtol=1e-6, atol=1e-5, msg=family)
        assert (raw - logits).abs().max() > 1.0, family
    # Neutral values are the identity; a plain family has none.
    assert head_transform(tiny_from("Gemma2Config", 0, head_dim=8, final_logit_softcapping=None, **SMALL)) \
        == HeadTransform()
    assert head_transform(tiny_llama(32, 0)) == HeadTransform()
    assert head_transform(torch.nn.Linear(2, 3)) == HeadTransform()
    assert head_transform(tiny_granite(0, scaling=3.0)).logit_scale == pytest.approx(1 / 3.0, rel=1e-15)


LOGIT_CASES = {
    "gemma2_student": lambda: (tiny_gemma2(0), tiny_llama(48, 1)),
    "gemma2_teacher": lambda: (tiny_llama(32, 0), tiny_gemma2(1)),
    "cohere_student_gemma2_teacher": lambda: (tiny_cohere(0), tiny_gemma2(1, cap=5.0)),
    "granite_teacher": lambda: (tiny_llama(32, 0), tiny_granite(1)),
}


def untransformed(model):
    """The model with its post-head transform switched off (to show the transform matters)."""
    model = copy.deepcopy(model)
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        model.config.final_logit_softcapping = None
    if hasattr(model, "logit_scale"):
        model.logit_scale = 1.0
    if getattr(model.config, "logits_scaling", None) is not None:
        model.config.logits_scaling = 1.0
    return model


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_fused_linear_applies_the_models_logit_transforms(tmp_path, case):
    """Same loss and student gradients as the logits path, where the models transform their
    own logits (same tolerances as test_fused_linear_equals_logits_path)."""
    student, teacher = LOGIT_CASES[case]()
    kd = dict(divergence="forward_kl", temperature=2.0, alpha=0.5)
    b = batch_tensors()
    trainer, loss_ref = check_fused_equals_logits_path(tmp_path, student, teacher, b, **kd)
    student.zero_grad()
    with torch.no_grad():   # evaluation reads the models' logits, already transformed: not twice
        loss_eval, _ = trainer.compute_loss(student, dict(b), return_outputs=True)
    torch.testing.assert_close(loss_eval, loss_ref, rtol=1e-6, atol=1e-7)
    fused_settings = trainer.fused_kd_loss_fn.config
    assert (fused_settings.softcap, fused_settings.logit_scale) == \
        (head_transform(student).softcap, head_transform(student).logit_scale)
    assert (fused_settings.teacher_cap, fused_settings.teacher_scale) == \
        (head_transform(teacher).softcap, head_transform(teacher).logit_scale)

    # The transforms matter: without them the loss is another one.
    with torch.no_grad():
        plain = make_trainer(tmp_path, untransformed(student), untransformed(teacher), **kd)
        loss_plain = plain.compute_loss(plain.model, dict(b))
    assert abs(loss_plain.item() - loss_ref.item()) > 1e-2 * abs(loss_ref.item()), (loss_plain, loss_ref)


def test_head_check_applies_the_transform(tmp_path):
    # The one-time check compares transform(hidden @ W.T) with the model's logits: the
    # identity transform does not reproduce a soft-capped Gemma 2.
    gemma = tiny_gemma2(0)
    captured = []
    hook = gemma.get_decoder().register_forward_hook(lambda mod, args, out: captured.append(out))
    with torch.no_grad():
        last = gemma(input_ids=batch_tensors()["input_ids"], logits_to_keep=1).logits
    hook.remove()
    hidden = captured[0].last_hidden_state
    _check_head_reproduces_logits("student", hidden, gemma.lm_head, last, head_transform(gemma))
    with pytest.raises(ValueError, match=r"not its decoder output times its LM head \(max difference"):
        _check_head_reproduces_logits("student", hidden, gemma.lm_head, last, HeadTransform())
    with pytest.raises(ValueError, match=r"LM head, transformed by config.final_logit_softcapping=2.0 \(gemma2\)"):
        _check_head_reproduces_logits("student", hidden, gemma.lm_head, last,
                                      HeadTransform(softcap=2.0, source="config.final_logit_softcapping=2.0 (gemma2)"))


@pytest.mark.parametrize("kw, match", [
    (dict(softcap=5.0), r"softcap=5.0 was given, but the student's own logits have softcap=3.0"),
    (dict(logit_scale=2.0), r"logit_scale=2.0 was given, but the student's own logits have logit_scale=1.0"),
    (dict(teacher_softcap=3.0), r"teacher_softcap=3.0 was given, but the teacher's own logits have softcap=None"),
    (dict(teacher_softcap=fastkd.config.SAME_AS_STUDENT), r"teacher_softcap=SAME_AS_STUDENT \(the student's\)"),
    (dict(teacher_logit_scale=0.5), r"teacher_logit_scale=0.5 was given"),
])
def test_error_explicit_logit_settings_in_fused_linear(tmp_path, kw, match):
    student, teacher = tiny_gemma2(0), tiny_llama(48, 1)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, student, teacher, fused_linear=True, **kw)


def test_explicit_logit_settings_equal_to_the_configs_are_accepted(tmp_path):
    student, teacher = tiny_gemma2(0), tiny_llama(48, 1)
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=True, softcap=3.0, logit_scale=1.0,
                           teacher_softcap=None, teacher_logit_scale=1.0)
    assert (trainer.fused_kd_loss_fn.config.softcap, trainer.fused_kd_loss_fn.config.teacher_cap) == (3.0, None)
    # The logits path (evaluation) reads the models' own, already capped logits: no options.
    assert trainer.kd_loss_fn.config.softcap is None and trainer.kd_loss_fn.config.teacher_cap is None


@pytest.mark.parametrize("pair, kw, match", [
    ("gemma_llama", dict(softcap=3.0), r"softcap=3.0 was given, but the student's logits already have it"),
    ("llama_gemma", dict(softcap=2.0), r"teacher_softcap \(by default the student's softcap\) is 2.0"),
    ("llama_gemma", dict(teacher_softcap=3.0), r"teacher_softcap=3.0 was given, but the teacher's"),
    ("cohere_llama", dict(logit_scale=2.0), r"logit_scale=2.0 was given.*would apply logit_scale twice"),
])
def test_error_double_transform_in_logits_mode(tmp_path, pair, kw, match):
    models = {"gemma_llama": lambda: (tiny_gemma2(0), tiny_llama(48, 1)),
              "llama_gemma": lambda: (tiny_llama(32, 0), tiny_gemma2(1)),
              "cohere_llama": lambda: (tiny_cohere(0), tiny_llama(48, 1))}
    student, teacher = models[pair]()
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, student, teacher, **kw)


def test_logits_mode_options_that_are_not_applied_twice(tmp_path):
    # A cap on a plain student only, and a cap on a scaled (not capped) Cohere: each applied once.
    b = batch_tensors()
    for student, teacher, kw in ((tiny_llama(32, 0), tiny_gemma2(1), dict(softcap=2.0, teacher_softcap=None)),
                                 (tiny_cohere(0), tiny_llama(48, 1), dict(softcap=2.0, teacher_softcap=None))):
        trainer = make_trainer(tmp_path, student, teacher, temperature=2.0, **kw)
        with torch.no_grad():
            loss = trainer.compute_loss(student, dict(b))
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref = fastkd.reference.kd_loss(s.double(), t.double(), shift_causal_labels(b["labels"]), temperature=2.0,
                                       **kw)
        assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_error_known_attribute_that_is_not_a_positive_number(tmp_path):
    student = tiny_cohere(0)
    student.logit_scale = -0.5            # what Cohere's forward multiplies by
    with pytest.raises(ValueError, match=r"config.logit_scale=-0.5 of a 'cohere' model: .* finite positive"):
        make_trainer(tmp_path, student, tiny_llama(48, 1), fused_linear=True)
    make_trainer(tmp_path, student, tiny_llama(48, 1), fused_linear=False)   # the logits path reads its logits
