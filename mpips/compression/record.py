"""The record of one compressed chunk, the codec interface (``ChunkCodec``) and record parsing.
Pure: torch and numpy, no MPI.

A worker cuts each server's gradient slice into chunks of ``--chunk-bytes`` worth of float32
elements (``chunk_ranges``) and encodes every chunk into one self-describing **record**::

    offset 0   uint32  elements   n, the chunk's length (the server checks it against its layout)
    offset 4   uint32  count      codec-specific: entries kept (topk, randomk), levels (qsgd), n
    offset 8   uint32  body       bytes of the body that follows (before padding)
    offset 12  float32 scale      codec-specific: 1.0, or the norm / mean magnitude / n/k
    offset 16  body, zero-padded to a multiple of 4 bytes (so every record stays 4-byte aligned)

``parse_chunk`` validates one record (``PayloadError`` otherwise) and decodes it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from mpips.chunking import chunks
from mpips.transport.wire import Codec

__all__ = [
    "RECORD",
    "RECORD_BYTES",
    "ChunkCodec",
    "Decoded",
    "PayloadError",
    "chunk_ranges",
    "chunk_seed",
    "parse_chunk",
]

RECORD = struct.Struct("<IIIf")
RECORD_BYTES = RECORD.size  # 16


class PayloadError(ValueError):
    """A compressed payload fails validation; the message says which chunk and what is wrong."""


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


def chunk_ranges(numel: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Element ranges ``(lo, hi)`` that cut ``numel`` float32 elements into chunks of
    ``chunk_bytes // 4`` elements (the last shorter): the unit a codec encodes."""
    return chunks(numel, max(1, chunk_bytes // 4))


def chunk_seed(seed: int, step: int, worker: int, server: int, chunk: int) -> int:
    """A 63-bit seed for one chunk of one push, the same on worker and server (splitmix64 mixing).

    randomk draws its indices from it (the server regenerates them); qsgd its rounding noise.
    """
    x = 0
    for v in (seed, step, worker, server, chunk):
        x = (x + (v & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1



@dataclass
class Decoded:
    """One decoded chunk of ``n`` elements: dense ``values`` [n], or ``indices`` (int64 [k]) and
    ``values`` (float32 [k]) of a sparse one."""

    n: int
    values: torch.Tensor
    indices: torch.Tensor | None = None

    def add_into(self, acc: torch.Tensor, alpha: float = 1.0) -> None:
        """``acc += alpha * self`` for ``acc`` float32 [n]; sparse chunks touch only their entries."""
        if self.indices is None:
            acc.add_(self.values, alpha=alpha)
        else:
            acc.index_add_(0, self.indices, self.values, alpha=alpha)

    def dense(self) -> torch.Tensor:
        """float32 [n]."""
        if self.indices is None:
            return self.values
        out = torch.zeros(self.n, dtype=torch.float32)
        out[self.indices] = self.values
        return out

    def finite(self) -> bool:
        return bool(torch.isfinite(self.values).all())


class ChunkCodec:
    """One codec: ``encode`` a float32 chunk into a record, ``decode`` a record's body back.

    Subclasses set ``name``, ``wire_id`` and implement ``_encode``, ``count_ok``,
    ``body_bytes`` and ``_decode``.
    """

    name = ""
    wire_id = Codec.RAW32  # the push header's codec field: each codec sets its own
    sparse = False

    def encode(self, x: torch.Tensor, seed: int = 0) -> np.ndarray:
        """The record (uint8 [16 + padded body]) of chunk ``x`` (float32 [n], n >= 1).

        ``seed``: ``chunk_seed`` of this chunk (randomk and qsgd draw from it).
        """
        n = x.numel()
        count, scale, body = self._encode(x.detach().reshape(-1).to(torch.float32), seed)
        raw = np.frombuffer(body, dtype=np.uint8) if not isinstance(body, np.ndarray) else body.view(np.uint8)
        out = np.zeros(RECORD_BYTES + _pad4(raw.size), dtype=np.uint8)
        RECORD.pack_into(out, 0, n, count, raw.size, scale)
        out[RECORD_BYTES : RECORD_BYTES + raw.size] = raw.reshape(-1)
        return out

    def roundtrip(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """``decode(encode(x))`` as float32 [n]: what the server will see of ``x``."""
        return parse_chunk(self, self.encode(x, seed), x.numel(), seed)[0].dense()

    def max_record_bytes(self, n: int) -> int:
        """The largest record this codec makes for a chunk of ``n`` elements."""
        return RECORD_BYTES + _pad4(self.body_bytes(n, self.max_count(n)))

    def max_count(self, n: int) -> int:
        return n

    def begin_step(self, step: int) -> None:
        """The worker is about to encode ``step``'s chunks (the sparse codecs' warm-up follows it)."""

    # -- per codec ---------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, seed: int) -> tuple[int, float, np.ndarray]:
        raise NotImplementedError

    def count_ok(self, n: int, count: int) -> bool:
        raise NotImplementedError

    def body_bytes(self, n: int, count: int) -> int:
        raise NotImplementedError

    def _decode(self, n: int, count: int, scale: float, body: np.ndarray, seed: int) -> Decoded:
        raise NotImplementedError



def parse_chunk(codec: ChunkCodec, buf: np.ndarray, n: int, seed: int = 0, at: int = 0,
                finite: bool = True) -> tuple[Decoded, int]:
    """Validate and decode the record at byte ``at`` of ``buf`` for a chunk of ``n`` elements.

    ``finite=False`` lets a NaN or Inf scale through: the push announced a non-finite gradient
    (its header's norm), which the server drops without applying it.

    Returns the decoded chunk and the offset just past the record.

    Raises:
        PayloadError: a short record, wrong element count, bad count, wrong body length,
            non-finite or negative scale, indices out of range or unsorted, levels too large.
    """
    if buf.size - at < RECORD_BYTES:
        raise PayloadError(f"{buf.size - at} bytes left, shorter than a record header")
    elements, count, body, scale = RECORD.unpack_from(buf, at)
    if elements != n:
        raise PayloadError(f"record for {elements} elements, the chunk has {n}")
    if not codec.count_ok(n, count):
        raise PayloadError(f"count {count} is not valid for {codec.name} on {n} elements")
    if body != codec.body_bytes(n, count):
        raise PayloadError(f"body of {body} bytes, {codec.name} with count {count} needs {codec.body_bytes(n, count)}")
    end = at + RECORD_BYTES + _pad4(body)
    if end > buf.size:
        raise PayloadError(f"record needs {end - at} bytes, only {buf.size - at} left")
    if (finite and not math.isfinite(scale)) or scale < 0:
        raise PayloadError(f"scale {scale} is not a finite, non-negative number")
    return codec._decode(n, count, scale, buf[at + RECORD_BYTES : at + RECORD_BYTES + body], seed), end

