"""Reading samples: ``PartitionReader`` (partitions through a byte-bounded cache), ``HDF5Store``
(a worker reading its own samples) and ``HeldOut`` (the held-out split).

Reading goes through ``PartitionReader``: a request for sample ids is served from whole
partitions read in one contiguous slab into an LRU cache bounded in bytes; a partition bigger
than the bound is read as the smallest contiguous span covering the request instead.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpips.data.hdf5.file import DatasetFile
from mpips.data.hdf5.schema import SampleFormat

__all__ = [
    "HDF5Store",
    "HeldOut",
    "PartitionReader",
]


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
