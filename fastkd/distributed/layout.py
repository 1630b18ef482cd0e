"""Where this rank's slice of the vocabulary lies, for both vocab-parallel losses.

A rank's slice is a run of columns (logits, vocab_parallel.py) or rows (LM head,
fused_linear.py) of the global vocabulary. Its :class:`Layout` comes from one of two
places:

* ``vocab_start=`` given: the caller says where the slice starts. Nothing is exchanged,
  so nothing is compared across ranks: each rank checks its own arguments
  (:func:`check_vocab_start`), and with the CE term a valid label that no slice holds (or
  two hold) is marked on the way (``check_label_found``: its row's loss becomes NaN in
  round 2);
* otherwise the :func:`handshake`: one all_gather of ``HEADER_WIDTH`` int64 per rank (the
  slices' widths, from which the offsets follow, and what must agree across ranks: row
  count, dtypes, whether the student's gradient is wanted, labels, settings). It runs
  before any other collective of the call, and every rank decides from the same gathered
  headers, so bad or inconsistent input raises the same error on every rank instead of
  leaving some ranks waiting in a collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .._checks import FLOAT_DTYPES
from ..config import REDUCTIONS, KDConfig

# The handshake's int64 fields, one row per rank.
HEADER = ("error", "rows", "width", "student_dtype", "teacher_dtype", "wants_grad", "has_labels", "label_min",
          "label_max", "labels_digest", "settings_digest")
HEADER_WIDTH = len(HEADER)
_NO_LABEL_MIN = 2 ** 62  # label_min / label_max of a batch without valid labels
_NO_LABEL_MAX = -1


@dataclass(frozen=True)
class Layout:
    """This rank's place in the global vocabulary."""

    vocab_start: int         # global index of the slice's first column (row of the head)
    counted: int             # how many of its columns lie below the global vocab_size
    vocab_size: int          # global: the columns that count, over all slices
    check_label_found: bool  # no handshake checked the labels: mark a label no slice holds (NaN)

    @classmethod
    def from_vocab_start(cls, vocab_start: int, width: int, cfg: KDConfig) -> "Layout":
        """The layout a caller gives with ``vocab_start=`` (without ``vocab_size`` every
        column counts, so the global size is known only up to this slice's end)."""
        vocab_size = vocab_start + width if cfg.vocab_size is None else cfg.vocab_size
        return cls(vocab_start, _counted(vocab_start, width, vocab_size), vocab_size, True)

    @classmethod
    def from_widths(cls, widths: List[int], rank: int, cfg: KDConfig) -> "Layout":
        """Rank ``rank``'s layout when the slices, in rank order, have these widths."""
        start = sum(widths[:rank])
        vocab_size = sum(widths) if cfg.vocab_size is None else cfg.vocab_size
        return cls(start, _counted(start, widths[rank], vocab_size), vocab_size, False)


def _counted(vocab_start: int, width: int, vocab_size: int) -> int:
    return min(max(vocab_size - vocab_start, 0), width)


# ---------------------------------------------------------------------------------------
# With vocab_start=: what one rank can check alone.

def check_vocab_start(vocab_start, labels: Optional[torch.Tensor], cfg: KDConfig) -> None:
    """``vocab_start`` is an int >= 0, and the labels (when on the CPU, where reading them
    is free) are valid global ids as far as this rank can tell."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 or None, got {vocab_start!r}")
    lo, hi = label_range(labels, cfg)
    if lo is not None and (lo < 0 or (cfg.vocab_size is not None and hi >= cfg.vocab_size)):
        bound = "" if cfg.vocab_size is None else f", {cfg.vocab_size}"
        raise ValueError(f"labels must be in [0{bound}) or equal ignore_index={cfg.ignore_index}; "
                         f"found {lo if lo < 0 else hi}")


def label_range(labels: Optional[torch.Tensor], cfg: KDConfig):
    """(min, max) of the valid labels when they are on the CPU (free to read), else (None, None)."""
    if labels is None or labels.device.type != "cpu" or labels.numel() == 0:
        return None, None
    valid = labels[labels != cfg.ignore_index]
    if valid.numel() == 0:
        return None, None
    return int(valid.min()), int(valid.max())


# ---------------------------------------------------------------------------------------
# Without vocab_start=: the handshake.

def _settings_digest(cfg: KDConfig, num_items) -> int:
    """A number equal on ranks with equal settings (hashes of ints and floats do not vary
    between processes, unlike those of strings)."""
    values = [getattr(cfg, name) for name in ("divergence_id", "ignore_index", "temperature", "beta", "alpha",
                                              "t_squared", "logit_scale", "softcap_value", "teacher_scale",
                                              "teacher_softcap_value", "label_smoothing", "z_loss")]
    values += [-1 if cfg.vocab_size is None else cfg.vocab_size, REDUCTIONS.index(cfg.reduction)]
    values.append(num_items if isinstance(num_items, float) else -1.0)
    return hash(tuple(values))


def _header(student, teacher, labels, cfg: KDConfig, num_items, wants_grad: bool, error: bool,
            device) -> torch.Tensor:
    if error:
        return torch.full((HEADER_WIDTH,), -1, dtype=torch.int64, device=device).index_fill_(
            0, torch.tensor([0], device=device), 1)
    fixed = torch.tensor([0, student.shape[:-1].numel(), student.shape[-1], FLOAT_DTYPES.index(student.dtype),
                          FLOAT_DTYPES.index(teacher.dtype), wants_grad, labels is not None], dtype=torch.int64,
                         device=device)
    if labels is None or labels.numel() == 0:
        label_part = torch.tensor([_NO_LABEL_MIN, _NO_LABEL_MAX, 0], dtype=torch.int64, device=device)
    else:  # computed where the labels are: no host sync on a GPU
        flat = labels.reshape(-1).to(torch.int64)
        valid = flat != cfg.ignore_index
        weights = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
        label_part = torch.stack([torch.where(valid, flat, _NO_LABEL_MIN).min(),
                                  torch.where(valid, flat, _NO_LABEL_MAX).max(), (flat * weights).sum()])
    digest = torch.tensor([_settings_digest(cfg, num_items)], dtype=torch.int64, device=device)
    return torch.cat([fixed, label_part.to(device), digest])


def _raise_everywhere(local_error: Optional[BaseException], headers, group, caller: str):
    """Every rank raises the error of the first rank that failed its local checks."""
    failed = [r for r, h in enumerate(headers) if h[0] != 0]
    messages = [None] * len(headers)
    dist.all_gather_object(messages, None if local_error is None else
                           (type(local_error).__name__, str(local_error)), group=group)
    rank = failed[0]
    kind, message = messages[rank]
    error = TypeError if kind == "TypeError" else ValueError
    raise error(f"{caller}: rank {rank}: {message}") from local_error


def _check_headers(headers, cfg: KDConfig, caller: str, grad_arg: str) -> List[int]:
    """Cross-rank consistency, decided alike on every rank from the gathered headers;
    returns the slices' widths."""
    first = headers[0]
    f = {name: i for i, name in enumerate(HEADER)}
    for r, h in enumerate(headers[1:], start=1):
        if h[f["wants_grad"]] != first[f["wants_grad"]]:
            # The fused-linear loss all-reduces the hidden states' gradient in backward: a
            # rank that skips it leaves the others waiting there until the group's timeout.
            # (The logits form has no collective in backward, but a rank whose slice gets
            # no gradient is a part of the head that does not train: a mistake too.)
            said = {True: "yes", False: "no"}
            raise ValueError(
                f"{caller}: the ranks disagree on whether {grad_arg} requires grad (with grad mode on): "
                f"{said[bool(h[f['wants_grad']])]} on rank {r}, {said[bool(first[f['wants_grad']])]} on rank 0; "
                f"{grad_arg} must require grad on every rank of the group or on none")
        for name, what in (("rows", "rows (tokens)"), ("student_dtype", "student dtype"),
                           ("teacher_dtype", "teacher dtype"), ("has_labels", "labels (given or None)"),
                           ("labels_digest", "labels"), ("settings_digest", "loss settings")):
            if h[f[name]] != first[f[name]]:
                detail = ""
                if name == "rows":
                    detail = f": {h[f[name]]} on rank {r}, {first[f[name]]} on rank 0"
                elif name.endswith("dtype"):
                    detail = f": {FLOAT_DTYPES[h[f[name]]]} on rank {r}, {FLOAT_DTYPES[first[f[name]]]} on rank 0"
                raise ValueError(f"{caller}: the ranks disagree on the {what}{detail}; every rank "
                                 "must pass its slice of the same tokens, with the same labels and settings")
    widths = [h[f["width"]] for h in headers]
    total = sum(widths)
    if cfg.vocab_size is not None and cfg.vocab_size > total:
        raise ValueError(f"vocab_size must be in [1, {total}] (the columns of all shards together), "
                         f"got {cfg.vocab_size}")
    vocab_size = total if cfg.vocab_size is None else cfg.vocab_size
    lo, hi = first[f["label_min"]], first[f["label_max"]]
    if hi != _NO_LABEL_MAX and (lo < 0 or hi >= vocab_size):
        raise ValueError(f"labels must be in [0, {vocab_size}) or equal ignore_index={cfg.ignore_index}; "
                         f"found {lo if lo < 0 else hi}")
    return widths


def _comm_device(group, student) -> torch.device:
    if isinstance(student, torch.Tensor):
        return student.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


def handshake(student, teacher, labels, cfg: KDConfig, num_items, local_error: Optional[BaseException], group,
              *, wants_grad: bool, caller: str, grad_arg: str) -> Layout:
    """One all_gather of the ranks' headers: this rank's layout, or the same error raised
    on every rank.

    ``student`` and ``teacher`` are this rank's logits slices ``[..., width]`` (only their
    shapes and dtypes are read; the fused-linear loss passes zero-memory stand-ins), and
    ``num_items`` the checked one. ``wants_grad``: whether this call will compute the
    gradient of the student argument named ``grad_arg`` (grad mode on and it requires
    grad). ``local_error``: what this rank's own checks raised (then its other arguments
    are not read), re-raised on every rank. ``caller`` names the loss in the errors.
    """
    device = _comm_device(group, student)
    header = _header(student, teacher, labels, cfg, num_items, wants_grad, local_error is not None, device)
    gathered = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, header, group=group)
    headers = torch.stack(gathered).tolist()  # the one host read of the handshake
    if any(h[0] != 0 for h in headers):
        _raise_everywhere(local_error, headers, group, caller)
    return Layout.from_widths(_check_headers(headers, cfg, caller, grad_arg), dist.get_rank(group), cfg)
