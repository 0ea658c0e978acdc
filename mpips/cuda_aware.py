"""Is the MPI library CUDA-aware, and which path do a GPU worker's bytes take? Decided once per job.

A CUDA-aware MPI takes device pointers in its calls; others need host memory. The library is
asked, in this order (``query``):

- Open MPI: ``int MPIX_Query_cuda_support(void)`` (``mpi-ext.h``), the run-time answer (1 where
  the library was built with CUDA and its CUDA support is not turned off).
- MPICH >= 4: ``int MPIX_GPU_query_support(int gpu_type, int *is_supported)`` with
  ``MPIX_GPU_SUPPORT_CUDA`` (0), 1 where MPICH was built with CUDA and ``MPIR_CVAR_ENABLE_GPU``
  is on.
- Cray MPICH: device buffers are taken only with ``MPICH_GPU_SUPPORT_ENABLED=1`` in the
  environment (HPE's documentation; PyTorch's ``ProcessGroupMPI`` reads the same variable).
- MVAPICH2(-GDR): only with ``MV2_USE_CUDA=1`` in the environment.

The answer then meets ``--cuda-aware auto|yes|no`` (``decide``): a worker on a CUDA device sends
and pulls device memory directly (``direct``) where the library says yes or ``yes`` is forced,
and stages through pinned host memory otherwise (``staging``); a CPU worker has nothing to
decide (``host``). A library's claim is not proof: ``python -m mpips.doctor`` with a GPU runs a
Send/Recv of a device buffer between two ranks (ChainerMN's ``_check_cuda_aware_mpi`` does the
same), and ``jobs/device-check.sh`` runs it.

Pure apart from ``ctypes`` on the library file; the symbol lookup is a parameter (``Lookup``), so
tests fake every library's answer without one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CudaSupport", "PathDecision", "decide", "library_lookup", "query"]

MPIX_GPU_SUPPORT_CUDA = 0  # MPICH's mpi.h: a gpu type id, not a flag

# symbol name -> a ctypes function of the MPI library, or None where it has no such symbol
Lookup = Callable[[str], "ctypes._CFuncPtr | None"]


@dataclass(frozen=True)
class CudaSupport:
    """What the MPI library says about device buffers.

    Attributes:
        aware: True or False as the library (or its documented variable) answers; None when it
            gives no answer (no query symbol, no variable).
        source: how it was learnt, for the start-up line, e.g. ``"MPIX_Query_cuda_support() = 1"``.
    """

    aware: bool | None
    source: str


@dataclass(frozen=True)
class PathDecision:
    """How a worker's parameter and gradient bytes travel.

    Attributes:
        path: ``"host"`` (CPU worker: MPI reads the model's own host memory), ``"staging"``
            (CUDA worker, pinned host buffers and chunked async copies) or ``"direct"`` (CUDA
            worker, MPI reads and writes device memory).
        line: the start-up line that says so and why (printed once, by the lead worker).
    """

    path: str
    line: str


def library_lookup(libmpi: str | None) -> Lookup:
    """A ``Lookup`` over the MPI library at ``libmpi`` (a path; None: no library, every symbol None).

    The symbols are not global in a process that loaded mpi4py (``ctypes.CDLL(None)`` misses
    them), so the library is opened by path.
    """
    if libmpi is None or not Path(libmpi).exists():
        return lambda name: None
    try:
        lib = ctypes.CDLL(libmpi)
    except OSError:
        return lambda name: None
    return lambda name: getattr(lib, name, None)


def query(lookup: Lookup, vendor: str, environ: Mapping[str, str]) -> CudaSupport:
    """Ask the MPI library whether it takes CUDA device buffers (see the module docstring).

    Args:
        lookup: symbol name -> function of the MPI library, or None (``library_lookup``).
        vendor: ``mpi4py.MPI.get_vendor()[0]`` or the first line of ``MPI.Get_library_version()``
            (only used to recognise Cray MPICH and MVAPICH2, whose answer is an environment
            variable).
        environ: the process environment.

    Returns:
        The answer and where it came from. A query that fails (non-zero status) counts as no answer.
    """
    lowered = vendor.lower()
    cray, mvapich = "cray" in lowered, "mvapich" in lowered
    if cray:
        return _variable("Cray MPICH", "MPICH_GPU_SUPPORT_ENABLED", environ)
    if mvapich:
        return _variable("MVAPICH2", "MV2_USE_CUDA", environ)
    ompi = lookup("MPIX_Query_cuda_support")
    if ompi is not None:
        ompi.restype, ompi.argtypes = ctypes.c_int, []
        value = int(ompi())
        return CudaSupport(value == 1, f"Open MPI MPIX_Query_cuda_support() = {value}")
    mpich = lookup("MPIX_GPU_query_support")
    if mpich is not None:
        mpich.restype, mpich.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        supported = ctypes.c_int(0)
        status = int(mpich(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(supported)))
        if status != 0:
            return CudaSupport(None, f"MPICH MPIX_GPU_query_support(CUDA) failed with status {status}")
        return CudaSupport(supported.value == 1, f"MPICH MPIX_GPU_query_support(CUDA) = {supported.value}")
    # an MPICH derivative that did not name itself: its documented variable, where set
    for name, variable in (("Cray MPICH", "MPICH_GPU_SUPPORT_ENABLED"), ("MVAPICH2", "MV2_USE_CUDA")):
        if variable in environ:
            return _variable(name, variable, environ)
    return CudaSupport(None, "the MPI library has no CUDA query (MPIX_Query_cuda_support, MPIX_GPU_query_support)")


def decide(mode: str, support: CudaSupport, device_type: str, needs_host: str = "") -> PathDecision:
    """The path a worker on ``device_type`` uses under ``--cuda-aware mode``.

    Args:
        mode: ``"auto"`` (direct where the library says it is CUDA-aware), ``"yes"`` (direct; a
            library that is not fails in its first MPI call on a device buffer) or ``"no"``
            (always staging).
        support: the library's answer (``query``).
        device_type: the worker's ``torch.device.type``: ``"cpu"`` or ``"cuda"``.
        needs_host: why the bytes must pass through host memory whatever the library says (the
            gradient codecs and pull codecs encode and widen on the host), e.g. ``"--compress topk"``;
            empty where nothing does. It makes the path staging.

    Raises:
        ValueError: for a mode other than auto, yes or no.
    """
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"--cuda-aware must be auto, yes or no, got {mode!r}")
    said = {True: "CUDA-aware", False: "not CUDA-aware", None: "unknown"}[support.aware]
    facts = f"MPI {said}: {support.source}"
    if device_type != "cuda":
        return PathDecision("host", f"device buffers: none, workers compute on {device_type} ({facts})")
    if needs_host and (mode == "yes" or support.aware):
        return PathDecision("staging", "device buffers: staged through pinned host memory, chunk by chunk on a"
                                       f" side stream ({needs_host} encodes on the host; {facts})")
    if mode == "yes" or (mode == "auto" and support.aware):
        why = "--cuda-aware yes" if mode == "yes" else "--cuda-aware auto"
        return PathDecision("direct", f"device buffers: direct, MPI reads and writes GPU memory ({why}; {facts})")
    why = "--cuda-aware no" if mode == "no" else "--cuda-aware auto"
    return PathDecision("staging", "device buffers: staged through pinned host memory, chunk by chunk on a"
                                   f" side stream ({why}; {facts})")


def _variable(library: str, variable: str, environ: Mapping[str, str]) -> CudaSupport:
    value = environ.get(variable, "")
    return CudaSupport(value == "1", f"{library} {variable}={value or '(unset)'}")
