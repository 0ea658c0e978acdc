"""Push during backward: a worker sends each chunk of its gradient as soon as backward has
produced it, like DDP's buckets (bsp, ``--push-during-backward``).

``BackwardChunks`` (pure) says when each chunk of a server's gradient slice is final and in
which order chunks go out (last first); ``BackwardPush`` sends them from ``FlatModel``'s
post-accumulate-grad hooks through ``transport.Pusher``'s streamed pushes (header with the
first chunk, the chunks, a tail with mask, norm and loss; see ``mpips.transport``). Units:
chunks are ``chunk_bytes // 4`` float32 elements of a server's slice (``compression.chunk_ranges``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpips.compression import chunk_seed
from mpips.shard import ShardPlan
from mpips.transport import Pusher, PushHeader

if TYPE_CHECKING:
    from mpips.client.flat import FlatModel

__all__ = ["BackwardChunks", "BackwardPush"]


class BackwardChunks:
    """Which chunks of each server's gradient slice backward has finished, in the order they go out.

    Pure. Chunk ``c`` of server ``s`` is elements ``c * chunk_elements ..`` of its slice (as
    ``chunk_ranges`` cuts it); it is final once every trainable tensor overlapping it has had its
    gradient accumulated (``grad_done``, from ``FlatModel``'s post-accumulate hooks). Chunks go
    out **last first**: backward produces gradients roughly last layer first (which is why DDP
    buckets in reverse order of registration too), and a final chunk waits for every chunk after
    it, so the server can post its receives in the order they are sent and MPI's in-order
    matching of one tag needs no sequence numbers. A tensor that gets no gradient never fires:
    ``rest()`` gives what is left after backward.

    Args:
        plan: the shard plan (tensor offsets and each server's range of the flat vector).
        chunk_elements: elements per chunk (``chunk_bytes // 4``).
        servers: the server indices whose chunks to schedule (the others are pushed whole).
    """

    def __init__(self, plan: ShardPlan, chunk_elements: int, servers: list[int]):
        self.touching: list[list[tuple[int, int]]] = [[] for _ in plan.tensors]  # tensor -> (s, c)
        self.needs = [[0] * -(-plan.shard_numel(s) // chunk_elements) if s in servers else []
                      for s in range(plan.servers)]
        for i, spec in enumerate(plan.tensors):
            t0, t1 = spec.offset, spec.offset + spec.numel
            for s in servers:
                lo, hi = plan.shard_range(s)
                a, b = max(t0, lo), min(t1, hi)
                for c in range((a - lo) // chunk_elements, (b - 1 - lo) // chunk_elements + 1) if a < b else ():
                    self.touching[i].append((s, c))
                    self.needs[s][c] += 1
        self.reset()

    def reset(self) -> None:
        """A new backward: no tensor has its gradient yet."""
        self.left = [list(n) for n in self.needs]
        self.next = [len(n) - 1 for n in self.needs]

    def grad_done(self, i: int) -> list[tuple[int, int]]:
        """Tensor ``i``'s gradient is final: the (server, chunk) pairs to send now, in order."""
        for s, c in self.touching[i]:
            self.left[s][c] -= 1
        return self._ready(force=False)

    def rest(self) -> list[tuple[int, int]]:
        """After backward: every chunk not sent yet, in order."""
        return self._ready(force=True)

    def _ready(self, force: bool) -> list[tuple[int, int]]:
        out = []
        for s, left in enumerate(self.left):
            while self.next[s] >= 0 and (force or left[self.next[s]] <= 0):
                out.append((s, self.next[s]))
                self.next[s] -= 1
        return out


class BackwardPush:
    """Push during backward: a worker's streamed pushes, fed by ``FlatModel``'s gradient hooks.

    ``begin`` hooks the model before forward; each chunk of a server's gradient slice then goes
    out as soon as backward has finished it (the first after the server's header, ``Pusher.begin``:
    what is known before backward), last first (``BackwardChunks``), as float32 or encoded by the
    codec (its error feedback too) right there; ``finish``, after backward, sends the chunks no
    hook sent (tensors without a gradient) and the tails (mask, norm, loss). The bytes are those
    an after-backward push sends: a chunk is final when it goes.

    Only where a gradient is final when its hook fires: float32 wire buffers on the CPU without
    staging, no fp16 loss scaling (the worker checks; elsewhere it pushes after backward).

    Args:
        flat: the model in flat buffers.
        pusher: sends the messages (``begin`` / ``send_chunk`` / ``end``).
        servers: the server indices whose pushes are streamed.
        ranges: each server's chunk ranges (``chunk_ranges`` of its slice).
        chunk_bytes: ``--chunk-bytes`` (elements per chunk: a quarter of it).
        codec, encoder: the push codec and its encoder (error feedback), or None (float32).
        seed, worker: what ``chunk_seed`` mixes in besides step, server and chunk.
    """

    def __init__(self, flat: FlatModel, pusher: Pusher, servers: list[int], ranges: list[list[tuple[int, int]]],
                 chunk_bytes: int, codec: Any = None, encoder: Any = None, seed: int = 0, worker: int = 0):
        self.flat, self.pusher, self.servers, self.ranges = flat, pusher, servers, ranges
        self.codec, self.encoder, self.seed, self.worker = codec, encoder, seed, worker
        self.chunks = BackwardChunks(flat.plan, max(1, chunk_bytes // 4), servers)
        self.grads = [flat.shard(s, grad=True) for s in range(flat.plan.servers)]
        self.step = -1
        self.headers: dict[int, PushHeader] = {}  # servers whose header is not sent yet
        self.sent = 0  # chunks sent, all steps
        self.in_backward = 0  # of those, from a hook (before backward returned)

    def begin(self, step: int, headers: dict[int, PushHeader]) -> None:
        """Before forward: hook the gradients. Each server's header (one per streamed server) goes
        with its first chunk, so that an asp/ssp server, which receives one streamed push at a
        time, is held by a push only while backward sends it, not through the forward before."""
        self.headers = dict(headers)
        self.chunks.reset()
        self.step = step
        if self.encoder is not None:
            self.encoder.begin_step(step)  # --sparsity-warmup: this step's fraction
        self.flat.on_grad = self._grad_done

    def _grad_done(self, i: int) -> None:
        for s, c in self.chunks.grad_done(i):
            self._send(s, c)
            self.in_backward += 1

    def finish(self, grad_norm: float, loss: float) -> None:
        """After backward: the chunks not sent yet, in order, then every tail."""
        self.flat.on_grad = None
        for s, c in self.chunks.rest():
            self._send(s, c)
        for s in self.servers:
            self.pusher.end(s, self.flat.mask(s), grad_norm, loss)
        self.headers = {}

    def _send(self, s: int, c: int) -> None:
        """Chunk ``c`` of server ``s``'s slice, as it is or encoded. A non-finite chunk is encoded
        without error feedback (its NaN or Inf must not stay in the residual; the push's norm is
        then non-finite and the server drops it): the whole-push rule, decided per chunk, since
        the norm is not known yet."""
        if s in self.headers:
            self.pusher.begin(s, self.headers.pop(s))
        lo, hi = self.ranges[s][c]
        grad = self.grads[s][lo:hi]
        self.sent += 1
        if self.codec is None:
            self.pusher.send_chunk(s, c, grad)
            return
        g, seed = torch.from_numpy(grad), chunk_seed(self.seed, self.step, self.worker, s, c)
        if bool(torch.isfinite(g).all()):
            record = self.encoder.encode(g, seed, self.flat.plan.shard_range(s)[0] + lo)
        else:
            record = self.codec.encode(g, seed)
        self.pusher.send_chunk(s, c, record)
