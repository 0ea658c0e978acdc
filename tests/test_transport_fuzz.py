"""Fuzzing the push decoders: whatever arrives, ``PushHeader.decode`` and ``PushTrailer.decode``
either raise MalformedMessage or return a header (trailer) whose every field is valid. Plain
pytest, no MPI."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mpips.transport import (
    HEADER_BYTES,
    MAGIC,
    PROTOCOL,
    STREAMED,
    TAIL_MAGIC,
    TRAILER_BYTES,
    Codec,
    MalformedMessage,
    PushHeader,
    PushTrailer,
)

FORMAT = PushHeader._FORMAT
MAX_PAYLOAD = 4096
WORKER = 3


def _check(header: PushHeader, nbytes: int) -> None:
    """The invariants every accepted header satisfies."""
    assert header.codec in {int(c) for c in Codec}
    assert header.worker == WORKER
    assert header.step >= 0 and header.samples >= 0 and (header.clock_seen >= -1 or header.codec == Codec.JOIN)
    assert header.applied_seen >= 0
    if header.streamed:  # a header alone, announcing what follows
        assert nbytes == HEADER_BYTES and 0 < header.length <= MAX_PAYLOAD
        assert header.codec not in (Codec.JOIN, Codec.STOP)
    else:
        assert header.length == nbytes - HEADER_BYTES and 0 <= header.length <= MAX_PAYLOAD


def _decode(buf: np.ndarray, nbytes: int) -> PushHeader | None:
    try:
        header = PushHeader.decode(buf, nbytes, worker=WORKER, max_payload=MAX_PAYLOAD)
    except MalformedMessage as exc:
        assert f"worker {WORKER}" in str(exc)  # the message says whose push it was
        return None
    _check(header, nbytes)
    return header


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=HEADER_BYTES + 64), st.data())
def test_random_bytes_never_crash(raw: bytes, data):
    buf = np.frombuffer(raw, dtype=np.uint8).copy()
    nbytes = data.draw(st.integers(0, len(raw)))  # a message never exceeds its receive buffer
    _decode(buf, nbytes)


def _int(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [lo, hi, -2, -1, 0, 1, 2, WORKER, MAX_PAYLOAD, MAX_PAYLOAD + 1]
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


fields = st.tuples(
    st.one_of(st.just(MAGIC), _int(32, False)),  # magic
    st.one_of(st.just(PROTOCOL), _int(16, False)),  # protocol
    st.one_of(st.sampled_from([int(c) for c in Codec]), _int(8, False)),  # codec
    st.one_of(st.sampled_from([0, STREAMED]), _int(8, False)),  # flags
    _int(64, True),  # step
    st.one_of(st.just(WORKER), _int(32, True)),  # worker
    _int(32, True),  # samples
    _int(64, True),  # clock_seen
    st.one_of(st.integers(0, MAX_PAYLOAD + 8), _int(64, True)),  # length
    st.floats(allow_nan=True, allow_infinity=True),  # grad_norm
    st.floats(allow_nan=True, allow_infinity=True),  # loss
    _int(64, True),  # applied_seen
)


@settings(max_examples=500, deadline=None)
@given(fields, st.integers(0, MAX_PAYLOAD + 16))
def test_structured_headers_are_accepted_only_when_valid(values, payload):
    buf = np.zeros(HEADER_BYTES + MAX_PAYLOAD + 16, dtype=np.uint8)
    FORMAT.pack_into(buf, 0, *values)
    nbytes = HEADER_BYTES + payload
    header = _decode(buf, nbytes)
    magic, proto, codec, flags, step, w, samples, clock, length, _, _, applied = values
    streamed = flags == STREAMED
    valid = (
        magic == MAGIC
        and proto == PROTOCOL
        and codec in {int(c) for c in Codec}
        and flags in (0, STREAMED)
        and w == WORKER
        and step >= 0
        and samples >= 0
        and clock >= (-1 if codec != Codec.JOIN else -(2**63))
        and applied >= 0
        and (
            (not streamed and length == payload and length <= MAX_PAYLOAD)
            or (streamed and payload == 0 and 0 < length <= MAX_PAYLOAD and codec not in (Codec.JOIN, Codec.STOP))
        )
    )
    assert (header is not None) == valid


@settings(max_examples=200, deadline=None)
@given(
    step=st.integers(0, 2**40),
    samples=st.integers(0, 2**20),
    clock=st.integers(-1, 2**40),
    length=st.integers(0, MAX_PAYLOAD),
    norm=st.floats(allow_nan=False),
    applied=st.integers(0, 2**40),
    streamed=st.booleans(),
)
def test_valid_headers_round_trip(step, samples, clock, length, norm, applied, streamed):
    length = max(1, length) if streamed else length
    sent = PushHeader(
        step, WORKER, Codec.RAW32, samples, clock, length, norm, 0.5, applied_seen=applied, streamed=streamed
    )
    buf = np.zeros(HEADER_BYTES + length, dtype=np.uint8)
    sent.pack_into(buf)
    nbytes = HEADER_BYTES if streamed else HEADER_BYTES + length
    assert PushHeader.decode(buf, nbytes, worker=WORKER, max_payload=MAX_PAYLOAD) == sent


TRAILER_FIELDS = st.tuples(
    st.one_of(st.just(TAIL_MAGIC), _int(32, False)),  # magic
    st.one_of(st.just(WORKER), _int(32, True)),  # worker
    st.one_of(st.just(7), _int(64, True)),  # step
    st.floats(allow_nan=True, allow_infinity=True),  # grad_norm
    st.floats(allow_nan=True, allow_infinity=True),  # loss
)


@settings(max_examples=300, deadline=None)
@given(TRAILER_FIELDS)
def test_trailers_are_accepted_only_for_their_push(values):
    """A tail's trailer must name the header's worker and step; norm and loss may be anything
    (a non-finite norm: the server drops the push, as for a one-message push)."""
    header = PushHeader(7, WORKER, Codec.RAW32, 8, 6, 100, 0.0, 0.0, streamed=True)
    buf = np.zeros(TRAILER_BYTES, dtype=np.uint8)
    PushTrailer._FORMAT.pack_into(buf, 0, *values)
    magic, w, step, norm, loss = values
    try:
        got = PushTrailer.decode(buf, header)
    except MalformedMessage as exc:
        assert f"worker {WORKER} for step 7" in str(exc)
        assert (magic, w, step) != (TAIL_MAGIC, WORKER, 7)
    else:
        assert (magic, w, step) == (TAIL_MAGIC, WORKER, 7)
        assert (got.worker, got.step) == (WORKER, 7)
        assert got.grad_norm == norm or (np.isnan(got.grad_norm) and np.isnan(norm))


def test_corrupted_magic_is_named():
    buf = np.zeros(HEADER_BYTES, dtype=np.uint8)
    PushHeader(1, WORKER, Codec.RAW32, 1, 0, 0, 1.0, 1.0).pack_into(buf)
    buf[:4] ^= 0xFF  # what faults kind=malformed does
    try:
        PushHeader.decode(buf, HEADER_BYTES, worker=WORKER, max_payload=MAX_PAYLOAD)
    except MalformedMessage as exc:
        assert "bad magic" in str(exc)
    else:
        raise AssertionError("a corrupted magic number was accepted")
    assert struct.calcsize(FORMAT.format) == HEADER_BYTES
