"""The mpips HDF5 dataset format: its schema, sample fields and partitions. Pure (no file access).

Layout of a file (``schema = "mpips.dataset"``, ``version = 1``)::

    /            attrs: schema, version, name, kind, num_classes
                 kind: "classification" | "regression" | "multilabel" | "tokens" | "text"
    /train/x     (N, *shape) inputs       } one row per sample; y: classification (N,) int64 labels,
    /train/y     (N, *target) targets     } regression float32, multilabel 0/1 (N, C), tokens
                                            (N, T) next-token ids for x (N, T) ids
    /train/tokens (N, L + 1) uint8        text: byte windows; x = w[:-1], y = w[1:] (next byte)
    /train       attrs: partition_offsets, partition_sizes (int64[P]),
                        partition_crc32 (int64[P, fields]: zlib.crc32 of each field's rows)
    /val/...     the held-out split, same fields, not partitioned

Partitions are contiguous row ranges of /train; they are the unit of placement on data servers
and of reading (see ``EpochPlan``). Datasets are chunked (a chunk never straddles two
partitions' worth of rows by much) and optionally compressed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpips.models import DataSpec

__all__ = [
    "SCHEMA",
    "VERSION",
    "DatasetError",
    "Field",
    "Partitions",
    "SampleFormat",
    "describe_nonfinite",
    "first_nonfinite",
]


SCHEMA = "mpips.dataset"
VERSION = 1


class DatasetError(ValueError):
    """A dataset file is missing, malformed or corrupt; the message names the file and partition.

    Raised identically on every rank, so the job reports it once and exits (no hang).
    """


@dataclass(frozen=True)
class Field:
    """One stored dataset under /train and /val: per-sample shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))


@dataclass(frozen=True)
class SampleFormat:
    """What one stored sample is, and how it becomes a model's (x, y)."""

    kind: str  # "classification" | "regression" | "multilabel" | "tokens" | "text"
    num_classes: int  # the model's output size: classes, target values, labels, vocabulary
    fields: tuple[Field, ...]

    @classmethod
    def xy(cls, kind: str, x_shape: tuple[int, ...], x_dtype: Any, y_shape: tuple[int, ...], y_dtype: Any,
           num_classes: int) -> SampleFormat:
        """Inputs ``x`` and targets ``y`` stored as they are (any task but text)."""
        return cls(kind, num_classes, (Field("x", tuple(x_shape), np.dtype(x_dtype)),
                                       Field("y", tuple(y_shape), np.dtype(y_dtype))))

    @classmethod
    def classification(
        cls, x_shape: tuple[int, ...], x_dtype: Any, num_classes: int
    ) -> SampleFormat:
        return cls(
            "classification",
            num_classes,
            (Field("x", tuple(x_shape), np.dtype(x_dtype)), Field("y", (), np.dtype(np.int64))),
        )

    @classmethod
    def text(cls, window: int) -> SampleFormat:
        """Byte windows of ``window`` = context + 1 tokens."""
        return cls("text", 256, (Field("tokens", (window,), np.dtype(np.uint8)),))

    @property
    def record_bytes(self) -> int:
        return sum(f.row_bytes for f in self.fields)

    @property
    def max_context(self) -> int:
        return self.fields[0].shape[0] - 1 if self.kind == "text" else 0

    def spec(self, context: int) -> DataSpec:
        if self.kind == "text":
            return DataSpec("text", (min(context, self.max_context),), 256)
        return DataSpec(self.kind, self.fields[0].shape, self.num_classes, self.fields[1].shape)

    def to_xy(
        self, arrays: dict[str, np.ndarray], context: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training arrays: float32 inputs (tokens: int64 ids); int64 labels or token ids
        (classification, tokens, text) or float32 targets (regression, multilabel)."""
        if self.kind == "text":
            tok = arrays["tokens"]
            c = min(context or self.max_context, self.max_context)
            return tok[:, :c].astype(np.int64), tok[:, 1 : c + 1].astype(np.int64)
        ids = self.kind == "tokens"
        x = arrays["x"].astype(np.int64 if ids else np.float32, copy=False)
        y = arrays["y"].astype(np.int64 if self.kind in ("classification", "tokens") else np.float32, copy=False)
        return x, y

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {f.name: np.empty((n, *f.shape), dtype=f.dtype) for f in self.fields}

    def pack(self, arrays: dict[str, np.ndarray], out: np.ndarray) -> int:
        """Write the fields' bytes one after another into uint8 ``out``; returns the bytes."""
        pos = 0
        for f in self.fields:
            raw = np.ascontiguousarray(arrays[f.name]).reshape(-1).view(np.uint8)
            out[pos : pos + raw.size] = raw
            pos += raw.size
        return pos

    def unpack(self, buf: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """Views of ``n`` samples packed by ``pack`` in ``buf`` (uint8)."""
        out, pos = {}, 0
        for f in self.fields:
            size = n * f.row_bytes
            out[f.name] = buf[pos : pos + size].view(f.dtype).reshape(n, *f.shape)
            pos += size
        return out


@dataclass(frozen=True)
class Partitions:
    """Contiguous row ranges of the training split."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def even(cls, n: int, count: int) -> Partitions:
        """``count`` partitions of ``n`` rows, sizes differing by at most one."""
        if count < 1 or count > max(n, 1):
            raise DatasetError(f"cannot cut {n} samples into {count} partitions")
        sizes = [len(a) for a in np.array_split(np.arange(n), count)]
        return cls(tuple(int(o) for o in np.cumsum([0, *sizes[:-1]])), tuple(sizes))

    def __len__(self) -> int:
        return len(self.sizes)

    def range(self, p: int) -> tuple[int, int]:
        return self.offsets[p], self.offsets[p] + self.sizes[p]

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Partition index of every sample id."""
        return np.searchsorted(np.asarray(self.offsets), ids, side="right") - 1


def first_nonfinite(rows: np.ndarray) -> int | None:
    """Index of the first row of ``rows`` (samples along axis 0) holding NaN or Inf, else None."""
    if not np.issubdtype(rows.dtype, np.floating) or len(rows) == 0:
        return None
    finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
    return None if finite.all() else int(np.argmin(finite))


def describe_nonfinite(row: np.ndarray) -> str:
    """"NaN at x[0, 3, 4] (2 NaN, 1 Inf in this sample)": where a sample is not finite."""
    where = tuple(int(i) for i in np.argwhere(~np.isfinite(row))[0])
    value = "NaN" if np.isnan(row[where]) else f"{row[where]}"
    nans, infs = int(np.isnan(row).sum()), int(np.isinf(row).sum())
    return f"{value} at x[{', '.join(map(str, where))}] ({nans} NaN, {infs} Inf in this sample)"


def iter_slabs(lo: int, hi: int, rows: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) in pieces of at most ``rows`` rows."""
    for a in range(lo, hi, max(1, rows)):
        yield a, min(hi, a + max(1, rows))
