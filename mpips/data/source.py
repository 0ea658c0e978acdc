"""Where a worker's batches come from. ``LocalSource`` reads the samples itself (no data servers).

A source yields, for each (epoch, step) of the EpochPlan, the worker's samples as numpy arrays
together with their sample ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mpips.data.plan import EpochPlan

__all__ = ["ArrayDataset", "Batch", "BatchSource", "LocalSource", "SampleStore"]


@dataclass
class Batch:
    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class SampleStore(Protocol):
    """Random access to training samples by id."""

    def __len__(self) -> int: ...
    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class BatchSource(Protocol):
    def batch(self, epoch: int, step: int) -> Batch: ...
    def close(self) -> None: ...


@dataclass
class ArrayDataset:
    """Samples held in memory (the built-in datasets, or a split of one)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[ids], self.y[ids]


class LocalSource:
    """The worker reads its own slice of every global batch from ``store``."""

    def __init__(self, store: SampleStore, plan: EpochPlan, worker: int):
        self.store, self.plan, self.worker = store, plan, worker

    def batch(self, epoch: int, step: int) -> Batch:
        ids = self.plan.worker_ids(epoch, step, self.worker)
        x, y = self.store.take(ids)
        return Batch(ids, x, y)

    def close(self) -> None:
        pass
