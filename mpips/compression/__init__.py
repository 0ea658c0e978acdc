"""Gradient codecs for the push path, and error feedback over any of them. Pure: torch and numpy, no MPI.

- ``record``: the self-describing record of one compressed chunk, the codec interface
  (``ChunkCodec``: ``encode`` a chunk into a record, decode it back) and record parsing;
- ``codecs``: fp16, bf16, topk, randomk, qsgd, sign (``make_codec``), their wire ids taken from
  ``mpips.transport.Codec``, and DGC's sparsity warm-up;
- ``payload``: a compressed push's payload validated and decoded (``parse_payload``);
- ``feedback``: error feedback and momentum correction, decorating any codec (``make_encoder``).

Every name is importable from ``mpips.compression`` itself.
"""

from mpips.compression.codecs import BIASED, CODECS, QSGD, Half, RandomK, Sign, TopK, make_codec, sparsity_ratio
from mpips.compression.feedback import ErrorFeedback, MomentumCorrection, NoFeedback, make_encoder
from mpips.compression.payload import PushGradient, parse_payload, payload_bound
from mpips.compression.record import (
    RECORD,
    RECORD_BYTES,
    ChunkCodec,
    Decoded,
    PayloadError,
    chunk_ranges,
    chunk_seed,
    parse_chunk,
)

__all__ = [
    "BIASED",
    "CODECS",
    "QSGD",
    "RECORD",
    "RECORD_BYTES",
    "ChunkCodec",
    "Decoded",
    "ErrorFeedback",
    "Half",
    "MomentumCorrection",
    "NoFeedback",
    "PayloadError",
    "PushGradient",
    "RandomK",
    "Sign",
    "TopK",
    "chunk_ranges",
    "chunk_seed",
    "make_codec",
    "make_encoder",
    "parse_chunk",
    "parse_payload",
    "payload_bound",
    "sparsity_ratio",
]
