"""mpips: an MPI parameter-server for PyTorch training on HPC clusters.

``mpips.fit`` (``mpips.api``) trains a model from a script run under mpirun; it is imported on
first use, so ``import mpips`` initialises no MPI.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["FitResult", "__version__", "fit"]


def __getattr__(name: str) -> Any:
    if name in ("fit", "FitResult"):
        from mpips import api

        return getattr(api, name)
    raise AttributeError(f"module 'mpips' has no attribute {name!r}")
