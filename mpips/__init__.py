"""mpips: an MPI parameter-server for PyTorch training on HPC clusters."""

__version__ = "0.1.0"
__all__ = ["__version__"]
