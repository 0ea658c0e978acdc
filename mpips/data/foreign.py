"""HDF5 files mpips did not write, read in place: ``--data 'shards/*.h5' --x-key images --y-key labels``.

Each file holds two datasets of one row per sample, inputs ``x_key`` ``(N, *shape)`` and targets
``y_key`` ``(N, *target)``; the files of a job share shapes and dtypes. Nothing is copied: the
training split is the files' rows one after another (files in the order given, a glob sorted),
cut into partitions, each a whole file or, for a file over ``PARTITION_BYTES``, a range of it
aligned to its HDF5 chunks. Partitions are what data servers hold and read (``PartitionReader``);
each opens the files it reads lazily, through the MPI-IO driver on ``MPI.COMM_SELF`` where h5py
has it (independent reads; no collective open that every data server would have to join), with
h5py's default driver otherwise. ``--val-data`` names the held-out file(s), read whole into memory.

``ForeignData.scan`` checks every file up front (one line per problem: missing file, not HDF5,
missing dataset, row counts, shapes, dtypes, labels outside the classes, non-finite or non-0/1
targets), with the target scans spread over the ranks. Inputs are not scanned up front (that
would read the whole dataset before the first step): each read checks its rows instead, and a NaN
or infinity ends the job as bad data (``check_finite``: the file, the dataset and the row), before
it becomes a gradient.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from mpips.data.hdf5 import DatasetError, Partitions, SampleFormat, describe_nonfinite, first_nonfinite

__all__ = ["PARTITION_BYTES", "ForeignData", "ForeignFile", "ForeignReader", "check_finite", "expand_paths",
           "is_foreign"]

PARTITION_BYTES = 64 << 20  # a file bigger than this is cut into chunk-aligned ranges of about this size


def expand_paths(spec: str | os.PathLike | list | tuple) -> list[str]:
    """Files named by ``spec``: a path, a glob (sorted), a comma-separated list, or a list of these.

    A glob that matches nothing, and a plain path, are kept as given (the scan says it is missing).
    """
    items = [str(s) for s in spec] if isinstance(spec, list | tuple) else str(spec).split(",")
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else []
        out += matches or [item]
    return out


def is_foreign(spec: str | list | tuple) -> bool:
    """True unless ``spec`` is one file meant as an mpips dataset (with a ``schema`` attribute, as
    ``python -m mpips.data prepare`` writes), or one that cannot be opened as HDF5."""
    paths = expand_paths(spec)
    if len(paths) != 1:
        return True
    try:
        with h5py.File(paths[0], "r") as f:
            # a schema attribute, any: meant as an mpips file (the mpips reader names what is wrong)
            return "schema" not in f.attrs
    except OSError:  # missing or not HDF5: the mpips reader says so, as it always has
        return False


def check_finite(x: np.ndarray, path: str, key: str, first: int) -> np.ndarray:
    """``x`` (rows ``first``... of dataset ``key`` of file ``path``), when every value is finite.

    Raises:
        DatasetError: naming the file, the dataset and the first row holding a NaN or an infinity,
            as ``prepare`` names a source's (it would become a NaN gradient a step later).
    """
    bad = first_nonfinite(x)
    if bad is None:
        return x
    raise DatasetError(f"{path}: dataset '{key}' row {first + bad} has {describe_nonfinite(x[bad])}: mpips refuses"
                       " non-finite features (every gradient of a batch holding one is NaN); clean or drop that row")


@dataclass(frozen=True)
class ForeignFile:
    """One file's datasets: rows, per-sample shapes and dtypes, chunk rows of ``x``."""

    path: str
    rows: int
    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    y_shape: tuple[int, ...]
    y_dtype: np.dtype
    chunk_rows: int  # rows per HDF5 chunk of x (1 for a contiguous dataset)


def _describe(path: str, x_key: str, y_key: str) -> tuple[ForeignFile | None, list[str]]:
    """The file's layout, or the problems that prevent reading it (one line each)."""
    if not os.path.exists(path):
        return None, [f"{path}: no such file"]
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        return None, [f"{path}: not a readable HDF5 file ({exc})"]
    with h5:
        problems = []
        for key in (x_key, y_key):
            if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                have = sorted(k for k in h5 if isinstance(h5[k], h5py.Dataset))[:8]
                flag = "--x-key" if key == x_key else "--y-key"
                problems.append(f"{path}: no dataset {key!r} ({flag}); datasets here: {', '.join(have) or 'none'}")
        if problems:
            return None, problems
        x, y = h5[x_key], h5[y_key]
        for key, d in ((x_key, x), (y_key, y)):
            if d.ndim == 0 or not np.issubdtype(d.dtype, np.number) and d.dtype != np.bool_:
                problems.append(f"{path}: dataset {key!r} is {d.dtype} of shape {d.shape}: needs numbers, one row"
                                " per sample")
        if problems:
            return None, problems
        if x.shape[0] != y.shape[0]:
            problems.append(f"{path}: {x_key!r} has {x.shape[0]} rows, {y_key!r} {y.shape[0]}: one row per sample"
                            " in each")
        elif x.shape[0] == 0:
            problems.append(f"{path}: no samples (0 rows)")
        chunk = int(x.chunks[0]) if x.chunks else 1
        return ForeignFile(path, int(x.shape[0]), tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype,
                           chunk), problems


def _guess_task(f: ForeignFile) -> str:
    """auto: integer y of one value per sample -> classification; integer x and y of one shape ->
    tokens; otherwise regression (multilabel is never guessed)."""
    integer_y = np.issubdtype(f.y_dtype, np.integer)
    if integer_y and np.issubdtype(f.x_dtype, np.integer) and f.x_shape == f.y_shape and f.x_shape:
        return "tokens"
    if integer_y and f.y_shape == ():
        return "classification"
    return "regression"


def _check_targets(f: ForeignFile, x_key: str, y_key: str, task: str) -> tuple[list[str], int]:
    """Problems of a file's targets for ``task``, and its largest class or token id (or -1)."""
    with h5py.File(f.path, "r") as h5:
        y = h5[y_key][()]
        top, problems = -1, []
        if task in ("classification", "tokens"):
            if not np.issubdtype(y.dtype, np.integer):
                return [f"{f.path}: {task} targets {y_key!r} must be integers, got {y.dtype}"
                        + (" (--task regression for float targets)" if task == "classification" else "")], -1
            ids = [y] if task == "classification" else [y, h5[x_key][()]]
            low = min(int(a.min()) for a in ids)
            top = max(int(a.max()) for a in ids)
            if low < 0:
                what = "label" if task == "classification" else "token id"
                problems.append(f"{f.path}: {what} {low} is negative")
        elif task == "regression":
            bad = ~np.isfinite(y.reshape(len(y), -1).astype(np.float64)).all(axis=1)
            if bad.any():
                problems.append(f"{f.path}: target {y_key!r} of sample {int(np.argmax(bad))} is NaN or Inf"
                                f" ({int(bad.sum())} such samples)")
        elif task == "multilabel" and (y.ndim != 2 or not np.isin(np.unique(y), (0, 1)).all()):
            problems.append(f"{f.path}: multilabel targets {y_key!r} must be 0/1 of shape (N, labels), got"
                            f" {y.dtype} {y.shape}")
        return problems, top


@dataclass(frozen=True)
class ForeignData:
    """The training files (and held-out files) of a job, checked; partitions over their rows."""

    files: tuple[ForeignFile, ...]
    val_files: tuple[ForeignFile, ...]
    x_key: str
    y_key: str
    format: SampleFormat
    partitions: Partitions
    pieces: tuple[tuple[int, int, int], ...]  # partition -> (file index, first row, end row)

    @property
    def samples(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def name(self) -> str:
        first = os.path.basename(self.files[0].path)
        return first if len(self.files) == 1 else f"{first} and {len(self.files) - 1} more file(s)"

    @classmethod
    def scan(
        cls, data: str | list, *, x_key: str = "x", y_key: str = "y", task: str = "auto",
        num_classes: int | None = None, val_data: str | list | None = None, min_partitions: int = 1,
        comm: Any = None,
    ) -> ForeignData:
        """Check every file and lay out the partitions; the same result (or error) on every rank.

        Args:
            data: the training file(s): a path, a glob, a comma-separated list, or a list.
            x_key, y_key: the datasets of inputs and targets in every file.
            task: ``auto`` or one of ``mpips.tasks.TASKS`` (auto: see ``_guess_task``).
            num_classes: classes (classification) or vocabulary (tokens); default: largest
                label or id + 1 over the training and held-out files.
            val_data: the held-out file(s), same keys and shapes; None: no held-out split.
            min_partitions: at least this many partitions (the data servers' need).
            comm: spread the target scans over its ranks and agree on the verdict (collective).

        Raises:
            DatasetError: one line per problem (at most ``MAX_REPORTED``), the same on every rank.
        """
        from mpips.data import MAX_REPORTED

        paths = expand_paths(data)
        val_paths = expand_paths(val_data) if val_data else []
        rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
        problems: list[str] = [] if paths else [f"--data {data!r} names no file"]
        described = [_describe(p, x_key, y_key) for p in paths + val_paths]
        files = [f for f, _ in described]
        problems += [m for _, ms in described for m in ms]
        if not problems:
            problems += _agreeing_shapes(files, len(paths), x_key, y_key)
        fmt = None
        if not problems:
            task = _guess_task(files[0]) if task == "auto" else task
            if task == "multilabel" and len(files[0].y_shape) != 1:
                problems.append(f"{files[0].path}: multilabel targets {y_key!r} need shape (N, labels), got"
                                f" (N, {', '.join(map(str, files[0].y_shape))})")
            if task == "tokens" and (files[0].x_shape != files[0].y_shape or len(files[0].x_shape) != 1):
                problems.append(f"{files[0].path}: tokens need x and y of one shape (N, T), got x"
                                f" (N, {files[0].x_shape}) and y (N, {files[0].y_shape})")
        if not problems:
            top = -1
            for i in range(rank, len(files), size):
                found, t = _check_targets(files[i], x_key, y_key, task)
                problems += found
                top = max(top, t)
            if comm is not None:
                gathered = comm.allgather((problems, top))
                problems = list(dict.fromkeys(m for ms, _ in gathered for m in ms))
                top = max(t for _, t in gathered)
            if not problems:
                fmt, more = _format(files[0], task, num_classes, top)
                problems += more
        elif comm is not None:
            problems = list(dict.fromkeys(m for ms in comm.allgather(problems) for m in ms))
        if problems:
            extra = len(problems) - MAX_REPORTED
            raise DatasetError("\n  ".join(problems[:MAX_REPORTED]) + (f"\n  ... and {extra} more" if extra > 0
                                                                        else ""))
        train = tuple(files[: len(paths)])
        parts, pieces = _cut(train, fmt.record_bytes, min_partitions)
        return cls(train, tuple(files[len(paths):]), x_key, y_key, fmt, parts, pieces)

    def open(self, mpio: bool = False) -> ForeignReader:
        """A reader of the training rows (``DatasetFile``'s reading interface)."""
        return ForeignReader(self, mpio)

    def read_val(self) -> dict[str, np.ndarray]:
        """The held-out files' rows, concatenated, by field (``x``, ``y``)."""
        if not self.val_files:
            return self.format.empty(0)
        xs, ys = [], []
        for f in self.val_files:
            with h5py.File(f.path, "r") as h5:
                xs.append(check_finite(h5[self.x_key][()], f.path, self.x_key, 0))
                ys.append(h5[self.y_key][()])
        return {"x": np.concatenate(xs), "y": np.concatenate(ys)}


def _agreeing_shapes(files: list[ForeignFile], n_train: int, x_key: str, y_key: str) -> list[str]:
    """One line per file whose shapes or dtypes differ from the first file's."""
    first, problems = files[0], []
    for f in files[1:]:
        for key, a, b in ((x_key, (f.x_shape, f.x_dtype), (first.x_shape, first.x_dtype)),
                          (y_key, (f.y_shape, f.y_dtype), (first.y_shape, first.y_dtype))):
            if a != b:
                problems.append(f"{f.path}: {key!r} holds {a[1]} samples of shape {a[0]}, {first.path} {b[1]} of"
                                f" shape {b[0]}: every file must hold the same")
    return problems


def _format(f: ForeignFile, task: str, num_classes: int | None, top: int) -> tuple[SampleFormat, list[str]]:
    """The sample format of ``task``, and the problems of its class count."""
    problems = []
    if task in ("classification", "tokens"):
        classes = num_classes if num_classes is not None else top + 1
        if top >= classes:
            what = "label" if task == "classification" else "token id"
            problems.append(f"{f.path} and the other files: {what} {top} is outside [0, {classes})"
                            " (--num-classes)")
        elif classes < 2:
            problems.append(f"{f.path}: {classes} class(es): a classifier needs at least 2")
    elif task == "multilabel":
        classes = f.y_shape[0]
    else:
        classes = math.prod(f.y_shape)
    return SampleFormat.xy(task, f.x_shape, f.x_dtype, f.y_shape, f.y_dtype, int(classes)), problems


def _cut(files: tuple[ForeignFile, ...], record_bytes: int, at_least: int
         ) -> tuple[Partitions, tuple[tuple[int, int, int], ...]]:
    """Partitions: each file whole, or in chunk-aligned ranges of about PARTITION_BYTES; files are
    cut further (largest pieces first) until there are ``at_least`` partitions, where chunks allow."""
    counts = [max(1, math.ceil(f.rows * record_bytes / PARTITION_BYTES)) for f in files]

    def most(i: int) -> int:  # the most pieces file i can be cut into along its chunks
        return math.ceil(files[i].rows / files[i].chunk_rows)

    counts = [min(c, most(i)) for i, c in enumerate(counts)]
    while sum(counts) < at_least:
        room = [i for i in range(len(files)) if counts[i] < most(i)]
        if not room:
            break
        i = max(room, key=lambda i: (files[i].rows / counts[i], -i))
        counts[i] += 1
    pieces = []
    for i, (f, c) in enumerate(zip(files, counts, strict=True)):
        chunks = most(i)
        bounds = [min(f.rows, round(k * chunks / c) * f.chunk_rows) for k in range(c + 1)]
        pieces += [(i, a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    sizes = tuple(b - a for _, a, b in pieces)
    offsets = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
    return Partitions(offsets, sizes), tuple(pieces)


class ForeignReader:
    """Reads rows of the training split of ``ForeignData``; files opened on first read.

    Offers what ``PartitionReader`` needs of a ``DatasetFile``: ``format``, ``partitions``,
    ``samples``, ``path``, ``read_train(lo, hi)`` (inside one partition) and ``close()``.
    """

    def __init__(self, data: ForeignData, mpio: bool = False):
        self.data, self.mpio = data, mpio
        self.format, self.partitions, self.samples = data.format, data.partitions, data.samples
        self.path = data.name
        self.open_files: dict[int, h5py.File] = {}

    def _file(self, i: int) -> h5py.File:
        if i not in self.open_files:
            path = self.data.files[i].path
            try:
                if self.mpio:
                    from mpi4py import MPI

                    self.open_files[i] = h5py.File(path, "r", driver="mpio", comm=MPI.COMM_SELF)
                else:
                    self.open_files[i] = h5py.File(path, "r")
            except OSError as exc:
                raise DatasetError(f"{path}: cannot be opened for reading: {exc}") from exc
        return self.open_files[i]

    def read_train(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of the training split, which must lie inside one partition."""
        p = int(self.partitions.of(np.array([lo]))[0])
        start, end = self.partitions.range(p)
        if hi > end:
            raise ValueError(f"rows {lo}..{hi} straddle partition {p} ({start}..{end})")
        i, first, _ = self.data.pieces[p]
        h5, a = self._file(i), first + lo - start
        x = h5[self.data.x_key][a : a + hi - lo]
        check_finite(x, self.data.files[i].path, self.data.x_key, a)
        return {"x": x, "y": h5[self.data.y_key][a : a + hi - lo]}

    def close(self) -> None:
        for h5 in self.open_files.values():
            h5.close()
        self.open_files.clear()

    def __enter__(self) -> ForeignReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
