"""DataAssignment: which data servers hold which partitions, and where each worker reads. Pure.

Placement: partitions, largest first, go to the ``replicas`` data servers holding the fewest
samples so far (ties: lowest index), so held bytes are balanced and each partition has
``replicas`` distinct holders.

Routing: in an epoch every worker reads about 1/W of every partition (each global batch is split
evenly over the workers). For each (partition, worker) pair the worker reads from the holder
with the least expected load so far, so the samples served per epoch are balanced across data
servers and replication spreads the readers of a partition over its holders. The routing is a
pure function of (partition sizes, servers, workers, replicas): every rank computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpips.text import plural

__all__ = ["DataAssignment"]


@dataclass(frozen=True)
class DataAssignment:
    sizes: tuple[int, ...]  # samples per partition
    servers: int
    workers: int
    replicas: int
    holders: tuple[tuple[int, ...], ...]  # holders[p]: data servers holding partition p
    route: tuple[tuple[int, ...], ...]  # route[w][p]: data server worker w reads partition p from

    @classmethod
    def build(
        cls, sizes: tuple[int, ...], servers: int, workers: int, replicas: int = 1
    ) -> DataAssignment:
        """Place ``sizes`` partitions on ``servers`` data servers and route ``workers`` to them."""
        if servers < 1 or workers < 1:
            raise ValueError("need at least one data server and one worker")
        if not 1 <= replicas <= servers:
            raise ValueError(
                f"--replicas {replicas} must be between 1 and the {servers} data servers"
            )
        held = [0] * servers
        holders: list[tuple[int, ...]] = [()] * len(sizes)
        for p in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
            chosen = sorted(range(servers), key=lambda s: (held[s], s))[:replicas]
            for s in chosen:
                held[s] += sizes[p]
            holders[p] = tuple(sorted(chosen))
        load = [0.0] * servers
        route = [[0] * len(sizes) for _ in range(workers)]
        for p in range(len(sizes)):
            for k in range(workers):
                w = (p + k) % workers  # rotate who picks first, so no worker always gets the best
                s = min(holders[p], key=lambda s: (load[s], (s - w) % servers))
                route[w][p] = s
                load[s] += sizes[p] / workers
        return cls(
            tuple(sizes), servers, workers, replicas, tuple(holders), tuple(tuple(r) for r in route)
        )

    def held_by(self, server: int) -> list[int]:
        return [p for p, hs in enumerate(self.holders) if server in hs]

    def load(self) -> list[float]:
        """Expected samples each data server sends per epoch."""
        out = [0.0] * self.servers
        for w in range(self.workers):
            for p, s in enumerate(self.route[w]):
                out[s] += self.sizes[p] / self.workers
        return out

    def workers_of(self, server: int) -> list[int]:
        return [w for w in range(self.workers) if server in self.route[w]]

    def describe(self, ranks: tuple[int, ...] | None = None) -> str:
        """Human-readable placement and routing, one line per data server."""
        ranks = ranks or tuple(range(self.servers))
        load = self.load()
        mean = sum(load) / len(load)
        lines = [
            f"data assignment: {plural(len(self.sizes), 'partition')} x {plural(self.replicas, 'replica')}"
            f" on {plural(self.servers, 'data server')}; {plural(self.workers, 'worker')}; load imbalance"
            f" {100 * (max(load) / mean - 1) if mean else 0:.1f}%",
            f"{'data server':>11} {'rank':>5} {'partitions held':<28} {'samples/epoch':>13}"
            "  workers served",
        ]
        for s in range(self.servers):
            held = _ranges(self.held_by(s))
            lines.append(
                f"{s:>11} {ranks[s]:>5} {held:<28} {load[s]:>13.0f}"
                f"  {_ranges(self.workers_of(s)) or '-'}"
            )
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
