"""Training data: the sample-order plan, built-in datasets, and batch sources for workers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpips.data.builtin import load_builtin
from mpips.data.plan import EpochPlan
from mpips.data.source import ArrayDataset, Batch, BatchSource, LocalSource, SampleStore
from mpips.models import DataSpec

__all__ = [
    "ArrayDataset",
    "Batch",
    "BatchSource",
    "DatasetHandle",
    "EpochPlan",
    "LocalSource",
    "load_builtin",
    "open_dataset",
]


@dataclass
class DatasetHandle:
    """What the job needs of a dataset: its spec, the training store and the held-out split."""

    name: str
    spec: DataSpec
    train: SampleStore
    val_x: np.ndarray
    val_y: np.ndarray


def open_dataset(dataset: str, path: str | None, context: int = 64) -> DatasetHandle:
    """The built-in ``dataset``, or the HDF5 file at ``path`` when given."""
    if path is not None:
        raise ValueError(f"--data {path}: HDF5 dataset files are not supported yet")
    d = load_builtin(dataset, context=context)
    spec = DataSpec(d["kind"], tuple(d["x"].shape[1:]), d["num_classes"])
    tr, va = d["train_ids"], d["val_ids"]
    return DatasetHandle(dataset, spec, ArrayDataset(d["x"][tr], d["y"][tr]), d["x"][va], d["y"][va])
