"""The mpips HDF5 dataset format: partitioned training samples, a held-out split, checksums.

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

Reading goes through ``PartitionReader``: a request for sample ids is served from whole
partitions read in one contiguous slab into an LRU cache bounded in bytes; a partition bigger
than the bound is read as the smallest contiguous span covering the request instead.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from mpips.models import DataSpec

__all__ = [
    "SCHEMA",
    "VERSION",
    "DatasetError",
    "DatasetFile",
    "DatasetWriter",
    "Field",
    "HDF5Store",
    "HeldOut",
    "PartitionReader",
    "Partitions",
    "SampleFormat",
    "describe_nonfinite",
    "first_nonfinite",
]

SCHEMA = "mpips.dataset"
VERSION = 1
VERIFY_SLAB = 64 << 20  # bytes read at a time when checksumming


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


def _scan_rows(dset: h5py.Dataset, lo: int, hi: int, row_bytes: int) -> tuple[int, int | None]:
    """(zlib.crc32 of rows [lo, hi), the first row holding NaN or Inf or None), read in slabs of at
    most VERIFY_SLAB bytes; only floating-point fields can hold a non-finite value."""
    crc, step, bad = 0, max(1, VERIFY_SLAB // max(1, row_bytes)), None
    floating = np.issubdtype(dset.dtype, np.floating)
    for a in range(lo, hi, step):
        rows = np.ascontiguousarray(dset[a : min(hi, a + step)])
        crc = zlib.crc32(rows.data, crc)
        if floating and bad is None:
            bad = first_nonfinite(rows)
            bad = None if bad is None else a + bad
    return crc, bad


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


class DatasetFile:
    """An open, schema-checked dataset file. Raises DatasetError naming the file on any problem.

    Args:
        path: the .h5 file.
        comm: open with the MPI-IO driver, collectively over ``comm`` (needs MPI-enabled h5py).
    """

    def __init__(self, path: str | os.PathLike, comm: Any = None):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise DatasetError(f"dataset file {self.path} does not exist")
        try:
            if comm is not None:
                self.h5 = h5py.File(self.path, "r", driver="mpio", comm=comm)
            else:
                self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetError(
                f"dataset file {self.path} is not a readable HDF5 file: {exc}"
            ) from exc
        try:
            self._read_metadata()
        except DatasetError:
            self.h5.close()
            raise
        except (KeyError, ValueError, TypeError) as exc:
            self.h5.close()
            raise DatasetError(f"dataset file {self.path} is malformed: {exc}") from exc

    def _read_metadata(self) -> None:
        a, where = self.h5.attrs, self.path
        schema = a.get("schema")
        schema = schema.decode() if isinstance(schema, bytes) else schema
        if schema != SCHEMA:
            raise DatasetError(
                f"{where} is not an mpips dataset (schema attribute {schema!r},"
                f" expected {SCHEMA!r});"
                " make one with `python -m mpips.data prepare`"
            )
        version = int(a.get("version", -1))
        if version != VERSION:
            raise DatasetError(
                f"{where} has format version {version}; this mpips reads version {VERSION}"
            )
        self.name = str(a.get("name", os.path.basename(where)))
        kind, classes = str(a["kind"]), int(a["num_classes"])
        train = self.h5["train"]
        if kind == "text":
            self.format = SampleFormat.text(int(train["tokens"].shape[1]))
        elif kind == "classification":
            x = train["x"]
            self.format = SampleFormat.classification(x.shape[1:], x.dtype, classes)
        elif kind in ("regression", "multilabel", "tokens"):
            x, y = train["x"], train["y"]
            self.format = SampleFormat.xy(kind, x.shape[1:], x.dtype, y.shape[1:], y.dtype, classes)
        else:
            raise DatasetError(f"{where}: unknown kind {kind!r}")
        self.train = {f.name: train[f.name] for f in self.format.fields}
        self.val = {f.name: self.h5["val"][f.name] for f in self.format.fields}
        self.samples = int(self.train[self.format.fields[0].name].shape[0])
        if self.samples == 0:
            raise DatasetError(f"{where}: the training split is empty (0 samples)")
        for f in self.format.fields:
            if self.train[f.name].shape[0] != self.samples:
                raise DatasetError(
                    f"{where}: /train/{f.name} has {self.train[f.name].shape[0]} rows,"
                    f" expected {self.samples}"
                )
        offsets = tuple(int(o) for o in train.attrs["partition_offsets"])
        sizes = tuple(int(s) for s in train.attrs["partition_sizes"])
        self.crc = np.asarray(train.attrs["partition_crc32"], dtype=np.int64).reshape(
            len(sizes), -1
        )
        self.partitions = Partitions(offsets, sizes)
        if not sizes or len(offsets) != len(sizes) or len(self.crc) != len(sizes):
            raise DatasetError(f"{where}: partition table is missing or inconsistent")
        expect = 0
        for p, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
            if o != expect or s < 1:
                raise DatasetError(
                    f"{where}: partition {p} (offset {o}, size {s}) does not continue"
                    f" the previous one at {expect}"
                )
            expect += s
        if expect != self.samples:
            raise DatasetError(
                f"{where}: partitions cover {expect} samples, the training split has {self.samples}"
            )

    @property
    def val_samples(self) -> int:
        return int(self.val[self.format.fields[0].name].shape[0])

    def read_train(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of every field: one contiguous read per field."""
        return {name: d[lo:hi] for name, d in self.train.items()}

    def read_val(self) -> dict[str, np.ndarray]:
        return {name: d[()] for name, d in self.val.items()}

    def check_partition(self, p: int) -> list[str]:
        """Problems of partition ``p``: checksum mismatches, non-finite features, labels out of range."""
        lo, hi = self.partitions.range(p)
        problems = []
        for i, f in enumerate(self.format.fields):
            got, bad = _scan_rows(self.train[f.name], lo, hi, f.row_bytes)
            if got != int(self.crc[p, i]):
                problems.append(
                    f"{self.path}: partition {p} (samples {lo}..{hi - 1}) field {f.name!r}:"
                    f" checksum {got:#010x} does not match the stored"
                    f" {int(self.crc[p, i]):#010x}; the file is"
                    " corrupt, re-create it with `python -m mpips.data prepare`"
                )
            if bad is not None:
                problems.append(self._nonfinite("training", bad, self.train[f.name][bad]))
        if self.format.kind == "classification":
            y = self.train["y"][lo:hi]
            bad = np.nonzero((y < 0) | (y >= self.format.num_classes))[0]
            if len(bad):
                problems.append(
                    f"{self.path}: partition {p}: label {int(y[bad[0]])}"
                    f" of sample {lo + int(bad[0])}"
                    f" is outside [0, {self.format.num_classes}) ({len(bad)} such labels)"
                )
        return problems

    def _nonfinite(self, split: str, sample: int, row: np.ndarray) -> str:
        return (f"{self.path}: {split} sample {sample} has {describe_nonfinite(row)}: training on it"
                " would make every gradient NaN; clean the source and re-create the file with"
                " `python -m mpips.data prepare`")

    def check_val(self) -> list[str]:
        """Problems of the held-out split: non-finite features, labels out of range."""
        if self.format.kind in ("text", "tokens") or self.val_samples == 0:
            return []
        problems = []
        for f in self.format.fields:
            _, bad = _scan_rows(self.val[f.name], 0, self.val_samples, f.row_bytes)
            if bad is not None:
                problems.append(self._nonfinite("held-out", bad, self.val[f.name][bad]))
        if self.format.kind != "classification":
            return problems
        y = self.val["y"][()]
        bad = np.nonzero((y < 0) | (y >= self.format.num_classes))[0]
        if len(bad):
            problems.append(
                f"{self.path}: held-out split: label {int(y[bad[0]])} of sample {int(bad[0])} is"
                f" outside [0, {self.format.num_classes})"
            )
        return problems

    def check_classes(self) -> list[str]:
        """Is the class count plausible? At least 2, and no more than there are samples."""
        if self.format.kind != "classification":
            return []
        classes, samples = self.format.num_classes, self.samples + self.val_samples
        if classes < 2:
            return [f"{self.path}: {classes} class(es): a classifier needs at least 2; re-create the file"
                    " with `python -m mpips.data prepare --num-classes C`"]
        if classes > samples:
            return [f"{self.path}: {classes} classes for {samples} samples: labels must be class indices"
                    " 0..C-1 (not ids or regression targets); re-create the file with"
                    " `python -m mpips.data prepare` from such labels"]
        return []

    def close(self) -> None:
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None

    def __enter__(self) -> DatasetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ReadStats:
    reads: int = 0
    bytes_read: int = 0
    hits: int = 0
    misses: int = 0


class PartitionReader:
    """Samples by id, read in large contiguous slabs through an LRU cache of whole partitions.

    Args:
        file: an open DatasetFile.
        cache_bytes: bound on the cached partitions' bytes (at least one partition is needed
            for whole-partition reads; otherwise each request reads its smallest covering span).
    """

    def __init__(self, file: DatasetFile, cache_bytes: int):
        self.file, self.cache_bytes = file, int(cache_bytes)
        self.format, self.partitions = file.format, file.partitions
        self.cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.cached_bytes = 0
        self.stats = ReadStats()

    def _read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        self.stats.reads += 1
        self.stats.bytes_read += (hi - lo) * self.format.record_bytes
        return self.file.read_train(lo, hi)

    def _partition(self, p: int) -> dict[str, np.ndarray]:
        if p in self.cache:
            self.stats.hits += 1
            self.cache.move_to_end(p)
            return self.cache[p]
        self.stats.misses += 1
        lo, hi = self.partitions.range(p)
        size = (hi - lo) * self.format.record_bytes
        while self.cache and self.cached_bytes + size > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= sum(a.nbytes for a in old.values())
        block = self._read(lo, hi)
        self.cache[p] = block
        self.cached_bytes += size
        return block

    def take(
        self, ids: np.ndarray, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Stored fields of samples ``ids`` (in the order given), into ``out`` when given."""
        ids = np.asarray(ids, dtype=np.int64)
        out = self.format.empty(len(ids)) if out is None else out
        if not len(ids):
            return out
        if ids.min() < 0 or ids.max() >= self.file.samples:
            raise IndexError(f"sample ids outside 0..{self.file.samples - 1}")
        parts = self.partitions.of(ids)
        for p in np.unique(parts):
            sel = np.nonzero(parts == p)[0]
            lo, hi = self.partitions.range(int(p))
            if (hi - lo) * self.format.record_bytes <= self.cache_bytes:
                block, base = self._partition(int(p)), lo
            else:  # too big to cache: the smallest contiguous span covering the request
                base, top = int(ids[sel].min()), int(ids[sel].max()) + 1
                block = self._read(base, top)
            for name, arr in block.items():
                if len(sel) == len(ids):  # one partition: gather straight into ``out``
                    np.take(arr, ids - base, axis=0, out=out[name])
                else:
                    out[name][sel] = arr[ids[sel] - base]
        return out


class HDF5Store:
    """A SampleStore over a dataset file's training split, opened lazily on first ``take``.

    Used by workers that read their own data (``--data-servers 0``) and by tests.
    """

    def __init__(
        self, path: str, fmt: SampleFormat, samples: int, cache_bytes: int, context: int = 0,
        opener: Any = None,
    ):
        self.path, self.format, self.samples = path, fmt, samples
        self.cache_bytes, self.context = cache_bytes, context
        self.opener = opener  # () -> a DatasetFile-like reader (HDF5 files read in place)
        self.reader: PartitionReader | None = None

    def __len__(self) -> int:
        return self.samples

    def take_raw(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        if self.reader is None:
            file = self.opener() if self.opener is not None else DatasetFile(self.path)
            self.reader = PartitionReader(file, self.cache_bytes)
        return self.reader.take(ids)

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.format.to_xy(self.take_raw(ids), self.context)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.file.close()
            self.reader = None


class HeldOut:
    """The held-out split, read into memory on first use of ``x`` or ``y``.

    ``read``: instead of the file's /val, a callable returning the stored fields (``--val-data``).
    """

    def __init__(self, path: str, fmt: SampleFormat, context: int = 0, read: Any = None):
        self.path, self.format, self.context, self.read = path, fmt, context, read
        self._xy: tuple[np.ndarray, np.ndarray] | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._xy is None:
            if self.read is not None:
                self._xy = self.format.to_xy(self.read(), self.context)
            else:
                with DatasetFile(self.path) as f:
                    self._xy = self.format.to_xy(f.read_val(), self.context)
        return self._xy

    @property
    def x(self) -> np.ndarray:
        return self._load()[0]

    @property
    def y(self) -> np.ndarray:
        return self._load()[1]


@dataclass
class DatasetWriter:
    """Creates a dataset file and writes its rows; serially, or collectively through MPI-IO.

    Args:
        path: file to create (overwritten).
        fmt: what a sample is.
        name: dataset name stored in the file.
        train, val: sample counts of the two splits.
        partitions: number of training partitions.
        comm: with MPI-enabled h5py, create collectively with ``driver='mpio'``; every rank
            then writes only the rows it is given (its own partitions), independently.
        compression: None, "gzip" or "lzf" (serial writes only: HDF5 filters need collective I/O).
        chunk_bytes: target bytes per chunk.
    """

    path: str
    fmt: SampleFormat
    name: str
    train: int
    val: int
    partitions: int
    comm: Any = None
    compression: str | None = None
    chunk_bytes: int = 1 << 20
    crc: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.train < 1:
            raise DatasetError(f"{self.path}: cannot write an empty training split")
        self.parts = Partitions.even(self.train, self.partitions)
        if self.comm is not None and self.compression:
            raise DatasetError(
                "compression needs a serial prepare (HDF5 filters need collective writes)"
            )
        self.crc = np.zeros((self.partitions, len(self.fmt.fields)), dtype=np.int64)
        if self.comm is not None:
            self.h5 = h5py.File(self.path, "w", driver="mpio", comm=self.comm)
        else:
            self.h5 = h5py.File(self.path, "w")
        a = self.h5.attrs
        a["schema"], a["version"], a["name"] = SCHEMA, VERSION, self.name
        a["kind"], a["num_classes"] = self.fmt.kind, self.fmt.num_classes
        smallest = min(self.parts.sizes)
        for split, n in (("train", self.train), ("val", self.val)):
            g = self.h5.create_group(split)
            for f in self.fmt.fields:
                rows = max(1, min(n, smallest, self.chunk_bytes // max(1, f.row_bytes)))
                # MPI-IO writes go to a contiguous layout: chunked parallel writes were ~15x
                # slower here (Open MPI 4.1 + HDF5 1.10); serial files are chunked
                kw: dict[str, Any] = {"chunks": (rows, *f.shape)} if n and self.comm is None else {}
                if self.compression and n:
                    kw["compression"] = self.compression
                g.create_dataset(f.name, shape=(n, *f.shape), dtype=f.dtype, **kw)

    def write_train(self, lo: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows starting at ``lo``; a call must stay inside one partition and follow the
        previous call on that partition (checksums are computed as rows arrive)."""
        n = len(next(iter(arrays.values())))
        p = int(self.parts.of(np.array([lo]))[0])
        if lo + n > self.parts.range(p)[1]:
            raise ValueError(f"rows {lo}..{lo + n} straddle partition {p}")
        for i, f in enumerate(self.fmt.fields):
            a = np.ascontiguousarray(arrays[f.name], dtype=f.dtype)
            self.h5["train"][f.name][lo : lo + n] = a
            self.crc[p, i] = zlib.crc32(a.data, int(self.crc[p, i]))

    def write_val(self, lo: int, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        for f in self.fmt.fields:
            self.h5["val"][f.name][lo : lo + n] = np.ascontiguousarray(
                arrays[f.name], dtype=f.dtype
            )

    def close(self) -> None:
        """Record the partition table (collectively: checksums are summed over ranks) and close."""
        crc = self.crc
        if self.comm is not None:
            crc = np.zeros_like(self.crc)
            from mpi4py import MPI

            self.comm.Allreduce(self.crc, crc, op=MPI.SUM)  # each partition is written by one rank
        g = self.h5["train"]
        g.attrs["partition_offsets"] = np.asarray(self.parts.offsets, dtype=np.int64)
        g.attrs["partition_sizes"] = np.asarray(self.parts.sizes, dtype=np.int64)
        g.attrs["partition_crc32"] = crc
        self.h5.close()


def iter_slabs(lo: int, hi: int, rows: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) in pieces of at most ``rows`` rows."""
    for a in range(lo, hi, max(1, rows)):
        yield a, min(hi, a + max(1, rows))
