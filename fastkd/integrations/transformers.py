"""Knowledge distillation inside a Hugging Face ``transformers.Trainer``.

``KDTrainer`` is a ``Trainer`` whose loss is fastkd's: the student (``model``) is trained,
the teacher (``teacher_model``) is run under ``torch.no_grad()`` in eval mode on the same
batch, and the loss between their next-token distributions is :func:`fastkd.kd_loss` (or,
with ``fused_linear=True``, :func:`fastkd.fused_linear_kd_loss`, which never builds either
side's ``[tokens, vocab]`` logits). ``KDTrainerMixin`` carries all of it, for use with
another ``Trainer`` subclass: ``class MyKD(KDTrainerMixin, MyTrainer)``.

How the parts fit Trainer (transformers 5.x; written against 5.24):

* **Labels** are shifted as transformers' own causal-LM loss shifts them
  (``transformers.loss.loss_utils.ForCausalLMLoss``): the labels are padded at the end
  with ``ignore_index`` and the first column is dropped, so the logits at position ``i``
  are scored against ``labels[i + 1]`` and the last position counts for nothing. A batch
  that carries ``shift_labels`` (padding-free collators) is used as it is. A token whose
  shifted label is ``-100`` is left out of every term, the divergence included: prompt
  and padding tokens are not distilled.
* **Gradient accumulation.** Trainer counts the valid (shifted) labels of a whole
  optimizer step, over all its micro-batches and processes, and passes that count as
  ``num_items_in_batch``. ``KDTrainer`` hands it to fastkd as ``num_items`` (the
  denominator of ``reduction="mean"``), so each micro-batch returns *its token sum
  divided by the step's token count*, and the micro-batch losses add up to the mean over
  the whole step. Trainer only counts when ``model_accepts_loss_kwargs`` is true and then
  does not divide the loss by ``gradient_accumulation_steps`` again; ``KDTrainer`` sets
  that attribute (it computes the loss itself, so the flag says nothing about the
  model) and counts labels shifted. Without labels in a batch there is no count, and
  Trainer falls back to dividing the per-micro-batch mean by the accumulation steps.
* **Teacher**: moved to the training device when Trainer places the student (otherwise
  it must already be on the student's device), put in eval mode, never given to the
  optimizer and never saved: checkpoints and ``save_model`` hold the student only.
* **Logits transformed after the LM head** (Gemma 2's ``final_logit_softcapping``,
  Cohere's ``logit_scale``, Granite's ``logits_scaling``; :mod:`fastkd.integrations.heads`
  reads them): in fused-linear mode the loss computes the logits itself and applies each
  model's transform from its config (the student's as ``logit_scale`` / ``softcap``, the
  teacher's as ``teacher_logit_scale`` / ``teacher_softcap``); passing one of those four
  settings too is an error unless it is the same value. In logits mode the models' logits
  are already transformed, and a ``softcap`` (``logit_scale``) setting that would apply to
  a model whose config already soft-caps (scales) is an error: it would apply twice.

The sparse (top-k) teacher cache of fastkd has not landed: the teacher runs on every
batch and its full distribution is used.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

import torch

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastkd.integrations.transformers needs the `transformers` package "
                      "(pip install transformers)") from exc

from ..config import SETTING_NAMES, make_config
from ..api import KDLoss
from ..fused_linear import FusedLinearKDLoss
from .heads import (LOGIT_SETTINGS, HeadTransform, UnknownHeadTransform, check_no_double_transform,
                    fused_linear_logit_settings, head_transform)

__all__ = ["KDTrainer", "KDTrainerMixin", "shift_causal_labels", "KD_OPTIONS"]

# Keywords KDTrainer takes for the loss: the settings of fastkd.make_config, then the
# per-call options of kd_loss / fused_linear_kd_loss.
CALL_OPTIONS = ("backend", "inplace_backward", "chunk_size")
KD_OPTIONS = SETTING_NAMES + CALL_OPTIONS

def shift_causal_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The causal-LM targets of each logits position: ``labels[..., i + 1]``, ``ignore_index`` last.

    The same alignment as transformers' ``ForCausalLMLoss`` (pad the end with
    ``ignore_index``, drop the first column), in the shape of ``labels``, so the full
    ``[B, L, V]`` logits can be used without slicing (no copy).
    """
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _model_output_logits(outputs) -> torch.Tensor:
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"KDTrainer: the model returned no `logits` (keys: {', '.join(outputs.keys())})")
        return outputs["logits"]
    return outputs[0]


def _config_of(model) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # some configs' text lookup needs sub-configs they lack
            return config
    return config


def _lm_head(model, role: str) -> torch.nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"KDTrainer(fused_linear=True): the {role}'s output embeddings "
                         f"({type(head).__name__}) are not a linear LM head with a [V, H] weight; "
                         "use fused_linear=False")
    return head


def _vocab_of(model) -> Optional[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    config = _config_of(model)
    return getattr(config, "vocab_size", None)


def _check_fused_linear_model(model, role: str) -> HeadTransform:
    """Refuse models whose logits fused-linear mode cannot compute; return the transform
    their forward applies after the LM head (the loss applies it to its own logits)."""
    try:
        transform = head_transform(model)
    except UnknownHeadTransform as exc:
        raise ValueError(f"KDTrainer(fused_linear=True): the {role} ({type(model).__name__}) has {exc}. "
                         "Use fused_linear=False (the loss then reads the model's own logits).") from None
    except ValueError as exc:
        raise ValueError(f"KDTrainer(fused_linear=True): the {role} ({type(model).__name__}): {exc}") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ValueError(
            f"KDTrainer(fused_linear=True): the {role}'s forward ({type(base).__name__}) takes no "
            "`logits_to_keep`; fused-linear mode needs it to keep the model from computing its "
            "full logits. Use fused_linear=False.")
    decoder = getattr(model, "get_decoder", lambda: None)()
    if not isinstance(decoder, torch.nn.Module) or decoder is model or decoder is base:
        raise ValueError(f"KDTrainer(fused_linear=True): cannot find the {role}'s decoder "
                         "(model.get_decoder()) whose output the LM head reads; use fused_linear=False")
    _lm_head(model, role)
    return transform


def _logits_transform(model) -> Optional[HeadTransform]:
    """The transform ``model``'s forward applies to its logits; None where it is unknown."""
    try:
        return head_transform(model)
    except ValueError:  # UnknownHeadTransform too: logits mode reads whatever the model computes
        return None


def _decoder_hidden_and_logits(call, model, inputs: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``call(**inputs)`` (the possibly wrapped ``model``) keeping only the last logits.

    A forward hook on ``model.get_decoder()`` captures the decoder's ``last_hidden_state``,
    the tensor a causal LM feeds its LM head; ``logits_to_keep=1`` makes the model apply
    its head to the last position only (``[B, 1, V]``, a small tensor kept for a check).
    Calling the wrapped model, not the decoder alone, keeps DDP's gradient hooks working.
    """
    decoder = model.get_decoder()
    captured = []

    def hook(module, args, output):
        captured.append(output)

    handle = decoder.register_forward_hook(hook)
    try:
        outputs = call(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"KDTrainer(fused_linear=True): the decoder ran {len(captured)} times in one "
                           "forward; expected once")
    out = captured[0]
    if hasattr(out, "last_hidden_state"):
        hidden = out.last_hidden_state
    elif isinstance(out, (tuple, list)):
        hidden = out[0]
    else:
        hidden = out
    return hidden, _model_output_logits(outputs)


def _check_head_reproduces_logits(role: str, hidden: torch.Tensor, head: torch.nn.Module,
                                  last_logits: torch.Tensor, transform: HeadTransform) -> None:
    """One-time check that ``transform(hidden @ W.T + b)`` is what the model computed as its logits.

    Compares the last position only (the one the model computed); catches heads that
    transform the logits in a way the config does not say. One host sync.
    """
    with torch.no_grad():
        # F.linear, not the head module: module hooks (or adapters) that change the logits
        # must show up as a difference. Under autocast it runs in the autocast dtype, as the
        # model's own head did, and so does the transform.
        mine = transform.apply(torch.nn.functional.linear(hidden[..., -1:, :], head.weight,
                                                          getattr(head, "bias", None)))
        ref = last_logits[..., -1:, :]
        if mine.shape != ref.shape:
            raise ValueError(f"KDTrainer(fused_linear=True): the {role}'s LM head gives logits of shape "
                             f"{tuple(mine.shape)} but the model returned {tuple(ref.shape)}; use fused_linear=False")
        low = any(x.dtype in (torch.bfloat16, torch.float16) for x in (mine, ref))
        tol = 2e-2 if low else 1e-4
        err = (mine.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
    if not err <= tol * (1.0 + scale):  # also catches NaN
        raise ValueError(
            f"KDTrainer(fused_linear=True): the {role}'s logits are not its decoder output times its LM "
            f"head{', transformed by ' + transform.source if transform.source else ''} (max difference "
            f"{err:.3g} at logits of size {scale:.3g}): the model transforms its logits after the head in a "
            "way its config does not say. Use fused_linear=False.")


class KDTrainerMixin:
    """The distillation part of :class:`KDTrainer`, for any ``transformers.Trainer`` subclass.

    Put it first in the bases: ``class MyKDTrainer(KDTrainerMixin, MyTrainer): ...``.
    See :class:`KDTrainer` for the arguments.
    """

    def __init__(self, *args, teacher_model: Optional[torch.nn.Module] = None,
                 kd_kwargs: Optional[Dict[str, Any]] = None, fused_linear: bool = False, **kwargs):
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError("KDTrainer needs teacher_model=<a torch.nn.Module returning logits>, got "
                            f"{type(teacher_model).__name__}")
        if not isinstance(fused_linear, bool):
            raise TypeError(f"fused_linear must be a bool, got {type(fused_linear).__name__}")
        if kd_kwargs is not None and not isinstance(kd_kwargs, dict):
            raise TypeError(f"kd_kwargs must be a dict or None, got {type(kd_kwargs).__name__}")
        kd = dict(kd_kwargs or {})
        for name in [k for k in kwargs if k in KD_OPTIONS]:
            if name in kd:
                raise TypeError(f"KDTrainer got {name!r} both in kd_kwargs and as a keyword")
            kd[name] = kwargs.pop(name)
        unknown = [k for k in kd if k not in KD_OPTIONS]
        if unknown:
            raise TypeError(f"KDTrainer: unknown loss keyword {unknown[0]!r}; the loss keywords are "
                            f"{', '.join(KD_OPTIONS)}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("KDTrainer computes the loss itself; compute_loss_func cannot be combined with it")
        if kd.get("reduction", "mean") != "mean":
            raise ValueError("KDTrainer needs reduction='mean' (the token mean Trainer's gradient accumulation "
                             f"expects), got {kd['reduction']!r}")
        if kd.get("ignore_index", -100) != -100:
            raise ValueError("KDTrainer needs ignore_index=-100: Trainer counts the step's tokens "
                             f"(num_items_in_batch) as labels != -100, got {kd['ignore_index']!r}")
        if "chunk_size" in kd and not fused_linear:
            raise ValueError("chunk_size applies to fused_linear=True only")

        super().__init__(*args, **kwargs)

        if self.args.label_smoothing_factor != 0:
            raise ValueError("KDTrainer does not support label_smoothing_factor (the teacher's distribution "
                             "is the soft target); set it to 0")
        if self.args.n_gpu > 1:
            raise ValueError("KDTrainer does not support torch.nn.DataParallel (one process driving "
                             f"{self.args.n_gpu} GPUs); launch one process per GPU (torchrun / accelerate "
                             "launch), or make one GPU visible")

        settings = {k: v for k, v in kd.items() if k in SETTING_NAMES}
        make_config("KDTrainer", **settings)  # the settings' own checks come first
        backend = kd.get("backend", "auto")
        self.teacher_model = teacher_model
        teacher_model.eval()
        if getattr(self, "place_model_on_device", False):
            teacher_model.to(self.args.device)
        student = self.accelerator.unwrap_model(self.model)
        self.fused_linear = fused_linear
        self.fused_kd_loss_fn = None
        if fused_linear:
            # The loss computes the logits from the heads, so it applies the models' own
            # transforms (softcap, scale), read from their configs. The logits path below
            # (evaluation) reads the models' logits, already transformed: no options there.
            self.student_transform = _check_fused_linear_model(student, "student")
            self.teacher_transform = _check_fused_linear_model(teacher_model, "teacher")
            logit = fused_linear_logit_settings(self.student_transform, self.teacher_transform, settings,
                                                caller="KDTrainer(fused_linear=True)")
            settings = {k: v for k, v in settings.items() if k not in LOGIT_SETTINGS}
            self.fused_kd_loss_fn = FusedLinearKDLoss(**settings, **logit, backend=backend,
                                                      chunk_size=kd.get("chunk_size", "auto"))
        self.kd_loss_fn = KDLoss(**settings, backend=backend, inplace_backward=kd.get("inplace_backward", False))
        if not fused_linear:
            self.student_transform = _logits_transform(student)
            self.teacher_transform = _logits_transform(teacher_model)
            check_no_double_transform(self.student_transform, self.teacher_transform, self.kd_loss_fn.config,
                                      caller="KDTrainer(fused_linear=False)")
        self.kd_ignore_index = self.kd_loss_fn.config.ignore_index
        self._check_vocab_sizes(self.kd_loss_fn.config.vocab_size)
        self._heads_checked = False

        # Trainer counts the step's valid labels (num_items_in_batch) only for models that
        # "accept loss kwargs", and then treats the returned loss as already normalised for
        # gradient accumulation. KDTrainer's loss is normalised by that count whatever the
        # model's forward takes, and always compares shifted labels.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    # -- checks ---------------------------------------------------------------------------

    def _check_vocab_sizes(self, vocab_size: Optional[int]) -> None:
        vs = _vocab_of(self.accelerator.unwrap_model(self.model))
        vt = _vocab_of(self.teacher_model)
        if vs is None or vt is None:
            return  # plain modules: fastkd checks the logits' widths at the first call
        if vocab_size is None and vs != vt:
            raise ValueError(
                f"KDTrainer: the student's vocabulary has {vs} entries and the teacher's {vt}. If they share "
                f"a tokenizer and one is only padded (e.g. Qwen 151936 vs 152064), pass "
                f"vocab_size={min(vs, vt)} (the real vocabulary size) so only those columns count; models "
                "with different tokenizers cannot be distilled token by token")
        if vocab_size is not None and vocab_size > min(vs, vt):
            raise ValueError(f"KDTrainer: vocab_size={vocab_size} is larger than the student's ({vs}) or the "
                             f"teacher's ({vt}) vocabulary")

    def _check_teacher_device(self, inputs: Dict[str, Any]) -> None:
        ref = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        param = next(self.teacher_model.parameters(), None)
        if ref is not None and param is not None and param.device != ref.device:
            raise ValueError(f"KDTrainer: the teacher is on {param.device} but the batch is on {ref.device}; "
                             "move the teacher to the student's device (Trainer moves it only when it "
                             "places the student itself)")

    # -- the loss -------------------------------------------------------------------------

    def _shifted_labels(self, inputs: Dict[str, Any]) -> torch.Tensor:
        if inputs.get("shift_labels") is not None:
            return inputs["shift_labels"]
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "KDTrainer needs `labels` in every batch: they pick the tokens to distill (-100 = left out, "
                "e.g. padding and prompt) and the targets of the cross-entropy part. For plain language "
                "modelling use DataCollatorForLanguageModeling(tokenizer, mlm=False), or copy input_ids "
                "with padding set to -100")
        return shift_causal_labels(labels, self.kd_ignore_index)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """fastkd's loss between the student ``model`` and the teacher on ``inputs``.

        ``num_items_in_batch`` (Trainer's count of the step's valid shifted labels) becomes
        fastkd's ``num_items``. With ``return_outputs=True`` (evaluation) the student's
        full outputs are returned, so even in fused-linear mode that call materialises the
        student's logits.
        """
        labels = self._shifted_labels(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        if self.teacher_model.training:
            self.teacher_model.eval()
        self._check_teacher_device(model_inputs)

        outputs = None
        if self.fused_linear and not return_outputs:
            loss = self._fused_linear_loss(model, model_inputs, labels, num_items_in_batch)
        else:
            outputs = model(**model_inputs)
            # Accelerate runs the prepared student's forward under mixed-precision autocast;
            # the teacher is not prepared, so it gets the same autocast here.
            with torch.no_grad(), self.accelerator.autocast():
                teacher_logits = _model_output_logits(self.teacher_model(**model_inputs))
            loss = self.kd_loss_fn(_model_output_logits(outputs), teacher_logits, labels,
                                   num_items=num_items_in_batch)

        # Under data-parallel training Trainer's count covers every process, while DDP
        # averages the gradients over processes: scale back up, as Trainer.compute_loss does.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            factor = self.accelerator.num_processes // max(1, tp)
            if factor != 1:
                loss = loss * factor
        return (loss, outputs) if return_outputs else loss

    def _fused_linear_loss(self, model, model_inputs, labels, num_items):
        student = self.accelerator.unwrap_model(model)
        hs, s_last = _decoder_hidden_and_logits(model, student, model_inputs)
        with torch.no_grad(), self.accelerator.autocast():
            ht, t_last = _decoder_hidden_and_logits(self.teacher_model, self.teacher_model, model_inputs)
        s_head = _lm_head(student, "student")
        t_head = _lm_head(self.teacher_model, "teacher")
        # The LM-head matmuls run under the training's mixed precision, as the model's own
        # head would (fused_linear_kd_loss casts both sides to the autocast dtype and keeps
        # fp32 logits).
        with self.accelerator.autocast():
            if not self._heads_checked:
                _check_head_reproduces_logits("student", hs, s_head, s_last, self.student_transform)
                _check_head_reproduces_logits("teacher", ht, t_head, t_last, self.teacher_transform)
                self._heads_checked = True
            return self.fused_kd_loss_fn(hs, s_head.weight, ht, t_head.weight, labels,
                                         student_bias=getattr(s_head, "bias", None),
                                         teacher_bias=getattr(t_head, "bias", None), num_items=num_items)


class KDTrainer(KDTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that distills ``teacher_model`` into ``model`` with fastkd.

    >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=training_args,
    ...                     train_dataset=ds, divergence="forward_kl", temperature=2.0, alpha=0.5)
    >>> trainer.train()

    Args:
        model: the student, a causal LM returning ``logits`` (``[B, L, V]``).
        teacher_model: the teacher, same tokenizer; run under ``torch.no_grad()`` in eval
            mode, never trained, never saved (checkpoints hold the student only). Moved
            to the training device when Trainer places the student.
        kd_kwargs: the loss keywords as a dict; they may also be passed directly as
            keywords. The settings of :func:`fastkd.kd_loss` (``divergence``,
            ``temperature``, ``beta``, ``alpha``, ``t_squared``, ``ignore_index``,
            ``vocab_size``, ``logit_scale``, ``softcap``, ...; ``reduction`` must stay
            ``"mean"``; the logit transforms: see ``fused_linear``) and the call options
            ``backend``, ``inplace_backward`` and, with ``fused_linear=True``,
            ``chunk_size``. ``alpha < 1`` mixes in hard-label cross-entropy on the same
            shifted labels.
        fused_linear: compute the loss from the decoders' last hidden states and the LM
            heads with :func:`fastkd.fused_linear_kd_loss`: neither side's
            ``[tokens, vocab]`` logits exist (the models are run with
            ``logits_to_keep=1``). Needs a plain linear LM head (``get_output_embeddings()``)
            fed by ``get_decoder()``'s ``last_hidden_state``, as Llama, Mistral, Qwen2/3
            and Phi-3 have. Logit softcapping or scaling after the head (Gemma 2/3,
            Cohere, Granite: :data:`fastkd.integrations.heads.FAMILIES`) is applied by the
            loss, read from each model's config; a config attribute of another family that
            may transform the logits is refused. The first step checks that the
            (transformed) head reproduces the model's own last-position logits.
            Evaluation (``return_outputs=True``) uses the model's logits.
        other arguments: those of ``transformers.Trainer`` (``compute_loss_func`` and
            ``label_smoothing_factor`` are refused: the loss is fastkd's).

    Gradient accumulation is exact: the loss of each micro-batch is its token sum divided
    by Trainer's ``num_items_in_batch`` (the valid shifted labels of the whole optimizer
    step), so accumulated gradients equal the full batch's. The sparse (top-k) teacher
    cache has not landed in fastkd: the teacher runs on every batch.
    """
