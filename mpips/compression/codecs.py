"""The codecs: ``make_codec(name)``. Pure: torch and numpy, no MPI.

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

Deep gradient compression (Lin et al., ICLR 2018) adds, for the sparse codecs:

- **sparsity warm-up** (``sparsity_ratio``): over the first ``warmup_steps`` steps the fraction
  sent falls exponentially from near 1 to ``ratio``: ``ratio ** ((t + 1) / (warmup_steps + 1))``
  at step t (DGC: 75%, 93.75%, 98.4375%, ... sparsity over the first epochs; its code's default
  coefficient ``ratio ** (1 / (warmup + 1))``, here per step instead of per epoch).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mpips.compression.record import ChunkCodec, Decoded, PayloadError
from mpips.transport.wire import FP16_MAX, Codec

__all__ = [
    "BIASED",
    "CODECS",
    "QSGD",
    "Half",
    "RandomK",
    "Sign",
    "TopK",
    "make_codec",
    "sparsity_ratio",
]

BIASED = ("topk", "sign")  # error feedback is on by default for these


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


class Half(ChunkCodec):
    """fp16 or bf16: two bytes per element; count = n, scale = 1."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name, self.wire_id = ("fp16", Codec.FP16) if dtype == torch.float16 else ("bf16", Codec.BF16)

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

    name, wire_id, sparse = "topk", Codec.TOPK, True
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

    name, wire_id, sparse = "randomk", Codec.RANDOMK, True

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

    name, wire_id = "qsgd", Codec.QSGD
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

    name, wire_id = "sign", Codec.SIGN

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

