"""Transport: windows give whole versions, pushes arrive validated. Multi-rank under mpirun."""

import numpy as np
import pytest
import torch

from mpips.transport import DEFAULT_CHUNK_BYTES, HEADER_BYTES, TRAILER_BYTES, Codec, MalformedMessage, PushHeader, Slot

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
@pytest.mark.parametrize("lead", [0.0, 2.0])
def test_pulls_only_ever_see_whole_versions(lead):
    """Rank 0 publishes its whole shard set to v, 300 times; the others pull in a tight loop
    (with a lead: the pulled values are v + lead, and the master they read as well is v, whole)."""
    from mpi4py import MPI

    from mpips.transport import ParameterWindow

    comm = MPI.COMM_WORLD
    n, versions = 200_000, 300
    window = ParameterWindow(comm, n if comm.rank == 0 else 0, lead=lead if comm.rank == 0 else 0.0)
    seen, torn = set(), 0
    if comm.rank == 0:
        for v in range(1, versions + 1):
            window.begin_update()  # with float32 pulls the update is in place, in the stale buffer
            window.params[:] = v
            window.publish()  # the published version number is v too
        comm.Barrier()
    else:
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        shard = np.zeros(n, dtype=np.float32)
        master = np.zeros(n, dtype=np.float32)
        while True:
            window.pull([0], status, [shard])
            v = int(status[0, Slot.VERSION])
            led = v + lead if v else 0  # the update to v started from v - 1 (the first from 0, unpublished)
            torn += int(shard.min() != led or shard.max() != led)
            if lead:
                window.pull_master([0], [master])
                torn += int(master.min() != master.max() or master[0] < v)
            seen.add(v)
            if v == versions:
                break
        comm.Barrier()
    window.free()
    assert torn == 0
    if comm.rank:
        assert versions in seen


def test_published_values_are_read_only_outside_an_update():
    """With float32 pulls the server updates an exposed buffer in place: between updates its
    values are the published version, which readers may be reading, so writing them is an error."""
    from mpi4py import MPI

    from mpips.transport import ParameterWindow

    window = ParameterWindow(MPI.COMM_SELF, 8, init=np.ones(8, dtype=np.float32))
    with pytest.raises(ValueError, match="read-only"):
        window.params[:] = 2
    window.begin_update()
    window.params[:] = 2
    window.publish()
    assert window.params.tolist() == [2.0] * 8 and not window.params.flags.writeable
    window.free()


@pytest.mark.mpi(min_size=2, sizes=(2, 4))
def test_notices_name_each_version_and_the_buffer_that_holds_it():
    """bsp: rank 0 publishes 200 versions, each announced; the others wait for each clock from
    the notices alone and pull the buffer a notice names: always that version or a newer one,
    whole. After the last notice every notice is received and nothing is left in flight."""
    from mpi4py import MPI

    from mpips.transport import NoticeReceiver, NoticeSender, ParameterWindow

    comm = MPI.COMM_WORLD
    n, versions = 50_000, 200
    window = ParameterWindow(comm, n if comm.rank == 0 else 0)
    if comm.rank == 0:
        sender = NoticeSender(comm, list(range(1, comm.size)))
        for v in range(1, versions + 1):
            window.begin_update()
            window.params[:] = v
            window.status[Slot.CLOCK] = v
            sender.send(v, window.publish(), int(window.status[Slot.VERSION]))
            comm.Recv(np.zeros(1, dtype=np.int64), source=MPI.ANY_SOURCE, tag=99)  # a worker went on
        for w in range(comm.size - 1):
            sender.close(w)
        sender.finish(timeout=60)
        bad = 0
    else:
        notices, bad = NoticeReceiver(comm, [0]), 0
        status, shard = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64), np.zeros(n, dtype=np.float32)
        for v in range(1, versions + 1):
            notices.wait(v, lambda: "rank 0", timeout=60)
            window.pull([0], status, [shard], which=list(notices.buffer))
            got = int(status[0, Slot.VERSION])
            bad += int(got < v or shard.min() != got or shard.max() != got)
            if comm.rank == 1:
                comm.Send(np.zeros(1, dtype=np.int64), dest=0, tag=99)
        notices.close(timeout=60)
        assert notices.ended == [True] and int(notices.clock[0]) == versions
    comm.Barrier()
    window.free()
    assert bad == 0


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_forward_computes_a_layer_as_soon_as_its_bucket_is_published():
    """P3-style pull-ahead: the server publishes a version bucket by bucket, and holds bucket 1
    back until the worker has begun the step, and the rest until its first layer has run. The
    first layer (buckets 0 and 1) must run with the new values while buckets 2 and 3 are not
    published (a worker that waited for the whole version would stall here: StallError, not a
    hang); the next layers then get theirs."""
    from mpi4py import MPI
    from torch import nn

    from mpips.chunking import MIN_BUCKET_BYTES, bucket_ranges
    from mpips.client.pullahead import PullAhead
    from mpips.shard import ShardPlan
    from mpips.transport import NoticeReceiver, NoticeSender, ParameterWindow, StallError, wait_all
    from mpips.worker import FlatModel

    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    # layer 0: 64 x 64 + 64 = 4160 elements, layer 1 after it: buckets of 4096 elements
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    plan = ShardPlan.for_module(model, 1)
    buckets = bucket_ranges(plan.numel, MIN_BUCKET_BYTES)
    assert len(buckets) == 4
    window = ParameterWindow(comm, plan.numel if comm.rank == 0 else 0)
    if comm.rank == 0:
        notices = NoticeSender(comm, [1])
        window.begin_update(lazy=True)
        version, buffer = window.next_version(), window.updating
        for b, (lo, hi) in enumerate(buckets):
            window.prepare(lo, hi)
            window.params[lo:hi] = 1.0 + b
            window.expose(lo, hi)
            if b < len(buckets) - 1:
                notices.send_partial(1, buffer, version, b + 1)
            if b < 2:  # after bucket 0: until the worker began; after bucket 1: until layer 0 ran
                req = comm.Irecv(np.zeros(1, dtype=np.int64), source=1, tag=98)
                wait_all([req], "the worker", timeout=60)
        window.status[Slot.CLOCK] = 1
        notices.send(1, window.publish(), version)
        notices.close(0)
        notices.finish(timeout=60)
    else:
        flat = FlatModel(model, plan, torch.device("cpu"))
        notices = NoticeReceiver(comm, [0])
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        ahead = PullAhead(window, notices, [0], plan, MIN_BUCKET_BYTES, [flat.shard(0)], status,
                          lambda need: f"clock {need}", timeout=20)
        ahead.hooks(model, list(model.parameters()))
        notices.wait_started(1, lambda: "rank 0", timeout=60)
        ahead.begin(1)
        assert ahead.have == [1]
        comm.Send(np.zeros(1, dtype=np.int64), dest=0, tag=98)  # the server publishes bucket 1 now
        x = torch.ones(2, 64)
        try:
            h = model[0](x)
        except StallError:
            pytest.fail("layer 0 waited for buckets it does not need")
        assert ahead.have == [2]  # layer 0 ends in bucket 1; nothing later is published yet
        assert torch.all(model[0].weight == 1.0) and torch.all(model[0].bias == 2.0)
        assert model[2].weight.abs().max() < 1.0  # buckets 2 and 3: not pulled yet, the initial values
        comm.Send(np.zeros(1, dtype=np.int64), dest=0, tag=98)
        model[2](model[1](h))
        ahead.finish()
        for lo, hi in buckets:
            values = flat.shard(0)[lo:hi]
            assert values.min() == values.max() == 1.0 + buckets.index((lo, hi))
        assert int(status[0, Slot.VERSION]) == int(notices.version[0]) and int(status[0, Slot.CLOCK]) == 1
        notices.close(timeout=60)
    comm.Barrier()
    window.free()


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_push_reaches_server_validated_and_bounded_inflight():
    from mpi4py import MPI

    from mpips.transport import Pusher, PushLayout, PushReceiver, wait_for

    comm = MPI.COMM_WORLD
    n = 1000
    layout = PushLayout.raw(n, 0, DEFAULT_CHUNK_BYTES)  # one message
    if comm.rank == 1:
        pusher = Pusher(comm, [0], [layout], max_inflight=2)
        for step in range(5):
            g = np.full(n, step, dtype=np.float32)
            pusher.push(0, header(step=step, worker=0, length=4 * n), g)
            assert len(pusher.pending[0]) <= 2
        # a malformed push: claims to be another worker
        pusher.push(0, header(step=5, worker=7, length=4 * n), np.zeros(n, np.float32))
        pusher.drain()
    elif comm.rank == 0:
        rx = PushReceiver(comm, [1], layout)
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


# -- chunks: no MPI call moves more than chunk_bytes -------------------------------------------------
CHUNK = 100  # bytes: 25 float32 per chunk of a raw slice


def _receive_one(rx, what="a push"):
    from mpips.transport import wait_for

    ready = []
    wait_for(lambda: bool(ready.extend(rx.poll()) or ready), what, 30, moved=lambda: rx.progressed)
    ((w, hdr, payload),) = ready
    payload = payload.copy()
    rx.repost(w)
    return w, hdr, payload


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_streamed_pushes_arrive_whole_with_the_trailer_and_the_header_is_checked_first():
    """Raw pushes longer than a chunk: header, chunks last first, tail (mask + norm + loss),
    sent whole (``push``) or chunk by chunk (``begin``/``send_chunk``/``end``, as during
    backward); the server gets the payload laid out as one message's (values, then mask) and the
    header with the trailer's norm and loss. A bad header is refused before anything more is
    received."""
    from mpi4py import MPI

    from mpips.transport import Pusher, PushLayout, PushReceiver, Tag, recv_chunks, wait_all, wait_for

    comm = MPI.COMM_WORLD
    n, runs = 1001, 3  # 40 chunks of 25 elements and one of 1
    layout = PushLayout.raw(n, runs, CHUNK)
    assert len(layout.slots) == 41 and not layout.one_message(CHUNK)
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    mask = np.array([1, 0, 1], np.uint8)
    if comm.rank == 1:
        pusher = Pusher(comm, [0], [layout], max_inflight=2, chunk_bytes=CHUNK)
        pusher.push(0, header(step=0, worker=0, length=4 * n + runs, grad_norm=2.5, loss=0.25), grads[0], mask)
        pusher.begin(0, header(step=1, worker=0))
        with pytest.raises(ValueError, match="out of order"):
            pusher.send_chunk(0, 0, grads[1][:25])  # chunks go last first
        for c in reversed(range(41)):
            pusher.send_chunk(0, c, grads[1][25 * c : 25 * c + 25])
        pusher.end(0, mask, float("inf"), 0.75)
        pusher.push(0, header(step=2, worker=7, length=4 * n + runs), grads[2], mask)  # claims another worker
        pusher.drain()
    elif comm.rank == 0:
        rx = PushReceiver(comm, [1], layout, chunk_bytes=CHUNK)
        for step, norm, loss in ((0, 2.5, 0.25), (1, float("inf"), 0.75)):
            w, hdr, payload = _receive_one(rx)
            assert (w, hdr.step, hdr.length, hdr.grad_norm, hdr.loss) == (0, step, 4 * n + runs, norm, loss)
            assert np.array_equal(payload[: 4 * n].view(np.float32), grads[step]), f"push {step}"
            assert np.array_equal(payload[4 * n :], mask)
        assert rx.bytes_received == 2 * (HEADER_BYTES + 4 * n + runs + TRAILER_BYTES)
        with pytest.raises(MalformedMessage, match="malformed push from worker 0: claims worker 7"):
            wait_for(lambda: bool(rx.poll()), "the bad push", 30)
        assert rx.receiving is None  # refused on its header: nothing more was received for it
        scratch = np.empty(CHUNK, np.uint8)  # receive what the refused push sent: 41 chunks and its tail
        wait_all([comm.Irecv(scratch, 1, Tag.PUSH_DATA) for _ in range(41)]
                 + recv_chunks(comm, np.empty(runs + TRAILER_BYTES, np.uint8), 1, Tag.PUSH_TAIL, CHUNK), "the rest", 30)
        assert not comm.Iprobe(source=1, tag=MPI.ANY_TAG)
    comm.Barrier()


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_codec_records_shorter_than_their_slot_or_longer_than_a_chunk_arrive_together():
    """A codec's records vary up to their bound (``max_record_bytes``): each is received at the
    start of its slot, a slot larger than a chunk in several messages (the last ones short or
    empty), and the server hands out the records back to back, then the mask."""
    from mpi4py import MPI

    from mpips.transport import Pusher, PushLayout, PushReceiver

    comm = MPI.COMM_WORLD
    layout = PushLayout((40, 150, 40, 230), 2, exact=False)
    rng = np.random.default_rng(7)
    pushes = [[rng.integers(0, 256, k, dtype=np.uint8) for k in sizes]
              for sizes in ((40, 150, 40, 230), (12, 120, 0 + 4, 201), (40, 60, 40, 100))]
    mask = np.array([1, 1], np.uint8)
    if comm.rank == 1:
        pusher = Pusher(comm, [0], [layout], max_inflight=1, chunk_bytes=CHUNK)
        for step, records in enumerate(pushes):
            pusher.push(0, header(step=step, worker=0, codec=Codec.TOPK, length=sum(r.size for r in records) + 2),
                        *records, mask)
        pusher.drain()
    elif comm.rank == 0:
        rx = PushReceiver(comm, [1], layout, chunk_bytes=CHUNK)
        for step, records in enumerate(pushes):
            _, hdr, payload = _receive_one(rx)
            want = np.concatenate([*records, mask])
            assert hdr.length == want.size and np.array_equal(payload, want), f"push {step}"
        rx.cancel()  # the receive posted ahead for a next push
    comm.Barrier()


def _send_streamed(comm, n, runs, *, step=0, chunk_sizes=None, tail=True, trailer_step=None):
    """Rank 1 -> 0 by hand: a streamed push's header, its chunks last first (``chunk_sizes``:
    bytes of each message, in sending order), and its tail."""
    from mpips.transport import PushTrailer, Tag

    hdr = np.zeros(HEADER_BYTES, np.uint8)
    header(step=step, worker=0, length=4 * n + runs, streamed=True).pack_into(hdr)
    comm.Send(hdr, dest=0, tag=Tag.PUSH)
    sizes = chunk_sizes if chunk_sizes is not None else [CHUNK] * (4 * n // CHUNK)
    for size in sizes:
        comm.Send(np.zeros(size, np.uint8), dest=0, tag=Tag.PUSH_DATA)
    if tail:
        out = np.zeros(runs + TRAILER_BYTES, np.uint8)
        PushTrailer(0, step if trailer_step is None else trailer_step, 1.0, 0.5).pack_into(out[runs:])
        comm.Send(out, dest=0, tag=Tag.PUSH_TAIL)


@pytest.mark.mpi(min_size=2, sizes=(2,))
@pytest.mark.parametrize("fault", ["short chunk", "bad trailer", "missing tail", "one message"])
def test_a_broken_streamed_push_is_refused_naming_the_worker(fault):
    """Every chunk is checked for its size, the trailer for its push (worker and step), and a
    push whose tail never comes is named in the stall message: nothing of it is handed out."""
    from mpi4py import MPI

    from mpips.transport import PushLayout, PushReceiver, StallError, Tag, wait_for

    comm = MPI.COMM_WORLD
    n, runs = 250, 2  # 10 chunks of 100 bytes
    if comm.rank == 1:
        if fault == "short chunk":
            _send_streamed(comm, n, runs, chunk_sizes=[CHUNK, 64], tail=False)
        elif fault == "bad trailer":
            _send_streamed(comm, n, runs, step=4, trailer_step=3)
        elif fault == "missing tail":
            _send_streamed(comm, n, runs, tail=False)
        else:  # a whole push where the layout streams (a worker with another --chunk-bytes)
            message = np.zeros(CHUNK, np.uint8)
            header(step=0, worker=0, length=CHUNK - HEADER_BYTES).pack_into(message)
            comm.Send(message, dest=0, tag=Tag.PUSH)
    elif comm.rank == 0:
        rx = PushReceiver(comm, [1], PushLayout.raw(n, runs, CHUNK), chunk_bytes=CHUNK)
        expected = {
            "short chunk": (MalformedMessage, r"malformed push from worker 0: chunk 8 of its push for step 0 has 64"
                                              r" bytes, expected 100"),
            "bad trailer": (MalformedMessage, r"malformed push from worker 0 for step 4: trailer of worker 0, step 3"),
            "missing tail": (StallError, r"worker 0's push for step 0: 0 chunk messages and its tail still to come"),
            "one message": (MalformedMessage, r"malformed push from worker 0: one 36 payload bytes; pushes here are"
                                              r" streamed"),
        }[fault]
        with pytest.raises(expected[0], match=expected[1]):
            wait_for(lambda: bool(rx.poll()), rx.describe, 2 if fault == "missing tail" else 30)
        rx.cancel()
    comm.Barrier()


@pytest.mark.mpi(min_size=2, sizes=(2,))
@pytest.mark.parametrize("codec", ["fp32", "bf16"])
def test_a_led_window_publishes_its_values_led_along_the_last_update(codec):
    """--lookahead: readers pull ``params + lead * (params - before)``, ``before`` the values the
    last update started from (a publish without an update keeps the lead); ``params`` stays the
    optimizer's own values, and readers read them too (``pull_master``, float32 whatever the pull
    codec); a led window refuses bucket-by-bucket updates."""
    from mpi4py import MPI

    from mpips.transport import ParameterWindow

    comm = MPI.COMM_WORLD
    n, lead = 1000, 2.0
    init = np.linspace(-1, 1, n, dtype=np.float32)
    step = np.full(n, 0.25, dtype=np.float32)
    window = ParameterWindow(comm, n if comm.rank == 0 else 0, init=init.copy() if comm.rank == 0 else None,
                             pull_codec=codec, lead=lead if comm.rank == 0 else 0.0)
    want = [init, init + step + lead * step, init + step + lead * step, init + 0.5 * step - lead * 0.5 * step]
    have = [init, init + step, init + step, init + 0.5 * step]  # the optimizer's own values
    status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
    shard, master = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    assert window.exposes_master  # every rank, though only the server has a lead
    for version, expected in enumerate(want):
        if comm.rank == 0:
            if version == 1:
                window.begin_update()
                window.params[:] += step
            elif version == 3:
                window.begin_update()
                window.params[:] -= step / 2
            window.publish()
            np.testing.assert_allclose(window.params, have[version], rtol=0, atol=1e-6)
        comm.Barrier()
        if comm.rank == 1:
            window.pull([0], status, [shard])
            tol = 1e-6 if codec == "fp32" else 1e-2
            np.testing.assert_allclose(shard, expected, rtol=tol, atol=tol)
            window.pull_master([0], [master])
            np.testing.assert_allclose(master, have[version], rtol=0, atol=1e-6)
        comm.Barrier()
    if comm.rank == 0:
        with pytest.raises(RuntimeError, match="whole versions"):
            window.begin_update(lazy=True)
    window.free()


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_chunked_window_and_message_pulls_read_the_whole_shard():
    from mpi4py import MPI

    from mpips.transport import MessagePuller, ParameterWindow, PullServer, wait_for

    comm = MPI.COMM_WORLD
    n = 10_007
    want = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    window = ParameterWindow(comm, n if comm.rank == 0 else 0, init=want if comm.rank == 0 else None,
                             chunk_bytes=CHUNK)
    if comm.rank == 0:
        window.publish()
    comm.Barrier()
    if comm.rank == 0:
        pulls = PullServer(comm, window, chunk_bytes=CHUNK)
        wait_for(pulls.poll, "a pull request", 30)
        pulls.close()
    else:
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        shard = np.zeros(n, dtype=np.float32)
        window.pull([0], status, [shard])
        assert int(status[0, Slot.VERSION]) == 1 and np.array_equal(shard, want)
        shard[:] = 0
        status[:] = 0
        MessagePuller(comm, [0], [n], 30, chunk_bytes=CHUNK).pull(0, status, [shard])
        assert int(status[0, Slot.VERSION]) == 1 and np.array_equal(shard, want)
    comm.Barrier()
    window.free()


@pytest.mark.mpi(min_size=2, sizes=(2,))
@pytest.mark.parametrize("codec", ["bf16", "fp16"])
def test_low_precision_pulls_read_the_rounded_shard_and_half_the_bytes(codec):
    """--pull-codec: the server keeps float32, exposes a bf16/fp16 copy (half the window bytes);
    window and message pulls read it in chunks and widen it: exactly the rounded float32 values."""
    import torch
    from mpi4py import MPI

    from mpips.transport import PULL_CODECS, MessagePuller, ParameterWindow, PullServer, wait_for

    comm = MPI.COMM_WORLD
    n = 10_007
    want = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    want[:2] = [1e6, -1e6]  # beyond fp16's range: saturates at +-65504 rather than becoming Inf
    window = ParameterWindow(comm, n if comm.rank == 0 else 0, init=want.copy() if comm.rank == 0 else None,
                             chunk_bytes=CHUNK, pull_codec=codec)
    if comm.rank == 0:
        window.publish()
        assert np.array_equal(window.params, want)  # the master copy stays float32
        assert window.published().nbytes == HEADER_BYTES + 2 * n
    comm.Barrier()
    if comm.rank == 0:
        pulls = PullServer(comm, window, chunk_bytes=CHUNK)
        wait_for(pulls.poll, "a pull request", 30)
        pulls.close()
    else:
        t = torch.from_numpy(want)
        rounded = (t.clamp(-65504, 65504) if codec == "fp16" else t).to(PULL_CODECS[codec]).float().numpy()
        assert not np.array_equal(rounded, want) and np.isfinite(rounded).all()
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        shard = np.zeros(n, dtype=np.float32)
        window.pull([0], status, [shard])
        assert np.array_equal(shard, rounded)
        shard[:] = 0
        MessagePuller(comm, [0], [n], 30, chunk_bytes=CHUNK, pull_codec=codec).pull(0, status, [shard])
        assert np.array_equal(shard, rounded)
    comm.Barrier()
    window.free()


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.timeout(400)
def test_a_shard_over_2_gib_is_pushed_and_pulled_intact():
    """2**29 + 16 float32 (2 GiB + 64 bytes) through Pusher/PushReceiver, a window pull and a
    message pull, at the default chunk size; without chunks each would be one MPI call of more than
    2**31-1 bytes (MPI_ERR_ARG). Memory: one receive buffer on the server, no extra copies."""
    import json

    from helpers import REPO, run_mpi

    if _available_gib() < 10:
        pytest.skip(f"needs about 10 GiB of free memory (8 GiB of buffers), {_available_gib():.1f} available")
    out = run_mpi(2, [str(REPO / "tests" / "big_shard_job.py")], timeout=360, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shard = 2.0  # GiB
    print(json.dumps(result))  # shown with -s or on failure: seconds per phase, peak RSS per rank
    assert result["server"]["after_push_gib"] < shard + 0.5  # the receive buffer, nothing more
    assert result["worker"]["after_push_gib"] < 2 * shard + 0.5  # the gradient and one send buffer
    assert result["server"]["peak_gib"] < 2 * shard + 0.5  # 2 published versions, updated in place: no copy
    assert result["worker"]["peak_gib"] < 2 * shard + 0.5
