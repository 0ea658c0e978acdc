"""The chunk rule: no piece over the limit, none over the hard cap, all bytes once and in order. Pure."""

import pytest

from mpips.chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, chunk_count, chunks


@pytest.mark.parametrize("nbytes, limit", [(0, 100), (1, 100), (99, 100), (100, 100), (101, 100), (10_007, 64),
                                           (2**31 + 128, DEFAULT_CHUNK_BYTES), (2**33, 2**31)])
def test_chunks_cover_every_byte_once_in_order_within_the_limit(nbytes, limit):
    ranges = chunks(nbytes, limit)
    starts, stops = [a for a, _ in ranges], [b for _, b in ranges]
    assert starts == [0, *stops[:-1]][: len(starts)] and (stops or [0])[-1] == nbytes  # consecutive, 0..nbytes
    assert all(0 < b - a <= min(limit, MAX_CHUNK_BYTES) for a, b in ranges)
    assert all(b - a == min(limit, MAX_CHUNK_BYTES) for a, b in ranges[:-1])  # only the last is short
    assert chunk_count(nbytes, limit) == len(ranges)


def test_no_chunk_can_exceed_what_one_mpi_3_call_carries():
    assert MAX_CHUNK_BYTES < 2**31 - 1
    assert max(b - a for a, b in chunks(5 * 2**30, 2**40)) == MAX_CHUNK_BYTES


@pytest.mark.parametrize("nbytes, limit", [(-1, 100), (100, 0)])
def test_bad_arguments_are_refused(nbytes, limit):
    with pytest.raises(ValueError, match="cannot cut"):
        chunks(nbytes, limit)
