"""The direct path (a CUDA-aware MPI) on CPU: torch tensors, not numpy arrays, handed to mpi4py.

On a GPU the same calls get CUDA tensors (mpi4py reads ``__cuda_array_interface__`` / DLPack);
here they get CPU tensors through DLPack, which runs every line of the direct path's transport
code except the stream synchronisation. What a real CUDA-aware MPI does with device pointers is
checked by ``python -m mpips.doctor`` on a GPU machine (``jobs/device-check.sh``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mpips.shard import ShardPlan
from mpips.transport import HEADER_BYTES, Codec, PushHeader, Slot
from mpips.worker import FlatModel


@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_window_and_message_pulls_land_in_tensors_and_pushes_leave_from_tensors_in_chunks():
    from mpi4py import MPI

    from mpips.transport import (
        MessagePuller,
        ParameterWindow,
        PullServer,
        Pusher,
        PushLayout,
        PushReceiver,
        wait_for,
    )

    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    plan = ShardPlan.for_module(model, 1)
    n, runs, chunk = plan.numel, len(plan.server_pieces(0)), 4096  # several chunks per transfer
    values = np.arange(n, dtype=np.float32) / n
    window = ParameterWindow(comm, n if comm.rank == 0 else 0, init=values.copy() if comm.rank == 0 else None,
                             chunk_bytes=chunk)
    ok = True
    if comm.rank == 0:
        receiver = PushReceiver(comm, [1], PushLayout.raw(n, runs, chunk), chunk_bytes=chunk)
        got = []
        wait_for(lambda: bool(got.extend(receiver.poll()) or got), "the push", 60)
        _, header, payload = got[0]
        grad = payload[: 4 * n].view(np.float32)
        ok = header.codec == Codec.RAW32 and header.samples == 5 and np.array_equal(grad, -values)
        ok &= bool(payload[4 * n :].tolist() == [1] * runs)
        receiver.repost(0)
        receiver.cancel()
        # a message pull (the fallback where windows cannot be created) answered into a tensor
        server = PullServer(comm, window, chunk_bytes=chunk)
        wait_for(lambda: (server.poll(), bool(server.sending))[1], "the pull request", 60)
        server.close()
    else:
        flat = FlatModel(model, plan, torch.device("cpu"), path="direct")
        assert isinstance(flat.host, torch.Tensor) and flat.params is flat.host  # MPI writes the model
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        window.pull([0], status, [flat.shard(0)])
        ok = bool(torch.equal(flat.params, torch.from_numpy(values))) and int(status[0, Slot.VERSION]) == 0
        ok &= bool(torch.equal(model[0].weight.reshape(-1), torch.from_numpy(values[: 64 * 96])))
        flat.grads.copy_(-flat.params)
        flat.used[:] = 1
        pusher = Pusher(comm, [0], [PushLayout.raw(n, runs, chunk)], max_inflight=1, chunk_bytes=chunk,
                        device=torch.device("cpu"))
        assert isinstance(pusher.buffers[0][0], torch.Tensor)
        flat.grads_ready(0)
        payload = flat.shard(0, grad=True)
        pusher.push(0, PushHeader(0, 0, Codec.RAW32, 5, 0, payload.numel() * 4 + runs, 1.0, 0.5),
                    payload, flat.mask(0))
        pusher.drain()
        flat.params.zero_()
        MessagePuller(comm, [0], [n], 60, chunk_bytes=chunk).pull(0, status, [flat.shard(0)])
        ok &= bool(torch.equal(flat.params, torch.from_numpy(values)))
    assert comm.allgather(ok) == [True, True]
    window.free()
