"""``DatasetFile``: an mpips HDF5 dataset opened, its schema, partitions and checksums checked."""

from __future__ import annotations

import os
import zlib
from typing import Any

import h5py
import numpy as np

from mpips.data.hdf5.schema import (
    SCHEMA,
    VERSION,
    DatasetError,
    Partitions,
    SampleFormat,
    describe_nonfinite,
    first_nonfinite,
)

__all__ = [
    "DatasetFile",
]


VERIFY_SLAB = 64 << 20  # bytes read at a time when checksumming


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
