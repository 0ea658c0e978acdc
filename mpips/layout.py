"""Rank-to-role layout: which MPI ranks are parameter servers, data servers and workers.

Placement rule (documented in the README): parameter servers are taken first, then data
servers, each round-robin across nodes, taking the highest free rank on each node; workers are
the remaining ranks in increasing order. So on one node with ``-n 4`` and the defaults, ranks 0
and 1 are workers, rank 2 the data server and rank 3 the parameter server; on several nodes the
servers land on different nodes and rank 0 (which prints progress) is always a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from mpips.text import plural

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpips.checkpoint import Checkpointing
    from mpips.config import CompressionConfig, OptimConfig, TrainConfig
    from mpips.registration import TableSpec
    from mpips.shard import ShardPlan

__all__ = ["LayoutError", "PSContext", "Role", "RoleComms", "RoleLayout"]


class LayoutError(ValueError):
    """The role counts do not fit the world; the message says how."""


class Role(str, Enum):
    SERVER = "server"
    DATA = "data-server"
    WORKER = "worker"


@dataclass(frozen=True)
class RoleLayout:
    """The validated rank-to-role map of one job. Pure: no MPI calls."""

    world_size: int
    servers: tuple[int, ...]
    data_servers: tuple[int, ...]
    workers: tuple[int, ...]
    hosts: tuple[str, ...]

    @classmethod
    def from_counts(
        cls, world_size: int, servers: int, data_servers: int, hosts: Sequence[str] | None = None,
        backup_workers: int = 0,
    ) -> RoleLayout:
        """Build the layout for ``world_size`` ranks.

        Args:
            world_size: number of MPI ranks.
            servers: parameter-server ranks (at least 1).
            data_servers: data-server ranks (0 or more).
            hosts: host name of every rank, to spread servers across nodes; default one node.
            backup_workers: bsp's ``--backup-workers``, fewer than the workers.
        """
        hosts = tuple(hosts) if hosts is not None else ("localhost",) * world_size
        if len(hosts) != world_size:
            raise LayoutError(f"got {len(hosts)} host names for {world_size} ranks")
        if servers < 1:
            raise LayoutError(f"at least 1 parameter server is needed, got {servers}")
        if data_servers < 0:
            raise LayoutError(f"the number of data servers cannot be negative ({data_servers})")
        workers = world_size - servers - data_servers
        if workers < 1:
            raise LayoutError(
                f"{plural(world_size, 'rank')} cannot hold {plural(servers, 'parameter server')}"
                f" + {plural(data_servers, 'data server')} + at least 1 worker: launch with at least"
                f" {servers + data_servers + 1} ranks (mpirun -n {servers + data_servers + 1})"
                " or lower --servers / --data-servers"
            )
        if backup_workers >= workers:
            raise LayoutError(
                f"--backup-workers {backup_workers} needs more than {plural(backup_workers, 'worker')}, and"
                f" {plural(world_size, 'rank')} leave {plural(workers, 'worker')}: lower --backup-workers"
            )
        free = {h: [r for r in range(world_size) if hosts[r] == h] for h in dict.fromkeys(hosts)}

        def take(count: int) -> tuple[int, ...]:
            picked: list[int] = []
            while len(picked) < count:
                for ranks in free.values():
                    if ranks and len(picked) < count:
                        picked.append(ranks.pop())
            return tuple(sorted(picked))

        srv = take(servers)
        data = take(data_servers)
        rest = tuple(sorted(r for ranks in free.values() for r in ranks))
        return cls(world_size, srv, data, rest, hosts)

    def role_of(self, rank: int) -> Role:
        if rank in self.servers:
            return Role.SERVER
        if rank in self.data_servers:
            return Role.DATA
        if rank in self.workers:
            return Role.WORKER
        raise LayoutError(f"rank {rank} is outside a world of {self.world_size}")

    def index_of(self, rank: int) -> int:
        """Position of ``rank`` among the ranks of its own role (worker 0, 1, ...)."""
        return {Role.SERVER: self.servers, Role.DATA: self.data_servers, Role.WORKER: self.workers}[
            self.role_of(rank)
        ].index(rank)

    def local_rank(self, rank: int) -> int:
        """Rank's position among the ranks on its own host."""
        return [r for r in range(self.world_size) if self.hosts[r] == self.hosts[rank]].index(rank)

    @property
    def lead_worker(self) -> int:
        """The worker that reports progress and evaluates (the lowest worker rank)."""
        return self.workers[0]

    def describe(self) -> str:
        """Human-readable role map, one line per rank."""
        lines = [
            f"role map: {plural(self.world_size, 'rank')} = {plural(len(self.servers), 'parameter server')}"
            f" + {plural(len(self.data_servers), 'data server')} + {plural(len(self.workers), 'worker')}",
            f"{'rank':>5}  {'host':<20} {'role':<12} {'index':>5} {'local':>5}",
        ]
        for r in range(self.world_size):
            lines.append(
                f"{r:>5}  {self.hosts[r]:<20} {self.role_of(r).value:<12}"
                f" {self.index_of(r):>5} {self.local_rank(r):>5}"
            )
        return "\n".join(lines)


@dataclass
class RoleComms:
    """The communicators one rank needs: the world and its own role's group."""

    world: MPI.Comm
    role: MPI.Comm

    @classmethod
    def split(cls, world: MPI.Comm, layout: RoleLayout) -> RoleComms:
        """Collective over ``world``: one sub-communicator per role, ranks ordered by index."""
        rank = world.Get_rank()
        color = list(Role).index(layout.role_of(rank))
        return cls(world, world.Split(color, layout.index_of(rank)))

    def free(self) -> None:
        if self.role is not None:
            self.role.Free()
            self.role = None


@dataclass(frozen=True, kw_only=True)
class PSContext:
    """What the parameter servers and workers of one job share; each role takes this and its own parts.

    Attributes:
        comm: the parameter-server communicator (servers and workers, world order).
        servers: the servers' ranks in ``comm``, by shard index.
        workers: the workers' ranks in ``comm``, by worker index.
        plan: which tensor runs make up each server's shard.
        train: the run's settings (sync, staleness, max_inflight, stall_timeout, chunk_bytes, ...).
        optim: the optimizer settings: the servers run them (``Config.server_optim``: plain SGD with
            --momentum-correction), the workers take that option's momentum factor from them.
        pull: "rma" or "message": ``train.pull`` resolved for this MPI (a role falls back to
            messages where its window has no RMA).
        total_steps: global steps of the run.
        checkpoints: this rank's checkpointing (``mpips.checkpoint.Checkpointing``), or None.
        compression: the push codec, error feedback and pull precision (``--compress`` ...), or
            None: float32 both ways.
        table: the model and optimizer a worker registered (``job.optimizer``,
            ``mpips.registration``); None: the servers build ``optim``'s optimizer by name.
    """

    comm: MPI.Comm
    servers: list[int]
    workers: list[int]
    plan: ShardPlan
    train: TrainConfig
    optim: OptimConfig
    pull: str
    total_steps: int
    checkpoints: Checkpointing | None = None
    compression: CompressionConfig | None = None
    table: TableSpec | None = None
