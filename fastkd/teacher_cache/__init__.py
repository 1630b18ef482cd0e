"""Offline teachers: record a teacher's sparse distributions once, train students from disk.

* :class:`TeacherCacheWriter` / :func:`write_teacher_cache`: top-k log-probs or RS-KD
  samples per token, from a model's logits or any other source (a vLLM server's top-k),
  in memory-mappable ``.npy`` shards with a JSON manifest; resumable, crash-safe.
* :class:`TeacherCacheReader`: batches aligned with the token batches, checked against the
  student's vocabulary and the temperature.
* :func:`topk_logprobs`, :func:`rskd_sample`: a full distribution made sparse.
* :func:`retemper`: log-probs recorded at one temperature, at another.

The format, the sampler and where re-tempering is approximate: ``docs/offline.md``.
"""
from .format import read_manifest
from .reader import TeacherCacheReader
from .retemper import retemper
from .sparsify import rskd_sample, topk_logprobs
from .writer import TeacherCacheWriter, write_teacher_cache

__all__ = ["TeacherCacheWriter", "write_teacher_cache", "TeacherCacheReader", "read_manifest",
           "topk_logprobs", "rskd_sample", "retemper"]
