"""Parameter-server role: hold one shard, receive pushes, apply the optimizer, publish versions.

Pushes are raw float32 or, with ``--compress``, one validated codec record per chunk of the
slice (``mpips.compression``): bsp adds them into its accumulator in worker order (sparse
chunks with ``index_add_``), asp/ssp decode them into a dense gradient first.

Lifecycle (collective steps are over the parameter-server communicator, servers + workers):
``start()`` creates the window (collective) -> ``serve()`` applies gradients until every worker
has sent its stop message -> ``finish()`` sends the final shard to the lead worker (in chunks)
and frees the window (collective).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mpi4py import MPI

from mpips import faults
from mpips.chunking import bucket_ranges
from mpips.compression import (
    PayloadError,
    PushGradient,
    chunk_ranges,
    chunk_seed,
    make_codec,
    parse_payload,
)
from mpips.delay import lookahead_lead
from mpips.optim import STATE_FACTOR, build_optimizer, lr_factor
from mpips.shard import split_pieces
from mpips.sync import sync_mode
from mpips.trace import NULL_TRACER, NullTracer, Tracer
from mpips.transport import (
    Backoff,
    Codec,
    MalformedMessage,
    NoticeSender,
    ParameterWindow,
    PullServer,
    PushHeader,
    PushLayout,
    PushReceiver,
    Slot,
    StallError,
    Tag,
    send_chunks,
    wait_all,
)

if TYPE_CHECKING:
    from mpips.layout import PSContext
    from mpips.rowserver import RowServer

__all__ = ["ParameterServer", "ServerStats"]

log = logging.getLogger("mpips.server")


@dataclass
class ServerStats:
    applied: int = 0
    dropped: int = 0  # non-finite gradients
    late: int = 0  # bsp --backup-workers: pushes of a step already applied, dropped
    max_staleness: int = 0
    staleness: list[int] = field(default_factory=list)  # of every applied gradient (asp/ssp)
    bytes_received: int = 0
    max_queue: int = 0


class ParameterServer:
    """Owns shard ``index`` of the flat parameter vector.

    Args:
        ctx: what servers and workers share (communicator, ranks, plan, settings, checkpoints).
        index: this server's shard index.
        init: the initial values of this shard (float32 [shard elements]); the window takes it
            over as its working copy.
        servers: the server communicator (for the global gradient norm and checkpoint marks in bsp).
        batch_size: per-worker batch (samples above this in a header are rejected).

    ``tracer`` (an attribute, set after construction; ``mpips.trace``) records receiving,
    applying, publishing and waiting.
    """

    tracer: Tracer | NullTracer = NULL_TRACER

    def __init__(self, ctx: PSContext, index: int, init: np.ndarray, servers: MPI.Comm, batch_size: int):
        self.ctx, self.index, self.init, self.servers, self.batch_size = ctx, index, init, servers, batch_size
        self.comm, self.workers, self.plan, self.cfg = ctx.comm, ctx.workers, ctx.plan, ctx.optim
        self.total_steps, self.pull_mode = ctx.total_steps, ctx.pull
        self.mode = sync_mode(ctx.train.sync, ctx.train.staleness, ctx.train.backup_workers)  # mpips.sync: server half
        self.stall_timeout, self.chunk_bytes = ctx.train.stall_timeout, ctx.train.chunk_bytes
        self.checkpoints = ctx.checkpoints
        self.compression, self.seed = ctx.compression, ctx.train.seed  # the push codec (None: float32)
        self.stats = ServerStats()
        self.clocks = [0] * len(self.workers)  # steps each worker has completed, as received here
        self.active = set(range(len(self.workers)))  # the workers that have not sent their stop message
        # a registered optimizer (mpips.registration; None: the config's, by name): its class and
        # groups, and the hyperparameters each push carries after its mask
        self.table = ctx.table
        self.hyper = self.table.hyper() if self.table is not None else None
        self.hyper_bytes = self.table.hyper_bytes if self.table is not None else 0
        self.hyper_values: np.ndarray | None = None  # of the last push decoded
        # pushes received while waiting in a checkpoint that are not dropped there (Bsp.while_saving)
        self.deferred: list[tuple[int, PushHeader, np.ndarray]] = []
        self.sparse: list[RowServer] = []  # the model's sparse tables (job.embedding), at the same step

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        n = self.init.size
        self.window = ParameterWindow(self.comm, n, init=self.init, chunk_bytes=self.chunk_bytes,
                                      pull_codec=self.compression.pull_codec if self.compression else "fp32",
                                      lead=lookahead_lead(self.cfg.lookahead, self.mode.name, len(self.workers)))
        self.init = None  # the window holds the values now
        # bsp over windows: every worker waits for every version, so each is announced by a
        # notice, and applied and published bucket by bucket, which workers pull as they come
        # (mpips.client.pullahead); asp/ssp and message pulls publish a version whole
        if not self.window.rma:
            self.pull_mode = "message"
        notices = (self.mode.announces or self.mode.acks) and self.pull_mode == "rma"
        self.notices = NoticeSender(self.comm, self.workers) if notices else None
        self._build_optimizer(n)
        c = self.compression
        self.codec = (make_codec(c.compress, c.compress_ratio, c.qsgd_levels, c.feedback(), c.sparsity_warmup)
                      if c else None)
        self.ranges = chunk_ranges(n, self.chunk_bytes)  # the codec's chunks of this shard
        self.dense = torch.zeros(n) if self.codec is not None and not self.mode.sums else None  # asp: decoded
        layout = PushLayout.of(self.codec, self.ranges, len(self.runs) + self.hyper_bytes)
        self.receiver = PushReceiver(self.comm, self.workers, layout, chunk_bytes=self.chunk_bytes)
        self.pull_server = (PullServer(self.comm, self.window, chunk_bytes=self.chunk_bytes)
                            if self.pull_mode == "message" else None)
        self.publish()
        mib = 4 * n / 2**20
        log.info(
            "server %d: %s elements (%.2f MiB) + %s state ~%.2f MiB; %s pulls",
            self.index, f"{n:,}", mib, self.cfg.optimizer, mib * STATE_FACTOR[self.cfg.optimizer],
            self.pull_mode,
        )

    def _build_optimizer(self, n: int) -> None:
        """The optimizer over this shard of ``n`` elements, and the buckets it is applied in.

        One optimizer parameter per tensor run of the shard (``runs``, the push mask's unit), cut
        where a bucket ends (``splits``; ``split_run``: the run of each), each a view of the
        shard memory: a tensor that got no gradient in a step keeps grad None and torch.optim
        skips it (no weight decay, no momentum, no Adam step), exactly as in a single process.
        With updates in place the views move to the exposed buffer each update holds
        (``_point_pieces``). Buckets (``buckets``, element ranges; ``bucket_splits``: the
        pieces of each) are ``chunking.bucket_ranges`` in bsp over windows with pull-ahead,
        else the whole shard.
        """
        ahead = self.notices is not None and self.ctx.train.pull_ahead and self.mode.ahead and not self.window.lead
        self.buckets = bucket_ranges(n, self.chunk_bytes) if ahead else [(0, n)]
        self.runs = self.plan.server_pieces(self.index)
        starts = [lo for lo, _ in self.buckets]
        self.splits, self.split_run = split_pieces(self.runs, starts)
        bucket_of = [bisect.bisect_right(starts, p.server_offset) - 1 for p in self.splits]  # ascending
        self.bucket_splits = [(bisect.bisect_left(bucket_of, b), bisect.bisect_right(bucket_of, b))
                              for b in range(len(self.buckets))]
        self.window.begin_update()  # until the first publish, at the end of start()
        values = torch.from_numpy(self.window.params)
        self.pieces = [values[r.server_offset : r.server_offset + r.length].detach().requires_grad_(True)
                       for r in self.splits]
        if self.table is not None:
            tensor = {name: i for i, name in enumerate(self.table.names)}
            self.optimizer = self.table.build(self.pieces, [tensor[p.tensor] for p in self.splits])
        else:
            workers = len(self.workers)
            implicit = 1.0 - 1.0 / workers if self.cfg.implicit_momentum and self.mode.name != "bsp" else 0.0
            self.optimizer = build_optimizer(self.pieces, self.cfg, implicit)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this server (views, not copies: save before changing them).

        ``params``: float32 [shard elements]; ``optimizer``: torch.optim's state_dict over
        ``pieces`` (``mpips.shard.Piece``: the shard's tensor runs, cut where a bucket ends);
        ``applied``: gradients applied; ``clocks``: steps completed per worker; ``params_before``:
        ``params`` before the last update (``--lookahead``: what workers pull leads by their change), or None.
        """
        for rows in self.sparse:  # the tables at the same cut
            rows.catch_up(self.clocks)
        return {"params": self.window.params, "params_before": self.window.before,
                "optimizer": self.optimizer.state_dict(), "pieces": self.splits,
                "applied": self.stats.applied, "clocks": list(self.clocks),
                "sparse": [rows.state_dict() for rows in self.sparse]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (as ``state_dict`` returns it); call after ``start()``."""
        self.window.begin_update()
        self.window.params[:] = state["params"]
        if self.window.lead:  # a checkpoint without it (bsp, --lookahead 0) leads by nothing at first
            before = state.get("params_before")
            self.window.before[:] = state["params"] if before is None else before
        self.optimizer.load_state_dict(state["optimizer"])
        self.stats.applied = int(state["applied"])
        self.clocks = [int(c) for c in state["clocks"]]
        for rows, st in zip(self.sparse, state.get("sparse", []), strict=True):
            rows.load_state_dict(st)
        self.window.status[Slot.APPLIED] = self.stats.applied
        self.window.status[Slot.CLOCK] = min(self.clocks)
        self.publish()

    def serve(self) -> ServerStats:
        """Apply pushes until every worker has stopped."""
        self.begin_serving()
        backoff, last_progress = Backoff.for_messages(), time.monotonic()
        while self.serving:
            began = self.tracer.now()
            if self.poll():
                backoff.reset()
                last_progress = time.monotonic()
            else:
                if time.monotonic() - last_progress > self.stall_timeout:
                    raise StallError(self.stall_message())
                backoff.wait()
                self.tracer.idle("wait for pushes", began)
        return self.stats

    def begin_serving(self) -> None:
        """Before the first ``poll``: nothing received yet, every worker active."""
        self.active = set(range(len(self.workers)))
        self.mode.begin(self)
        self.final_saved = False

    @property
    def serving(self) -> bool:
        """Whether a worker has not sent its stop message yet."""
        return bool(self.active)

    @property
    def step_open(self) -> bool:
        """bsp: whether some workers' pushes of the step in progress are in and others are not."""
        return self.mode.step_open

    def stall_message(self) -> str:
        waiting = self.mode.waiting(self)
        partial = self.receiver.describe()
        return (f"server {self.index}: no push for {self.stall_timeout:.0f} s; waiting for"
                f" workers {waiting} (clock {int(self.window.status[Slot.CLOCK])})"
                + (f"; {partial}" if partial else ""))

    def poll(self) -> bool:
        """Receive, apply and publish what has come; True if anything moved."""
        tracer = self.tracer
        began = tracer.now()
        ready, self.deferred = self.deferred + self.receiver.poll(), []
        moved = bool(ready) or self.receiver.progressed  # chunks arriving: poll again soon
        for rows in self.sparse:  # a worker's rows of a step are sent ahead of its dense push
            moved |= rows.poll()
        if moved:
            tracer.record("receive", began)
        self.stats.max_queue = max(self.stats.max_queue, len(ready))
        self.window.status[Slot.QUEUE] = len(ready)
        # a worker's stop message can complete in the same poll as its last streamed push, ahead
        # of it in ``ready`` (its first message is received ahead): stops are taken after pushes
        stops = [(w, header) for w, header, _ in ready if header.codec == Codec.STOP]
        for w, header, payload in ready:
            if header.codec == Codec.STOP:
                continue
            if header.codec == Codec.JOIN:
                self.mode.join_received(self, w, header)
                self.receiver.repost(w)
                continue
            if header.codec == Codec.MASTER:  # after the worker's earlier pushes: they are applied
                self.send_values(w)
                continue
            faults.at("push", header.step)
            grad, mask = self._decode(header, payload)  # views of the receive buffer
            with tracer.span("apply", header.step):
                self.mode.accept(self, w, header, grad, mask)
        for w, header in stops:
            self.active.discard(w)
            if self.notices is not None:
                self.notices.close(w)
            self.mode.stopped(self, w, header)
        if self.checkpoints is not None:
            moved |= self.mode.checkpoint(self)
            if not self.final_saved and min(self.clocks) >= self.total_steps and not self.mode.cutting:
                self.final_saved = True  # every step of every worker is applied: the last checkpoint
                self.checkpoints.save_final(self.state_dict(), lambda: self.mode.while_saving(self))
        if self.pull_server is not None:
            served = tracer.now()
            if self.pull_server.poll():
                tracer.record("serve pulls", served)
                moved = True
        if not self.active:
            self.stats.bytes_received = self.receiver.bytes_received
        return moved

    def finish(self, lead: int) -> None:
        """Collective: send the final shard to ``lead`` (a rank in comm), free the window."""
        faults.at("shutdown")
        for rows in self.sparse:
            rows.catch_up(self.clocks)
            rows.close()
        if self.pull_server is not None:
            self.pull_server.close()
        if self.notices is not None:
            self.notices.finish(self.stall_timeout)
        wait_all(send_chunks(self.comm, self.window.params, lead, Tag.FINAL, self.chunk_bytes),
                 f"the lead worker (rank {lead}) to receive the final shard", self.stall_timeout)
        self.comm.gather(self.stats, root=lead)
        self.window.free()

    def _point_pieces(self, buffer: int | None) -> None:
        """In place: the optimizer's tensor runs become views of the exposed buffer being updated."""
        if buffer is None:
            return
        values = torch.from_numpy(self.window.params)
        for piece, r in zip(self.pieces, self.splits, strict=True):
            piece.data = values[r.server_offset : r.server_offset + r.length]

    def publish(self) -> None:
        """Publish the working shard and status as the next version; in bsp, announce it."""
        buffer = self.window.publish()
        if self.notices is not None and self.mode.announces:
            status = self.window.status
            self.notices.send(int(status[Slot.CLOCK]), buffer, int(status[Slot.VERSION]), int(status[Slot.CHECKPOINT]))

    def acknowledge(self, w: int) -> None:
        """asp/ssp over windows: tell worker ``w`` its pushes so far are applied (``SyncMode.acks``)."""
        if self.notices is not None and self.mode.acks:
            self.notices.ack(w, self.clocks[w])

    def send_values(self, w: int) -> None:
        """Worker ``w`` asked for this shard as the optimizer holds it (a MASTER push, ``--lookahead``)."""
        wait_all(send_chunks(self.comm, self.window.params, self.workers[w], Tag.MASTER, self.chunk_bytes),
                 f"worker {w} to receive the optimizer's values", self.stall_timeout)
        self.receiver.repost(w)

    def serve_pulls(self) -> None:
        if self.pull_server is not None:
            self.pull_server.poll()

    # -- checkpoints in asp/ssp: a consistent cut --------------------------------------------
    # -- gradients ---------------------------------------------------------------------------
    def _decode(self, header: PushHeader, payload: np.ndarray) -> tuple[torch.Tensor | PushGradient, np.ndarray]:
        """(gradient, mask): float32 [shard elements] (raw) or the validated compressed chunks
        (``PushGradient``), and uint8 [tensor runs], 1 = has a gradient.

        Raises:
            MalformedMessage: naming the worker, for a push that fails validation (nothing of it
                is applied).
        """
        n, runs = self.window.params.size, len(self.runs)
        if self.hyper_bytes:  # the registered optimizer's hyperparameters, after the mask
            if payload.size < self.hyper_bytes:
                raise MalformedMessage(f"server {self.index}: push from worker {header.worker} has {payload.size}"
                                       f" bytes, less than its {self.hyper_bytes} bytes of hyperparameters")
            cut = payload.size - self.hyper_bytes
            self.hyper_values = payload[cut:].copy().view(np.float64)
            payload, header = payload[:cut], dataclasses.replace(header, length=header.length - self.hyper_bytes)
        expected = Codec(self.codec.wire_id) if self.codec is not None else Codec.RAW32
        if header.codec != expected or (expected == Codec.RAW32 and header.length != 4 * n + runs):
            want = (f"raw float32 of {4 * n} bytes and a mask of {runs} bytes" if expected == Codec.RAW32
                    else f"codec {expected.name.lower()} (--compress)")
            raise MalformedMessage(
                f"server {self.index}: push from worker {header.worker} has codec {header.codec}"
                f" and {header.length} bytes; expected {want}"
            )
        if header.samples > self.batch_size:
            raise MalformedMessage(
                f"server {self.index}: worker {header.worker} claims {header.samples} samples,"
                f" more than the batch size {self.batch_size}"
            )
        if not 0 <= header.step < self.total_steps:
            raise MalformedMessage(
                f"server {self.index}: worker {header.worker} pushed step {header.step},"
                f" outside 0..{self.total_steps - 1}"
            )
        if self.codec is not None:
            seeds = [chunk_seed(self.seed, header.step, header.worker, self.index, c) for c in range(len(self.ranges))]
            try:
                grad, mask = parse_payload(self.codec, payload, self.ranges, seeds, runs,
                                           finite=bool(np.isfinite(header.grad_norm)))
            except PayloadError as exc:
                raise MalformedMessage(
                    f"server {self.index}: malformed {self.codec.name} push from worker {header.worker} for step"
                    f" {header.step}: {exc}"
                ) from None
            return grad, mask
        mask = payload[4 * n :]
        if mask.max(initial=0) > 1:
            raise MalformedMessage(f"server {self.index}: worker {header.worker} sent a mask that is not 0/1")
        return torch.from_numpy(payload[: 4 * n].view(np.float32)), mask

    def is_bad(self, header: PushHeader, grad: torch.Tensor | PushGradient) -> bool:
        """Non-finite gradients are dropped, counted and logged, never applied."""
        # numpy's isfinite: ~25x faster than torch's on one thread (measured, 4 M floats)
        if np.isfinite(header.grad_norm) and (
                grad.finite() if isinstance(grad, PushGradient) else bool(np.isfinite(grad.numpy()).all())):
            return False
        self.stats.dropped += 1
        self.window.status[Slot.DROPPED] = self.stats.dropped
        log.warning(
            "server %d: dropped a non-finite gradient from worker %d at step %d (%d dropped so far)",
            self.index, header.worker, header.step, self.stats.dropped,
        )
        if self.cfg.max_bad_grads and self.stats.dropped >= self.cfg.max_bad_grads:
            raise RuntimeError(
                f"server {self.index}: {self.stats.dropped} non-finite gradients dropped"
                f" (--max-bad-grads {self.cfg.max_bad_grads}); last from worker {header.worker}"
                f" at step {header.step}"
            )
        return True

    def apply(
        self, grad: torch.Tensor | None, used: np.ndarray, step: int, norm: float | None, clock: int,
        lr_scale: float = 1.0,
    ) -> None:
        """Apply ``grad`` to the tensor runs ``used`` marks (None: only advance the clock), publish.

        Bucket by bucket (``self.buckets``; one bucket but in bsp over windows): each is brought
        to the current values, stepped by the optimizer over its pieces only and exposed, and the
        workers are told (``NoticeSender.send_partial``), so they pull it while the next is
        applied. The pieces are elementwise torch.optim state, so stepping them bucket by bucket
        is the arithmetic of one step over all of them. The last bucket goes with the publish.
        """
        if self.pull_server is not None:
            self.pull_server.flush()  # replies in flight read the memory we are about to change
        if grad is not None:
            lazy = len(self.buckets) > 1
            self._point_pieces(self.window.begin_update(lazy=lazy))
            if self.cfg.clip_grad_norm and norm is not None:
                coef = self.cfg.clip_grad_norm / (norm + 1e-6)
                if coef < 1.0:
                    grad.mul_(coef)
            if self.hyper is not None:  # the worker's param_groups at this step
                self.hyper.apply(self.optimizer, self.hyper_values, lr_scale)
            else:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.lr * lr_scale * lr_factor(step, self.cfg, self.total_steps)
            has = used[self.split_run]
            version, buffer = self.window.next_version(), self.window.updating
            mark = int(self.window.status[Slot.CHECKPOINT])
            for b, ((lo, hi), (first, last)) in enumerate(zip(self.buckets, self.bucket_splits, strict=True)):
                self.window.prepare(lo, hi)
                stepped = False
                for piece, r, h in zip(self.pieces[first:last], self.splits[first:last], has[first:last], strict=True):
                    if h:
                        piece.grad = grad[r.server_offset : r.server_offset + r.length]
                        stepped = True
                if stepped:
                    with self.tracer.span("optimizer step"):
                        self.optimizer.step()
                    for piece in self.pieces[first:last]:
                        piece.grad = None
                if lazy:
                    self.window.expose(lo, hi)
                    if b < len(self.buckets) - 1:  # the last one is told with the publish
                        self.notices.send_partial(clock, buffer, version, b + 1, mark)
            self.stats.applied += 1
            self.window.status[Slot.APPLIED] = self.stats.applied
        self.window.status[Slot.CLOCK] = clock
        with self.tracer.span("publish"):
            self.publish()
