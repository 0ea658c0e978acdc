"""The chunk rule of the transport layer: no MPI call moves more than one chunk. Pure (no MPI).

Open MPI 4.1 implements MPI-3.1, where every count is a C ``int``: a send, receive or ``Get``
of more than 2**31-1 elements fails with ``MPI_ERR_ARG`` (mpi4py 4.1 has no large-count
fallback), and HDF5 1.10's MPI-IO driver refuses a single write over 2 GiB ("can't convert from
size to size_i"). So every transfer -- pushes, window pulls, message pulls, the final gather,
checkpoint writes -- is cut into chunks of at most ``--chunk-bytes`` bytes, moved as bytes, so
a chunk's count is its size in bytes. ``mpips.transport`` makes the MPI calls; the checkpoint
writer cuts its slabs with the same ``chunks``.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CHUNK_BYTES", "MAX_CHUNK_BYTES", "MIN_BUCKET_BYTES", "MIN_CHUNK_BYTES", "bucket_ranges", "chunk_count",
    "chunks",
]

# 1 GiB, well below 2**31-1 bytes and below Linux's largest single read/write (0x7ffff000 bytes),
# which single-copy transports (CMA) and file systems hit first.
MAX_CHUNK_BYTES = 2**30
# A push's 64-byte header travels in its first chunk (mpips.transport.HEADER_BYTES).
MIN_CHUNK_BYTES = 64
# Window pulls, message pulls and pushes of 1 MB to 1 GB between 2 ranks (README "How it works"):
# chunks of 1 MiB to 1 GiB all ran within the noise of one call per transfer, 256 KiB lost at 1 GB.
# 4 MiB (BytePS's choice too) costs nothing measurable and stays small enough to overlap later.
DEFAULT_CHUNK_BYTES = 4 * 2**20
# bsp servers apply and publish a shard in buckets of --chunk-bytes (mpips.client.pullahead), but no
# smaller than this: every bucket costs an optimizer call, a window sync and a notice per worker.
MIN_BUCKET_BYTES = 2**14


def chunks(nbytes: int, limit: int) -> list[tuple[int, int]]:
    """The byte ranges ``(start, stop)`` that cut ``nbytes`` bytes into chunks of at most ``limit``.

    Every range but the last is ``limit`` long; no bytes give no chunks. ``limit`` is capped at
    MAX_CHUNK_BYTES, so no caller can build a chunk that one MPI call cannot carry.

    Raises:
        ValueError: ``nbytes`` is negative or ``limit`` is not positive.
    """
    if nbytes < 0 or limit < 1:
        raise ValueError(f"cannot cut {nbytes} bytes into chunks of {limit} bytes")
    limit = min(limit, MAX_CHUNK_BYTES)
    return [(a, min(a + limit, nbytes)) for a in range(0, nbytes, limit)]


def chunk_count(nbytes: int, limit: int) -> int:
    """``len(chunks(nbytes, limit))``, without building the ranges."""
    if nbytes < 0 or limit < 1:
        raise ValueError(f"cannot cut {nbytes} bytes into chunks of {limit} bytes")
    return -(-nbytes // min(limit, MAX_CHUNK_BYTES))


def bucket_ranges(numel: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Element ranges ``(lo, hi)`` that cut a shard of ``numel`` float32 elements into the
    buckets a bsp server applies and publishes one at a time: ``max(chunk_bytes,
    MIN_BUCKET_BYTES) // 4`` elements each, the last shorter; one empty bucket for no elements."""
    return chunks(numel, max(chunk_bytes, MIN_BUCKET_BYTES) // 4) or [(0, 0)]
