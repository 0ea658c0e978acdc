"""Moving a worker's parameters and gradients between the buffers MPI uses and the model's, chunk by chunk.

MPI reads gradients from, and pulls write parameters into, a flat float32 "wire" buffer (pinned
host memory on the staging path; device memory on the direct path). The model's parameters and
gradients are views of a flat buffer of the model's dtype on its device. Where the two differ (a
GPU worker, or a bf16/fp16 model), ``Staging`` copies between them in chunks of at most
``STAGE_CHUNK_BYTES`` of the wire, each inside one server's shard, on a copy engine:

- after a pull, every chunk is copied to the device at once, asynchronously; the host does not
  wait. A forward pre-hook on each module that owns parameters makes the compute stream wait
  for the chunks of its own parameters only, so the first layers compute while the last chunks
  still copy (the same idea as PyTorch FSDP's prefetch before each module's forward).
- during backward, a post-accumulate-grad hook per parameter counts the tensors of each chunk
  down; when a chunk's last tensor has its gradient, the chunk is copied to the wire at once,
  while backward goes on (autograd produces gradients in reverse, as DDP's reducer buckets
  them). What backward never reached (tensors without a gradient: zeros) is copied at its end.
- a push to server ``s`` waits for the chunks of shard ``s`` only (``grads_ready(s)``): the push
  to server 0 is on the wire while the chunks of server 1 still copy.

No whole-model synchronous copy is left on the critical path: the host waits for a chunk only
where MPI is about to read or overwrite it.

The copy engine is the seam. ``CudaCopyEngine`` issues the copies on a side CUDA stream and
orders them with events against the compute stream; ``ImmediateCopyEngine`` copies at once (a
CPU worker with a bf16/fp16 model: the casts between the float32 wire and the model). Tests
drive the same chunk and hook logic with an engine that defers copies until they are waited
for, on CPU tensors, which catches a use before its wait as a wrong result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mpips.shard import ShardPlan

__all__ = ["STAGE_CHUNK_BYTES", "CopyEngine", "CudaCopyEngine", "ImmediateCopyEngine", "Staging", "stage_chunks"]

STAGE_CHUNK_BYTES = 4 * 2**20  # of the float32 wire: 1 M elements per copy (~80 us at 50 GB/s)


class CopyEngine(Protocol):
    """Where staged copies run, and how the host and the compute stream wait for them."""

    def after_producer(self) -> None:
        """Copies issued from now on start only after the work queued so far on the compute stream."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Queue ``dst.copy_(src)`` (shapes equal; dtypes and devices may differ); returns its event."""

    def wait_host(self, event: Any) -> None:
        """Block the host until the copy of ``event`` is done (before MPI reads or overwrites it)."""

    def wait_compute(self, event: Any) -> None:
        """Make the compute stream wait for the copy of ``event``; the host goes on."""


class ImmediateCopyEngine:
    """Copies at once on the calling thread; nothing to wait for (CPU workers)."""

    def after_producer(self) -> None:
        pass

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait_host(self, event: Any) -> None:
        pass

    def wait_compute(self, event: Any) -> None:
        pass


class CudaCopyEngine:
    """Copies on a side CUDA stream of ``device``, ordered against the compute stream by events.

    Host memory on either side must be pinned (``torch.empty(..., pin_memory=True)``), or the
    "asynchronous" copy is synchronous. Not run on this project's CPU machines: see the README.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def after_producer(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait_host(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def wait_compute(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


def stage_chunks(plan: ShardPlan, chunk_elements: int) -> list[tuple[int, int, int]]:
    """(server, lo, hi) element ranges of the flat vector: each shard cut into pieces of at most
    ``chunk_elements``, in flat order; no chunk crosses a shard boundary."""
    out = []
    for s in range(plan.servers):
        lo, hi = plan.shard_range(s)
        out += [(s, a, min(a + chunk_elements, hi)) for a in range(lo, hi, chunk_elements)]
    return out


class Staging:
    """Chunked, overlapped copies between the wire buffers and the model's flat buffers.

    Args:
        engine: where copies run (``CudaCopyEngine``, ``ImmediateCopyEngine``, a test's engine).
        plan: the shard plan (tensor offsets and shard ranges, in elements).
        wire, wire_grad: float32 [plan.numel], what MPI reads and writes.
        params, grads: [plan.numel] of the model's dtype on its device; the parameters' views.
        chunk_elements: largest chunk, in elements.
        overlap_backward: copy a chunk of gradients as soon as backward has produced it. Off
            where gradients change after backward (fp16 loss scaling unscales them first).
    """

    def __init__(
        self, engine: CopyEngine, plan: ShardPlan, wire: torch.Tensor, wire_grad: torch.Tensor,
        params: torch.Tensor, grads: torch.Tensor, chunk_elements: int = STAGE_CHUNK_BYTES // 4,
        overlap_backward: bool = True,
    ):
        self.engine, self.plan, self.overlap_backward = engine, plan, overlap_backward
        self.wire, self.wire_grad, self.params, self.grads = wire, wire_grad, params, grads
        self.chunks = stage_chunks(plan, chunk_elements)
        spans = [(t.offset, t.offset + t.numel) for t in plan.tensors]
        # tensor i -> the chunks it overlaps; chunk c -> how many tensors overlap it
        self.tensor_chunks = [[c for c, (_, lo, hi) in enumerate(self.chunks) if a < hi and lo < b]
                              for a, b in spans]
        self.tensors_in = [0] * len(self.chunks)
        for cs in self.tensor_chunks:
            for c in cs:
                self.tensors_in[c] += 1
        self.server_chunks = [[c for c, (s2, _, _) in enumerate(self.chunks) if s2 == s] for s in range(plan.servers)]
        self.down: list[Any] = [None] * len(self.chunks)  # wire -> params, the last pull's
        self.unwaited: set[int] = set()  # chunks of ``down`` the compute stream has not waited for
        self.up: list[Any] = [None] * len(self.chunks)  # grads -> wire_grad, this backward's
        self.issued = [False] * len(self.chunks)
        self.left = list(self.tensors_in)
        self.copies_down = self.copies_up = 0  # chunk copies issued (per direction), for tests

    # -- pull side: wire -> params --------------------------------------------------------------
    def before_pull(self) -> None:
        """The host waits for the last pull's copies to have read the wire it is about to overwrite."""
        for c, event in enumerate(self.down):
            if event is not None:
                self.engine.wait_host(event)
                self.down[c] = None

    def after_pull(self) -> None:
        """Queue every chunk's copy to the model; the host does not wait."""
        self.engine.after_producer()  # the last step's compute is done with the parameters
        for c, (_, lo, hi) in enumerate(self.chunks):
            self.down[c] = self.engine.copy(self.params[lo:hi], self.wire[lo:hi])
            self.copies_down += 1
        self.unwaited = set(range(len(self.chunks)))

    def before_use(self, tensors: Sequence[int]) -> None:
        """The compute stream waits for the chunks of ``tensors`` (plan indices) not yet waited for."""
        if not self.unwaited:
            return
        for t in tensors:
            for c in self.tensor_chunks[t]:
                if c in self.unwaited:
                    self.engine.wait_compute(self.down[c])
                    self.unwaited.discard(c)

    def use_all(self) -> None:
        self.before_use(range(len(self.tensor_chunks)))

    def forward_hooks(self, model: nn.Module, trainable: Sequence[nn.Parameter]) -> list[Any]:
        """A forward pre-hook on every module that owns trainable parameters: ``before_use`` of them.

        A module that reads another module's parameter without calling that module (e.g.
        ``F.linear(x, self.embedding.weight)``) must own it too (tie it by assignment, as GPT-2
        does), or call ``use_all()`` first: the hook only sees the parameters a module owns.
        """
        index = {id(p): i for i, p in enumerate(trainable)}
        handles = []
        for module in model.modules():
            own = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
            if own:
                handles.append(module.register_forward_pre_hook(lambda _m, _a, own=own: self.before_use(own)))
        return handles

    # -- push side: grads -> wire_grad ----------------------------------------------------------
    def start_backward(self) -> None:
        """Before a backward: the last step's copies are done (the host waited for them in
        ``grads_ready``), so every chunk is counted down afresh."""
        for event in self.up:
            if event is not None:
                self.engine.wait_host(event)
        self.up = [None] * len(self.chunks)
        self.issued = [False] * len(self.chunks)
        self.left = list(self.tensors_in)

    def grad_done(self, tensor: int) -> None:
        """Post-accumulate-grad hook of plan tensor ``tensor``: copy the chunks it completes."""
        if not self.overlap_backward:
            return
        ready = []
        for c in self.tensor_chunks[tensor]:
            self.left[c] -= 1
            if self.left[c] == 0:
                ready.append(c)
        if ready:
            self.engine.after_producer()
            for c in ready:
                self._copy_up(c)

    def finish_backward(self) -> None:
        """After backward (and any unscaling): copy every chunk not copied yet."""
        self.engine.after_producer()
        for c in range(len(self.chunks)):
            if not self.issued[c]:
                self._copy_up(c)

    def _copy_up(self, c: int) -> None:
        _, lo, hi = self.chunks[c]
        self.up[c] = self.engine.copy(self.wire_grad[lo:hi], self.grads[lo:hi])
        self.issued[c] = True
        self.copies_up += 1

    def grads_ready(self, server: int) -> None:
        """The host waits for the chunks of shard ``server`` (before MPI reads them)."""
        for c in self.server_chunks[server]:
            if self.up[c] is not None:
                self.engine.wait_host(self.up[c])
