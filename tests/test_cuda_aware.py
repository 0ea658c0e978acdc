"""CUDA-awareness detection with faked library answers, and the path each answer leads to."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from mpips.cuda_aware import CudaSupport, decide, library_lookup, query

# Functions with the C signatures of the real queries, answering what a test wants.
OMPI_QUERY = ctypes.CFUNCTYPE(ctypes.c_int)
MPICH_QUERY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))


def _ompi(answer: int):
    return OMPI_QUERY(lambda: answer)


def _mpich(answer: int, status: int = 0, seen: list[int] | None = None):
    def query_support(gpu_type, is_supported):
        if seen is not None:
            seen.append(gpu_type)
        is_supported[0] = answer
        return status

    return MPICH_QUERY(query_support)


def _lookup(**symbols):
    return lambda name: symbols.get(name)


@pytest.mark.parametrize("answer, aware", [(1, True), (0, False)])
def test_open_mpi_is_asked_through_mpix_query_cuda_support(answer, aware):
    support = query(_lookup(MPIX_Query_cuda_support=_ompi(answer)), "Open MPI v4.1.6", {})
    assert support == CudaSupport(aware, f"Open MPI MPIX_Query_cuda_support() = {answer}")


@pytest.mark.parametrize("answer, aware", [(1, True), (0, False)])
def test_mpich_is_asked_for_cuda_through_mpix_gpu_query_support(answer, aware):
    seen = []
    support = query(_lookup(MPIX_GPU_query_support=_mpich(answer, seen=seen)), "MPICH Version: 4.2.0", {})
    assert support == CudaSupport(aware, f"MPICH MPIX_GPU_query_support(CUDA) = {answer}")
    assert seen == [0]  # MPIX_GPU_SUPPORT_CUDA


def test_a_failing_mpich_query_is_no_answer():
    support = query(_lookup(MPIX_GPU_query_support=_mpich(1, status=13)), "MPICH Version: 4.2.0", {})
    assert support.aware is None and "failed with status 13" in support.source


@pytest.mark.parametrize("value, aware", [("1", True), ("0", False), (None, False)])
def test_cray_mpich_answers_with_mpich_gpu_support_enabled(value, aware):
    env = {} if value is None else {"MPICH_GPU_SUPPORT_ENABLED": value}
    # Cray MPICH may carry MPICH's query too; its documented switch decides
    lookup = _lookup(MPIX_GPU_query_support=_mpich(1))
    support = query(lookup, "MPI VERSION    : CRAY MPICH version 8.1.28.2 (ANL base 3.4a2)", env)
    assert support == CudaSupport(aware, f"Cray MPICH MPICH_GPU_SUPPORT_ENABLED={value or '(unset)'}")


@pytest.mark.parametrize("value, aware", [("1", True), (None, False)])
def test_mvapich2_answers_with_mv2_use_cuda(value, aware):
    env = {} if value is None else {"MV2_USE_CUDA": value}
    support = query(_lookup(), "MVAPICH2 Version      :\t2.3.7", env)
    assert support == CudaSupport(aware, f"MVAPICH2 MV2_USE_CUDA={value or '(unset)'}")


def test_an_unnamed_mpich_derivative_is_read_from_its_variable():
    support = query(_lookup(), "MPICH Version: 3.4", {"MV2_USE_CUDA": "1"})
    assert support == CudaSupport(True, "MVAPICH2 MV2_USE_CUDA=1")


def test_a_library_without_any_query_gives_no_answer():
    support = query(_lookup(), "Intel(R) MPI Library 2021.10", {})
    assert support.aware is None and "has no CUDA query" in support.source


def test_the_real_library_here_answers():
    """This machine's Open MPI has the query (Debian builds it without CUDA)."""
    from mpi4py import MPI

    from mpips.doctor import find_loaded_libmpi

    libmpi = find_loaded_libmpi(Path("/proc/self/maps").read_text())
    support = query(library_lookup(libmpi), MPI.Get_library_version().splitlines()[0], {})
    if "Open MPI" in MPI.Get_library_version():
        assert support.aware is not None and support.source.startswith("Open MPI MPIX_Query_cuda_support() = ")
    assert library_lookup(None)("MPIX_Query_cuda_support") is None


@pytest.mark.parametrize(
    "mode, aware, device, path",
    [
        ("auto", True, "cuda", "direct"),
        ("auto", False, "cuda", "staging"),
        ("auto", None, "cuda", "staging"),
        ("yes", False, "cuda", "direct"),
        ("no", True, "cuda", "staging"),
        ("yes", True, "cpu", "host"),
        ("auto", None, "cpu", "host"),
    ],
)
def test_the_decision_follows_the_flag_and_the_answer(mode, aware, device, path):
    decision = decide(mode, CudaSupport(aware, "faked"), device)
    assert decision.path == path
    assert "faked" in decision.line and "\n" not in decision.line
    if device == "cuda":
        assert f"--cuda-aware {mode}" in decision.line


def test_the_decision_line_says_what_the_library_said():
    line = decide("auto", CudaSupport(False, "Open MPI MPIX_Query_cuda_support() = 0"), "cuda").line
    assert line == ("device buffers: staged through pinned host memory, chunk by chunk on a side stream"
                    " (--cuda-aware auto; MPI not CUDA-aware: Open MPI MPIX_Query_cuda_support() = 0)")


@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_codecs_that_encode_on_the_host_keep_a_cuda_aware_library_on_the_staging_path(mode):
    decision = decide(mode, CudaSupport(True, "faked"), "cuda", needs_host="--compress topk")
    assert decision.path == "staging"
    assert "(--compress topk encodes on the host; MPI CUDA-aware: faked)" in decision.line


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="--cuda-aware must be auto, yes or no"):
        decide("maybe", CudaSupport(None, ""), "cuda")
