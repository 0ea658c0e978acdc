"""A compressed push's payload: its records validated and decoded. Pure: torch and numpy, no MPI.

A compressed push's payload is its records in chunk order, then one uint8 per tensor run of the
shard (1 = that tensor got a gradient), as for raw float32. ``parse_payload`` checks every
record (elements, count, body length, finite scale, index range and order, quantisation levels)
and raises ``PayloadError`` before anything is decoded into a gradient; the server turns that
into a ``MalformedMessage`` naming the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpips.compression.record import ChunkCodec, Decoded, PayloadError, parse_chunk

__all__ = [
    "PushGradient",
    "parse_payload",
    "payload_bound",
]

@dataclass
class PushGradient:
    """A validated compressed gradient slice: decoded chunks at element offsets of the slice."""

    n: int
    parts: list[tuple[int, Decoded]]

    def add_into(self, acc: torch.Tensor, alpha: float = 1.0) -> None:
        """``acc += alpha * gradient`` for ``acc`` float32 [n]; sparse chunks with ``index_add_``."""
        for lo, d in self.parts:
            d.add_into(acc[lo : lo + d.n], alpha)

    def dense(self, out: torch.Tensor) -> torch.Tensor:
        """The gradient written into ``out`` (float32 [n]); returns ``out``."""
        out.zero_()
        self.add_into(out)
        return out

    def finite(self) -> bool:
        return all(d.finite() for _, d in self.parts)


def parse_payload(codec: ChunkCodec, payload: np.ndarray, ranges: Sequence[tuple[int, int]],
                  seeds: Sequence[int], runs: int, finite: bool = True) -> tuple[PushGradient, np.ndarray]:
    """Validate a whole compressed push payload (records, then ``runs`` mask bytes).

    Args:
        codec: the job's codec.
        payload: uint8 [payload bytes].
        ranges: the slice's chunk ranges (``chunk_ranges``).
        seeds: ``chunk_seed`` of each chunk.
        runs: tensor runs of the shard (mask bytes).
        finite: False where the push announced a non-finite gradient (see ``parse_chunk``).

    Returns:
        (the gradient, the mask: uint8 [runs], 0/1).

    Raises:
        PayloadError: naming the chunk and what is wrong, or a bad mask / trailing bytes.
    """
    at, parts = 0, []
    body = payload[: max(0, payload.size - runs)]
    for c, ((lo, hi), seed) in enumerate(zip(ranges, seeds, strict=True)):
        try:
            decoded, at = parse_chunk(codec, body, hi - lo, seed, at, finite)
        except PayloadError as exc:
            raise PayloadError(f"chunk {c} (elements {lo}..{hi - 1}): {exc}") from None
        parts.append((lo, decoded))
    if at != body.size or payload.size < runs:
        raise PayloadError(f"{payload.size} payload bytes, the records and mask take {at + runs}")
    mask = payload[payload.size - runs :]
    if mask.max(initial=0) > 1:
        raise PayloadError("the tensor mask is not 0/1")
    return PushGradient(ranges[-1][1] if ranges else 0, parts), mask


def payload_bound(codec: ChunkCodec | None, ranges: Sequence[tuple[int, int]], runs: int) -> int:
    """The largest push payload in bytes for a slice cut into ``ranges`` with ``runs`` mask bytes."""
    if codec is None:
        return 4 * (ranges[-1][1] if ranges else 0) + runs
    return sum(codec.max_record_bytes(hi - lo) for lo, hi in ranges) + runs

