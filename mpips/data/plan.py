"""EpochPlan: the sample-order contract. Pure numpy, no MPI.

An epoch is one seeded permutation of the training set, cut into global batches of
``workers * batch_size`` samples; worker ``w`` takes the ``w``-th slice of ``batch_size`` samples
of each global batch. The last global batch of an epoch may be short: it is split as evenly as
possible (``numpy.array_split``), so every training sample is used exactly once per epoch, and
in bsp the global batch of step ``t`` holds the same samples whatever the number of workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EpochPlan"]


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each worker trains on at each step."""

    samples: int
    workers: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("the training split is empty")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError("need at least one worker and a batch size of at least 1")

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples / self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of sample ids for ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.samples)

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
