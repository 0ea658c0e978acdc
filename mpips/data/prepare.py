"""Writing dataset files: sources (arrays, text folders, built-ins, synthetic) -> mpips HDF5.

A source is a set of row-indexable arrays plus the ids of its training and held-out samples.
``write_dataset`` writes it partition by partition in slabs, so a source backed by memory-mapped
``.npy`` files or generated on the fly is never whole in memory. Under MPI (``comm`` given and
h5py built with MPI-IO) every rank writes its own partitions (partition p -> rank p % size)
through one collectively opened file.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpips.data.builtin import load_builtin
from mpips.data.hdf5 import (
    VERSION,
    DatasetError,
    DatasetWriter,
    SampleFormat,
    describe_nonfinite,
    first_nonfinite,
    iter_slabs,
)

__all__ = [
    "ArraySource",
    "SynthSource",
    "array_source",
    "builtin_path",
    "builtin_source",
    "materialise_builtin",
    "split_ids",
    "text_source",
    "write_dataset",
]

BUILTIN_PARTITIONS = 16
SLAB_BYTES = 32 << 20  # rows written per call, in bytes


def split_ids(
    n: int, val_fraction: float, seed: int, shuffle: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): a seeded random held-out set; train in file order or shuffled."""
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    if shuffle:
        train = rng.permutation(train)
    return train, val


@dataclass
class ArraySource:
    """Row-indexable arrays (numpy, memory-mapped .npy, or views) named like the format's fields."""

    name: str
    fmt: SampleFormat
    arrays: dict[str, Any]
    train_ids: np.ndarray
    val_ids: np.ndarray
    origin: str = ""  # the input file the rows come from, for messages

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(self.arrays[f.name][ids]) for f in self.fmt.fields}


@dataclass
class SynthSource:
    """Synthetic, learnable samples generated from their ids (never whole in memory).

    Classification: y uniform in [0, classes), x = a fixed random pattern of class y plus noise.
    Text: random bytes.
    """

    name: str
    fmt: SampleFormat
    train_ids: np.ndarray
    val_ids: np.ndarray
    seed: int = 0

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 1, int(ids[0]) if len(ids) else 0, len(ids)])
        if self.fmt.kind == "text":
            return {
                "tokens": rng.integers(
                    0, 256, (len(ids), *self.fmt.fields[0].shape), dtype=np.uint8
                )
            }
        x_field = self.fmt.fields[0]
        patterns = np.random.default_rng([self.seed, 0]).standard_normal(
            (self.fmt.num_classes, *x_field.shape), dtype=np.float32
        )
        y = rng.integers(0, self.fmt.num_classes, len(ids))
        x = patterns[y] + rng.standard_normal((len(ids), *x_field.shape), dtype=np.float32)
        return {"x": x.astype(x_field.dtype, copy=False), "y": y.astype(np.int64)}


def array_source(
    path: str,
    labels: str | None = None,
    *,
    x_key: str = "x",
    y_key: str = "y",
    num_classes: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shuffle: bool = False,
    task: str = "classification",
) -> ArraySource:
    """A ``.npz`` with arrays ``x`` and ``y``, or an ``.npy`` of inputs with ``labels`` (.npy).

    ``task``: ``classification`` (y: integer class indices, shape (N,)), ``regression`` (y:
    float targets, (N,) or (N, k, ...): stored as float32), ``multilabel`` (y: 0/1 per label,
    (N, C): stored as uint8) or ``tokens`` (x and y: integer token ids of the same shape
    (N, T), y the next tokens; ``num_classes``: the vocabulary, default largest id + 1).
    """
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                if x_key not in z or y_key not in z:
                    raise DatasetError(
                        f"{path}: needs arrays {x_key!r} and {y_key!r}, has {sorted(z.files)}"
                    )
                x, y = z[x_key], z[y_key]
        else:
            if labels is None:
                raise DatasetError(f"{path}: an .npy source needs --labels FILE.npy")
            x, y = np.load(path, mmap_mode="r"), np.load(labels, mmap_mode="r")
    except (OSError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    where = f"{path} (labels {labels})" if labels else path
    if task != "classification":
        return _target_source(path, where, x, y, task, num_classes, val_fraction, seed, shuffle)
    if len(x) != len(y) or y.ndim != 1:
        raise DatasetError(f"{path}: {len(x)} inputs but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be integer class indices 0..C-1, got {y.dtype}")
    classes = num_classes if num_classes is not None else (int(np.max(y)) + 1 if len(y) else 0)
    labels_ok(np.asarray(y), classes, where, given=num_classes is not None)
    fmt = SampleFormat.classification(x.shape[1:], x.dtype, classes)
    train, val = split_ids(len(y), val_fraction, seed, shuffle)
    return ArraySource(Path(path).stem, fmt, {"x": x, "y": y}, train, val, origin=path)


def _target_source(path: str, where: str, x: Any, y: Any, task: str, num_classes: int | None,
                   val_fraction: float, seed: int, shuffle: bool) -> ArraySource:
    """``array_source`` for regression, multilabel and tokens."""
    if len(x) != len(y):
        raise DatasetError(f"{where}: {len(x)} inputs but {len(y)} targets")
    if task == "regression":
        if not np.issubdtype(y.dtype, np.number):
            raise DatasetError(f"{where}: regression targets must be numbers, got {y.dtype}")
        y_dtype, classes = np.float32, math.prod(y.shape[1:])
    elif task == "multilabel":
        if y.ndim != 2 or not np.isin(np.unique(np.asarray(y)), (0, 1)).all():
            raise DatasetError(f"{where}: multilabel targets must be 0/1 of shape (N, labels), got {y.dtype}"
                               f" {y.shape}")
        y_dtype, classes = np.uint8, y.shape[1]
    elif task == "tokens":
        if not (np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)) or x.shape != y.shape \
                or x.ndim != 2:
            raise DatasetError(f"{where}: tokens need integer ids x and y of one shape (N, T), got x {x.dtype}"
                               f" {x.shape}, y {y.dtype} {y.shape}")
        top = int(max(np.max(x), np.max(y))) + 1 if len(y) else 0
        classes = num_classes if num_classes is not None else top
        low = int(min(np.min(x), np.min(y))) if len(y) else 0
        if low < 0 or top > classes:
            raise DatasetError(f"{where}: token ids span {low}..{top - 1}, outside the vocabulary [0, {classes})")
        y_dtype = y.dtype
    else:
        raise DatasetError(f"unknown task {task!r}: classification, regression, multilabel or tokens")
    fmt = SampleFormat.xy(task, x.shape[1:], x.dtype, y.shape[1:], y_dtype, int(classes))
    train, val = split_ids(len(y), val_fraction, seed, shuffle)
    return ArraySource(Path(path).stem, fmt, {"x": x, "y": y}, train, val, origin=path)


def labels_ok(y: np.ndarray, classes: int, where: str, given: bool) -> None:
    """Labels are class indices in [0, classes), and the class count is plausible; DatasetError if not."""
    source = "--num-classes" if given else "largest label + 1"
    bad = np.nonzero((y < 0) | (y >= classes))[0]
    if len(bad):
        raise DatasetError(
            f"{where}: label {int(y[bad[0]])} of sample {int(bad[0])} is outside [0, {classes})"
            f" ({source} = {classes}; {len(bad)} such labels): labels must be class indices 0..C-1"
        )
    if classes < 2:
        raise DatasetError(f"{where}: {classes} class(es) ({source}): a classifier needs at least 2")
    if classes > len(y):
        raise DatasetError(
            f"{where}: {classes} classes ({source}) for {len(y)} samples: labels must be class"
            " indices 0..C-1, not ids or regression targets"
        )


def _check_rows(
    source: ArraySource | SynthSource, ids: np.ndarray, rows: dict[str, np.ndarray]
) -> tuple[int, str] | None:
    """(sample id, problem) of the first row about to be written with non-finite features, or None."""
    if source.fmt.kind in ("text", "tokens"):
        return None
    bad = first_nonfinite(rows["x"])
    if bad is None:
        return None
    where = getattr(source, "origin", "") or source.name
    return int(ids[bad]), (
        f"{where}: sample {int(ids[bad])} has {describe_nonfinite(rows['x'][bad])}: mpips refuses"
        " non-finite features (every gradient of a batch holding one is NaN); clean or drop those"
        " samples, then prepare again"
    )


def text_source(
    folder: str,
    *,
    context: int = 64,
    suffixes: tuple[str, ...] = (),
    val_fraction: float = 0.1,
    seed: int = 0,
    shuffle: bool = False,
) -> ArraySource:
    """Byte windows of ``context + 1`` from the files under ``folder`` (sorted, recursive)."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{folder} is not a folder of text files")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and (not suffixes or p.suffix in suffixes)
    )
    stream = np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)
    window = context + 1
    n = len(stream) // window
    if n == 0:
        raise DatasetError(
            f"{folder}: {len(stream)} bytes in {len(files)} files, not one window of {window}"
        )
    train, val = split_ids(n, val_fraction, seed, shuffle)
    tokens = stream[: n * window].reshape(n, window)
    return ArraySource(root.name, SampleFormat.text(window), {"tokens": tokens}, train, val)


def builtin_source(name: str, context: int = 64) -> ArraySource:
    """A built-in dataset with its fixed held-out split; training rows shuffled once (seeded)."""
    d = load_builtin(name, context=context)
    train = np.random.default_rng(4321).permutation(d["train_ids"])
    if d["kind"] == "text":
        tokens = np.concatenate([d["x"], d["y"][:, -1:]], axis=1).astype(np.uint8)
        return ArraySource(
            name, SampleFormat.text(context + 1), {"tokens": tokens}, train, d["val_ids"]
        )
    fmt = SampleFormat.classification(d["x"].shape[1:], d["x"].dtype, d["num_classes"])
    return ArraySource(name, fmt, {"x": d["x"], "y": d["y"]}, train, d["val_ids"])


def write_dataset(
    source: ArraySource | SynthSource,
    path: str,
    *,
    partitions: int,
    comm: Any = None,
    compression: str | None = None,
    chunk_mb: float = 1.0,
) -> None:
    """Write ``source`` to ``path``; collective over ``comm`` when given (MPI-IO)."""
    n_train, n_val = len(source.train_ids), len(source.val_ids)
    if n_train == 0:
        raise DatasetError(f"{source.name}: no training samples to write")
    if partitions > n_train:
        raise DatasetError(
            f"{source.name}: {partitions} partitions for only {n_train} training samples"
        )
    writer = DatasetWriter(
        path,
        source.fmt,
        source.name,
        n_train,
        n_val,
        partitions,
        comm=comm,
        compression=compression,
        chunk_bytes=int(chunk_mb * (1 << 20)),
    )
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    slab = max(1, SLAB_BYTES // max(1, source.fmt.record_bytes))
    share = np.array_split(np.arange(n_val), size)[rank]
    pieces = [(True, a, b) for p in range(rank, partitions, size) for a, b in iter_slabs(*writer.parts.range(p), slab)]
    if len(share):
        pieces += [(False, a, b) for a, b in iter_slabs(int(share[0]), int(share[-1]) + 1, slab)]
    problem = None
    try:
        for train, a, b in pieces:
            ids = (source.train_ids if train else source.val_ids)[a:b]
            rows = source.rows(ids)
            problem = _check_rows(source, ids, rows)
            if problem:
                break  # stop writing; still close collectively below
            (writer.write_train if train else writer.write_val)(a, rows)
    finally:
        writer.close()
    if comm is not None:  # every rank closed the file: agree on the first bad sample, raise it everywhere
        problem = min((p for p in comm.allgather(problem) if p), default=None)
    if problem:
        if rank == 0:
            Path(path).unlink(missing_ok=True)  # a half-written file must not look like a dataset
        raise DatasetError(problem[1])


def builtin_path(name: str, context: int, data_dir: str | None) -> Path:
    root = Path(data_dir or os.path.join(os.path.expanduser("~"), ".cache", "mpips"))
    if name == "pytext":
        py = f"py{sys.version_info[0]}{sys.version_info[1]}"
        return root / f"{name}-ctx{context}-{py}-v{VERSION}.h5"
    return root / f"{name}-v{VERSION}.h5"


def materialise_builtin(name: str, context: int, data_dir: str | None, comm: Any = None) -> str:
    """The built-in dataset as an HDF5 file in ``data_dir``, written once.

    One rank per node writes it under a temporary name and renames it into place (atomic), the
    others on that node wait; an existing file is reused. Collective over ``comm`` when given.
    """
    path = builtin_path(name, context, data_dir)
    local = None
    if comm is not None:
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    error = None
    try:
        if (local is None or local.Get_rank() == 0) and not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
                try:
                    write_dataset(
                        builtin_source(name, context), str(tmp), partitions=BUILTIN_PARTITIONS
                    )
                    os.replace(tmp, path)
                finally:
                    if tmp.exists():
                        tmp.unlink()
            except (OSError, DatasetError) as exc:
                error = f"cannot write the built-in dataset {name!r} to {path}: {exc}"
        if local is not None:
            error = local.bcast(error, root=0)
    finally:
        if local is not None:
            local.Free()
    if comm is not None:  # same verdict everywhere, so every rank raises the same error
        errors = [e for e in comm.allgather(error) if e]
        error = errors[0] if errors else None
    if error:
        raise DatasetError(error)
    return str(path)


def has_mpio() -> bool:
    """Whether h5py can open files with the MPI-IO driver."""
    return bool(h5py.get_config().mpi)


def default_partitions(record_bytes: int, samples: int, target_mb: float = 64.0) -> int:
    """Enough partitions of about ``target_mb`` each (a data server caches a few); at least 8."""
    by_size = math.ceil(record_bytes * samples / (target_mb * (1 << 20)))
    return max(1, min(samples, max(8, by_size)))
