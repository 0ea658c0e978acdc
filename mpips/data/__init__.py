"""Training data: the sample-order plan, the HDF5 dataset format, and batch sources for workers.

Every job reads HDF5: ``--data FILE.h5`` (made by ``python -m mpips.data prepare``), a built-in
dataset (``--dataset digits``) materialised once as such a file in ``--data-dir``, or a user's own
HDF5 files read in place (``--data 'shards/*.h5' --x-key ... --y-key ...``, ``mpips.data.foreign``).
``open_dataset`` checks the data up front, on every rank alike, so a bad file ends the job with
one clear ``DatasetError`` before training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpips.config import ConfigError
from mpips.data.builtin import load_builtin
from mpips.data.foreign import ForeignData, is_foreign
from mpips.data.hdf5 import DatasetError, DatasetFile, HDF5Store, HeldOut, Partitions, SampleFormat
from mpips.data.plan import EpochPlan
from mpips.data.prepare import materialise_builtin
from mpips.data.source import ArrayDataset, Batch, BatchSource, LocalSource, SampleStore
from mpips.models import DataSpec

__all__ = [
    "ArrayDataset",
    "Batch",
    "BatchSource",
    "DatasetError",
    "DatasetHandle",
    "EpochPlan",
    "ForeignData",
    "LocalSource",
    "load_builtin",
    "open_dataset",
]

MAX_REPORTED = 5  # problems listed in one DatasetError


@dataclass
class DatasetHandle:
    """What the job needs of a dataset: its spec, the training store and the held-out split.

    ``partitions`` (contiguous training ranges) shape the epoch order: build the EpochPlan with
    ``plan()`` so that every reader (data servers, workers, a reference run) agrees on it.
    """

    name: str
    spec: DataSpec
    train: SampleStore
    val: Any  # has .x and .y (HeldOut reads them on first use; ArrayDataset holds them)
    path: str | None = None
    format: SampleFormat | None = None
    partitions: Partitions | None = None
    foreign: ForeignData | None = None  # HDF5 files read in place (``mpips.data.foreign``)

    def open_file(self, mpio_comm: Any = None) -> Any:
        """A reader of the training rows: the dataset file (collectively over ``mpio_comm`` with
        MPI-IO when given), or the files read in place (MPI-IO per file when ``mpio_comm``)."""
        if self.foreign is not None:
            return self.foreign.open(mpio=mpio_comm is not None)
        return DatasetFile(self.path, comm=mpio_comm)

    @property
    def val_x(self) -> np.ndarray:
        return self.val.x

    @property
    def val_y(self) -> np.ndarray:
        return self.val.y

    def sample(self, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` training samples as a worker gets them, (x, y), read without the cache."""
        n = min(n, len(self.train))
        if self.foreign is not None:
            n = min(n, self.partitions.sizes[0])
        elif self.path is None or self.format is None:
            return self.train.take(np.arange(n))
        with self.open_file() as f:
            return self.format.to_xy(f.read_train(0, n), self.spec.input_shape[0] if self.spec.kind == "text" else 0)

    def plan(self, workers: int, batch_size: int, seed: int) -> EpochPlan:
        """The EpochPlan of this dataset for ``workers`` x ``batch_size``.

        Raises:
            ConfigError: a step's samples (``workers * batch_size``) are more than the training
                split holds: each step would be the whole split, not the batch asked for.
        """
        n = len(self.train)
        if workers * batch_size > n:
            raise ConfigError(f"--batch-size {batch_size:,} x {workers} worker{'s' if workers > 1 else ''} is"
                              f" {workers * batch_size:,} samples a step, more than the {n:,} training samples"
                              f" of {self.name}: use --batch-size {max(1, n // workers):,} or less")
        sizes = self.partitions.sizes if self.partitions is not None else None
        return EpochPlan(len(self.train), workers, batch_size, seed, sizes)


def open_dataset(
    dataset: str, path: str | list | None, context: int = 64, *, comm: Any = None,
    data_dir: str | None = None,
    data_servers: int = 0, replicas: int = 1, cache_mb: float = 256.0, verify: bool = True,
    x_key: str = "x", y_key: str = "y", task: str = "auto", num_classes: int | None = None,
    val_data: str | list | None = None,
) -> DatasetHandle:
    """Open the HDF5 file at ``path``, or the built-in ``dataset`` materialised in ``data_dir``.

    Args:
        dataset: built-in name, used when ``path`` is None.
        path: an mpips dataset file; or HDF5 file(s) mpips did not write, read in place (a path,
            a glob, a comma-separated list or a list: ``mpips.data.foreign``), with datasets
            ``x_key`` and ``y_key``, targets of ``task`` (auto: guessed from them),
            ``num_classes`` (default: largest label + 1) and held-out file(s) ``val_data``.
        context: window length for text datasets (at most the file's).
        comm: collective over ``comm`` when given: the built-in file is written once per node,
            and the partition checksums are verified with the work spread over the ranks.
        data_servers, replicas: the layout's needs; the file must have at least
            ceil(data_servers / replicas) partitions.
        cache_mb: read cache of the training store (used when workers read their own data).
        verify: re-read every partition to check its checksum and labels.

    Raises:
        DatasetError: naming the file and partition, the same on every rank.
    """
    if path is not None and val_data and not is_foreign(path):
        raise DatasetError(f"--val-data goes with --data files read in place; {path} was written by `python -m"
                           " mpips.data prepare` and holds its own held-out split")
    if path is not None and is_foreign(path):
        need = math.ceil(data_servers / replicas) if data_servers else 1
        foreign = ForeignData.scan(path, x_key=x_key, y_key=y_key, task=task, num_classes=num_classes,
                                   val_data=val_data, min_partitions=need, comm=comm)
        if len(foreign.partitions) < need:
            raise DatasetError(f"{foreign.name}: {len(foreign.partitions)} partition(s) (files, or chunk-aligned"
                               f" ranges of them), but {data_servers} data servers with --replicas {replicas} need"
                               f" at least {need}: give more files or lower --data-servers")
        fmt = foreign.format
        store = HDF5Store(foreign.name, fmt, foreign.samples, int(cache_mb * (1 << 20)), 0, opener=foreign.open)
        val = HeldOut(foreign.name, fmt, 0, read=foreign.read_val)
        return DatasetHandle(foreign.name, fmt.spec(0), store, val, None, fmt, foreign.partitions, foreign)
    if path is None:
        path = materialise_builtin(dataset, context, data_dir, comm)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    problems: list[str] = []
    try:
        with DatasetFile(path) as f:
            fmt, parts, samples, name = f.format, f.partitions, f.samples, f.name
            problems += _fit(path, f, context, data_servers, replicas) + f.check_classes()
            if verify and not problems:
                problems += f.check_val() if rank == 0 else []
                problems += [msg for p in range(rank, len(parts), size) for msg in f.check_partition(p)]
    except DatasetError as exc:  # e.g. the file is missing on this node only: still agree below
        problems.append(str(exc))
    if comm is not None:  # every rank reaches this, so every rank raises the same DatasetError
        problems = list(dict.fromkeys(m for ms in comm.allgather(problems) for m in ms))
    if problems:
        extra = len(problems) - MAX_REPORTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise DatasetError("\n  ".join(problems[:MAX_REPORTED]) + more)
    store = HDF5Store(path, fmt, samples, int(cache_mb * (1 << 20)), context)
    val = HeldOut(path, fmt, context)
    return DatasetHandle(name, fmt.spec(context), store, val, path, fmt, parts)


def _fit(path: str, f: DatasetFile, context: int, data_servers: int, replicas: int) -> list[str]:
    """Does the file fit the job: the text context, and enough partitions for the data servers?"""
    fmt, parts = f.format, f.partitions
    if fmt.kind == "text" and context > fmt.max_context:
        return [f"{path}: windows hold a context of {fmt.max_context} bytes, --gpt-context is {context}"]
    need = math.ceil(data_servers / replicas) if data_servers else 1
    if len(parts) < need:
        return [
            f"{path} has {len(parts)} partition(s), but {data_servers} data servers"
            f" with --replicas"
            f" {replicas} need at least {need}: re-create it with `python -m mpips.data prepare"
            f" --partitions {data_servers}` or lower --data-servers"
        ]
    return []
