"""Reading a teacher cache: memory-mapped shards, batches aligned with the token batches.

The reader checks, when it opens a cache, that it was written for the student's vocabulary
and the temperature the loss will use (anything else is a ``ValueError`` saying what differs
and what to do), and that its files are the ones the manifest describes (size always; sha256
of every file on open, or of each shard when first read with ``verify="lazy"``).

Batches come back as torch tensors in the layout ``fastkd.sparse_kd_loss`` takes:
``(teacher_ids int64 [..., W], teacher_logprobs [..., W])``, id -1 an empty slot (with
log-prob -inf), where W is the cache's width (``k``; for RS-KD the widest shard). Positions
past a sequence's length (when a batch mixes lengths) are all-empty slots: mask them with
``labels = ignore_index`` as usual.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import format as fmt
from .sparsify import EMPTY_ID

__all__ = ["TeacherCacheReader"]

VERIFY = ("open", "lazy", "none")


class TeacherCacheReader:
    """A teacher cache opened for training.

    ``vocab_size``: the student's (logit-column) vocabulary as passed to ``sparse_kd_loss``;
    it must equal the cache's. ``temperature``: the distillation temperature; it must equal
    the recorded one (for another temperature see ``retemper``). ``verify``: ``"open"``
    (hash every file now), ``"lazy"`` (hash each shard when first read) or ``"none"``.
    ``allow_incomplete``: read the completed shards of a cache whose writer has not
    finished (by default that is an error). ``logprob_dtype``: the dtype of the returned
    log-probs (default float32; ``None``: as stored).
    """

    def __init__(self, path, *, vocab_size: int, temperature: float, mode: Optional[str] = None,
                 verify: str = "open", allow_incomplete: bool = False,
                 logprob_dtype: Optional[torch.dtype] = torch.float32):
        self.path = Path(path)
        self.manifest = m = fmt.read_manifest(self.path)
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        if vocab_size != m["vocab_size"]:
            raise ValueError(
                f"the teacher cache at {self.path} was written for vocab_size={m['vocab_size']}, but the "
                f"student has vocab_size={vocab_size}: its ids would index other tokens. Use a cache recorded "
                f"with this tokenizer/vocabulary (the cache's tokenizer: {m.get('tokenizer')!r})")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isclose(float(temperature), m["temperature"], rel_tol=1e-9, abs_tol=0.0):
            how = ("record an rskd cache at this temperature" if m["mode"] == "rskd" else
                   f"open it with temperature={m['temperature']} and convert its batches with "
                   f"fastkd.teacher_cache.retemper(..., from_temperature={m['temperature']}, "
                   f"to_temperature={temperature})")
            raise ValueError(f"the teacher cache at {self.path} holds the teacher at temperature="
                             f"{m['temperature']}, not the requested temperature={temperature!r}: {how}")
        if mode is not None and mode != m["mode"]:
            raise ValueError(f"the teacher cache at {self.path} has mode={m['mode']!r}, not mode={mode!r}")
        if not m["complete"] and not allow_incomplete:
            raise ValueError(f"the teacher cache at {self.path} is incomplete ({m['sequences']} sequences in "
                             f"{len(m['shards'])} shards; its writer did not finish): resume writing it, or "
                             "pass allow_incomplete=True to read the completed shards")
        self.mode, self.k, self.temperature = m["mode"], m["k"], m["temperature"]
        self.logprob_dtype = logprob_dtype
        self._verified = set()
        self._maps = {}
        self._check_sizes()
        if verify == "open":
            for shard in m["shards"]:
                self._verify(shard["index"])
        self._verify_lazily = verify == "lazy"
        if verify == "lazy":           # the small lengths files are read now: hash them first
            for shard in m["shards"]:
                self._verify_file(shard, "lengths")
        lengths = [np.load(self._file(s, "lengths")) for s in m["shards"]]
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, fmt.LENGTH_DTYPE)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        for shard, part in zip(m["shards"], lengths):
            if len(part) != shard["sequences"] or int(part.sum()) != shard["tokens"]:
                raise ValueError(f"{self._file(shard, 'lengths')} does not match the manifest's counts")
        self._first_tokens = np.array([s["first_token"] for s in m["shards"]], dtype=np.int64)
        self.width = max([s["width"] for s in m["shards"]], default=self.k)

    # ------------------------------------------------------------------ sizes and checks

    @property
    def num_sequences(self) -> int:
        return int(len(self.lengths))

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def bytes_per_token(self) -> float:
        """Bytes on disk per stored token (all shard files, headers included)."""
        return self.manifest["bytes"] / self.num_tokens if self.num_tokens else float("nan")

    @property
    def payload_bytes_per_token(self) -> float:
        """k · (4 bytes of id + the log-prob's bytes): the format's cost per token, no headers."""
        return fmt.payload_bytes_per_token(self.manifest)

    def _file(self, shard: dict, array: str) -> Path:
        return self.path / shard["files"][array]["file"]

    def _check_sizes(self) -> None:
        for shard in self.manifest["shards"]:
            for array in fmt.ARRAYS:
                file = self._file(shard, array)
                if not file.is_file():
                    raise ValueError(f"the teacher cache at {self.path} lists {file.name}, which is missing")
                if file.stat().st_size != shard["files"][array]["bytes"]:
                    raise ValueError(f"{file} has {file.stat().st_size} bytes, the manifest says "
                                     f"{shard['files'][array]['bytes']}: the file is damaged or was replaced")

    def _verify_file(self, shard: dict, array: str) -> None:
        file = self._file(shard, array)
        if fmt.sha256_file(file) != shard["files"][array]["sha256"]:
            raise ValueError(f"{file} does not match its sha256 in the manifest: the teacher cache is damaged "
                             "(rewrite this shard, or the cache)")

    def _verify(self, index: int) -> None:
        if index in self._verified:
            return
        shard = self.manifest["shards"][index]
        for array in fmt.ARRAYS:
            self._verify_file(shard, array)
        self._verified.add(index)

    def verify(self) -> None:
        """Hash every file of the cache now (``ValueError`` naming the first damaged one)."""
        for shard in self.manifest["shards"]:
            self._verify(shard["index"])

    def _arrays(self, index: int):
        if index not in self._maps:
            if self._verify_lazily:
                self._verify(index)
            shard = self.manifest["shards"][index]
            ids = np.load(self._file(shard, "ids"), mmap_mode="r")
            values = np.load(self._file(shard, "logprobs"), mmap_mode="r")
            expected = (shard["tokens"], shard["width"])
            if ids.shape != expected or values.shape != expected:
                raise ValueError(f"shard {index} of {self.path} has arrays of shape {ids.shape} and "
                                 f"{values.shape}, the manifest says {expected}")
            self._maps[index] = (ids, values)
        return self._maps[index]

    # ------------------------------------------------------------------ reading

    def _convert(self, ids: np.ndarray, values: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Storage arrays [n, w] -> torch (ids int64, log-probs), padded to the cache's width."""
        out_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        out_lp = fmt.from_storage(values, self.manifest["dtype"])
        if self.logprob_dtype is not None:
            out_lp = out_lp.to(self.logprob_dtype)
        if out_ids.shape[-1] < self.width:
            pad = (out_ids.shape[0], self.width - out_ids.shape[-1])
            out_ids = torch.cat([out_ids, out_ids.new_full(pad, EMPTY_ID)], -1)
            out_lp = torch.cat([out_lp, out_lp.new_full(pad, float("-inf"))], -1)
        return out_ids, out_lp

    def tokens(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tokens at global offsets ``[start, stop)`` (dataset order): ``[stop - start, W]``."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside the cache's {self.num_tokens} tokens")
        parts_ids, parts_lp = [], []
        shards = self.manifest["shards"]
        # The shards that overlap [start, stop): a binary search, not a scan of the manifest.
        first = max(0, int(np.searchsorted(self._first_tokens, start, side="right")) - 1)
        last = int(np.searchsorted(self._first_tokens, stop, side="left"))
        for shard in shards[first:last]:
            lo, hi = max(start, shard["first_token"]), min(stop, shard["first_token"] + shard["tokens"])
            if lo < hi:
                ids, values = self._arrays(shard["index"])
                i, v = self._convert(ids[lo - shard["first_token"]: hi - shard["first_token"]],
                                     values[lo - shard["first_token"]: hi - shard["first_token"]])
                parts_ids.append(i)
                parts_lp.append(v)
        if not parts_ids:
            empty_lp = torch.empty(0, self.width, dtype=self.logprob_dtype or torch.float32)
            return torch.empty(0, self.width, dtype=torch.int64), empty_lp
        return torch.cat(parts_ids), torch.cat(parts_lp)

    def sequences(self, index: Union[int, Sequence[int], torch.Tensor, np.ndarray], *,
                  length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The sequences ``index`` (dataset order), as ``[B, L, W]`` (``[L, W]`` for an int).

        ``L`` is ``length`` if given (a longer sequence is an error), else the longest of
        the batch; shorter sequences are padded with empty slots.
        """
        single = isinstance(index, (int, np.integer))
        idx = np.atleast_1d(np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64))
        if idx.ndim != 1:
            raise ValueError(f"index must be an int or a 1-d list of sequence indices, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"sequence index out of range: the cache holds {self.num_sequences} sequences")
        lengths = self.lengths[idx]
        seq_len = int(lengths.max(initial=0)) if length is None else int(length)
        if lengths.size and lengths.max() > seq_len:
            raise ValueError(f"a requested sequence has {int(lengths.max())} tokens, more than length={seq_len}")
        out_ids = torch.full((len(idx), seq_len, self.width), EMPTY_ID, dtype=torch.int64)
        out_lp = torch.full((len(idx), seq_len, self.width), float("-inf"),
                            dtype=self.logprob_dtype or fmt.LOGPROB_DTYPES[self.manifest["dtype"]][0])
        for row, i in enumerate(idx):
            start = int(self.offsets[i])
            ids, lp = self.tokens(start, start + int(lengths[row]))
            out_ids[row, : len(ids)], out_lp[row, : len(ids)] = ids, lp
        if single:
            return out_ids[0], out_lp[0]
        return out_ids, out_lp

    def iter_batches(self, batch_size: int, *, length: Optional[int] = None
                     ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive sequences, ``batch_size`` at a time (the last batch may be smaller)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for lo in range(0, self.num_sequences, batch_size):
            yield self.sequences(np.arange(lo, min(lo + batch_size, self.num_sequences)), length=length)

    def __getstate__(self):
        # DataLoader workers (spawn) get the reader pickled: send the description, not the
        # memory maps (numpy would pickle a map as a full copy of its shard); each worker
        # maps the shards again on first use.
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return (f"TeacherCacheReader({str(self.path)!r}, mode={self.mode!r}, k={self.k}, "
                f"temperature={self.temperature}, sequences={self.num_sequences}, tokens={self.num_tokens}, "
                f"bytes_per_token={self.bytes_per_token:.1f})")
