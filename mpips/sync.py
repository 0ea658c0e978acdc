"""Sync modes as objects: each owns both halves of its protocol and where a checkpoint may be cut.

``Bsp`` (``--sync bsp``): a step is applied once every worker's push of it is in, summed in
worker order (bitwise the same sum on every run), as the mean over samples; a worker computing
step ``k`` waits for the version of clock ``k``. Servers announce each version (notices, over
windows), a push may stream during backward, and the checkpoint point is a step boundary: the
servers agree on it before publishing clock ``k`` and publish the mark with it; a worker about
to compute step ``k`` joins.

With ``--backup-workers b`` a bsp step is applied once ``W - b`` pushes of it are in, summed in
the order they arrive (the first to come, so not the same sum on every run); a later push of an
applied step is dropped and counted (``ServerStats.late``), and its worker skips to the clock of
the newest version it pulls (``position``). Such pushes go after backward and versions are pulled
whole (a streamed push would hold the server's receive buffer through a slow worker's backward).

``Async`` (``--sync asp``, ``--sync ssp``): every push is applied as it comes, its learning rate
scaled by ``1 / W`` (or ``--asp-scale``) and, with ``--staleness-lr``, divided by its staleness;
with ``--dc-lambda``, the gradient is first delay-compensated (``mpips.delay``);
an ssp worker computing step ``k`` waits until the slowest worker's clock is ``k - staleness``,
an asp worker never waits. The cut: server 0 publishes a mark when a checkpoint is due; each
worker sees it in its next pull, sends JOIN after its last push and joins with its position; a
server saves once every worker joined (see ``mpips.checkpoint``).

A server calls ``begin``, ``accept`` for every push, ``join`` for every JOIN and ``checkpoint``
once per poll; a client asks ``need``, ``inflight``, ``streams``, ``announces`` and ``joins``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpips.compression import PushGradient
from mpips.config import ConfigError
from mpips.delay import DelayCompensation
from mpips.optim import sum_of_squares
from mpips.transport import Codec, MalformedMessage, PushHeader, Slot

if TYPE_CHECKING:
    from mpips.client import ParameterClient
    from mpips.server import ParameterServer

__all__ = ["Async", "Bsp", "SyncMode", "UnevenSteps", "sync_mode"]


class UnevenSteps(ConfigError):
    """A bsp worker finished while another still pushes: every later step would wait for it (said
    as bad input: one line, no traceback)."""


class SyncMode:
    """What servers and workers of one sync mode do; ``Bsp`` and ``Async`` fill it in."""

    name: str = ""
    announces = False  # servers send a notice per version (bsp over windows)
    streams = False  # a push may leave during backward (bsp)
    sums = False  # servers add pushes into a step's sum (compressed chunks stay sparse) before applying
    marks_anytime = False  # a checkpoint mark may come with any version: it ends a wait, and a worker
    # pulls again after joining (the servers applied the others' last pushes meanwhile)
    ahead = True  # bsp over windows may apply, announce and pull a version bucket by bucket (--pull-ahead)
    acks = False  # asp/ssp over windows: a server tells a worker when its push is applied (read your writes)

    # -- the client's half -------------------------------------------------------------------
    def need(self, step: int) -> int:
        """The slowest-worker clock the parameters for ``step`` must have reached (-1: any)."""
        raise NotImplementedError

    def inflight(self, max_inflight: int) -> int:
        """Pushes a worker may have in flight per server."""
        return max_inflight

    def position(self, step: int, clock: int) -> int:
        """The step a worker computes next, about to compute ``step`` with parameters of ``clock``."""
        return step

    def joins(self, marks: set[int], step: int) -> bool:
        """Whether a worker about to compute ``step`` joins the checkpoint ``marks`` published."""
        raise NotImplementedError

    def join(self, client: ParameterClient, mark: int) -> None:
        """A worker's part of the cut before it saves (asp/ssp: JOIN after its last push)."""

    # -- the server's half -------------------------------------------------------------------
    def begin(self, server: ParameterServer) -> None:
        """Before the server's first poll."""

    def accept(self, server: ParameterServer, w: int, header: PushHeader, grad: Any, mask: np.ndarray) -> None:
        """Worker ``w``'s validated push: apply it (or hold it for the step)."""
        raise NotImplementedError

    def join_received(self, server: ParameterServer, w: int, header: PushHeader) -> None:
        raise MalformedMessage(f"server {server.index}: unexpected checkpoint join from worker {w} in {self.name}")

    def stopped(self, server: ParameterServer, w: int, header: PushHeader) -> None:
        """Worker ``w`` sent its stop message (it finished)."""

    def checkpoint(self, server: ParameterServer) -> bool:
        """Once per poll: open or complete a checkpoint; True if anything moved."""
        return False

    def while_saving(self, server: ParameterServer) -> None:
        """What a server serves while it waits for the others in a checkpoint: pulls."""
        server.serve_pulls()

    @property
    def step_open(self) -> bool:
        """Whether a step is partly in (some workers' pushes and not others')."""
        return False

    def waiting(self, server: ParameterServer) -> list[int]:
        """The workers the server waits for, for its stall message."""
        return sorted(server.active)

    @property
    def cutting(self) -> bool:
        """Whether a checkpoint cut is in progress (the final checkpoint waits for it)."""
        return False


@dataclass
class Bsp(SyncMode):
    """Bulk-synchronous: every step applies the mean of every worker's gradient of it."""

    name: str = "bsp"
    backup: int = 0  # --backup-workers: a step is applied once all but this many pushes of it are in
    announces = True
    sums = True
    next: int = 0  # the worker whose push is added next
    held: dict[int, tuple[int, Any, np.ndarray]] = field(default_factory=dict)  # w -> samples, grad, mask
    samples: int = 0
    used: np.ndarray | None = None  # bool [runs]: tensor runs with a gradient from any worker
    acc: torch.Tensor | None = None  # the step's sum
    finished: dict[int, int] = field(default_factory=dict)  # worker -> the steps it pushed, once it stopped
    arrived: set[int] = field(default_factory=set)  # backup workers: whose pushes of the step are in

    @property
    def streams(self) -> bool:  # type: ignore[override]
        return not self.backup

    @property
    def ahead(self) -> bool:  # type: ignore[override]
        return not self.backup

    def need(self, step: int) -> int:
        return step

    def position(self, step: int, clock: int) -> int:
        """Backup workers: a worker whose push came late skips to the servers' clock."""
        return max(step, clock) if self.backup else step

    def inflight(self, max_inflight: int) -> int:
        # a worker's next push comes after the notice that its last one is applied, so one send
        # buffer per server is never waited on
        return 1

    def joins(self, marks: set[int], step: int) -> bool:
        return step != 0 and marks in ({step}, {-step})

    def begin(self, server: ParameterServer) -> None:
        self.workers, self.runs = len(server.workers), len(server.runs)
        self.acc = torch.zeros(server.window.params.size)
        self.finished.clear()
        self.reset()
        server.receiver.prefer = None if self.backup else 0

    def reset(self) -> None:
        self.next, self.samples, self.used = 0, 0, np.zeros(self.runs, dtype=bool)
        self.held.clear()
        self.arrived.clear()

    @property
    def step_open(self) -> bool:
        return self.next > 0 or bool(self.held) or bool(self.arrived)

    def waiting(self, server: ParameterServer) -> list[int]:
        """Workers whose push for the step has not come."""
        if self.backup:
            return [w for w in range(self.workers) if w not in self.arrived and w in server.active]
        return [w for w in range(self.next, self.workers) if w not in self.held]

    def stopped(self, server: ParameterServer, w: int, header: PushHeader) -> None:
        """A worker that finished while the others go on would hold every later step: said at once.

        Its stop may come before the others' pushes of the step it pushed last (it finished
        first): that is even, and the step completes as they come.
        """
        if self.backup:  # a step open waits for fewer pushes once fewer workers are left to push it
            if self.arrived and len(self.arrived) >= self.quorum(server):
                self.complete(server, int(server.window.status[Slot.CLOCK]))
            return
        step = int(server.window.status[Slot.CLOCK])
        pushed = w < self.next or w in self.held
        self.finished[w] = step + 1 if pushed else step
        if self.step_open and not pushed:
            others = sorted(set(self.held) | set(range(self.next)))
            raise UnevenSteps(
                f"server {server.index}: worker {w} finished after {step} steps while worker"
                f" {others[0]} pushed step {step}: in bsp every worker takes the same number of steps"
                " (give every worker as many batches, or use asp/ssp)")

    def accept_check(self, server: ParameterServer, w: int, header: PushHeader) -> None:
        done = sorted(d for d, n in self.finished.items() if n <= header.step)
        if done:
            raise UnevenSteps(
                f"server {server.index}: worker {w} pushed step {header.step}, but worker {done[0]} finished"
                f" after {self.finished[done[0]]} steps: in bsp every worker takes the same number of steps"
                " (give every worker as many batches, or use asp/ssp)")

    def accept(self, server: ParameterServer, w: int, header: PushHeader, grad: Any, mask: np.ndarray) -> None:
        """Add worker ``w``'s push to the step's sum in worker order; apply once all are in.

        Worker order, not arrival order: the same sum, bit for bit, on every run (resume). A push
        that comes before its turn waits in its receive buffer (a first-chunk buffer: the
        receiver gives the body, for a push longer than one chunk, only to the worker whose turn
        it is), so the server holds one push of a shard's size at a time, whatever W.
        """
        if self.backup:
            self.accept_first(server, w, header, grad, mask)
            return
        self.accept_check(server, w, header)
        step = int(server.window.status[Slot.CLOCK])
        twice = w in self.held or w < self.next
        if header.step != step or twice:
            raise MalformedMessage(
                f"server {server.index}: bsp step {step} got a push for step {header.step}"
                f" from worker {w}" + (" twice" if twice else "")
            )
        acc = self.acc
        self.held[w] = (0 if server.is_bad(header, grad) else header.samples, grad, mask)
        while self.next in self.held:
            v = self.next
            n, g, m = self.held.pop(v)
            if n:
                if isinstance(g, PushGradient):
                    g.add_into(acc, alpha=float(n))  # sparse chunks: index_add_ of their entries only
                else:
                    acc.add_(g, alpha=float(n))
                self.used |= m.astype(bool)  # a tensor has a gradient if any worker's forward used it
                self.samples += n
            self.next += 1
            server.receiver.prefer = self.next % self.workers
            server.receiver.repost(v)
        if self.next < self.workers:
            return
        self.complete(server, step)

    def accept_first(self, server: ParameterServer, w: int, header: PushHeader, grad: Any, mask: np.ndarray) -> None:
        """Backup workers: add worker ``w``'s push as it comes; apply once ``W - backup`` are in.

        A push of a step already applied came late: dropped and counted (``ServerStats.late``).
        """
        step = int(server.window.status[Slot.CLOCK])
        if header.step < step:
            server.stats.late += 1
            server.receiver.repost(w)
            return
        if header.step != step or w in self.arrived:
            raise MalformedMessage(
                f"server {server.index}: bsp step {step} got a push for step {header.step}"
                f" from worker {w}" + (" twice" if w in self.arrived else "")
            )
        self.arrived.add(w)
        n = 0 if server.is_bad(header, grad) else header.samples
        if n:
            if isinstance(grad, PushGradient):
                grad.add_into(self.acc, alpha=float(n))
            else:
                self.acc.add_(grad, alpha=float(n))
            self.used |= mask.astype(bool)
            self.samples += n
        server.receiver.repost(w)
        if len(self.arrived) >= self.quorum(server):
            self.complete(server, step)

    def quorum(self, server: ParameterServer) -> int:
        """Backup workers: the pushes a step waits for: W - b, or fewer when fewer workers are
        left (``fit``'s workers all run to the last clock; own loops may stop apart)."""
        return min(self.workers - self.backup, len(server.active | self.arrived))

    def complete(self, server: ParameterServer, step: int) -> None:
        """The step's sum is in ``acc``: apply its mean, publish clock ``step + 1`` (and a checkpoint)."""
        acc = self.acc
        samples, used = self.samples, self.used
        self.reset()
        norm = None
        if samples:
            acc.div_(samples)
        if server.cfg.clip_grad_norm:  # the global norm: every server's part of the mean gradient
            norm = server.servers.allreduce(sum_of_squares(acc.numpy())) ** 0.5
        for rows in server.sparse:  # the model's tables reach the step first (checkpoints cut both)
            rows.complete(step)
        checkpoints = server.checkpoints
        mark = checkpoints.schedule(server.window, server.servers, step + 1) if checkpoints else 0
        server.clocks = [step + 1] * self.workers
        server.apply(acc if samples else None, used, step, norm=norm, clock=step + 1)
        if mark:  # every worker joins once it sees clock step + 1 and this mark
            checkpoints.save(abs(mark), mark < 0, server.state_dict(), lambda: self.while_saving(server))
        acc.zero_()

    def while_saving(self, server: ParameterServer) -> None:
        """Backup workers: pulls, and the late pushes of workers yet to join, dropped. A late
        worker's next push waits for its last one (one in flight), and it joins only after that
        push: were its last push left unreceived, the checkpoint would wait for it for ever."""
        server.serve_pulls()
        if not self.backup:
            return
        clock = int(server.window.status[Slot.CLOCK])
        for w, header, payload in server.receiver.poll():
            if header.codec in (Codec.STOP, Codec.JOIN) or header.step >= clock:
                server.deferred.append((w, header, payload))  # the next poll takes it (its buffer stays)
                continue
            server.stats.late += 1
            server.receiver.repost(w)


@dataclass
class Async(SyncMode):
    """asp (``staleness`` None: never wait) or ssp (wait until the slowest is ``staleness`` behind)."""

    name: str = "asp"
    staleness: int | None = None
    marks_anytime = True
    acks = True
    joined: dict[int, int] = field(default_factory=dict)  # worker -> its position, in the cut in progress
    dc: DelayCompensation | None = None  # --dc-lambda: the server's delay compensation

    def begin(self, server: ParameterServer) -> None:
        lam = server.cfg.dc_lambda
        if lam:
            self.dc = DelayCompensation(server.window.params.size, lam, keep=4 * len(server.workers) + 1)
            self.dc.record(server.stats.applied, server.window.params)

    def need(self, step: int) -> int:
        return -1 if self.staleness is None else step - self.staleness

    def joins(self, marks: set[int], step: int) -> bool:
        return bool(marks)

    def join(self, client: ParameterClient, mark: int) -> None:
        for s in range(len(client.servers)):
            client.pusher.push(s, PushHeader(client.position, client.index, Codec.JOIN, 0, mark, 0, 0.0, 0.0))

    @property
    def cutting(self) -> bool:
        return bool(self.joined)

    def accept(self, server: ParameterServer, w: int, header: PushHeader, grad: Any, mask: np.ndarray) -> None:
        self.apply_push(server, w, header, grad, mask)
        server.acknowledge(w)
        server.receiver.repost(w)

    def apply_push(self, server: ParameterServer, w: int, header: PushHeader, grad: Any, mask: np.ndarray) -> None:
        """Apply worker ``w``'s push now (``accept`` without receiving the worker's next)."""
        if isinstance(grad, PushGradient):
            grad = grad.dense(server.dense)  # the optimizer takes a dense gradient
        server.clocks[w] = header.step + 1
        workers, stats = len(server.workers), server.stats
        use = not server.is_bad(header, grad) and header.samples > 0
        if use:
            grad.mul_(header.samples / server.batch_size)  # a short last batch counts for less
            staleness = max(0, header.step - header.clock_seen)
            stats.staleness.append(staleness)
            stats.max_staleness = max(stats.max_staleness, staleness)
            server.window.status[Slot.MAX_STALENESS] = stats.max_staleness
        # clipping uses the norm in the push's header: the worker's whole gradient as decoded here
        # (servers see only their slice)
        step = stats.applied // workers
        # Each gradient is one worker's share of a step: scale the step, not the gradient, since
        # Adam-type updates are invariant to gradient scale (scaling it would be a no-op there).
        cfg = server.cfg
        scale = cfg.asp_scale if cfg.asp_scale is not None else 1.0 / workers
        if use and cfg.staleness_lr:
            # staleness in steps: updates applied here since the worker pulled, per worker
            behind = (stats.applied - header.applied_seen) / workers
            scale /= max(1.0, behind)
        if use and self.dc is not None:  # towards the parameters it is applied to (DC-ASGD)
            self.dc.compensate(grad, header.applied_seen, stats.applied)
        server.apply(grad if use else None, mask.astype(bool), step, norm=header.grad_norm,
                     clock=self.slowest(server), lr_scale=scale)
        if use and self.dc is not None:
            self.dc.record(stats.applied, server.window.params)

    def checkpoint(self, server: ParameterServer) -> bool:
        """Server 0 opens a checkpoint when one is due; every server saves once all workers joined.

        The cut: a worker that sees the mark in a pull stops pushing and sends JOIN (after its
        earlier pushes, so MPI's message order means every server has applied all of them); a
        server saves when it has every worker's JOIN. So each server holds exactly the updates of
        steps ``< position[w]`` from each worker ``w``, and each worker saves its ``position``.
        """
        if server.checkpoints is None:
            return False
        window = server.window
        mark = int(window.status[Slot.CHECKPOINT])
        if not mark and server.index == 0:
            mark = server.checkpoints.due_async(window, min(server.clocks))
            if mark:
                window.status[Slot.CHECKPOINT] = mark
                server.publish()
                return True
        if not mark or len(self.joined) < len(server.workers):
            return False
        # every server clears the mark before the collective save, so no worker sees it again
        window.status[Slot.CHECKPOINT] = 0
        server.publish()
        server.checkpoints.save(abs(mark), mark < 0, server.state_dict(), lambda: self.while_saving(server))
        self.joined.clear()
        return True

    def while_saving(self, server: ParameterServer) -> None:
        """Pulls, and a worker's request for the servers' own values (``--lookahead``: it may
        evaluate while the others wait in the checkpoint); a push waits for the next poll."""
        server.serve_pulls()
        if not server.window.lead:
            return
        for w, header, payload in server.receiver.poll():
            if header.codec == Codec.MASTER:
                server.send_values(w)
            else:
                server.deferred.append((w, header, payload))  # the next poll takes it (its buffer stays)

    @staticmethod
    def slowest(server: ParameterServer) -> int:
        """The published clock: steps completed by the slowest worker still training."""
        return min((server.clocks[v] for v in server.active), default=min(server.clocks))

    def stopped(self, server: ParameterServer, w: int, header: PushHeader) -> None:
        """The slowest worker's clock counts the workers still training: one that finished early
        must not hold an ssp worker back."""
        if not server.active:
            return
        clock = self.slowest(server)
        if clock > int(server.window.status[Slot.CLOCK]):
            server.window.status[Slot.CLOCK] = clock
            server.publish()

    def join_received(self, server: ParameterServer, w: int, header: PushHeader) -> None:
        mark = header.clock_seen  # the mark the worker saw
        if not mark or w in self.joined or header.step != server.clocks[w] or not server.checkpoints:
            raise MalformedMessage(
                f"server {server.index}: unexpected checkpoint join from worker {w} (mark {mark},"
                f" position {header.step}, {server.clocks[w]} steps received)"
            )
        self.joined[w] = header.step
        if not server.window.status[Slot.CHECKPOINT]:  # told by a worker: publish it for the others
            server.window.status[Slot.CHECKPOINT] = mark
            server.publish()


def sync_mode(name: str, staleness: int, backup: int = 0) -> SyncMode:
    """The mode ``--sync`` names (a fresh object: it holds one server's or client's state);
    ``backup``: bsp's ``--backup-workers``."""
    if name == "bsp":
        return Bsp(backup=backup)
    if name in ("asp", "ssp"):
        return Async(name, staleness if name == "ssp" else None)
    raise ValueError(f"unknown sync mode {name!r}")
