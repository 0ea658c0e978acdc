"""Transport: windows give whole versions, pushes arrive validated. Multi-rank under mpirun."""

import numpy as np
import pytest

from mpips.transport import HEADER_BYTES, Codec, MalformedMessage, PushHeader, Slot

pytestmark = pytest.mark.timeout(120)


def header(**kw):
    base = dict(step=3, worker=1, codec=Codec.RAW32, samples=8, clock_seen=2, length=16, grad_norm=1.5, loss=0.5)
    base.update(kw)
    return PushHeader(**base)


def test_header_round_trip_and_validation():
    buf = np.zeros(HEADER_BYTES + 16, dtype=np.uint8)
    header().pack_into(buf)
    assert PushHeader.decode(buf, HEADER_BYTES + 16, worker=1, max_payload=16) == header()
    with pytest.raises(MalformedMessage, match="claims worker 1"):
        PushHeader.decode(buf, HEADER_BYTES + 16, worker=0, max_payload=16)
    with pytest.raises(MalformedMessage, match="payload length 16"):
        PushHeader.decode(buf, HEADER_BYTES + 12, worker=1, max_payload=16)
    with pytest.raises(MalformedMessage, match="shorter than a header"):
        PushHeader.decode(buf, 10, worker=1, max_payload=16)
    buf[0] ^= 0xFF
    with pytest.raises(MalformedMessage, match="bad magic"):
        PushHeader.decode(buf, HEADER_BYTES + 16, worker=1, max_payload=16)


@pytest.mark.mpi(min_size=2, sizes=(2, 4))
def test_pulls_only_ever_see_whole_versions():
    """Rank 0 publishes its whole shard set to v, 300 times; the others pull in a tight loop."""
    from mpi4py import MPI

    from mpips.transport import ParameterWindow

    comm = MPI.COMM_WORLD
    n, versions = 200_000, 300
    window = ParameterWindow(comm, n if comm.rank == 0 else 0)
    seen, torn = set(), 0
    if comm.rank == 0:
        for v in range(1, versions + 1):
            window.params[:] = v
            window.publish()  # the published version number is v too
        comm.Barrier()
    else:
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        shard = np.zeros(n, dtype=np.float32)
        while True:
            window.pull([0], status, [shard])
            v = int(status[0, Slot.VERSION])
            torn += int(shard.min() != v or shard.max() != v)
            seen.add(v)
            if v == versions:
                break
        comm.Barrier()
    window.free()
    assert torn == 0
    if comm.rank:
        assert versions in seen


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_push_reaches_server_validated_and_bounded_inflight():
    from mpi4py import MPI

    from mpips.transport import Pusher, PushReceiver, wait_for

    comm = MPI.COMM_WORLD
    n = 1000
    if comm.rank == 1:
        pusher = Pusher(comm, [0], [4 * n], max_inflight=2)
        for step in range(5):
            g = np.full(n, step, dtype=np.float32)
            pusher.push(0, header(step=step, worker=0, length=4 * n), g)
            assert len(pusher.pending[0]) <= 2
        # a malformed push: claims to be another worker
        pusher.push(0, header(step=5, worker=7, length=4 * n), np.zeros(n, np.float32))
        pusher.drain()
    elif comm.rank == 0:
        rx = PushReceiver(comm, [1], max_payload=4 * n)
        got, error, ready = [], None, []

        def arrived() -> bool:
            ready.extend(rx.poll())
            return bool(ready)

        while len(got) < 5 or error is None:
            ready.clear()
            try:
                wait_for(arrived, "a push", 30)
            except MalformedMessage as exc:
                error = str(exc)
                continue
            for w, hdr, payload in ready:
                got.append((hdr.step, float(payload.view(np.float32).mean())))
                rx.repost(w)
        assert got == [(s, float(s)) for s in range(5)]
        assert "claims worker 7" in error
    comm.Barrier()
