"""ShardPlan: a model's parameters, flattened, split across parameter servers by bytes. Pure.

Parameters are concatenated in ``named_parameters()`` order into one flat float32 vector, which
is cut into one contiguous range per server with sizes differing by at most one element (so a
large tensor is split across servers and small tensors are packed together). The plan maps every
(tensor, slice) to (server, offset) and back.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from mpips.text import plural

__all__ = ["Piece", "ShardPlan", "TensorSpec", "split_pieces"]

FLOAT_BYTES = 4  # parameters travel and are stored as float32


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int  # first element in the flat vector

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Piece:
    """A contiguous run of one tensor that lives on one server."""

    tensor: str
    tensor_offset: int  # first element within the (flattened) tensor
    server: int
    server_offset: int  # first element within the server's shard
    length: int


@dataclass(frozen=True)
class ShardPlan:
    """Where every parameter element lives.

    Attributes:
        tensors: the tensors in flat order.
        bounds: ``bounds[s]:bounds[s+1]`` is server ``s``'s range of the flat vector.
    """

    tensors: tuple[TensorSpec, ...]
    bounds: tuple[int, ...]

    @classmethod
    def build(cls, named_shapes: Sequence[tuple[str, Sequence[int]]], servers: int) -> ShardPlan:
        """Plan ``servers`` shards for tensors given as (name, shape) in a fixed order."""
        if servers < 1:
            raise ValueError(f"need at least one server, got {servers}")
        specs, offset = [], 0
        for name, shape in named_shapes:
            spec = TensorSpec(name, tuple(int(d) for d in shape), offset)
            specs.append(spec)
            offset += spec.numel
        base, extra = divmod(offset, servers)
        bounds = [0]
        for s in range(servers):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
        return cls(tuple(specs), tuple(bounds))

    @classmethod
    def for_module(cls, module, servers: int) -> ShardPlan:  # noqa: ANN001 (torch.nn.Module)
        """The plan of ``module``'s trainable parameters (``requires_grad``), in registration order.

        Frozen parameters are not sharded: like buffers they stay with each worker's module, so
        the servers' optimizer never touches them (torch.optim skips them the same way).
        """
        return cls.build([(n, p.shape) for n, p in module.named_parameters() if p.requires_grad], servers)

    @property
    def servers(self) -> int:
        return len(self.bounds) - 1

    @property
    def numel(self) -> int:
        return self.bounds[-1]

    def shard_range(self, server: int) -> tuple[int, int]:
        return self.bounds[server], self.bounds[server + 1]

    def shard_numel(self, server: int) -> int:
        lo, hi = self.shard_range(server)
        return hi - lo

    def pieces(self, tensor: str) -> list[Piece]:
        """Where the elements of ``tensor`` live, in order."""
        spec = next((t for t in self.tensors if t.name == tensor), None)
        if spec is None:
            raise KeyError(tensor)
        return self._cut(spec)

    def server_pieces(self, server: int) -> list[Piece]:
        """The tensor runs held by ``server``, in shard order."""
        return [p for t in self.tensors for p in self._cut(t) if p.server == server]

    def server_tensor_indices(self, server: int) -> list[int]:
        """For each piece of ``server_pieces(server)``, the index of its tensor in ``tensors``."""
        index = {t.name: i for i, t in enumerate(self.tensors)}
        return [index[p.tensor] for p in self.server_pieces(server)]

    def locate(self, flat_index: int) -> tuple[int, int]:
        """(server, offset in its shard) of one element of the flat vector."""
        if not 0 <= flat_index < self.numel:
            raise IndexError(f"element {flat_index} outside 0..{self.numel - 1}")
        for s in range(self.servers):
            lo, hi = self.shard_range(s)
            if lo <= flat_index < hi:
                return s, flat_index - lo
        raise AssertionError("unreachable")

    def _cut(self, spec: TensorSpec) -> list[Piece]:
        out, start, end = [], spec.offset, spec.offset + spec.numel
        for s in range(self.servers):
            lo, hi = self.shard_range(s)
            a, b = max(start, lo), min(end, hi)
            if a < b:
                out.append(Piece(spec.name, a - start, s, a - lo, b - a))
        return out

    def imbalance(self) -> float:
        """(largest shard / mean shard) - 1, as a fraction."""
        sizes = [self.shard_numel(s) for s in range(self.servers)]
        mean = sum(sizes) / len(sizes)
        return max(sizes) / mean - 1.0 if mean else 0.0

    def describe(self, optimizer_factor: float = 1.0) -> str:
        """Bytes per server and imbalance, for --dry-run and the start-up log."""
        lines = [
            f"shard plan: {plural(len(self.tensors), 'tensor')}, {plural(self.numel, 'parameter')}"
            f" ({self.numel * FLOAT_BYTES / 2**20:.2f} MiB) over {plural(self.servers, 'server')},"
            f" imbalance {100 * self.imbalance():.2f}%",
            f"{'server':>6} {'elements':>12} {'MiB':>9} {'with optimizer state':>21} {'tensors':>8}",
        ]
        for s in range(self.servers):
            n = self.shard_numel(s)
            mib = n * FLOAT_BYTES / 2**20
            lines.append(
                f"{s:>6} {n:>12,} {mib:>9.2f} {mib * (1 + optimizer_factor):>17.2f} MiB"
                f" {len({p.tensor for p in self.server_pieces(s)}):>8}"
            )
        return "\n".join(lines)


def split_pieces(pieces: Sequence[Piece], cuts: Sequence[int]) -> tuple[list[Piece], list[int]]:
    """``pieces`` (one server's tensor runs, in shard order) cut at the shard offsets ``cuts``.

    Returns the cut pieces, in order, and for each the index of the run it came from. A run
    that crosses a cut becomes two pieces (their ``tensor_offset`` and ``server_offset`` say
    where each starts); runs no cut crosses stay whole.
    """
    out, source = [], []
    bounds = sorted(set(cuts))
    for i, p in enumerate(pieces):
        start, end = p.server_offset, p.server_offset + p.length
        edges = [start, *(c for c in bounds if start < c < end), end]
        for a, b in itertools.pairwise(edges):
            out.append(Piece(p.tensor, p.tensor_offset + a - start, p.server, a, b - a))
            source.append(i)
    return out, source
