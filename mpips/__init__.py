"""mpips: an MPI parameter-server for PyTorch training on HPC clusters.

``mpips.init`` (``mpips.job``) gives every rank its role for a training loop of your own;
``mpips.fit`` (``mpips.api``) trains a model with mpips' own loop. Both are imported on first
use, so ``import mpips`` initialises no MPI.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["DistributedOptimizer", "FitResult", "Job", "Preempted", "SparseEmbedding", "__version__", "fit", "init"]

_HOME = {"fit": "api", "FitResult": "api", "init": "job", "Job": "job", "DistributedOptimizer": "client",
         "Preempted": "client", "SparseEmbedding": "client"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"mpips.{_HOME[name]}"), name)
    raise AttributeError(f"module 'mpips' has no attribute {name!r}")
