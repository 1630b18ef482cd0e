"""The on-disk format of a teacher cache: files, manifest, value storage, atomic writes.

A cache is a directory::

    manifest.json                  the description; the list of completed shards
    shard-00000.ids.npy            int32 [tokens, W]   teacher ids, -1 = empty slot
    shard-00000.logprobs.npy       [tokens, W]         log-probs (topk) or log-weights (rskd)
    shard-00000.lengths.npy        int64 [sequences]   tokens of each sequence of the shard
    shard-00001.*.npy ...

Tokens are stored in dataset order: the sequences of shard 0, then those of shard 1, ...,
each sequence's positions in order, so a token is found by (sequence index, position) or by
its global token offset. W is the cache's ``k`` for top-k; for RS-KD a shard stores only as
many slots as its busiest token needs (at most ``n_samples``).

Values are plain ``.npy`` (numpy's format: a short header, then the raw array), readable by
numpy, memory-mapped, never pickled. float16 log-probs are ``<f2``. numpy has no bfloat16:
bfloat16 log-probs are stored as their bit patterns, ``<u2`` (uint16), and the manifest says
``"logprob_storage": "bfloat16 bits in uint16"``; ``torch.from_numpy(a.view("<i2"))
.view(torch.bfloat16)`` reads them back. float32 is accepted too (``<f4``, for tests and
exact records).

Stored log-probs are rounded toward -inf (not to nearest), so a stored probability never
exceeds the recorded one and a support's mass P = Σ exp(log p) never exceeds 1 through
rounding: the tail bin 1 - P of ``tail="bucket"`` stays >= 0.

The manifest is the commit point. Every file is written under a temporary name, flushed and
fsync'ed, then renamed into place; the manifest, rewritten the same way after each shard,
lists a shard (with the sha256 and size of each of its files) only once all its files are
in place. A shard file that the manifest does not list, or whose checksum differs, is not
part of the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

FORMAT_NAME = "fastkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODES = ("topk", "rskd")
ARRAYS = ("ids", "logprobs", "lengths")

# torch dtype of the log-probs -> (manifest name, numpy storage dtype, storage description)
LOGPROB_DTYPES = {
    "float16": (torch.float16, np.dtype("<f2"), "float16"),
    "bfloat16": (torch.bfloat16, np.dtype("<u2"), "bfloat16 bits in uint16"),
    "float32": (torch.float32, np.dtype("<f4"), "float32"),
}
ID_DTYPE = np.dtype("<i4")
LENGTH_DTYPE = np.dtype("<i8")
TMP_SUFFIX = ".tmp"


def shard_file(index: int, array: str) -> str:
    return f"shard-{index:05d}.{array}.npy"


def check_logprob_dtype(dtype) -> str:
    """The manifest name of a log-prob storage dtype given as a string or a torch dtype."""
    for name, (torch_dtype, _, _) in LOGPROB_DTYPES.items():
        if dtype == name or dtype == torch_dtype:
            return name
    raise ValueError(f"dtype must be one of {tuple(LOGPROB_DTYPES)} (or the torch dtype), got {dtype!r}")


# --------------------------------------------------------------------------- values

def to_storage(logprobs: torch.Tensor, dtype_name: str) -> np.ndarray:
    """Log-probs as the storage array, each value rounded toward -inf (see the module doc)."""
    torch_dtype, np_dtype, _ = LOGPROB_DTYPES[dtype_name]
    exact = logprobs.detach().to(device="cpu", dtype=torch.float64)
    if torch_dtype == torch.float32:
        stored = exact.to(torch.float32)
        # One step down (toward -inf) where nearest rounding went up.
        stored = torch.where(stored.double() > exact, torch.nextafter(stored, torch.tensor(-np.inf)), stored)
        return stored.numpy().astype(np_dtype, copy=False)
    stored = exact.to(torch_dtype)
    bits = stored.view(torch.int16).to(torch.int32)
    # For a value <= 0 (sign bit set: -0.0, negatives, -inf), one more unit in the magnitude
    # bits is the next representable value toward -inf. A positive value (an inconsistent
    # log-prob > 0) is stepped down by one unit instead.
    up = stored.double() > exact
    negative = bits < 0
    bits = torch.where(up & negative, bits + 1, torch.where(up & ~negative, bits - 1, bits))
    # -0.0 rounded up from a tiny negative: 0x8000 + 1 is the smallest negative subnormal.
    out = (bits & 0xFFFF).to(torch.int32).numpy().astype(np.uint16)
    return out.view(np.float16) if torch_dtype == torch.float16 else out


def from_storage(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A storage array (or memory-map slice) as a torch tensor of the recorded dtype (a copy)."""
    torch_dtype = LOGPROB_DTYPES[dtype_name][0]
    array = np.ascontiguousarray(array)
    if torch_dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


# --------------------------------------------------------------------------- files

class _HashingFile:
    """A binary file that hashes what is written to it (np.save writes through ``write``)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.size = 0

    def write(self, data):
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.f.write(view)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_npy(path: Path, array: np.ndarray) -> dict:
    """Write ``array`` to ``path`` atomically (temp name, fsync, rename); its sha256 and size."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        hashing = _HashingFile(f)
        np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"file": path.name, "sha256": hashing.sha.hexdigest(), "bytes": hashing.size}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return sha.hexdigest()
            sha.update(block)


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace ``manifest.json`` atomically: readers see the old one or the new one, whole."""
    path = directory / MANIFEST
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def read_manifest(path) -> dict:
    """The manifest of the cache at ``path`` (a directory), checked to be a fastkd cache."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"no teacher cache at {path}: {MANIFEST} is missing")
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{file} is not a fastkd teacher cache (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version={manifest.get('format_version')!r}; this fastkd reads "
                         f"version {FORMAT_VERSION}")
    return manifest


def payload_bytes_per_token(manifest: dict) -> float:
    """Bytes of ids and log-probs per token at the cache's nominal width k (no headers)."""
    value_bytes = LOGPROB_DTYPES[manifest["dtype"]][1].itemsize
    return manifest["k"] * (ID_DTYPE.itemsize + value_bytes)
