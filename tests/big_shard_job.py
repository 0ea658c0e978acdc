"""A shard just over 2 GiB through the real transport classes, on 2 ranks (run by test_transport).

    mpirun -n 2 python tests/big_shard_job.py [CHUNK_BYTES]

Rank 0 is the server, rank 1 the worker; the shard is 2**29 + 16 float32 (2 GiB + 64 bytes), so
every transfer of it would be one MPI call of more than 2**31-1 bytes without chunks. Three
phases, each freeing its buffers before the next, so that the peak stays at 4 shards (8 GiB):

1. push: ``Pusher`` -> ``PushReceiver`` (gradient + has-gradient mask, as ``Worker.push`` sends:
   streamed, its header, chunks last first, then its tail);
2. window pull: ``ParameterWindow.publish`` on the server, ``ParameterWindow.pull`` on the worker;
3. message pull: ``PullServer`` -> ``MessagePuller`` from the same window.

Every phase moves the same pattern (element i holds the uint32 word i). After each, the
receiving rank checks slices at the ends, around 2 GiB and at chunk boundaries against the
pattern, and a CRC-32 of all bytes against the pattern's. Waiting ranks sleep (nonblocking
barrier, polled with backoff) instead of spinning, so the busy rank has a core to itself. Rank 0 prints one JSON line:
seconds per phase and each rank's peak RSS after the push and at the end.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import zlib

import numpy as np
from mpi4py import MPI

from mpips.transport import (
    DEFAULT_CHUNK_BYTES,
    HEADER_BYTES,
    Codec,
    MessagePuller,
    ParameterWindow,
    PullServer,
    Pusher,
    PushHeader,
    PushLayout,
    PushReceiver,
    Slot,
    wait_all,
    wait_for,
)

N = 2**29 + 16  # float32 elements: 2 GiB + 64 bytes
BLOCK = 2**24  # elements per block when filling or hashing: bounded scratch memory


def pattern(lo: int, hi: int) -> np.ndarray:
    """The uint32 words of elements lo..hi: every word differs (as float32: finite, untouched)."""
    return np.arange(lo, hi, dtype=np.uint32)


def fill(out: np.ndarray) -> None:
    words, base = out.view(np.uint32), pattern(0, BLOCK)
    for lo in range(0, words.size, BLOCK):
        hi = min(lo + BLOCK, words.size)
        np.add(base[: hi - lo], np.uint32(lo), out=words[lo:hi])


def crc(data: np.ndarray) -> int:
    """CRC-32 of all bytes of ``data``, a block at a time (as ``expected_crc`` cuts them)."""
    raw, value = data.view(np.uint8), 0
    for lo in range(0, raw.size, 4 * BLOCK):
        value = zlib.crc32(raw[lo : lo + 4 * BLOCK], value)
    return value


def check(got: np.ndarray, want_crc: int, chunk: int, what: str) -> None:
    """Slices against the pattern, then the CRC of every byte against the sender's."""
    words = got.view(np.uint32)
    per_chunk = chunk // 4
    spots = [0, per_chunk, 2**29 - 8, N - 64, *(k * per_chunk for k in (2**29 // per_chunk, N // per_chunk))]
    for at in spots:
        lo, hi = max(0, at - 8), min(N, at + 8)
        if not np.array_equal(words[lo:hi], pattern(lo, hi)):
            raise AssertionError(f"{what}: elements {lo}..{hi} differ from what was sent")
    if crc(got) != want_crc:
        raise AssertionError(f"{what}: CRC-32 of the {got.nbytes} bytes differs from the pattern's")


def quiet_barrier(comm: MPI.Comm) -> None:
    wait_all([comm.Ibarrier()], "the other rank", 300)


def expected_crc() -> int:
    """The CRC-32 of the pattern, a block at a time."""
    value = 0
    for lo in range(0, N, BLOCK):
        value = zlib.crc32(pattern(lo, min(lo + BLOCK, N)), value)
    return value


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    comm = MPI.COMM_WORLD
    assert comm.Get_size() == 2, "run with mpirun -n 2"
    chunk = int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CHUNK_BYTES
    server, worker = comm.Get_rank() == 0, comm.Get_rank() == 1
    seconds: dict[str, float] = {}

    # 1. push: the gradient and a one-byte mask, as Worker.push sends them
    quiet_barrier(comm)
    t0 = time.perf_counter()
    if worker:
        grad = np.empty(N, dtype=np.float32)
        fill(grad)
        pusher = Pusher(comm, [0], [PushLayout.raw(N, 1, chunk)], max_inflight=1, chunk_bytes=chunk)
        pusher.push(0, PushHeader(0, 0, Codec.RAW32, 8, 0, 4 * N + 1, 1.0, 1.0), grad, np.ones(1, np.uint8))
        pusher.drain()
        del pusher
    else:
        want = expected_crc()  # while the worker fills its gradient
        receiver = PushReceiver(comm, [1], PushLayout.raw(N, 1, chunk), chunk_bytes=chunk)
        ready: list = []
        wait_for(lambda: bool(ready.extend(receiver.poll()) or ready), "the big push", 120,
                 moved=lambda: receiver.progressed)
        ((w, header, payload),) = ready
        assert (w, header.length, int(payload[-1])) == (0, 4 * N + 1, 1)
        check(payload[:-1].view(np.float32), want, chunk, "push")
        del receiver, payload, ready
    seconds["push"] = time.perf_counter() - t0
    after_push = peak_gib()

    # 2. window pull: the server publishes the pattern, the worker pulls it into its gradient's memory
    quiet_barrier(comm)
    t0 = time.perf_counter()
    if worker:
        want = expected_crc()  # while the server allocates its window buffers
        grad[:] = 0.0
    window = ParameterWindow(comm, N if server else 0, chunk_bytes=chunk)
    status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
    if server:
        window.begin_update()  # the update is in place, in the stale exposed buffer
        fill(window.params)
        window.publish()
    quiet_barrier(comm)
    if worker:
        window.pull([0], status, [grad])
        assert int(status[0, Slot.VERSION]) == 1
        check(grad, want, chunk, "window pull")
        del grad
    seconds["window pull"] = time.perf_counter() - t0

    # 3. message pull of the same version; the worker's shard is the puller's own buffer (no copy)
    quiet_barrier(comm)
    t0 = time.perf_counter()
    if server:
        pulls = PullServer(comm, window, chunk_bytes=chunk)
        wait_for(pulls.poll, "the pull request", 120)
        pulls.close()
    else:
        puller = MessagePuller(comm, [0], [N], stall_timeout=120, chunk_bytes=chunk)
        shard = puller.buffers[0][HEADER_BYTES:].view(np.float32)
        puller.pull(0, status, [shard])
        assert int(status[0, Slot.VERSION]) == 1
        check(shard, want, chunk, "message pull")
        del puller, shard
    seconds["message pull"] = time.perf_counter() - t0
    window.free()

    rows = comm.gather({"after_push_gib": after_push, "peak_gib": peak_gib()}, root=0)
    if server:
        print(json.dumps({"chunk_bytes": chunk, "seconds": seconds, "server": rows[0], "worker": rows[1]}),
              flush=True)


if __name__ == "__main__":
    main()
