"""Gradient codecs for the push path, and error feedback over any of them. Pure: torch and numpy, no MPI.

A worker cuts each server's gradient slice into chunks of ``--chunk-bytes`` worth of float32
elements (``chunk_ranges``) and encodes every chunk into one self-describing **record**::

    offset 0   uint32  elements   n, the chunk's length (the server checks it against its layout)
    offset 4   uint32  count      codec-specific: entries kept (topk, randomk), levels (qsgd), n
    offset 8   uint32  body       bytes of the body that follows (before padding)
    offset 12  float32 scale      codec-specific: 1.0, or the norm / mean magnitude / n/k
    offset 16  body, zero-padded to a multiple of 4 bytes (so every record stays 4-byte aligned)

A compressed push's payload is its records in chunk order, then one uint8 per tensor run of the
shard (1 = that tensor got a gradient), as for raw float32. ``parse_payload`` checks every
record (elements, count, body length, finite scale, index range and order, quantisation levels)
and raises ``PayloadError`` before anything is decoded into a gradient; the server turns that
into a ``MalformedMessage`` naming the worker.

Codecs (``CODECS``; ``wire_id`` is the push header's codec field, ``mpips.transport.Codec``):

- ``fp16`` / ``bf16``: every element in 16 bits (fp16 saturates at +-65504 instead of overflowing).
- ``topk``: the ``ratio`` fraction of entries largest in magnitude, as k float32 values, a
  count per block of 65536 elements and each index's low 16 bits, ascending (6 bytes per entry);
  biased, so error feedback is on by default (top-k sparsification with memory: Stich et al.
  2018; Aji & Heafield 2017; deep gradient compression: Lin et al. 2018).
- ``randomk``: ``ratio`` of the entries chosen by a seeded permutation that the server
  regenerates (``chunk_seed``), so only the values travel. Without error feedback the values
  are scaled by n/k (unbiased: Stich et al. 2018, Wangni et al. 2018); with it they are not
  (a contraction, as error feedback needs: Karimireddy et al. 2019).
- ``qsgd``: stochastic rounding of |x| / ||bucket||_inf to ``levels`` levels in buckets of 512
  elements, one int8 (sign * level) per element and one float32 max-norm per bucket; unbiased
  (QSGD: Alistarh et al. 2017, bucket size d = 512 and max-norm scaling as in its experiments).
- ``sign``: one bit per element and the chunk's mean magnitude ||x||_1 / n as the scale (signSGD:
  Bernstein et al. 2018; scaled sign with error feedback, EF-SignSGD: Karimireddy et al. 2019);
  biased, error feedback on by default.

Error feedback (``ErrorFeedback``) wraps any codec: per worker it keeps a float32 residual as
long as the flat gradient; a chunk at flat offset ``at`` is sent as ``C(g + e)`` and the residual
becomes ``e <- (g + e) - decode(C(g + e))`` (1-bit SGD with error feedback: Seide et al. 2014;
EF-SGD: Karimireddy et al. 2019). The residual is worker state (``state_dict``) that checkpoints
keep, so resuming is exact.

Deep gradient compression (Lin et al., ICLR 2018) adds two options for the sparse codecs:

- **momentum correction** (``MomentumCorrection``): the worker runs the momentum itself, per
  element, ``u <- m u + g``, ``v <- v + u`` (Nesterov: ``u <- m (u + g)``, ``v <- v + u + g``),
  sends ``C(v)`` and zeroes ``u`` and ``v`` where it sent (momentum factor masking), so the
  servers apply plain SGD to the sum of what arrives (``v`` is error feedback's residual, with
  momentum in it). DGC's Algorithm 4 and its code (``DGCSGDMemory``).
- **sparsity warm-up** (``sparsity_ratio``): over the first ``warmup_steps`` steps the fraction
  sent falls exponentially from near 1 to ``ratio``: ``ratio ** ((t + 1) / (warmup_steps + 1))``
  at step t (DGC: 75%, 93.75%, 98.4375%, ... sparsity over the first epochs; its code's default
  coefficient ``ratio ** (1 / (warmup + 1))``, here per step instead of per epoch).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpips.chunking import chunks

__all__ = [
    "BIASED",
    "CODECS",
    "RECORD_BYTES",
    "ChunkCodec",
    "Decoded",
    "ErrorFeedback",
    "MomentumCorrection",
    "NoFeedback",
    "PayloadError",
    "PushGradient",
    "chunk_ranges",
    "chunk_seed",
    "make_codec",
    "make_encoder",
    "parse_payload",
    "payload_bound",
    "sparsity_ratio",
]

RECORD = struct.Struct("<IIIf")
RECORD_BYTES = RECORD.size  # 16
FP16_MAX = 65504.0
BIASED = ("topk", "sign")  # error feedback is on by default for these


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


def sparsity_ratio(step: int, ratio: float, warmup_steps: int) -> float:
    """The fraction of entries a sparse codec sends at ``step`` (0-based): DGC's exponential
    warm-up of the sparsity, ``ratio ** ((step + 1) / (warmup_steps + 1))`` during the first
    ``warmup_steps`` steps (each step sends ``ratio ** (1 / (warmup_steps + 1))`` of the one before),
    then ``ratio``.

    ``ratio`` 0.01 over 3 steps: 0.316, 0.1, 0.0316, then 0.01 (sparsity 68%, 90%, 96.8%, 99%).
    """
    if step >= warmup_steps or ratio >= 1:
        return ratio
    return ratio ** ((max(0, step) + 1) / (warmup_steps + 1))


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


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
    wire_id = 0
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


class Half(ChunkCodec):
    """fp16 or bf16: two bytes per element; count = n, scale = 1."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name, self.wire_id = ("fp16", 1) if dtype == torch.float16 else ("bf16", 2)

    def _encode(self, x, seed):
        if self.dtype == torch.float16:
            x = x.clamp(-FP16_MAX, FP16_MAX)  # saturate: a finite gradient stays finite (NaN stays NaN)
        return x.numel(), 1.0, x.to(self.dtype).view(torch.int16).numpy()

    def count_ok(self, n, count):
        return count == n

    def body_bytes(self, n, count):
        return 2 * n

    def _decode(self, n, count, scale, body, seed):
        return Decoded(n, torch.from_numpy(body.view(np.int16)).view(self.dtype).to(torch.float32))


def _count(n: int, ratio: float) -> int:
    """Entries a sparse codec sends of a chunk of ``n`` at ``ratio``: ceil(ratio x n), at least one."""
    return min(n, max(1, math.ceil(ratio * n)))


def _sparse_init(codec: TopK | RandomK, ratio: float, warmup_steps: int) -> None:
    """``target``: the ratio after warm-up; ``ratio``: this step's; ``peak``: the largest any
    step uses (step 0's), which sizes the buffers (``max_record_bytes``) on worker and server."""
    codec.target, codec.warmup_steps = ratio, max(0, warmup_steps)
    codec.peak = sparsity_ratio(0, ratio, codec.warmup_steps)
    codec.ratio = codec.peak if codec.warmup_steps else ratio


class TopK(ChunkCodec):
    """The ``ratio`` fraction (at least one) of entries largest in magnitude; biased.

    Body: the k values (float32), then how many of them fall in each block of 65536 elements
    (uint32 per block), then each index's low 16 bits (uint16), ascending: 6 bytes per entry
    plus 4 per block, where int32 indices would take 8 (at 1% of a 1 M-element chunk: 66x fewer
    bytes than float32 instead of 50x).
    """

    name, wire_id, sparse = "topk", 3, True
    BLOCK = 2**16

    def __init__(self, ratio: float, warmup_steps: int = 0):
        _sparse_init(self, ratio, warmup_steps)

    def max_count(self, n):
        return _count(n, self.peak)

    def begin_step(self, step):
        self.ratio = sparsity_ratio(step, self.target, self.warmup_steps)

    def _blocks(self, n: int) -> int:
        return -(-n // self.BLOCK)

    def _encode(self, x, seed):
        n, k = x.numel(), _count(x.numel(), self.ratio)
        xn = x.numpy()
        # numpy's introselect: ~7x faster than torch.topk here (4 M floats, k = 40 000, one thread)
        idx = np.sort(np.argpartition(np.abs(xn), n - k)[n - k :])
        counts = np.bincount(idx // self.BLOCK, minlength=self._blocks(n)).astype(np.uint32)
        low = (idx % self.BLOCK).astype(np.uint16)
        # values first, then the counts: both stay 4-byte aligned
        return k, 1.0, np.concatenate([xn[idx].view(np.uint8), counts.view(np.uint8), low.view(np.uint8)])

    def count_ok(self, n, count):
        return 1 <= count <= n

    def body_bytes(self, n, count):
        return 6 * count + 4 * self._blocks(n)

    def _decode(self, n, count, scale, body, seed):
        nb = self._blocks(n)
        counts = body[4 * count : 4 * count + 4 * nb].view(np.uint32).astype(np.int64)
        if int(counts.sum()) != count:
            raise PayloadError(f"block counts add up to {int(counts.sum())}, not the {count} entries")
        low = body[4 * count + 4 * nb : 6 * count + 4 * nb].view(np.uint16).astype(np.int64)
        idx = low + self.BLOCK * np.repeat(np.arange(nb, dtype=np.int64), counts)
        if idx.size and (idx[-1] >= n or (np.diff(idx) <= 0).any()):
            raise PayloadError(f"indices not ascending inside 0..{n - 1}")
        return Decoded(n, torch.from_numpy(body[: 4 * count].view(np.float32)), torch.from_numpy(idx))


class RandomK(ChunkCodec):
    """``ratio`` of the entries at indices drawn from the chunk's seed; only values travel.

    ``scaled``: multiply by n/k (unbiased; without error feedback), else send them as they are.
    """

    name, wire_id, sparse = "randomk", 4, True

    def __init__(self, ratio: float, scaled: bool = True, warmup_steps: int = 0):
        _sparse_init(self, ratio, warmup_steps)
        self.scaled = scaled

    def max_count(self, n):
        return _count(n, self.peak)

    def begin_step(self, step):
        self.ratio = sparsity_ratio(step, self.target, self.warmup_steps)

    def indices(self, n: int, k: int, seed: int) -> torch.Tensor:
        """int64 [k], ascending: the entries chunk seed ``seed`` selects (numpy's PCG64; its
        sampling without replacement costs O(k), where a permutation of n costs O(n))."""
        picked = np.random.default_rng(seed).choice(n, k, replace=False, shuffle=False)
        return torch.from_numpy(np.sort(picked).astype(np.int64))

    def _encode(self, x, seed):
        n, k = x.numel(), _count(x.numel(), self.ratio)
        return k, (n / k if self.scaled else 1.0), x[self.indices(n, k, seed)].numpy()

    def count_ok(self, n, count):
        return 1 <= count <= n

    def body_bytes(self, n, count):
        return 4 * count

    def _decode(self, n, count, scale, body, seed):
        vals = torch.from_numpy(body[: 4 * count].view(np.float32))
        return Decoded(n, vals * scale if scale != 1.0 else vals, self.indices(n, count, seed))


class QSGD(ChunkCodec):
    """Stochastic rounding of |x| / ||bucket||_inf to ``levels`` levels, per bucket of ``BUCKET``
    elements (the paper's bucketing: a chunk-wide norm would round nearly every entry to 0);
    body = the buckets' float32 norms, then one int8 (sign * level) per element. Unbiased.
    The record's scale is the largest bucket norm.

    The scale is each bucket's largest magnitude, the max-norm variant that QSGD's experiments use
    in place of the 2-norm of its analysis (Alistarh et al. 2017): the levels then span
    the values actually present, so each element's rounding error (at most norm / levels) is
    smaller; still unbiased (|x| / max <= 1). Measured on the default job (README): with the
    2-norm, 0.983 / 0.983 / 0.981 held-out accuracy at seeds 0 / 1 / 2 against float32's
    0.986 / 0.981 / 0.986; with the max-norm 0.989 / 0.986 / 0.986, same bytes. The decoder does
    not care which norm: it multiplies each level by norm / levels."""

    name, wire_id = "qsgd", 5
    BUCKET = 512

    def __init__(self, levels: int):
        if not 1 <= levels <= 127:
            raise ValueError(f"qsgd levels {levels}: must be 1..127 (one int8 per element)")
        self.levels = levels

    def _buckets(self, n: int) -> int:
        return -(-n // self.BUCKET)

    def _encode(self, x, seed):
        n, nb = x.numel(), self._buckets(x.numel())
        padded = torch.zeros(nb * self.BUCKET)
        padded[:n] = x
        rows = padded.view(nb, self.BUCKET)
        norms = rows.abs().amax(dim=1)  # max-norm: see the class docstring
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        r = rows.abs() * (self.levels / safe[:, None])
        noise = torch.rand(nb * self.BUCKET, generator=_generator(seed)).view(nb, self.BUCKET)
        level = torch.floor(r + noise).clamp_(max=self.levels).nan_to_num_(0.0)
        q = (level * torch.sign(rows)).to(torch.int8).reshape(-1)[:n]
        top = float(norms.max())
        return self.levels, top, np.concatenate([norms.numpy().view(np.uint8), q.numpy().view(np.uint8)])

    def count_ok(self, n, count):
        return 1 <= count <= 127

    def body_bytes(self, n, count):
        return 4 * self._buckets(n) + n

    def _decode(self, n, count, scale, body, seed):
        nb = self._buckets(n)
        norms = body[: 4 * nb].view(np.float32)
        if math.isfinite(scale) and not ((norms >= 0) & (norms <= scale)).all():
            raise PayloadError(f"bucket norms outside 0..{scale} (the record's largest)")
        q = body[4 * nb : 4 * nb + n].view(np.int8)
        if q.size and int(np.abs(q.astype(np.int16)).max()) > count:
            raise PayloadError(f"a level above the {count} levels announced")
        padded = torch.zeros(nb * self.BUCKET)
        padded[:n] = torch.from_numpy(q.astype(np.float32))
        values = padded.view(nb, self.BUCKET) * (torch.from_numpy(norms.copy()) / count)[:, None]
        return Decoded(n, values.reshape(-1)[:n])


class Sign(ChunkCodec):
    """One bit per element (1 = non-negative) and the mean magnitude ||x||_1 / n as the scale."""

    name, wire_id = "sign", 6

    def _encode(self, x, seed):
        return x.numel(), float(x.abs().mean()), np.packbits((x >= 0).numpy())

    def count_ok(self, n, count):
        return count == n

    def body_bytes(self, n, count):
        return (n + 7) // 8

    def _decode(self, n, count, scale, body, seed):
        bits = torch.from_numpy(np.unpackbits(body[: (n + 7) // 8], count=n).astype(np.float32))
        return Decoded(n, (bits * 2 - 1) * scale)


CODECS = ("none", "fp16", "bf16", "topk", "randomk", "qsgd", "sign")


def make_codec(name: str, ratio: float = 0.01, levels: int = 8, error_feedback: bool = False,
               warmup_steps: int = 0) -> ChunkCodec | None:
    """The codec called ``name`` (None for ``none``: raw float32, the transport's own format).

    ``warmup_steps``: topk, randomk: DGC's sparsity warm-up (``sparsity_ratio``) over this many
    steps; worker and server must agree on it (it sizes the records they exchange).

    Raises:
        ValueError: an unknown name or a ratio outside (0, 1].
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; one of {', '.join(CODECS)}")
    if name in ("topk", "randomk") and not 0 < ratio <= 1:
        raise ValueError(f"compression ratio {ratio}: must be in (0, 1]")
    return {
        "none": lambda: None,
        "fp16": lambda: Half(torch.float16),
        "bf16": lambda: Half(torch.bfloat16),
        "topk": lambda: TopK(ratio, warmup_steps),
        "randomk": lambda: RandomK(ratio, scaled=not error_feedback, warmup_steps=warmup_steps),
        "qsgd": lambda: QSGD(levels),
        "sign": lambda: Sign(),
    }[name]()


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


class NoFeedback:
    """A codec used as it is: ``encode(x, seed, at)`` ignores ``at``; no state."""

    def __init__(self, codec: ChunkCodec):
        self.codec = codec

    def begin_step(self, step: int) -> None:
        self.codec.begin_step(step)

    def encode(self, x: torch.Tensor, seed: int, at: int) -> np.ndarray:
        return self.codec.encode(x, seed)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ErrorFeedback:
    """Error feedback over any codec: ``e`` float32 [numel] holds what was not sent yet.

    ``encode(g, seed, at)`` sends ``C(g + e[at:at+n])`` and sets ``e[at:at+n]`` to what that
    left out, so sent + new residual = gradient + old residual (up to float32 rounding of the
    sum). Seide et al. 2014 (1-bit SGD); Karimireddy et al. 2019 (EF-SignSGD); Stich et al. 2018.
    """

    def __init__(self, codec: ChunkCodec, numel: int):
        self.codec = codec
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def begin_step(self, step: int) -> None:
        """The worker starts encoding ``step`` (the codec's sparsity warm-up follows it)."""
        self.codec.begin_step(step)

    def encode(self, x: torch.Tensor, seed: int, at: int) -> np.ndarray:
        """The record of chunk ``x`` (float32 [n]) at flat offset ``at``, residual included."""
        e = self.residual[at : at + x.numel()]
        corrected = x + e
        record = self.codec.encode(corrected, seed)
        sent = parse_chunk(self.codec, record, x.numel(), seed)[0]
        torch.sub(corrected, sent.dense(), out=e)
        return record

    def state_dict(self) -> dict[str, Any]:
        """``residual``: float32 [numel] (a view: copy before changing it)."""
        return {"residual": self.residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r = state.get("residual")
        if r is None:
            self.residual.zero_()
            return
        if r.numel() != self.residual.numel():
            raise ValueError(f"error-feedback residual of {r.numel()} elements, the model has {self.residual.numel()}")
        self.residual.copy_(r.reshape(-1))


class MomentumCorrection(ErrorFeedback):
    """DGC's momentum correction over a sparse codec (topk, randomk): the worker's own momentum.

    Per element: ``u <- m u + g`` and ``v <- v + u`` (``nesterov``: ``u <- m (u + g)``,
    ``v <- v + u + g``, torch's Nesterov SGD rewritten for accumulation); send ``C(v)``; then
    ``v <- v - sent`` and, momentum factor masking, ``u <- 0`` where something was sent. With every
    entry sent each step and no masking this is torch's momentum SGD (the servers applying plain
    SGD to what arrives); DGC sends a few and lets the rest accumulate in ``v``, which is error
    feedback's residual with the momentum in it (Lin et al. 2018, Section 3.2 and Algorithm 4).
    """

    def __init__(self, codec: ChunkCodec, numel: int, momentum: float, nesterov: bool = False):
        if not codec.sparse:
            raise ValueError(f"momentum correction needs a sparse codec (topk, randomk), not {codec.name}")
        if getattr(codec, "scaled", False):
            raise ValueError("momentum correction needs randomk unscaled, as error feedback has it"
                             " (make_codec(..., error_feedback=True))")
        super().__init__(codec, numel)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity = torch.zeros(numel, dtype=torch.float32)  # u

    def encode(self, x: torch.Tensor, seed: int, at: int) -> np.ndarray:
        """The record of chunk ``x`` (float32 [n], the gradient) at flat offset ``at``."""
        n = x.numel()
        u, v = self.velocity[at : at + n], self.residual[at : at + n]
        if self.nesterov:
            u.add_(x).mul_(self.momentum)
            v.add_(u).add_(x)
        else:
            u.mul_(self.momentum).add_(x)
            v.add_(u)
        record = self.codec.encode(v, seed)
        sent = parse_chunk(self.codec, record, n, seed)[0]
        v.index_add_(0, sent.indices, sent.values, alpha=-1.0)  # topk: exactly 0 there
        u.index_fill_(0, sent.indices, 0.0)
        return record

    def state_dict(self) -> dict[str, Any]:
        """``residual``: v, float32 [numel]; ``momentum``: u, float32 [numel] (views)."""
        return {"residual": self.residual, "momentum": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        u = state.get("momentum")
        if u is None:
            self.velocity.zero_()
            return
        if u.numel() != self.velocity.numel():
            raise ValueError(f"momentum-correction velocity of {u.numel()} elements, the model has"
                             f" {self.velocity.numel()}")
        self.velocity.copy_(u.reshape(-1))


def make_encoder(codec: ChunkCodec, numel: int, error_feedback: bool, momentum: float | None = None,
                 nesterov: bool = False) -> ErrorFeedback | NoFeedback:
    """The worker's encoder: ``codec`` with or without an error-feedback residual of ``numel``.

    ``momentum``: not None, DGC's momentum correction with this factor (``MomentumCorrection``;
    it keeps a residual of its own, whatever ``error_feedback`` says).
    """
    if momentum is not None:
        return MomentumCorrection(codec, numel, momentum, nesterov)
    return ErrorFeedback(codec, numel) if error_feedback else NoFeedback(codec)
