"""Sparse tables, the math: which server holds a row, how rows start, how a shard steps. Pure.

An embedding table of ``rows`` x ``dim`` (``job.embedding``) lives on the parameter servers, by
key: row ``k`` is held by server ``k % S`` as its local row ``k // S``. Every row has the same
bytes, so this balances bytes as the dense shards are balanced, and it spreads the hot rows of a
skewed (Zipf) id distribution over every server, where contiguous ranges would put them all on
the first one. A worker never holds the table: a forward pulls the unique rows its ids touch,
and ``opt.step()`` pushes their gradients as (keys, values).

Initial values. By default row ``k`` is ``std`` times standard normal values drawn from a
counter-based generator (splitmix64 of the seed, the table and the element index, then
Box-Muller): a function of (seed, table, key, column) alone, so each server makes its own rows,
no rank ever holds the whole table, and the values do not depend on the number of servers.
``init=`` gives the values of a small table instead.

The servers step a real ``torch.optim`` optimizer over their shard with torch's sparse semantics:
the gradient of a step is a sparse COO tensor of the rows the workers touched (bsp: the mean over
workers of their gradients, summed per key), so ``SGD``, ``Adagrad`` and ``SparseAdam`` change
only those rows and their state, exactly as they do for ``nn.Embedding(sparse=True)``. An
optimizer torch refuses sparse gradients to (Adam, AdamW, ...) is refused at ``job.embedding``
with torch's own reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpips.config import ConfigError
from mpips.registration import _plain, class_path, resolve_optimizer

__all__ = ["EmbeddingSpec", "RowShard", "available_memory", "check_fits", "init_rows", "local_rows", "owner_split",
           "quiet_sparse", "row_state_factor", "shard_bytes",
           "sparse_step"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function over uint64 counters (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def init_rows(keys: np.ndarray, dim: int, seed: int, table: int, std: float) -> np.ndarray:
    """float32 [len(keys), dim]: the default initial values of rows ``keys`` (see the module doc)."""
    keys = np.asarray(keys, dtype=np.uint64)
    stream = _splitmix64(np.uint64(seed & (2**64 - 1)) ^ _splitmix64(np.array([table], np.uint64)))[0]
    element = (keys[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]).reshape(-1)
    with np.errstate(over="ignore"):
        base = element * np.uint64(2) + stream * np.uint64(2)
    u1 = ((_splitmix64(base) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = ((_splitmix64(base + np.uint64(1)) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return (std * z).astype(np.float32).reshape(len(keys), dim)


def local_rows(rows: int, server: int, servers: int) -> int:
    """How many rows of a ``rows``-row table server ``server`` of ``servers`` holds."""
    return max(0, (rows - server + servers - 1) // servers)


def owner_split(keys: torch.Tensor, servers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each server: (positions in ``keys``, its local row indices) of the keys it holds."""
    owner = keys % servers
    out = []
    for s in range(servers):
        where = (owner == s).nonzero().view(-1)
        out.append((where, keys[where] // servers))
    return out


# float32 values of optimizer state per element of the table (for the servers' memory check)
_STATE = {"SGD": 0.0, "Adagrad": 1.0, "SparseAdam": 2.0}


def row_state_factor(optimizer: str) -> float:
    """Optimizer state per table element, in float32 values (momentum SGD: 1; unknown: 2)."""
    return _STATE.get(optimizer.rpartition(":")[2], 2.0)


def quiet_sparse() -> None:
    """Opt out of torch's sparse invariant checks explicitly (they are off by default; torch's
    optimizers build sparse tensors of coalesced rows, and say so once per process otherwise)."""
    torch.sparse.check_sparse_tensor_invariants.disable()


def sparse_step(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], dim: int = 1,
                ) -> tuple[torch.optim.Optimizer, str | None]:
    """Build ``cls(**kwargs)`` over a probe row pair and step it once on a sparse gradient:
    (the optimizer, None) if torch lets it, else (it, torch's reason).

    Raises:
        ConfigError: the class refused its arguments.
    """
    quiet_sparse()
    probe = torch.zeros(2, dim, requires_grad=True)
    try:
        opt = cls([probe], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}(...) refused its arguments: {exc}") from None
    probe.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, dim), (2, dim), check_invariants=False)
    try:
        opt.step()
    except RuntimeError as exc:
        return opt, str(exc)
    return opt, None


@dataclass(frozen=True)
class EmbeddingSpec:
    """One sparse table as the workers register it (``job.embedding``), inside a model's ``TableSpec``.

    Attributes:
        name: the module's name in the model (``"emb"``, ``"tables.0"``).
        rows, dim: the table's shape.
        optimizer: the optimizer class, ``"package.module:Qualname"``.
        settings: its group settings as torch filled them in (everything but ``params``).
        init: ``"seed"`` (per-row values from the seed) or ``"given"`` (worker 0 sends them).
        std: the standard deviation of the seeded values.
    """

    name: str
    rows: int
    dim: int
    optimizer: str
    settings: tuple[tuple[str, Any], ...]
    init: str = "seed"
    std: float = 1.0

    @classmethod
    def of(cls, rows: int, dim: int, optimizer: type | str, kwargs: dict[str, Any], init: str,
           std: float) -> EmbeddingSpec:
        """Check the table and its optimizer on the worker (without a name yet).

        Raises:
            ConfigError: a bad shape, or an optimizer that cannot step sparse gradients (torch's
                reason), or arguments the optimizer class refuses.
        """
        for what, n in (("num_embeddings", rows), ("embedding_dim", dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"job.embedding: {what} must be a positive int, got {n!r}")
        cls_ = resolve_optimizer(optimizer, sparse=True)
        opt, why = sparse_step(cls_, kwargs, dim)
        if why:
            raise ConfigError(f"job.embedding: {cls_.__name__} cannot step an embedding table's sparse gradients"
                              f" (torch: {why}); use torch.optim.SGD, Adagrad or SparseAdam, with options torch"
                              " allows for sparse gradients")
        settings = tuple(sorted((k, _plain(v)) for k, v in opt.param_groups[0].items() if k != "params"))
        return cls("", rows, dim, class_path(cls_), settings, init, float(std))

    @property
    def row_bytes(self) -> int:
        return 4 * self.dim


class RowShard:
    """One server's rows of one table and the torch optimizer that steps them.

    Args:
        spec: the table.
        server, servers: this server's index and how many hold the table.
        values: float32 [local rows, dim], the shard's initial rows (taken, not copied).
    """

    def __init__(self, spec: EmbeddingSpec, server: int, servers: int, values: np.ndarray):
        self.spec, self.server, self.servers = spec, server, servers
        quiet_sparse()
        self.weight = torch.from_numpy(values).requires_grad_(True)
        self.optimizer = resolve_optimizer(spec.optimizer, sparse=True)([self.weight], **dict(spec.settings))
        self.lr = self.optimizer.param_groups[0].get("lr")

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """float32 [len(local), dim]: a copy of the rows ``local`` (local indices)."""
        return self.weight.detach().index_select(0, local)

    def step(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float, lr_scale: float = 1.0) -> None:
        """One optimizer step on the sum of ``parts`` (local keys, row gradients), times ``scale``,
        summed per key in the order given; rows no part names (and their state) stay as they are.

        A step with no rows still steps the optimizer (its step count), as torch does for an
        ``nn.Embedding(sparse=True)`` whose gradient has no row of this shard.
        """
        keys = torch.cat([k for k, _ in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        values = torch.cat([v for _, v in parts]) if parts else torch.zeros(0, self.spec.dim)
        if scale != 1.0:
            values = values * scale
        grad = torch.sparse_coo_tensor(keys[None], values, tuple(self.weight.shape), check_invariants=False).coalesce()
        self.weight.grad = grad
        group = self.optimizer.param_groups[0]
        if lr_scale != 1.0 and self.lr is not None:
            group["lr"] = self.lr * lr_scale
        self.optimizer.step()
        if self.lr is not None:
            group["lr"] = self.lr
        self.weight.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The shard as arrays (views): ``weight``; the optimizer's per-element state ``elem``
        (float32 [rows, dim]; ``sparse`` names those torch keeps as sparse tensors, SGD's momentum)
        and per-shard numbers ``scalar`` (``ints`` names the Python ints, SparseAdam's step)."""
        state = self.optimizer.state.get(self.weight, {})
        elem, scalar, sparse, ints = {}, {}, [], []
        for key, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.is_sparse:
                    sparse.append(key)
                    v = v.to_dense()
                elem[key] = v.detach().numpy()
            else:
                scalar[key] = float(v)
                if isinstance(v, int):
                    ints.append(key)
        return {"weight": self.weight.detach().numpy(), "elem": elem, "scalar": scalar, "sparse": sparse,
                "ints": ints}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state`` as ``state_dict`` gives it (no optimizer state: none was made yet)."""
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(state["weight"]))
        own: dict[str, Any] = {}
        for key, v in state["elem"].items():
            t = torch.as_tensor(np.array(v, dtype=np.float32))
            own[key] = t.to_sparse(sparse_dim=1) if key in state["sparse"] else t
        for key, v in state["scalar"].items():
            own[key] = int(v) if key in state["ints"] else torch.tensor(v, dtype=torch.float32)
        full = self.optimizer.state_dict()
        full["state"] = {0: own} if own else {}
        self.optimizer.load_state_dict(full)


def shard_bytes(spec: EmbeddingSpec, server: int, servers: int) -> int:
    """Bytes server ``server`` holds for the table: rows and optimizer state, float32."""
    return int(local_rows(spec.rows, server, servers) * spec.row_bytes * (1 + row_state_factor(spec.optimizer)))


def check_fits(specs: Sequence[EmbeddingSpec], server: int, servers: int, available: int, sharing: int) -> None:
    """Refuse, before any allocation, tables whose shard on this server would not fit the memory
    ``available`` on its host, shared by ``sharing`` servers there.

    Raises:
        ConfigError: with the numbers (and how many servers would hold it).
    """
    need = sum(shard_bytes(s, server, servers) for s in specs)
    budget = available // max(1, sharing)
    if need > budget:
        whole = sum(s.rows * s.row_bytes * (1 + row_state_factor(s.optimizer)) for s in specs)
        gib = 2.0**30
        raise ConfigError(
            f"the sparse tables need {need / gib:.2f} GiB on server {server} (rows and optimizer state:"
            f" {whole / gib:.2f} GiB over {servers} servers) and its host has {available / gib:.2f} GiB available"
            f" for {sharing} server(s):"
            f" use more servers (at least {math.ceil(whole / max(1, budget))}) or a smaller table")


def available_memory() -> int:
    """Bytes of memory this host can still give (``MemAvailable``; -1 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1
