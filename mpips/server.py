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
from mpips.optim import STATE_FACTOR, build_optimizer, lr_factor, sum_of_squares
from mpips.shard import split_pieces
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

__all__ = ["ParameterServer", "ServerStats"]

log = logging.getLogger("mpips.server")


@dataclass
class ServerStats:
    applied: int = 0
    dropped: int = 0
    max_staleness: int = 0
    staleness: list[int] = field(default_factory=list)  # of every applied gradient (asp/ssp)
    bytes_received: int = 0
    max_queue: int = 0


@dataclass
class _BspStep:
    """The bsp step in progress: pushes held until their turn, the sum's progress."""

    workers: int
    runs: int  # tensor runs of the shard
    next: int = 0  # the worker whose push is added next
    held: dict[int, tuple[int, Any, np.ndarray]] = field(default_factory=dict)  # w -> samples, grad, mask
    samples: int = 0
    used: np.ndarray = field(init=False)  # bool [runs]: tensor runs with a gradient from any worker

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.next, self.samples, self.used = 0, 0, np.zeros(self.runs, dtype=bool)
        self.held.clear()

    def missing(self) -> list[int]:
        """Workers whose push for the step has not come."""
        return [w for w in range(self.next, self.workers) if w not in self.held]


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
        self.sync, self.total_steps, self.pull_mode = ctx.train.sync, ctx.total_steps, ctx.pull
        self.stall_timeout, self.chunk_bytes = ctx.train.stall_timeout, ctx.train.chunk_bytes
        self.checkpoints = ctx.checkpoints
        self.compression, self.seed = ctx.compression, ctx.train.seed  # the push codec (None: float32)
        self.stats = ServerStats()
        self.clocks = [0] * len(self.workers)  # steps each worker has completed, as received here

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        n = self.init.size
        self.window = ParameterWindow(self.comm, n, init=self.init, chunk_bytes=self.chunk_bytes,
                                      pull_codec=self.compression.pull_codec if self.compression else "fp32")
        self.init = None  # the window holds the values now
        # bsp over windows: every worker waits for every version, so each is announced by a
        # notice, and applied and published bucket by bucket, which workers pull as they come
        # (mpips.pullahead); asp/ssp and message pulls publish a version whole
        if not self.window.rma:
            self.pull_mode = "message"
        self.notices = NoticeSender(self.comm, self.workers) if self.sync == "bsp" and self.pull_mode == "rma" else None
        self._build_optimizer(n)
        c = self.compression
        self.codec = (make_codec(c.compress, c.compress_ratio, c.qsgd_levels, c.feedback(), c.sparsity_warmup)
                      if c else None)
        self.ranges = chunk_ranges(n, self.chunk_bytes)  # the codec's chunks of this shard
        self.dense = torch.zeros(n) if self.codec is not None and self.sync != "bsp" else None  # asp: decoded
        layout = PushLayout.of(self.codec, self.ranges, len(self.runs))
        self.receiver = PushReceiver(self.comm, self.workers, layout, chunk_bytes=self.chunk_bytes)
        self.pull_server = (PullServer(self.comm, self.window, chunk_bytes=self.chunk_bytes)
                            if self.pull_mode == "message" else None)
        self._publish()
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
        ahead = self.notices is not None and self.ctx.train.pull_ahead
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
        self.optimizer = build_optimizer(self.pieces, self.cfg)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this server (views, not copies: save before changing them).

        ``params``: float32 [shard elements]; ``optimizer``: torch.optim's state_dict over
        ``pieces`` (``mpips.shard.Piece``: the shard's tensor runs, cut where a bucket ends);
        ``applied``: gradients applied; ``clocks``: steps completed per worker.
        """
        return {"params": self.window.params, "optimizer": self.optimizer.state_dict(), "pieces": self.splits,
                "applied": self.stats.applied, "clocks": list(self.clocks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (as ``state_dict`` returns it); call after ``start()``."""
        self.window.begin_update()
        self.window.params[:] = state["params"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.stats.applied = int(state["applied"])
        self.clocks = [int(c) for c in state["clocks"]]
        self.window.status[Slot.APPLIED] = self.stats.applied
        self.window.status[Slot.CLOCK] = min(self.clocks)
        self._publish()

    def serve(self) -> ServerStats:
        """Apply pushes until every worker has stopped."""
        workers = len(self.workers)
        active = set(range(workers))
        acc = torch.zeros(self.window.params.size) if self.sync == "bsp" else None
        # bsp: the step in progress, summed in worker order as the pushes come (see _bsp_accumulate)
        bsp = _BspStep(workers, len(self.runs)) if self.sync == "bsp" else None
        if bsp is not None:
            self.receiver.prefer = 0
        joined: dict[int, int] = {}  # asp/ssp: worker -> its position, for the checkpoint in progress
        final_saved = False
        backoff, last_progress = Backoff.for_messages(), time.monotonic()
        tracer = self.tracer
        while active:
            began = tracer.now()
            ready = self.receiver.poll()
            moved = bool(ready) or self.receiver.progressed  # chunks arriving: poll again soon
            if moved:
                tracer.record("receive", began)
            self.stats.max_queue = max(self.stats.max_queue, len(ready))
            self.window.status[Slot.QUEUE] = len(ready)
            for w, header, payload in ready:
                if header.codec == Codec.STOP:
                    active.discard(w)
                    if self.notices is not None:
                        self.notices.close(w)
                    continue
                if header.codec == Codec.JOIN:
                    self._join(w, header, joined)
                    self.receiver.repost(w)
                    continue
                faults.at("push", header.step)
                grad, mask = self._decode(header, payload)  # views of the receive buffer
                with tracer.span("apply", header.step):
                    if isinstance(grad, PushGradient) and self.sync != "bsp":
                        grad = grad.dense(self.dense)  # asp/ssp: the optimizer takes a dense gradient
                    if self.sync == "bsp":
                        self._bsp_accumulate(w, header, grad, mask, acc, bsp)
                    else:
                        self.clocks[w] = header.step + 1
                        self._async_apply(w, header, grad, mask, min(self.clocks))
                        self.receiver.repost(w)
            if self.checkpoints is not None:
                if self.sync != "bsp":
                    moved |= self._async_checkpoint(joined)
                if not final_saved and min(self.clocks) >= self.total_steps and not joined:
                    final_saved = True  # every step of every worker is applied: the last checkpoint
                    self.checkpoints.save_final(self.state_dict(), self._serve_pulls)
            if self.pull_server is not None:
                served = tracer.now()
                if self.pull_server.poll():
                    tracer.record("serve pulls", served)
                    moved = True
            if moved:
                backoff.reset()
                last_progress = time.monotonic()
            else:
                if time.monotonic() - last_progress > self.stall_timeout:
                    waiting = bsp.missing() if bsp is not None else sorted(active)
                    partial = self.receiver.describe()
                    raise StallError(
                        f"server {self.index}: no push for {self.stall_timeout:.0f} s; waiting for"
                        f" workers {waiting} (clock {int(self.window.status[Slot.CLOCK])})"
                        + (f"; {partial}" if partial else "")
                    )
                backoff.wait()
                tracer.idle("wait for pushes", began)
        self.stats.bytes_received = self.receiver.bytes_received
        return self.stats

    def finish(self, lead: int) -> None:
        """Collective: send the final shard to ``lead`` (a rank in comm), free the window."""
        faults.at("shutdown")
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

    def _publish(self) -> None:
        """Publish the working shard and status as the next version; in bsp, announce it."""
        buffer = self.window.publish()
        if self.notices is not None:
            status = self.window.status
            self.notices.send(int(status[Slot.CLOCK]), buffer, int(status[Slot.VERSION]), int(status[Slot.CHECKPOINT]))

    def _serve_pulls(self) -> None:
        if self.pull_server is not None:
            self.pull_server.poll()

    # -- checkpoints in asp/ssp: a consistent cut --------------------------------------------
    def _async_checkpoint(self, joined: dict[int, int]) -> bool:
        """Server 0 opens a checkpoint when one is due; every server saves once all workers joined.

        The cut: a worker that sees the mark in a pull stops pushing and sends JOIN (after its
        earlier pushes, so MPI's message order means every server has applied all of them); a
        server saves when it has every worker's JOIN. So each server holds exactly the updates of
        steps ``< position[w]`` from each worker ``w``, and each worker saves its ``position``.
        """
        mark = int(self.window.status[Slot.CHECKPOINT])
        if not mark and self.index == 0:
            mark = self.checkpoints.due_async(self.window, min(self.clocks))
            if mark:
                self.window.status[Slot.CHECKPOINT] = mark
                self._publish()
                return True
        if not mark or len(joined) < len(self.workers):
            return False
        # every server clears the mark before the collective save, so no worker sees it again
        self.window.status[Slot.CHECKPOINT] = 0
        self._publish()
        self.checkpoints.save(abs(mark), mark < 0, self.state_dict(), self._serve_pulls)
        joined.clear()
        return True

    def _join(self, w: int, header: PushHeader, joined: dict[int, int]) -> None:
        mark = header.clock_seen  # the mark the worker saw
        if self.sync == "bsp" or not mark or w in joined or header.step != self.clocks[w] or not self.checkpoints:
            raise MalformedMessage(
                f"server {self.index}: unexpected checkpoint join from worker {w} (mark {mark},"
                f" position {header.step}, {self.clocks[w]} steps received)"
            )
        joined[w] = header.step
        if not self.window.status[Slot.CHECKPOINT]:  # told by a worker: publish it for the others
            self.window.status[Slot.CHECKPOINT] = mark
            self._publish()

    # -- gradients ---------------------------------------------------------------------------
    def _decode(self, header: PushHeader, payload: np.ndarray) -> tuple[torch.Tensor | PushGradient, np.ndarray]:
        """(gradient, mask): float32 [shard elements] (raw) or the validated compressed chunks
        (``PushGradient``), and uint8 [tensor runs], 1 = has a gradient.

        Raises:
            MalformedMessage: naming the worker, for a push that fails validation (nothing of it
                is applied).
        """
        n, runs = self.window.params.size, len(self.runs)
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

    def _is_bad(self, header: PushHeader, grad: torch.Tensor | PushGradient) -> bool:
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

    def _bsp_accumulate(
        self, w: int, header: PushHeader, grad: torch.Tensor | PushGradient, mask: np.ndarray, acc: torch.Tensor,
        bsp: _BspStep,
    ) -> None:
        """Add worker ``w``'s push to the step's sum in worker order; apply once all are in.

        Worker order, not arrival order: the same sum, bit for bit, on every run (resume). A push
        that comes before its turn waits in its receive buffer (a first-chunk buffer: the
        receiver gives the body, for a push longer than one chunk, only to the worker whose turn
        it is), so the server holds one push of a shard's size at a time, whatever W.
        """
        step = int(self.window.status[Slot.CLOCK])
        twice = w in bsp.held or w < bsp.next
        if header.step != step or twice:
            raise MalformedMessage(
                f"server {self.index}: bsp step {step} got a push for step {header.step}"
                f" from worker {w}" + (" twice" if twice else "")
            )
        bsp.held[w] = (0 if self._is_bad(header, grad) else header.samples, grad, mask)
        while bsp.next in bsp.held:
            v = bsp.next
            n, g, m = bsp.held.pop(v)
            if n:
                if isinstance(g, PushGradient):
                    g.add_into(acc, alpha=float(n))  # sparse chunks: index_add_ of their entries only
                else:
                    acc.add_(g, alpha=float(n))
                bsp.used |= m.astype(bool)  # a tensor has a gradient if any worker's forward used it
                bsp.samples += n
            bsp.next += 1
            self.receiver.prefer = bsp.next % bsp.workers
            self.receiver.repost(v)
        if bsp.next < bsp.workers:
            return
        samples, used = bsp.samples, bsp.used
        bsp.reset()
        norm = None
        if samples:
            acc.div_(samples)
        if self.cfg.clip_grad_norm:  # the global norm: every server's part of the mean gradient
            norm = self.servers.allreduce(sum_of_squares(acc.numpy())) ** 0.5
        mark = self.checkpoints.schedule(self.window, self.servers, step + 1) if self.checkpoints else 0
        self.clocks = [step + 1] * bsp.workers
        self._apply(acc if samples else None, used, step, norm=norm, clock=step + 1)
        if mark:  # every worker joins once it sees clock step + 1 and this mark
            self.checkpoints.save(abs(mark), mark < 0, self.state_dict(), self._serve_pulls)
        acc.zero_()

    def _async_apply(
        self, w: int, header: PushHeader, grad: torch.Tensor, mask: np.ndarray, clock: int
    ) -> None:
        use = not self._is_bad(header, grad) and header.samples > 0
        if use:
            grad.mul_(header.samples / self.batch_size)  # a short last batch counts for less
            staleness = max(0, header.step - header.clock_seen)
            self.stats.staleness.append(staleness)
            self.stats.max_staleness = max(self.stats.max_staleness, staleness)
            self.window.status[Slot.MAX_STALENESS] = self.stats.max_staleness
        # clipping uses the norm in the push's trailer: the worker's whole gradient as decoded here
        # (servers see only their slice) [restart]
        step = self.stats.applied // len(self.workers)
        # Each gradient is one worker's share of a step: scale the step, not the gradient, since
        # Adam-type updates are invariant to gradient scale (scaling it would be a no-op there).
        scale = self.cfg.asp_scale if self.cfg.asp_scale is not None else 1.0 / len(self.workers)
        if use and self.cfg.staleness_lr:
            # staleness in steps: updates applied here since the worker pulled, per worker
            behind = (self.stats.applied - header.applied_seen) / len(self.workers)
            scale /= max(1.0, behind)
        self._apply(grad if use else None, mask.astype(bool), step, norm=header.grad_norm, clock=clock,
                    lr_scale=scale)

    def _apply(
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
            self._publish()
