"""Pull ahead, first layers first: a bsp worker pulls each bucket as its server exposes it, and
each module's forward waits only for the buckets of its own parameters.

A bsp server applies a version bucket by bucket, in shard order (``ParameterServer.apply``,
``ParameterWindow.begin_update(lazy=True)``), and after each bucket sends every worker a notice
of how many are readable (``transport.NoticeSender``). The worker starts its step once every
server has exposed a first bucket of the version it needs, and a forward pre-hook on each
module pulls what that module needs and whatever else is readable by then, each server's
buckets in order, in one lock epoch per server. So the first layers compute while the servers
still apply the last, and the pull of one bucket overlaps the server's update of the next: the
priority-based parameter propagation of P3 (Jayarajan et al., SysML 2019) and ByteScheduler
(Peng et al., SOSP 2019), with the server's buckets as the unit. ``finish()`` (before the push)
pulls every bucket not pulled yet and the status blocks.

Which parameters a module needs: a forward pre-hook on the root module takes the parameters it
owns itself; one on every other module but the pure containers (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) takes the parameters of its whole subtree, since a module
may read its children's parameters without calling them (``nn.MultiheadAttention`` reads
``out_proj.weight``). A model that reads a parameter before any module holding it runs (e.g.
``F.linear(x, self.head.weight)`` in the root's forward without calling ``head``) would compute
with the last version. Every step checks for it: a tensor that got a gradient but that no hook
waited for (``covered``) was read unguarded, and the worker then redoes the step after a
whole pull and turns pull-ahead off, with one line. A parameter read before, and again
after, a module holding it runs is not caught (PyTorch FSDP has the same rule: a module's
parameters are ready in its own forward).

Units: bucket ranges are float32 elements of a server's shard (``chunking.bucket_ranges``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from mpips.chunking import bucket_ranges
from mpips.shard import ShardPlan
from mpips.transport import WHOLE, Backoff, NoticeReceiver, ParameterWindow, wait_for

__all__ = ["PullAhead"]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class PullAhead:
    """A bsp worker's bucket-by-bucket pulls of one version, driven by forward pre-hooks.

    Args:
        window: the worker's ``ParameterWindow``.
        notices: its ``NoticeReceiver``.
        servers: server ranks (in the parameter-server communicator), by shard index.
        plan: the shard plan.
        chunk_bytes: ``--chunk-bytes``, from which the servers cut their buckets.
        shards: float32 [shard elements] per server: where the pulls land (the model's memory).
        status: int64 [servers, status words]: where ``finish()`` puts the status blocks.
        what: for the stall message, the servers still applying (``Worker._lagging``).
        timeout: ``--stall-timeout`` seconds.
    """

    def __init__(
        self, window: ParameterWindow, notices: NoticeReceiver, servers: Sequence[int], plan: ShardPlan,
        chunk_bytes: int, shards: Sequence[np.ndarray], status: np.ndarray, what: Callable[[int], str],
        timeout: float,
    ):
        self.window, self.notices, self.servers, self.shards, self.status = window, notices, servers, shards, status
        self.what, self.timeout = what, timeout
        self.buckets = [bucket_ranges(plan.shard_numel(s), chunk_bytes) for s in range(plan.servers)]
        # tensor i -> (server, buckets of it needed: every bucket up to the last it overlaps)
        self.tensor_needs: list[list[tuple[int, int]]] = []
        for t in plan.tensors:
            needs = {}
            for s in range(plan.servers):
                lo, hi = plan.shard_range(s)
                a, b = max(t.offset, lo) - lo, min(t.offset + t.numel, hi) - lo
                if a < b:
                    needs[s] = max(i + 1 for i, (x, y) in enumerate(self.buckets[s]) if x < b and a < y)
            self.tensor_needs.append(sorted(needs.items()))
        self.need: int | None = None  # the clock of the version being pulled; None: nothing pending
        self.have = [0] * len(servers)  # buckets pulled, per server (WHOLE: all and the status block)
        self.waited = 0.0  # seconds forward waited for buckets, this step
        self._took = False  # the last _take pulled something (progress, for the stall clock)
        self.covered = np.zeros(len(plan.tensors), dtype=bool)  # tensors a hook waited for, this step

    def hooks(self, model: nn.Module, trainable: Sequence[nn.Parameter]) -> list[Any]:
        """Register the forward pre-hooks (see the module docstring); returns their handles."""
        index = {id(p): i for i, p in enumerate(trainable)}
        handles = []
        for name, module in model.named_modules():
            if type(module) in CONTAINERS:
                continue
            own = sorted({index[id(p)] for p in module.parameters(recurse=bool(name)) if id(p) in index})
            if own:
                needs: dict[int, int] = {}
                for t in own:
                    for s, k in self.tensor_needs[t]:
                        needs[s] = max(needs.get(s, 0), k)
                wanted = sorted(needs.items())
                handles.append(module.register_forward_pre_hook(
                    lambda _m, _a, own=own, wanted=wanted: self.wait(own, wanted)))
        return handles

    def begin(self, need: int) -> None:
        """Pull the version with clock ``need`` from now on (nothing of it is pulled yet)."""
        self.need, self.have, self.waited = need, [0] * len(self.servers), 0.0
        self.covered[:] = False
        self._take()

    @property
    def pending(self) -> bool:
        return self.need is not None

    def wait(self, tensors: Sequence[int], wanted: Sequence[tuple[int, int]]) -> None:
        """Until server ``s``'s first ``k`` buckets are pulled, for every ``(s, k)`` in ``wanted``
        (which covers plan ``tensors``)."""
        self.covered[tensors] = True
        if self.need is None or all(self.have[s] >= k for s, k in wanted):
            return
        began = time.perf_counter()
        self._until(lambda: all(self.have[s] >= k for s, k in wanted))
        self.waited += time.perf_counter() - began

    def finish(self) -> None:
        """Pull every bucket not pulled yet and the status blocks; nothing is pending after."""
        if self.need is None:
            return
        self._until(lambda: all(h == WHOLE for h in self.have))
        self.need = None

    def _until(self, done: Callable[[], bool]) -> None:
        def ready() -> bool:
            self.notices.poll()
            self._take()
            return done()

        wait_for(ready, lambda: self.what(self.need), self.timeout, moved=lambda: self._took,
                 backoff=Backoff.for_messages())

    def _take(self) -> None:
        """Pull whatever the notices say is readable and is not pulled yet, per server."""
        self._took = False
        for s, target in enumerate(self.servers):
            readable, buffer = self.notices.readable(s, self.need)
            have = self.have[s]
            if have == WHOLE or readable <= have:
                continue
            last = len(self.buckets[s]) if readable == WHOLE else readable
            self.window.pull_ranges(target, buffer, self.buckets[s][have:last], self.shards[s],
                                    self.status[s] if readable == WHOLE else None)
            self.have[s] = readable
            self._took = True
