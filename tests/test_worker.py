"""Push during backward: which gradient chunks are final when, the order they go in, and that the
server has them before the worker's backward returns. Plain pytest except the last (mpi)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from toymodels import _Awkward

from mpips.client.backwardpush import BackwardChunks, BackwardPush
from mpips.compression import chunk_ranges, chunk_seed, make_codec, make_encoder
from mpips.shard import ShardPlan
from mpips.transport import PushHeader
from mpips.worker import FlatModel

pytestmark = pytest.mark.timeout(120)


def test_chunks_are_ready_once_every_tensor_on_them_is_and_go_last_first():
    """Tensors a (6), b (4), c (10) over 2 servers of 10 elements, chunks of 3 elements: server 0
    = a + b[:4] -> chunks [0,3) [3,6) [6,9) [9,10); server 1 = c -> [0,3) [3,6) [6,9) [9,10)."""
    plan = ShardPlan.build([("a", (6,)), ("b", (4,)), ("c", (10,))], 2)
    chunks = BackwardChunks(plan, 3, [0, 1])
    assert chunks.grad_done(2) == [(1, 3), (1, 2), (1, 1), (1, 0)]  # c: all of server 1, last first
    assert chunks.grad_done(0) == []  # a is final, but server 0's last chunks wait for b
    assert chunks.grad_done(1) == [(0, 3), (0, 2), (0, 1), (0, 0)]
    assert chunks.rest() == []
    chunks.reset()  # next step; b never gets a gradient (an unused layer): sent after backward
    assert chunks.grad_done(0) == [] and chunks.grad_done(2) == [(1, 3), (1, 2), (1, 1), (1, 0)]
    assert chunks.rest() == [(0, 3), (0, 2), (0, 1), (0, 0)]
    only = BackwardChunks(plan, 3, [1])  # server 0 is pushed whole: not scheduled
    assert only.grad_done(0) == [] and only.grad_done(1) == [] and only.rest() == [(1, 3), (1, 2), (1, 1), (1, 0)]


class RecordingPusher:
    """Stands in for ``Pusher``: what a streamed push would send, and when."""

    def __init__(self, flat: FlatModel, first: torch.Tensor):
        self.flat, self.first, self.events = flat, first, []
        self.returned = False  # the test sets it when backward has returned

    def begin(self, s, header):
        self.events.append(("begin", s, header.step))

    def send_chunk(self, s, c, data):
        # the first trained layer's gradient is the last one backward computes: zero = long
        # before backward returns
        early = not bool(self.first.grad.any())
        self.events.append(("chunk", s, c, np.array(data, copy=True), not self.returned, early))

    def end(self, s, mask, grad_norm, loss):
        self.events.append(("end", s, mask.copy(), grad_norm, loss))


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("codec", [None, "topk"])
def test_chunks_leave_during_backward_last_first_with_the_bytes_of_a_push_after_it(servers, codec):
    """The real hooks on a real model (a frozen layer, an unused one, a tied weight): every chunk
    is sent once, last first per server, most of them before backward has reached the first
    layer, each with the bytes the after-backward push sends (a codec: the same records, error
    feedback included); then one tail per server with the mask and the norm."""
    torch.manual_seed(0)
    model = _Awkward(20, 5, batchnorm=False)
    plan = ShardPlan.for_module(model, servers)
    flat = FlatModel(model, plan, torch.device("cpu"))
    chunk_bytes = 64  # 16 elements per chunk
    ranges = [chunk_ranges(plan.shard_numel(s), chunk_bytes) for s in range(servers)]
    c = make_codec(codec, 0.25) if codec else None
    encoder = make_encoder(c, plan.numel, error_feedback=True) if c else None
    pusher = RecordingPusher(flat, model.mid.weight)
    stream = BackwardPush(flat, pusher, list(range(servers)), ranges, chunk_bytes, c, encoder, seed=3, worker=1)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    for step in range(2):  # twice: the residual of the first step goes into the second's records
        flat.zero_grad()
        stream.begin(step, {s: PushHeader(step, 1, 0, 8, step, 0, 0.0, 0.0) for s in range(servers)})
        pusher.returned = False
        nn.functional.cross_entropy(model(x), y).backward()
        pusher.returned = True
        stream.finish(1.25, 0.5)
    sent = [e for e in pusher.events if e[0] == "chunk"]
    assert len(sent) == 2 * sum(len(r) for r in ranges) == stream.sent
    # every chunk goes from a hook but those on the unused layer, which wait for backward's end
    unused_end = max(t.offset + t.numel for t in plan.tensors if t.name.startswith("unused."))
    hooked = sum(plan.shard_range(s)[0] + a >= unused_end for s in range(servers) for a, _ in ranges[s])
    assert sum(e[4] for e in sent) == stream.in_backward == 2 * hooked > 0
    assert sum(e[5] for e in sent) >= 2  # the head's chunks: before backward reached the middle layer
    # replay: what a push after backward would send, from the final gradient
    replay = make_encoder(c, plan.numel, error_feedback=True) if c else None
    for step in range(2):
        flat.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for s in range(servers):
            mine = [e for e in sent[step * len(sent) // 2 : (step + 1) * len(sent) // 2] if e[1] == s]
            assert [e[2] for e in mine] == list(reversed(range(len(ranges[s]))))  # last first
            lo = plan.shard_range(s)[0]
            for _, _, k, data, _, _ in mine[::-1]:
                a, b = ranges[s][k]
                g = flat.grads[lo + a : lo + b]
                want = g.numpy() if c is None else replay.encode(g, chunk_seed(3, step, 1, s, k), lo + a)
                assert np.array_equal(data.view(np.uint8), np.asarray(want).view(np.uint8)), (step, s, k)
    tails = [e for e in pusher.events if e[0] == "end"]
    assert [(e[1], e[3], e[4]) for e in tails] == [(s, 1.25, 0.5) for _ in range(2) for s in range(servers)]
    assert all(np.array_equal(e[2], flat.mask(e[1])) for e in tails)
    assert flat.mask(0).min() == 0 or servers == 2  # the unused layer: no gradient, sent after backward
    assert flat.on_grad is None  # unhooked after the push: evaluation and later backwards send nothing


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_the_server_has_a_chunk_before_the_workers_backward_returns():
    """Rank 1 trains one step of an MLP with its push streamed; at the very end of its backward
    (the hook on the input's gradient) it waits until rank 0, the server, says it has received
    chunks of the push. With a push sent after backward that never happens: the wait fails."""
    from mpi4py import MPI

    from mpips.transport import Codec, Pusher, PushLayout, PushReceiver, wait_all, wait_for

    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    plan = ShardPlan.for_module(model, 1)
    chunk = 4096
    runs = len(plan.server_pieces(0))
    layout = PushLayout.raw(plan.numel, runs, chunk)
    ranges = [chunk_ranges(plan.numel, chunk)]
    ack = np.zeros(1, dtype=np.int64)
    if comm.rank == 0:
        rx = PushReceiver(comm, [1], layout, chunk_bytes=chunk)
        got: list = []

        def arrived() -> bool:
            got.extend(rx.poll())
            return rx.receiving is not None and sum(rx.receiving.got) > 0 or bool(got)

        wait_for(arrived, "a chunk of the push", 60)
        ack[0] = len(got)  # 0: the push is not complete, only chunks of it are in
        comm.Send(ack, dest=1, tag=99)
        wait_for(lambda: bool(got.extend(rx.poll()) or got), "the whole push", 60)
        ((_, header, payload),) = got
        grad = payload[: 4 * plan.numel].view(np.float32)
        result = (header.step, header.grad_norm, grad.copy(), payload[4 * plan.numel :].tolist())
        rx.repost(0)
        rx.cancel()
    else:
        flat = FlatModel(model, plan, torch.device("cpu"))
        pusher = Pusher(comm, [0], [layout], max_inflight=1, chunk_bytes=chunk)
        stream = BackwardPush(flat, pusher, [0], ranges, chunk)
        x = torch.randn(16, 32, requires_grad=True)

        def end_of_backward(_):
            request = comm.Irecv(ack, source=0, tag=99)
            wait_all([request], "the server to receive a chunk during backward", 30)

        x.register_hook(end_of_backward)
        flat.zero_grad()
        stream.begin(0, {0: PushHeader(0, 0, Codec.RAW32, 16, 0, 0, 0.0, 0.0)})
        nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,))).backward()
        stream.finish(flat.grad_norm(), 0.0)
        pusher.drain()
        result = (0, flat.grad_norm(), flat.host_grad.copy(), [1] * runs)
    server, worker = comm.allgather(result)
    assert int(ack[0]) == 0 or comm.rank == 1  # chunks were in before the push was
    assert server[:2] == worker[:2] and np.array_equal(server[2], worker[2]) and server[3] == worker[3]
