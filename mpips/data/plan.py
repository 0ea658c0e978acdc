"""EpochPlan: the sample-order contract. Pure numpy, no MPI.

An epoch is one seeded permutation of the training set, cut into global batches of
``workers * batch_size`` samples; worker ``w`` takes the ``w``-th slice of ``batch_size`` samples
of each global batch. The last global batch of an epoch may be short: it is split as evenly as
possible (``numpy.array_split``), so every training sample is used exactly once per epoch, and
in bsp the global batch of step ``t`` holds the same samples whatever the number of workers.

When the training set is split into contiguous partitions (an HDF5 dataset file), the
permutation keeps reads large: the partitions are visited in a seeded random order, and the
samples of each partition in a seeded random order of their own, so a data server reads a
partition whole into a bounded buffer and serves it out of memory. The order depends only on
(partition sizes, seed, epoch), never on the number of workers or data servers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EpochPlan"]


@functools.lru_cache(maxsize=4)  # every step asks for its epoch's order; compute it once
def _order(samples: int, partitions: tuple[int, ...] | None, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    if partitions is None:
        out = rng.permutation(samples)
    else:
        sizes = np.asarray(partitions, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        visit = rng.permutation(len(sizes))
        out = np.concatenate([offsets[p] + rng.permutation(sizes[p]) for p in visit])
    out.flags.writeable = False  # shared between callers
    return out


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each worker trains on at each step."""

    samples: int
    workers: int
    batch_size: int
    seed: int
    partitions: tuple[int, ...] | None = None  # sizes of contiguous partitions; None = one pool

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("the training split is empty")
        if self.partitions is not None and (
            sum(self.partitions) != self.samples or min(self.partitions, default=0) < 1
        ):
            raise ValueError(
                f"partition sizes {self.partitions} do not add up to {self.samples} samples"
            )
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError("need at least one worker and a batch size of at least 1")

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples / self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of sample ids for ``epoch`` (partition by partition, if any)."""
        return _order(self.samples, self.partitions, self.seed, epoch)

    def global_ids(self, epoch: int, step: int) -> np.ndarray:
        """Sample ids of global batch ``step`` (0-based within the epoch)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside an epoch of {self.steps_per_epoch} steps")
        g = self.global_batch
        return self.order(epoch)[step * g : (step + 1) * g]

    def worker_ids(self, epoch: int, step: int, worker: int) -> np.ndarray:
        """Sample ids worker ``worker`` trains on at ``step`` of ``epoch`` (may be empty at the end)."""
        return np.array_split(self.global_ids(epoch, step), self.workers)[worker]

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of a run's ``global_step``."""
        return divmod(global_step, self.steps_per_epoch)
