"""A server's side of one sparse table: its rows, their optimizer, and the workers' requests.

A ``RowServer`` belongs to the ``ParameterServer`` of the model that contains the table
(``job.embedding`` inside a model given to ``job.optimizer``) and shares its communicator, sync
mode and checkpoints, so the table and the model's dense parameters are always at the same
step: the dense server calls ``poll`` each time it polls, ``complete(step)`` before it applies
(and publishes) a bsp step, and ``catch_up`` before a checkpoint or at the end.

- **Pushes.** bsp: a step is applied once every worker's push of it is in, as the mean over
  workers, summed per key in worker order (the same sum on every run). asp/ssp: each push is
  applied as it comes, its learning rate scaled by ``1 / W`` (or ``--asp-scale``), as dense
  pushes are. Each worker pushes once a step to every server, with no rows where it touched none.
- **Pulls.** A request for the rows a step reads is answered once the sync mode allows that
  step to read (bsp: every worker's push of the step before is applied; ssp: the slowest
  worker is at most ``staleness`` behind; asp: at once), in the order each worker asked.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mpi4py import MPI

from mpips.sparse import EmbeddingSpec, RowShard, local_rows
from mpips.transport import Backoff, MalformedMessage, StallError, wait_for
from mpips.transport.rows import EXPORT_CODEC, RowCodec, RowKind, RowRequest, receive_request, send_rows

if TYPE_CHECKING:
    from mpips.server import ParameterServer

__all__ = ["RowServer"]


class RowServer:
    """Table ``table`` of a model, as server ``server.index`` holds it.

    Args:
        server: the model's dense server (communicator, workers, sync mode, config).
        table: the table's index within the model.
        spec: the table.
        values: float32 [local rows, dim]: the shard's initial rows.
    """

    def __init__(self, server: ParameterServer, table: int, spec: EmbeddingSpec, values: np.ndarray):
        self.server, self.table, self.spec = server, table, spec
        self.shard = RowShard(spec, server.index, len(server.ctx.servers), values)
        self.rows = values.shape[0]
        comp = server.compression
        self.pull_codec = RowCodec(comp.pull_codec if comp is not None else "fp32")
        self.push_codec = RowCodec(comp.compress if comp is not None else "fp32")
        self.workers = list(server.workers)  # ranks in the communicator
        self.index_of = {rank: w for w, rank in enumerate(self.workers)}
        self.clocks = [0] * len(self.workers)  # pushes applied per worker (bsp: the step)
        self.held: dict[int, RowRequest] = {}  # bsp: the step's pushes in so far
        self.waiting: list[deque[RowRequest]] = [deque() for _ in self.workers]
        self.pulled: list[dict[int, torch.Tensor]] = [{} for _ in self.workers]  # each worker's last pull per step
        self.sends: list[tuple[list[MPI.Request], np.ndarray]] = []
        self.rows_pushed = 0  # statistics: rows received and rows sent
        self.rows_pulled = 0

    # -- polling -----------------------------------------------------------------------------
    def poll(self) -> bool:
        """Take the requests that came, apply what can be applied, answer what can be answered."""
        moved = self._reap()
        while True:
            req = receive_request(self.server.comm, self.table, self.spec.dim, self.rows, self.push_codec,
                                  self.server.chunk_bytes, self.server.stall_timeout)
            if req is None:
                break
            moved = True
            w = self.index_of.get(req.source)
            if w is None:
                raise StallError(f"table {self.spec.name}: a request from rank {req.source}, not a worker")
            if req.kind in (RowKind.PUSH, RowKind.PUSH_PULLED):
                self._push(w, self._keys_of(w, req))
            else:
                if req.kind == RowKind.PULL:
                    self.pulled[w][req.step] = req.keys
                self.waiting[w].append(req)
        return self._answer() or moved

    def _keys_of(self, w: int, req: RowRequest) -> RowRequest:
        """A push with its keys: a PUSH_PULLED's are those of worker ``w``'s last pull of its step."""
        pulled = self.pulled[w]
        if req.kind == RowKind.PUSH_PULLED:
            keys = pulled.get(req.step)
            if keys is None or len(keys) != len(req.values):
                raise MalformedMessage(f"table {self.spec.name}: worker {w} pushed {len(req.values)} rows of step"
                                       f" {req.step} as those it pulled, and it pulled"
                                       f" {'none' if keys is None else len(keys)}")
            req.keys = keys
        for step in [s for s in pulled if s <= req.step]:
            del pulled[step]
        return req

    def _push(self, w: int, req: RowRequest) -> None:
        self.rows_pushed += len(req.keys)
        mode = self.server.mode
        if not mode.sums:  # asp/ssp: apply now, as a dense push is
            cfg, workers = self.server.cfg, len(self.workers)
            scale = cfg.asp_scale if cfg.asp_scale is not None else 1.0 / workers
            self.shard.step([(req.keys, req.values)], 1.0, lr_scale=scale)
            self.clocks[w] = req.step + 1
            return
        step = min(self.clocks)
        if req.step != step or w in self.held:
            raise StallError(f"table {self.spec.name}: bsp step {step} got a push for step {req.step} from worker {w}")
        self.held[w] = req
        if len(self.held) == len(self.workers):
            parts = [(self.held[v].keys, self.held[v].values) for v in range(len(self.workers))]
            self.held.clear()
            self.shard.step(parts, 1.0 / len(parts))
            self.clocks = [step + 1] * len(self.workers)

    def _slowest(self) -> int:
        active = self.server.active
        return min((self.clocks[w] for w in active), default=max(self.clocks))

    def _answer(self) -> bool:
        """Answer each worker's waiting requests, in order, while the sync mode lets them read."""
        moved, slowest = False, self._slowest()
        for queue in self.waiting:
            while queue:
                req = queue[0]
                need = self.server.mode.need(req.step)
                if need >= 0 and slowest < need:
                    break
                queue.popleft()
                pull = req.kind == RowKind.PULL
                keys = req.keys if pull else torch.arange(self.rows)
                raw = (self.pull_codec if pull else EXPORT_CODEC).encode(self.shard.gather(keys))
                self.rows_pulled += len(keys)
                self.sends.append((send_rows(self.server.comm, req.source, self.table, raw,
                                             self.server.chunk_bytes), raw))
                moved = True
        return moved

    def _reap(self) -> bool:
        """Drop the replies whose sends completed."""
        before = len(self.sends)
        self.sends = [(reqs, raw) for reqs, raw in self.sends if not MPI.Request.Testall(reqs)]
        return len(self.sends) != before

    # -- the dense server's points -----------------------------------------------------------
    def complete(self, step: int) -> None:
        """bsp: before the model's step ``step`` is applied, this table's is (its pushes were sent
        ahead of the dense ones: they are here or on their way)."""
        self._wait(lambda: min(self.clocks) > step, f"every worker's rows of step {step}")

    def catch_up(self, clocks: list[int]) -> None:
        """Before a checkpoint or the end: every worker's pushes up to its dense clock applied."""
        self._wait(lambda: all(c >= d for c, d in zip(self.clocks, clocks, strict=True)),
                   f"the workers' rows up to steps {clocks}")

    def _wait(self, done: Any, what: str) -> None:
        def ready() -> bool:
            self.poll()
            return done()

        wait_for(ready, lambda: f"table {self.spec.name} on server {self.server.index}: {what}",
                 self.server.stall_timeout, backoff=Backoff.for_messages())

    def close(self) -> None:
        """At the end: replies still in flight are completed (their workers receive them at finish)."""
        def ready() -> bool:
            self._reap()
            return not self.sends

        wait_for(ready, "the workers to take the last row replies", self.server.stall_timeout,
                 backoff=Backoff.for_messages())

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The shard (``RowShard.state_dict``), where its rows start in the table's server-major
        order (a checkpoint's ``sparse/<t>/...`` rows), and the clocks."""
        S, s = len(self.server.ctx.servers), self.server.index
        start = sum(local_rows(self.spec.rows, v, S) for v in range(s))
        return {**self.shard.state_dict(), "clocks": list(self.clocks), "start": start, "rows": self.spec.rows,
                "servers": S}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shard.load_state_dict(state)
        self.clocks = [int(c) for c in state["clocks"]]
