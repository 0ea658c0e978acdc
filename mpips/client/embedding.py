"""A sparse table on the parameter servers, used in a model as ``nn.Embedding`` is.

    emb = job.embedding(50_000_000, 32, optimizer=torch.optim.Adagrad, lr=0.05)
    model = Recommender(emb)            # forward: emb(ids), ids an integer tensor of any shape
    opt = job.optimizer(model, torch.optim.Adam, lr=1e-3)   # registers model and table together
    ...
    emb.prefetch(next_ids)              # optional, before opt.step(): the next step's rows come
    opt.step()                          #   while the dense parameters are pulled

A ``SparseEmbedding`` holds no rows: a forward pulls the unique rows its ids touch from the
servers that hold them (``mpips.sparse``: row ``k`` on server ``k % S``), as a leaf tensor whose
gradient backward fills; ``opt.step()`` of the optimizer whose model contains the table pushes
those row gradients as (keys, values), and the servers' optimizer (SGD, Adagrad, SparseAdam)
steps only those rows. Several forwards before a step accumulate, as in torch. A forward under
``torch.no_grad()`` (evaluation) pulls and records nothing.

``emb.state_dict()`` is ``{"weight": the whole table}``, gathered from the servers (for tables
that fit in memory: export, tests); take it before ``job.finish()``, after which the servers
have stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpips.config import ConfigError
from mpips.sparse import EmbeddingSpec, local_rows, owner_split
from mpips.transport import wait_all
from mpips.transport.rows import EXPORT_CODEC, RowCodec, RowKind, expect_rows, send_request

__all__ = ["RowClient", "SparseEmbedding"]


@dataclass
class _Pending:
    """Replies asked for and not yet taken: one per server with keys."""

    step: int
    keys: torch.Tensor
    parts: list[tuple[torch.Tensor, np.ndarray]]  # (positions in keys, reply buffer) per server asked
    requests: list[MPI.Request]
    keep: list[np.ndarray]


class RowClient:
    """A worker's requests to the servers of one table (made at ``job.optimizer``).

    Args:
        comm: the model's communicator; ``servers``: the server ranks in it.
        table: the table's index in its model.
        spec: the table.
        position: the step this worker computes (the model's ``ParameterClient.position``).
        pull_codec, push_codec: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        chunk_bytes, timeout: the job's ``--chunk-bytes`` and ``--stall-timeout``.
    """

    def __init__(self, comm: MPI.Comm, servers: list[int], table: int, spec: EmbeddingSpec,
                 position: Callable[[], int], pull_codec: str, push_codec: str, chunk_bytes: int, timeout: float):
        self.comm, self.servers, self.table, self.spec = comm, servers, table, spec
        self.position, self.chunk_bytes, self.timeout = position, chunk_bytes, timeout
        self.pull_codec, self.push_codec = RowCodec(pull_codec), RowCodec(push_codec)
        self.sends: list[tuple[list[MPI.Request], list[np.ndarray]]] = []
        self.pulled: list[dict[int, torch.Tensor]] = [{} for _ in servers]  # the last pull per step, per server
        self.bytes_pulled = self.bytes_pushed = 0  # every byte sent and received, keys and headers too

    def ask(self, keys: torch.Tensor, step: int) -> _Pending:
        """Send pull requests for the unique global ``keys`` at ``step``; the replies are awaited by ``take``."""
        parts, requests, keep = [], [], []
        for s, (where, local) in enumerate(owner_split(keys, len(self.servers))):
            if not len(local):
                continue
            reqs, bufs = send_request(self.comm, self.servers[s], self.table, RowKind.PULL, step, local, None,
                                      self.chunk_bytes)
            self.pulled[s][step] = local
            self.bytes_pulled += sum(b.nbytes for b in bufs)
            raw = self.pull_codec.buffer(len(local), self.spec.dim)
            requests += reqs + expect_rows(self.comm, self.servers[s], self.table, raw, self.chunk_bytes)
            keep += bufs
            parts.append((where, raw))
        return _Pending(step, keys, parts, requests, keep)

    def take(self, pending: _Pending) -> torch.Tensor:
        """float32 [len(keys), dim]: the rows ``ask`` asked for."""
        wait_all(pending.requests, lambda: f"the rows of table {self.spec.name} for step {pending.step} from the"
                 " servers", self.timeout)
        out = torch.empty(len(pending.keys), self.spec.dim)
        for where, raw in pending.parts:
            out[where] = self.pull_codec.decode(raw, len(where), self.spec.dim)
            self.bytes_pulled += raw.nbytes
        return out

    def push(self, keys: torch.Tensor, grads: torch.Tensor, step: int) -> None:
        """Send the row gradients of ``step`` to every server (an empty push where no row is its);
        to a server whose last pull of ``step`` asked for exactly these rows, without their keys."""
        self.drain()
        for s, (where, local) in enumerate(owner_split(keys, len(self.servers))):
            values = self.push_codec.encode(grads[where]) if len(local) else None
            pulled = self.pulled[s].get(step)
            kind = RowKind.PUSH_PULLED if pulled is not None and len(local) and torch.equal(pulled, local) \
                else RowKind.PUSH
            reqs, bufs = send_request(self.comm, self.servers[s], self.table, kind, step, local, values,
                                      self.chunk_bytes)
            self.bytes_pushed += sum(b.nbytes for b in bufs) - (bufs[1].nbytes if kind == RowKind.PUSH_PULLED else 0)
            self.sends.append((reqs, bufs))
            for old in [t for t in self.pulled[s] if t <= step]:
                del self.pulled[s][old]

    def drain(self) -> None:
        """Wait for the pushes in flight (their buffers are reused)."""
        for reqs, _ in self.sends:
            wait_all(reqs, f"the servers to take table {self.spec.name}'s row gradients", self.timeout)
        self.sends.clear()

    def export(self, step: int) -> torch.Tensor:
        """float32 [rows, dim]: the whole table as the servers hold it at ``step``."""
        S, dim = len(self.servers), self.spec.dim
        out = torch.empty(self.spec.rows, dim)
        for s, rank in enumerate(self.servers):
            n = local_rows(self.spec.rows, s, S)
            raw = EXPORT_CODEC.buffer(n, dim)
            reqs, _ = send_request(self.comm, rank, self.table, RowKind.EXPORT, step, torch.zeros(0, dtype=torch.int64),
                                   None, self.chunk_bytes)
            reqs += expect_rows(self.comm, rank, self.table, raw, self.chunk_bytes)
            wait_all(reqs, f"server {s}'s rows of table {self.spec.name}", self.timeout)
            out[s::S] = EXPORT_CODEC.decode(raw, n, dim)
        return out


class SparseEmbedding(nn.Module):
    """An embedding table held by the parameter servers (made by ``Job.embedding``).

    Args:
        spec: the table (``mpips.sparse.EmbeddingSpec``).
        init: float32 [rows, dim] initial values (small tables), or None for the seeded ones.
    """

    def __init__(self, spec: EmbeddingSpec, init: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.init = spec, init
        self.num_embeddings, self.embedding_dim = spec.rows, spec.dim
        self.client: RowClient | None = None
        self.finished = False
        self._touched: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, rows leaf) of each forward this step
        self._ahead: _Pending | None = None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the parameter servers"

    def _client(self) -> RowClient:
        if self.finished:
            raise ConfigError("a table of job.embedding used after job.finish(): the servers that hold it have"
                              " stopped (take emb.state_dict() before job.finish())")
        if self.client is None:
            raise ConfigError("a table of job.embedding is used before its model was given to job.optimizer(model,"
                              " ...), which registers it with the servers")
        return self.client

    def _keys(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique keys, inverse) of ``ids``, checked."""
        if not isinstance(ids, torch.Tensor):
            raise ConfigError(f"embedding {self.spec.name}: ids must be a tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ConfigError(f"embedding {self.spec.name}: ids must be an integer tensor (torch.long),"
                              f" got {ids.dtype}")
        flat = ids.reshape(-1).to("cpu", torch.int64)
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.num_embeddings:
                bad = lo if lo < 0 else hi
                raise ConfigError(f"embedding {self.spec.name}: id {bad} is out of range for a table of"
                                  f" {self.num_embeddings:,} rows (ids {lo} .. {hi}; valid 0 .."
                                  f" {self.num_embeddings - 1})")
        return torch.unique(flat, return_inverse=True)

    def _step_of_next_forward(self) -> int:
        """The step a forward now computes for: after this step's forwards, the next one."""
        return self._client().position() + (1 if self._touched else 0)

    def prefetch(self, ids: torch.Tensor) -> None:
        """Ask now for the rows of the next forward's ``ids`` (call before ``opt.step()`` to have
        them come while the dense parameters are pulled); that forward then takes them."""
        keys, _ = self._keys(ids)
        client = self._client()
        if self._ahead is not None:
            client.take(self._ahead)  # one ask ahead at a time: the older one's rows are dropped
        self._ahead = client.ask(keys, self._step_of_next_forward())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keys, inverse = self._keys(ids)
        client = self._client()
        step = client.position()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.step == step and torch.equal(ahead.keys, keys):
            rows = client.take(ahead)
        else:
            if ahead is not None:
                client.take(ahead)
            rows = client.take(client.ask(keys, step))
        if torch.is_grad_enabled():
            rows.requires_grad_(True)
            self._touched.append((keys, rows))
        out = rows[inverse]
        return out.view(*ids.shape, self.embedding_dim).to(ids.device)

    # -- the optimizer's step ----------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - as nn.Module's
        self._touched.clear()

    def push(self) -> None:
        """Push this step's row gradients (``DistributedOptimizer.step``, before the dense push)."""
        client = self._client()
        parts = [(k, r.grad) for k, r in self._touched if r.grad is not None]
        self._touched.clear()
        if parts:
            keys, grads = torch.cat([k for k, _ in parts]), torch.cat([g for _, g in parts])
            if len(parts) > 1:  # several forwards: one row per key
                keys, inverse = torch.unique(keys, return_inverse=True)
                grads = torch.zeros(len(keys), self.embedding_dim).index_add_(0, inverse, grads)
        else:
            keys, grads = torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.embedding_dim)
        client.push(keys, grads.float(), client.position())

    def finish(self) -> None:
        """At ``job.finish()``: replies asked for and pushes in flight complete; the table is gone."""
        if self.client is not None:
            if self._ahead is not None:
                self.client.take(self._ahead)
                self._ahead = None
            self.client.drain()
        self.finished = True

    # -- state_dict: the whole table, gathered ----------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:  # noqa: ARG002
        destination[prefix + "weight"] = self._client().export(self._client().position())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "weight" in state_dict:
            raise ConfigError(f"embedding {self.spec.name}: a table on the servers is not loaded from a state_dict;"
                              " give its values as job.embedding(..., init=tensor), or resume from a checkpoint")
