"""Training data: the sample-order plan, built-in datasets, and batch sources for workers."""

from mpips.data.builtin import load_builtin
from mpips.data.plan import EpochPlan
from mpips.data.source import ArrayDataset, Batch, BatchSource, LocalSource

__all__ = ["ArrayDataset", "Batch", "BatchSource", "EpochPlan", "LocalSource", "load_builtin"]
