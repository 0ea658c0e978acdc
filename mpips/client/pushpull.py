"""ParameterClient: what a worker links to train one registered model on the parameter servers.

It pulls parameters (window ``MPI_Get`` or message pulls; in bsp over windows a CPU worker may
pull ahead, ``mpips.client.pullahead``), pushes gradients (after backward, or streamed during
it, ``mpips.client.backwardpush``), joins the checkpoints the servers call and stops. No data,
metrics or evaluation: mpips' own loop (``mpips.worker.Worker``) and a user's loop
(``mpips.client.optimizer.DistributedOptimizer``) are both built on it.

Per step: ``await_step()`` pulls the parameters of step ``position`` (and joins a checkpoint
published at that boundary); the caller runs forward and backward into ``flat``'s gradient;
``push`` (or ``step_after_backward``) sends it.

Push during backward (``--push-during-backward``, bsp): a push longer than one chunk leaves
while backward runs: the gradient hooks ``FlatModel`` registers send each chunk as soon as every
tensor on it has its gradient, last first (``BackwardChunks``), the first after the push's
header; the tail (mask, norm, loss) follows backward. Only where a gradient is final when its
hook fires: float32 parameters on the CPU, no fp16 loss scaling; elsewhere the push goes after
backward in the same messages (see ``mpips.transport``).

Lifecycle: ``start()`` creates the window (collective over the model's communicator) -> steps
-> ``finish()`` sends the stop messages, receives the final parameters (lead worker) and frees
the window (collective).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpips import faults
from mpips.client.backwardpush import BackwardPush
from mpips.client.flat import FlatModel
from mpips.client.pullahead import PullAhead
from mpips.compression import chunk_ranges, chunk_seed, make_codec, make_encoder, parse_chunk
from mpips.delay import lookahead_lead
from mpips.optim import sum_of_squares
from mpips.precision import Precision
from mpips.sync import sync_mode
from mpips.trace import NULL_TRACER, NullTracer, Tracer
from mpips.transport import (
    HEADER_BYTES,
    PULL_CODECS,
    Codec,
    MessagePuller,
    NoticeReceiver,
    ParameterWindow,
    Pusher,
    PushHeader,
    PushLayout,
    Slot,
    Tag,
    recv_chunks,
    wait_all,
    wait_for,
)

if TYPE_CHECKING:
    from mpips.layout import PSContext

__all__ = ["ParameterClient", "WorkerStats"]

log = logging.getLogger("mpips.worker")


@dataclass
class WorkerStats:
    steps: int = 0
    samples: int = 0
    pull_seconds: float = 0.0
    compute_seconds: float = 0.0
    push_seconds: float = 0.0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    max_staleness: int = 0
    last_loss: float = float("nan")
    skipped: int = 0  # fp16: steps whose gradient overflowed and was not pushed (0 samples instead)
    chunks_streamed: int = 0  # gradient chunks of streamed pushes (push during backward)
    chunks_in_backward: int = 0  # of those, sent from a gradient hook, before backward returned
    preempted: bool = False  # stopped early after a preemption checkpoint


class ParameterClient:
    """Worker ``index``'s client of one model's parameter servers: pull, push, checkpoints, stop.

    Args:
        ctx: what servers and workers share (communicator, ranks, plan, settings, checkpoints).
        index: worker index (0..W-1).
        flat: the model in flat buffers.
        precision: the workers' precision (its fp16 loss scaler keeps pushes after backward).

    ``tracer`` (an attribute, set after construction; ``mpips.trace``) records the spans of a step.
    """

    tracer: Tracer | NullTracer = NULL_TRACER

    def __init__(self, ctx: PSContext, index: int, flat: FlatModel, precision: Precision | None = None):
        self.ctx, self.index, self.flat = ctx, index, flat
        self.precision = precision if precision is not None else Precision("fp32", flat.device, flat.dtype)
        train = ctx.train
        self.comm, self.servers, self.checkpoints = ctx.comm, ctx.servers, ctx.checkpoints
        self.mode = sync_mode(train.sync, train.staleness, train.backup_workers)  # mpips.sync: the client's half
        self.total_steps, self.pull_mode = ctx.total_steps, ctx.pull  # pull_mode: "message" if no RMA
        self.max_inflight, self.stall_timeout = train.max_inflight, train.stall_timeout
        self.lead = lookahead_lead(ctx.optim.lookahead, train.sync, len(ctx.workers))  # pulls lead by it (asp/ssp)
        self.chunk_bytes = train.chunk_bytes
        self.compression, self.seed = ctx.compression, train.seed  # the push codec (None: float32)
        self.codec, self.encoder = None, None  # set by start()
        self.stats = WorkerStats()
        self.position = 0  # the next step this worker computes (``load_state_dict`` sets it on resume)
        self.clock = 0  # the servers' clock of the parameters pulled for it (``await_step``)
        self.status = np.zeros((len(self.servers), HEADER_BYTES // 8), dtype=np.int64)
        # a registered optimizer's hyperparameters (mpips.registration.HyperCodec), sent after each mask
        self.hyper_bytes = ctx.table.hyper_bytes if ctx.table is not None else 0
        self.extras = np.zeros(self.hyper_bytes, dtype=np.uint8)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        plan = self.flat.plan
        sizes = [plan.shard_numel(s) for s in range(plan.servers)]
        runs = [len(plan.server_pieces(s)) for s in range(plan.servers)]
        c = self.compression
        self.pull_codec = c.pull_codec if c else "fp32"
        self.window = ParameterWindow(self.comm, 0, chunk_bytes=self.chunk_bytes, pull_codec=self.pull_codec)
        self.codec = (make_codec(c.compress, c.compress_ratio, c.qsgd_levels, c.feedback(), c.sparsity_warmup)
                      if c else None)
        self.encoder = (make_encoder(self.codec, plan.numel, c.feedback(), *c.worker_momentum(self.ctx.optim))
                        if self.codec else None)
        self.wire_codec = Codec(self.codec.wire_id) if self.codec is not None else Codec.RAW32  # push headers
        if self.flat.path == "direct" and (self.codec is not None or self.pull_codec != "fp32"):
            raise ValueError("the direct path moves float32 device buffers: no --compress or --pull-codec"
                             " (mpips.train stages through host memory when they are set)")
        self.ranges = [chunk_ranges(n, self.chunk_bytes) for n in sizes]  # the codec's chunks per slice
        layouts = [PushLayout.of(self.codec, rg, r + self.hyper_bytes) for rg, r in zip(self.ranges, runs, strict=True)]
        # bsp: a worker's next push comes after the notice that its last one is applied, so one
        # send buffer per server is never waited on; asp/ssp keep --max-inflight in flight
        inflight = self.mode.inflight(self.max_inflight)
        self.pusher = Pusher(self.comm, self.servers, layouts, inflight, chunk_bytes=self.chunk_bytes,
                             device=self.flat.device if self.flat.path == "direct" else None)
        # push during backward, in bsp: the servers whose pushes take more than one chunk, where
        # each tensor's gradient is final when its hook fires (not under fp16 loss scaling: the
        # scaler unscales, and finds overflows, only after backward; not staged: copies come
        # later). Not in asp/ssp: a server takes in one push at a time, and a streamed push holds
        # it for the whole of its worker's backward while the others' pushes wait (measured: a
        # GPT at 2 workers, asp, 39 samples/s streamed against 58 pushed after backward)
        streamed = [s for s, st in enumerate(self.pusher.streamed) if st]
        final = self.flat.final_in_backward and self.precision.scaler is None
        on = self.ctx.train.push_during_backward and self.mode.streams
        self.streamed = streamed if on and final else []
        if not self.window.rma:
            self.pull_mode = "message"
        self.puller = (
            MessagePuller(self.comm, self.servers, sizes, self.stall_timeout, chunk_bytes=self.chunk_bytes,
                          pull_codec=self.pull_codec)
            if self.pull_mode == "message" else None
        )
        self.shards = [self.flat.shard(s) for s in range(plan.servers)]
        self.backward_push = (BackwardPush(self.flat, self.pusher, self.streamed, self.ranges, self.chunk_bytes,
                                           self.codec, self.encoder, self.seed, self.index)
                              if self.streamed else None)
        # bsp over windows: the servers announce each version (transport.NoticeSender), bucket
        # by bucket, and a CPU worker pulls the buckets as they come (mpips.client.pullahead)
        # asp/ssp over windows: a server acknowledges each push once applied, by the same notices
        self.notices = (NoticeReceiver(self.comm, self.servers)
                        if (self.mode.announces or self.mode.acks) and self.pull_mode == "rma" else None)
        self.pushed = 0  # the step after this process's last push (acks: what the next pull waits for)
        self.pull_ahead = None
        if self.notices is not None and self.mode.announces and self.ctx.train.pull_ahead and self.mode.ahead \
                and self.flat.staging is None and self.flat.path == "host":
            self.pull_ahead = PullAhead(self.window, self.notices, self.servers, plan, self.chunk_bytes, self.shards,
                                        self.status, lambda need: self._lagging(need, self.notices.clock),
                                        self.stall_timeout)
            trainable = [p for p in self.flat.model.parameters() if p.requires_grad]
            self._ahead_hooks = self.pull_ahead.hooks(self.flat.model, trainable)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this worker.

        ``position``: the next step (int); ``rng``: torch's CPU RNG state (uint8 tensor);
        ``module``: buffers and frozen parameters by name (``FlatModel.module_state``);
        ``residual``: the error-feedback residual, float32 [numel] (a view), only with error feedback;
        ``momentum``: --momentum-correction's momentum, float32 [numel] (a view), only with it;
        ``scaler``: ``Precision.state_dict()``, fp16's loss scale and growth tracker ({} otherwise).
        """
        state = {"position": self.position, "rng": torch.get_rng_state(), "module": self.flat.module_state()}
        if self.encoder is not None:
            state.update(self.encoder.state_dict())
        state["scaler"] = self.precision.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        torch.set_rng_state(state["rng"])
        self.flat.load_module_state(state["module"])
        self.precision.load_state_dict(state.get("scaler"))
        if self.encoder is not None:
            self.encoder.load_state_dict(state)

    # -- steps -------------------------------------------------------------------------------
    def await_step(self, ahead: bool = True) -> int | None:
        """Before computing step ``position``: pull its parameters and join a checkpoint the servers
        published at this boundary; returns the servers' clock, or None after a stop (preemption).
        With bsp's backup workers, a worker whose last push came late skips ahead: ``position``
        becomes the clock pulled.

        ``ahead``: pull ahead where this worker can (``pull``); else the whole version.
        """
        while True:
            step = self.position
            faults.at("pull", step)
            clock = self.pull(self._need(step), ahead=ahead)
            self.position = step = self.mode.position(step, clock)
            joined = self._join_checkpoint(step)
            if self.stats.preempted:
                return None
            if not (joined and self.mode.marks_anytime):
                self.clock = clock
                return clock
            # asp/ssp: the servers applied the other workers' last pushes meanwhile: pull again

    def step_after_backward(self, samples: int = 1, loss: float = float("nan")) -> None:
        """Push the gradient of step ``position`` (backward is done), for a loop of the user's
        (``mpips.client``): ``samples`` weighs it in the bsp mean (1: every worker the same)."""
        if self.pull_ahead is not None and self.pull_ahead.pending:
            self.pull_ahead.finish()
        self.flat.before_push()
        self.push(self.position, samples, self.clock, self.flat.grad_norm(), loss)
        self.position += 1
        self.stats.steps += 1
        self.stats.bytes_pushed = self.pusher.bytes_sent

    def _join_checkpoint(self, step: int) -> bool:
        """Join a checkpoint (or stop) the servers published; True if one was joined.

        bsp: the servers publish mark ``k`` (``-k``: then stop) with clock ``k``, agreed among
        them; a worker about to compute step ``k`` joins. asp/ssp: server 0 publishes a mark at
        any time; a worker sees it in its next pull, sends JOIN after its last push (so every
        server has applied all its pushes first) and joins with its position. See
        ``mpips.checkpoint`` for what each protocol guarantees.
        """
        ckpt = self.checkpoints
        ckpt.ring(self.window, self.servers[0])
        marks = {int(m) for m in self.status[:, Slot.CHECKPOINT]} - {0}
        if not self.mode.joins(marks, step):
            return False
        if len(marks) != 1:
            raise RuntimeError(f"worker {self.index}: the servers published different checkpoint marks {marks}")
        mark = marks.pop()
        self.mode.join(self, mark)
        self.stats.preempted = ckpt.save(abs(mark), mark < 0, self.state_dict())
        return True

    def finish(self, lead: int) -> np.ndarray | None:
        """Collective: stop the servers; the lead worker (rank ``lead``) gets the final parameters."""
        faults.at("shutdown")
        for s in range(len(self.servers)):
            self.pusher.push(s, PushHeader(0, self.index, Codec.STOP, 0, 0, 0, 0.0, 0.0))
        self.pusher.drain()
        if self.notices is not None:
            self.notices.close(self.stall_timeout)
        final = server_stats = None
        me = self.comm.Get_rank()
        if me == lead:  # every server sends its shard here, in chunks
            final = np.empty(self.flat.plan.numel, dtype=np.float32)
            wait_all(self._receive_shards(final, Tag.FINAL), "the final shards of every server", self.stall_timeout)
        gathered = self.comm.gather(self.stats, root=lead)  # servers send theirs, workers these
        if me == lead:
            server_stats = [gathered[r] for r in self.servers]
            self.worker_stats = [g for g in gathered if isinstance(g, WorkerStats)]
        self.window.free()
        self.server_stats = server_stats
        return final

    def _shard_views(self, out: np.ndarray) -> list[np.ndarray]:
        """Server s's shard of the float32 model vector ``out`` [numel], as views, in server order."""
        plan = self.flat.plan
        return [out[slice(*plan.shard_range(s))] for s in range(len(self.servers))]

    def _receive_shards(self, out: np.ndarray, tag: int) -> list:
        """Receives of every server's shard, sent by ``send_chunks`` with ``tag``, into float32 ``out`` [numel]."""
        return [r for rank, shard in zip(self.servers, self._shard_views(out), strict=True)
                for r in recv_chunks(self.comm, shard, rank, tag, self.chunk_bytes)]

    @contextlib.contextmanager
    def server_values(self) -> Iterator[None]:
        """Inside, the model holds the servers' own parameter values, e.g. to evaluate them; after
        it, the values pulled for the next step again. With ``--lookahead`` (asp/ssp) a step's pull
        brings values led along the last update, so its gradient is computed where the parameters
        will be when it lands; every server then sends its shard as its optimizer holds it, after
        this worker's pushes so far: read from their windows once they acknowledged those pushes
        (``ParameterWindow.pull_master``), or, without windows, sent by the servers when asked (a
        MASTER push, after the pushes before it). Without a lead a pull brings the servers' values:
        nothing to do.
        """
        if not self.lead:
            yield
            return
        flat = self.flat
        pulled = flat.host.copy() if isinstance(flat.host, np.ndarray) else flat.host.detach().cpu().numpy()
        values = np.empty(flat.plan.numel, dtype=np.float32)
        if self.notices is not None and self.window.exposes_master:
            self._wait_for_acks()
            self.window.pull_master(self.servers, self._shard_views(values))
        else:
            requests = self._receive_shards(values, Tag.MASTER)
            for s in range(len(self.servers)):
                self.pusher.push(s, PushHeader(self.position, self.index, Codec.MASTER, 0, 0, 0, 0.0, 0.0))
            wait_all(requests, "the parameter values of every server (--lookahead)", self.stall_timeout)
        flat.load_wire(values)
        try:
            yield
        finally:
            flat.load_wire(pulled)

    # -- pull and push -----------------------------------------------------------------------
    def _need(self, step: int) -> int:
        """The slowest-worker clock the parameters for ``step`` must have reached."""
        return self.mode.need(step)

    def pull(self, need: int, ahead: bool = False) -> int:
        """Wait until every server's clock is at least ``need``, then pull; returns the clock.

        ``ahead`` (a step's pull, bsp with ``self.pull_ahead``): wait only until every server has
        exposed a first bucket of that version; forward pulls the rest as it goes
        (``mpips.client.pullahead``) and ``pull_ahead.finish()`` completes it. A checkpoint mark in
        the notices makes it a whole pull (the boundary's checkpoint reads the status blocks).
        """
        self.flat.before_pull()
        if ahead and self.pull_ahead is not None:
            with self.tracer.span("wait for parameters"):
                self.notices.wait_started(need, lambda: self._lagging(need, self.notices.clock), self.stall_timeout)
            self.pull_ahead.begin(need)
            if self.notices.mark.any():
                self.pull_ahead.finish()
            else:
                self.status[:, Slot.CHECKPOINT] = 0
            self.stats.bytes_pulled += PULL_CODECS[self.pull_codec].itemsize * self.flat.plan.numel
            return need
        if self.puller is not None:
            with self.tracer.span("pull"):
                self.puller.pull(need, self.status, self.shards)
        elif self.notices is not None and self.mode.announces:  # bsp: wait for the notices, pull the buffers named
            with self.tracer.span("wait for parameters"):
                self.notices.wait(need, lambda: self._lagging(need, self.notices.clock), self.stall_timeout)
            with self.tracer.span("pull"):
                self.window.pull(self.servers, self.status, self.shards, which=list(self.notices.buffer))
        else:
            targets, newest = self.servers, None
            if self.notices is not None:  # asp/ssp: read your own writes
                self._wait_for_acks()

            def ready() -> bool:
                nonlocal newest
                newest = self.window.read_status(targets, self.status)
                # asp/ssp: a checkpoint mark ends the wait too (a waiting worker must join it)
                marked = self.mode.marks_anytime and bool(self.status[:, Slot.CHECKPOINT].any())
                return int(self.status[:, Slot.CLOCK].min()) >= need or marked

            if need >= 0:
                with self.tracer.span("wait for parameters"):
                    wait_for(ready, lambda: self._lagging(need), self.stall_timeout)
            with self.tracer.span("pull"):
                self.window.pull(targets, self.status, self.shards, which=newest)
        self.stats.bytes_pulled += PULL_CODECS[self.pull_codec].itemsize * self.flat.plan.numel
        self.flat.after_pull()
        return int(self.status[:, Slot.CLOCK].min())

    def _wait_for_acks(self) -> None:
        """asp/ssp over windows: until every server acknowledged this worker's pushes so far (applied)."""
        mine = self.pushed
        with self.tracer.span("wait for parameters"):
            self.notices.wait(mine, lambda: self._lagging(mine, self.notices.clock), self.stall_timeout)

    def _lagging(self, need: int, clocks: np.ndarray | None = None) -> str:
        """Which servers a pull waits for, for the stall message (``clocks``: from notices)."""
        told = "window status block" if clocks is None else "their notices"
        clocks = self.status[:, Slot.CLOCK] if clocks is None else clocks
        late = [(s, int(c)) for s, c in enumerate(clocks) if c < need]
        return (f"the servers to reach clock {need} ({told}): "
                + ", ".join(f"server {s} (rank {self.servers[s]} of the parameter-server communicator)"
                            f" at clock {c}" for s, c in late))

    def _header(self, s: int, step: int, samples: int, clock: int) -> PushHeader:
        """A streamed push's header: what is known before backward (``Pusher.begin``)."""
        return PushHeader(step, self.index, self.wire_codec, samples, clock, 0, 0.0, 0.0,
                          applied_seen=int(self.status[s, Slot.APPLIED]))

    def push(self, step: int, samples: int, clock: int, grad_norm: float, loss: float,
             servers: list[int] | None = None) -> None:
        """Push the whole gradient (after backward) to ``servers`` (default: all).

        asp/ssp servers clip each push by the norm in its header (``--clip-grad-norm``): with a
        codec, that of the gradient as they decode it, so every slice is encoded first.
        """
        targets = range(len(self.servers)) if servers is None else servers
        encoded: dict[int, list[np.ndarray]] = {}
        if self.codec is not None and not self.mode.sums and self.ctx.optim.clip_grad_norm and math.isfinite(grad_norm):
            encoded = {s: self._parts(s, step, True) for s in targets}
            grad_norm = self._decoded_norm(step, encoded)
        for s in targets:
            parts, mask = encoded.get(s) or self._parts(s, step, np.isfinite(grad_norm)), self.flat.mask(s)
            if self.hyper_bytes:
                mask = np.concatenate([mask, self.extras])
            header = PushHeader(
                step, self.index, self.wire_codec, samples, clock, sum(p.nbytes for p in parts) + mask.nbytes,
                grad_norm, loss, applied_seen=int(self.status[s, Slot.APPLIED]),
            )
            self.pusher.push(s, header, *parts, mask)
        self.pushed = step + 1

    def _parts(self, s: int, step: int, finite: bool) -> list[np.ndarray]:
        """Server ``s``'s slice of the gradient as it is sent: raw, or one codec record per chunk."""
        self.flat.grads_ready(s)  # staged: this shard's chunks are copied; direct: computed
        payload = self.flat.shard(s, grad=True)
        return [payload] if self.codec is None else self._encode(s, step, payload, finite)

    def _decoded_norm(self, step: int, encoded: dict[int, list[np.ndarray]]) -> float:
        """The L2 norm of the whole gradient as the servers decode it from ``encoded`` (every
        server's records), which asp/ssp servers clip by (``--clip-grad-norm``)."""
        total = 0.0
        for s, records in encoded.items():
            for c, ((a, b), record) in enumerate(zip(self.ranges[s], records, strict=True)):
                seed = chunk_seed(self.seed, step, self.index, s, c)
                total += sum_of_squares(parse_chunk(self.codec, record, b - a, seed)[0].values.numpy())
        return math.sqrt(total)

    def _encode(self, s: int, step: int, grad: np.ndarray, finite: bool) -> list[np.ndarray]:
        """One codec record per chunk of server ``s``'s gradient slice (``mpips.compression``).

        A non-finite gradient (which the server drops) is encoded without error feedback, so
        its NaN or Inf does not stay in the residual.
        """
        g, lo = torch.from_numpy(grad), self.flat.plan.shard_range(s)[0]
        self.encoder.begin_step(step)  # --sparsity-warmup: this step's fraction
        seeds = [chunk_seed(self.seed, step, self.index, s, c) for c in range(len(self.ranges[s]))]
        if not finite:
            return [self.codec.encode(g[a:b], seed) for (a, b), seed in zip(self.ranges[s], seeds, strict=True)]
        return [self.encoder.encode(g[a:b], seed, lo + a) for (a, b), seed in zip(self.ranges[s], seeds, strict=True)]
