"""Recording a teacher's sparse distributions to disk, resumably.

The writer takes the teacher's output batch by batch, in dataset order, from any source:

* ``add_logits``: raw logits ``[B, L, V]`` (e.g. ``hf_model(input_ids).logits``); the writer
  applies the temperature, then keeps the top-k or draws the RS-KD samples;
* ``add_logprobs``: full log-probabilities ``[B, L, V]`` already at the cache's temperature;
* ``add_sparse``: ``(ids, logprobs)`` ``[B, L, K']`` from elsewhere, e.g. a vLLM or sglang
  server's top-k log-probs (recorded at the cache's temperature).

Each call says where its rows sit in the dataset (``start=``, the index of its first
sequence). Sequences are buffered and written as shards of about ``shard_tokens`` tokens, cut
at sequence boundaries; see ``format.py`` for the files and why a crash never leaves a shard
that reads as valid.

Resuming: open a writer on the same directory with the same settings. It keeps the shards the
manifest lists, discards anything else, and ``next_sequence`` says where to continue; rows
before it are skipped by ``add_*`` (already stored), so re-running the same loop from the
start is correct, and ``done(start, count)`` lets a loop skip the teacher for those batches.
:func:`write_teacher_cache` is that loop.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from . import format as fmt
from .sparsify import EMPTY_ID, rskd_sample, topk_logprobs

__all__ = ["TeacherCacheWriter", "write_teacher_cache"]

# Settings a resumed writer must share with the manifest it continues.
_SETTINGS = ("mode", "k", "temperature", "vocab_size", "dtype", "shard_tokens", "tokenizer",
             "n_samples", "proposal_exponent", "seed")


def _version() -> str:
    from .. import __version__
    return __version__


class TeacherCacheWriter:
    """Write (or resume) a teacher cache in ``path``.

    ``mode="topk"`` stores the ``k`` most likely ids per token with their log-probabilities
    at ``temperature``. ``mode="rskd"`` stores RS-KD samples: ``k`` is the number of draws
    per token (``n_samples``), from the teacher at ``temperature`` raised to
    ``proposal_exponent`` (see ``sparsify.rskd_sample``), and the values are log importance
    weights that sum to 1 per token; ``seed`` makes the draws reproducible (each sequence's
    generator is seeded from ``seed`` and the sequence's index, so a resumed run stores
    what an uninterrupted one would).

    ``vocab_size``: the teacher's vocabulary (logits wider than it, e.g. a padded LM head,
    are cut to it, as ``kd_loss``'s ``vocab_size=`` does). ``dtype``: ``"float16"``
    (default: 10 mantissa bits, ample range for log-probs), ``"bfloat16"`` or ``"float32"``.
    ``tokenizer``: a name recorded for the reader's information. ``metadata``: a JSON-able
    dict stored as is.
    """

    def __init__(self, path, *, k: int, vocab_size: int, temperature: float = 1.0, mode: str = "topk",
                 dtype="float16", shard_tokens: int = 1 << 20, tokenizer: Optional[str] = None,
                 proposal_exponent: float = 1.0, seed: int = 0, metadata: Optional[dict] = None):
        if mode not in fmt.MODES:
            raise ValueError(f"mode must be one of {fmt.MODES}, got {mode!r}")
        for name, value in (("k", k), ("vocab_size", vocab_size), ("shard_tokens", shard_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(proposal_exponent, (int, float)) or not 0 < proposal_exponent < math.inf:
            raise ValueError(f"proposal_exponent must be a finite number > 0, got {proposal_exponent!r}")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise TypeError(f"tokenizer must be a name (str) or None, got {type(tokenizer).__name__}")
        self.path = Path(path)
        self.mode, self.k, self.vocab_size = mode, k, vocab_size
        self.temperature = float(temperature)
        self.dtype = fmt.check_logprob_dtype(dtype)
        self.shard_tokens = shard_tokens
        self.proposal_exponent, self.seed = float(proposal_exponent), int(seed)
        settings = {
            "mode": mode, "k": k, "temperature": self.temperature, "vocab_size": vocab_size,
            "dtype": self.dtype, "shard_tokens": shard_tokens, "tokenizer": tokenizer,
            "n_samples": k if mode == "rskd" else None,
            "proposal_exponent": self.proposal_exponent if mode == "rskd" else None,
            "seed": self.seed if mode == "rskd" else None,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / fmt.MANIFEST).exists():
            self.manifest = fmt.read_manifest(self.path)
            for name in _SETTINGS:
                if self.manifest.get(name) != settings[name]:
                    raise ValueError(
                        f"{self.path} holds a cache written with {name}={self.manifest.get(name)!r}, not "
                        f"{settings[name]!r}: resume with the same settings, or write to another directory")
        else:
            self.manifest = {
                "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, **settings,
                "logprob_storage": fmt.LOGPROB_DTYPES[self.dtype][2], "id_dtype": "int32",
                "empty_id": EMPTY_ID, "rounding": "toward -inf",
                "values": "log importance weights (sum to 1 per token)" if mode == "rskd"
                          else f"log-probabilities at temperature {self.temperature}",
                "fastkd_version": _version(), "metadata": metadata or {},
                "complete": False, "sequences": 0, "tokens": 0, "shards": [],
            }
            fmt.write_manifest(self.path, self.manifest)
        self._discard_unlisted()
        self.next_sequence = self.manifest["sequences"]    # the first sequence not yet taken
        self._pending = []                                 # (ids [n, W], values [n, W], lengths [s])
        self._pending_tokens = 0

    # ------------------------------------------------------------------ resume bookkeeping

    def _discard_unlisted(self) -> None:
        """Remove temporary files and shard files the manifest does not list (a crash's leftovers)."""
        listed = {entry["file"] for shard in self.manifest["shards"] for entry in shard["files"].values()}
        for file in self.path.iterdir():
            name = file.name
            if name.endswith(fmt.TMP_SUFFIX) or (name.startswith("shard-") and name not in listed):
                file.unlink()

    def done(self, start: int, count: int) -> bool:
        """Whether sequences ``[start, start + count)`` are all taken already (skip the teacher)."""
        return start + count <= self.next_sequence

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    # ------------------------------------------------------------------ adding rows

    def add_logits(self, logits: torch.Tensor, *, start: int, lengths=None) -> None:
        """Teacher logits ``[B, L, V']`` (V' >= vocab_size) of sequences ``start .. start+B-1``.

        ``lengths``: optional ``[B]`` valid positions per sequence (the rest is padding and is
        not stored); by default all L.
        """
        self._add_full(logits, start, lengths, "logits")

    def add_logprobs(self, logprobs: torch.Tensor, *, start: int, lengths=None) -> None:
        """Full log-probabilities ``[B, L, V']`` at the cache's temperature (see ``add_logits``)."""
        self._add_full(logprobs, start, lengths, "logprobs")

    def add_sparse(self, ids: torch.Tensor, logprobs: torch.Tensor, *, start: int, lengths=None) -> None:
        """A sparse teacher ``[B, L, K']`` from another source (id < 0: an empty slot).

        ``topk`` caches: log-probabilities at the cache's temperature; when K' > k the k
        largest are kept. ``rskd`` caches: samples and log-weights from ``rskd_sample`` (K' <=
        k), stored as given.
        """
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("ids must be an int32 or int64 tensor [B, L, K]")
        if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
            raise TypeError("logprobs must be a floating tensor [B, L, K]")
        if ids.dim() != 3 or ids.shape != logprobs.shape:
            raise ValueError(f"ids and logprobs must both have shape [B, L, K], got {tuple(ids.shape)} and "
                             f"{tuple(logprobs.shape)}")
        skip = self._take(start, ids.shape[0])
        if skip is None:
            return
        ids, logprobs = ids[skip:].long(), logprobs[skip:].double()
        logprobs = logprobs.masked_fill(ids < 0, float("-inf"))
        ids = ids.masked_fill(ids < 0, EMPTY_ID)
        if ids.shape[-1] > self.k:
            if self.mode == "rskd":
                raise ValueError(f"an rskd cache stores at most k={self.k} samples per token, got {ids.shape[-1]}")
            logprobs, order = logprobs.topk(self.k, dim=-1)
            ids = ids.gather(-1, order).masked_fill(logprobs == float("-inf"), EMPTY_ID)
        elif ids.shape[-1] < self.k:
            pad = (*ids.shape[:-1], self.k - ids.shape[-1])
            ids = torch.cat([ids, ids.new_full(pad, EMPTY_ID)], -1)
            logprobs = torch.cat([logprobs, logprobs.new_full(pad, float("-inf"))], -1)
        # Filled slots first, in their given order (an rskd shard is trimmed to its filled width).
        order = torch.sort((ids < 0).to(torch.int8), dim=-1, stable=True).indices
        ids, logprobs = ids.gather(-1, order), logprobs.gather(-1, order)
        self._check_sparse(ids, logprobs)
        self._append(ids, logprobs, self._lengths(lengths, skip, ids.shape[:2]))

    def _add_full(self, values, start, lengths, kind) -> None:
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 3:
            raise TypeError(f"{kind} must be a floating tensor [B, L, V]")
        if values.shape[-1] < self.vocab_size:
            raise ValueError(f"{kind} has {values.shape[-1]} columns, fewer than the cache's "
                             f"vocab_size={self.vocab_size}")
        skip = self._take(start, values.shape[0])
        if skip is None:
            return
        values = values[skip:, :, : self.vocab_size].detach()     # a view: no copy of the logits
        b, seq = values.shape[:2]
        # Rows converted at once: the float64 copy of a chunk stays near 256 MiB.
        chunk_rows = max(1, (1 << 25) // self.vocab_size)
        ids = torch.empty(b, seq, self.k, dtype=torch.int64, device=values.device)
        logp = torch.empty(b, seq, self.k, dtype=torch.float64, device=values.device)
        generator = torch.Generator(device=values.device) if self.mode == "rskd" else None
        for r in range(b):
            if generator is not None:
                # Seeded per sequence: a resumed run draws exactly what an uninterrupted one would.
                generator.manual_seed(self.seed * 1_000_003 + start + skip + r)
            for lo in range(0, seq, chunk_rows):
                # float64 for the log-normaliser: a support's mass P then stays <= 1 to ~1e-16.
                chunk = values[r, lo: lo + chunk_rows].double()
                full = (chunk / self.temperature).log_softmax(-1) if kind == "logits" else chunk
                if self.mode == "topk":
                    i, v = topk_logprobs(full, self.k)
                else:
                    i, v = rskd_sample(full, self.k, proposal_exponent=self.proposal_exponent,
                                       generator=generator)
                ids[r, lo: lo + chunk_rows], logp[r, lo: lo + chunk_rows] = i, v
        self._append(ids, logp, self._lengths(lengths, skip, (b, seq)))

    def _take(self, start: int, count: int) -> Optional[int]:
        """How many leading rows of sequences ``start .. start+count-1`` are stored already;
        None when all are."""
        if self.complete:
            raise ValueError(f"{self.path} is a complete cache (the writer was closed); write to another directory")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be the index (an int >= 0) of the batch's first sequence, got {start!r}")
        if start > self.next_sequence:
            raise ValueError(f"start={start} leaves a gap: the cache continues at sequence {self.next_sequence} "
                             "(batches must be added in dataset order)")
        skip = self.next_sequence - start
        if skip >= count:
            return None
        return skip

    def _lengths(self, lengths, skip, shape) -> np.ndarray:
        b, seq = shape
        if lengths is None:
            return np.full(b, seq, dtype=fmt.LENGTH_DTYPE)
        lengths = torch.as_tensor(lengths).reshape(-1)
        lengths = lengths[skip:].cpu().numpy().astype(fmt.LENGTH_DTYPE)
        if lengths.shape != (b,) or (lengths < 0).any() or (lengths > seq).any():
            raise ValueError(f"lengths must hold one length in [0, {seq}] per sequence")
        return lengths

    def _check_sparse(self, ids, logprobs) -> None:
        if bool((ids >= self.vocab_size).any()):
            raise ValueError(f"ids must be < vocab_size={self.vocab_size} (or < 0 for an empty slot)")
        if bool(torch.isnan(logprobs).any()) or bool((logprobs > 0).any()):
            raise ValueError("logprobs must be log-probabilities: <= 0 and not NaN (-inf is allowed)")
        ordered, _ = ids.sort(-1)
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            raise ValueError("ids hold a duplicate id within one token's slots")

    def _append(self, ids, logprobs, lengths) -> None:
        """Keep each sequence's first ``length`` positions, then write the shards that are full."""
        ids, logprobs = ids.cpu(), logprobs.cpu()
        keep = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
        ids_np = ids[keep].numpy().astype(fmt.ID_DTYPE)
        values = fmt.to_storage(logprobs[keep], self.dtype)
        self._pending.append((ids_np, values, lengths))
        self._pending_tokens += int(lengths.sum())
        self.next_sequence += len(lengths)
        while self._pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    # ------------------------------------------------------------------ shards

    def _flush(self, target_tokens: Optional[int]) -> None:
        """Write the pending sequences (the first ones reaching ``target_tokens``, or all) as a shard."""
        ids = np.concatenate([p[0] for p in self._pending])
        values = np.concatenate([p[1] for p in self._pending])
        lengths = np.concatenate([p[2] for p in self._pending])
        if target_tokens is None:
            count = len(lengths)
        else:   # the shortest run of sequences holding at least target_tokens tokens
            count = int(np.searchsorted(np.cumsum(lengths), target_tokens)) + 1
        tokens = int(lengths[:count].sum())
        rest = (ids[tokens:], values[tokens:], lengths[count:])
        ids, values, lengths = ids[:tokens], values[:tokens], lengths[:count]
        width = self.k
        if self.mode == "rskd" and tokens:
            # Store only the slots that some token of the shard fills (empty slots are last).
            width = max(1, int((ids >= 0).sum(1).max()))
            ids, values = ids[:, :width], values[:, :width]
        self._write_shard(ids, values, lengths, width)
        self._pending = [rest] if len(rest[2]) else []
        self._pending_tokens = int(rest[2].sum()) if len(rest[2]) else 0

    def _write_shard(self, ids, values, lengths, width) -> None:
        index = len(self.manifest["shards"])
        files = {}
        for name, array in (("ids", ids), ("logprobs", values), ("lengths", lengths)):
            files[name] = fmt.write_npy(self.path / fmt.shard_file(index, name), array)
        shard = {"index": index, "first_sequence": self.manifest["sequences"], "sequences": int(len(lengths)),
                 "first_token": self.manifest["tokens"], "tokens": int(len(ids)), "width": int(width),
                 "files": files}
        manifest = dict(self.manifest, shards=self.manifest["shards"] + [shard],
                        sequences=self.manifest["sequences"] + shard["sequences"],
                        tokens=self.manifest["tokens"] + shard["tokens"])
        manifest.update(_sizes(manifest))
        fmt.write_manifest(self.path, manifest)   # the commit point of the shard
        self.manifest = manifest

    def close(self) -> dict:
        """Write the last (partial) shard and mark the cache complete; returns the manifest."""
        if self.complete:
            return self.manifest
        if self._pending:
            self._flush(None)
        self.manifest = dict(self.manifest, complete=True)
        fmt.write_manifest(self.path, self.manifest)
        return self.manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Only a loop that finished marks the cache complete; after an error the completed
        # shards stay and a new writer resumes after them.
        if exc_type is None:
            self.close()


def _sizes(manifest: dict) -> dict:
    stored = sum(entry["bytes"] for shard in manifest["shards"] for entry in shard["files"].values())
    tokens = manifest["tokens"]
    return {"bytes": stored, "bytes_per_token": stored / tokens if tokens else None,
            "payload_bytes_per_token": fmt.payload_bytes_per_token(manifest)}


def write_teacher_cache(path, teacher: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *,
                        k: int, vocab_size: int, lengths: Optional[Callable] = None, **settings) -> dict:
    """Run ``teacher`` over token ``batches`` and record it in ``path``; resumes if interrupted.

    ``teacher(batch)`` returns logits ``[B, L, V']`` (an HF model: ``lambda x:
    model(x).logits``); it runs under ``torch.no_grad()`` and is skipped for batches already
    stored. ``batches`` yields ``[B, L]`` token tensors in a fixed order (the same order
    again when resuming). ``lengths(batch)`` may give the valid positions per sequence.
    ``settings``: the other keywords of :class:`TeacherCacheWriter`. Returns the manifest.
    """
    writer = TeacherCacheWriter(path, k=k, vocab_size=vocab_size, **settings)
    if writer.complete:
        return writer.manifest
    start = 0
    for batch in batches:
        count = batch.shape[0]
        if not writer.done(start, count):
            with torch.no_grad():
                logits = teacher(batch)
            writer.add_logits(logits, start=start, lengths=None if lengths is None else lengths(batch))
        start += count
    return writer.close()
