"""Worker role: pull parameters, compute a gradient on its batch, push it to the servers.

The model's parameters and gradients are views into two flat float32 buffers laid out by the
ShardPlan, so a pull writes straight into the model (no copy on the CPU) and each server's slice
of the gradient is a contiguous range that is sent as it is.

Lifecycle: ``start()`` creates the window (collective over the parameter-server communicator)
-> ``run()`` trains -> ``finish()`` sends the stop messages, receives the final parameters (lead
worker) and frees the window (collective).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpips import faults
from mpips.data import BatchSource, EpochPlan
from mpips.metrics import MetricsLog, Progress
from mpips.models import loss_and_correct
from mpips.shard import ShardPlan
from mpips.transport import (
    HEADER_BYTES,
    Codec,
    MessagePuller,
    ParameterWindow,
    Pusher,
    PushHeader,
    Slot,
    wait_for,
)

if TYPE_CHECKING:
    from mpips.checkpoint import Checkpointing

__all__ = ["FlatModel", "Worker", "evaluate"]


class FlatModel:
    """A module whose parameters and gradients live in flat buffers (host + device)."""

    def __init__(self, model: nn.Module, plan: ShardPlan, device: torch.device):
        self.model, self.plan, self.device = model.to(device), plan, device
        self.host = np.zeros(plan.numel, dtype=np.float32)  # what MPI reads and writes
        self.host_grad = np.zeros(plan.numel, dtype=np.float32)
        if device.type == "cpu":
            self.params, self.grads = torch.from_numpy(self.host), torch.from_numpy(self.host_grad)
        else:  # host staging: copy after a pull and before a push
            self.params = torch.zeros(plan.numel, device=device)
            self.grads = torch.zeros(plan.numel, device=device)
        for spec, p in zip(plan.tensors, model.parameters(), strict=True):
            view = slice(spec.offset, spec.offset + spec.numel)
            self.params[view].copy_(p.data.reshape(-1))
            p.data = self.params[view].view_as(p)
            p.grad = self.grads[view].view_as(p)
        if device.type != "cpu":
            self.host[:] = self.params.cpu().numpy()

    def shard(self, s: int, grad: bool = False) -> np.ndarray:
        lo, hi = self.plan.shard_range(s)
        return (self.host_grad if grad else self.host)[lo:hi]

    def after_pull(self) -> None:
        if self.device.type != "cpu":
            self.params.copy_(torch.from_numpy(self.host), non_blocking=False)

    def before_push(self) -> None:
        if self.device.type != "cpu":
            self.host_grad[:] = self.grads.cpu().numpy()


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 512
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on (x, y)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            xb = torch.from_numpy(x[i : i + batch]).to(device)
            yb = torch.from_numpy(y[i : i + batch]).to(device)
            loss, ok = loss_and_correct(model(xb), yb)
            n = yb.numel()
            total_loss += float(loss) * n
            correct += ok
            count += n
    model.train()
    return total_loss / count, correct / count


@dataclass
class WorkerStats:
    steps: int = 0
    samples: int = 0
    pull_seconds: float = 0.0
    compute_seconds: float = 0.0
    push_seconds: float = 0.0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    max_staleness: int = 0
    last_loss: float = float("nan")
    preempted: bool = False  # stopped early after a preemption checkpoint


class Worker:
    """Worker ``index`` of the parameter-server communicator ``comm``.

    Args:
        comm: parameter-server communicator (servers and workers).
        index: worker index (0..W-1).
        servers: server ranks in ``comm``, by shard index.
        flat: the model in flat buffers.
        source: where batches come from.
        epoch_plan: the sample-order contract.
        sync: "bsp", "asp" or "ssp"; ``staleness`` bounds ssp.
        total_steps: global steps to run; ``first_step`` where to start (resume).
        pull: "rma" or "message".
    """

    def __init__(
        self, *, comm: MPI.Comm, index: int, servers: list[int], flat: FlatModel, source: BatchSource,
        epoch_plan: EpochPlan, sync: str, staleness: int, total_steps: int, pull: str,
        max_inflight: int, stall_timeout: float, metrics: MetricsLog, progress: Progress,
        eval_every: int = 0, on_eval: Callable[[int], None] | None = None, first_step: int = 0,
        checkpoints: Checkpointing | None = None,
    ):
        self.comm, self.index, self.servers, self.flat = comm, index, servers, flat
        self.source, self.epoch_plan, self.sync, self.staleness = source, epoch_plan, sync, staleness
        self.total_steps, self.first_step, self.pull_mode = total_steps, first_step, pull
        self.max_inflight, self.stall_timeout = max_inflight, stall_timeout
        self.metrics, self.progress, self.eval_every, self.on_eval = metrics, progress, eval_every, on_eval
        self.stats = WorkerStats()
        self.checkpoints = checkpoints  # bsp checkpoints and preemption (mpips.checkpoint)
        self.data_wait = 0.0
        self.status = np.zeros((len(servers), HEADER_BYTES // 8), dtype=np.int64)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        plan = self.flat.plan
        sizes = [plan.shard_numel(s) for s in range(plan.servers)]
        self.window = ParameterWindow(self.comm, 0)
        self.pusher = Pusher(self.comm, self.servers, sizes, self.max_inflight)
        if not self.window.rma:
            self.pull_mode = "message"
        self.puller = (
            MessagePuller(self.comm, self.servers, sizes, self.stall_timeout)
            if self.pull_mode == "message" else None
        )
        self.shards = [self.flat.shard(s) for s in range(plan.servers)]

    def run(self) -> WorkerStats:
        model, flat = self.flat.model, self.flat
        model.train()
        start = time.perf_counter()
        for step in range(self.first_step, self.total_steps):
            t0 = time.perf_counter()
            faults.at("pull", step)
            clock = self.pull(self._need(step))
            if self.checkpoints is not None and self.checkpoints.at_boundary(self, step):
                self.stats.preempted = True  # checkpointed at this boundary; the job stops here
                break
            staleness = step - clock
            t1 = time.perf_counter()
            epoch, in_epoch = self.epoch_plan.position(step)
            faults.at("data", step)
            batch = self.source.batch(epoch, in_epoch)
            self.data_wait = time.perf_counter() - t1  # time this step waited for its samples
            flat.grads.zero_()
            loss = torch.zeros(())
            if len(batch):
                x = torch.from_numpy(batch.x).to(flat.device)
                y = torch.from_numpy(batch.y).to(flat.device)
                loss, _ = loss_and_correct(model(x), y)
                loss.backward()
                loss = loss.detach()
            flat.before_push()
            t2 = time.perf_counter()
            grad_norm = float(np.linalg.norm(flat.host_grad.astype(np.float64, copy=False)))
            self.push(step, len(batch), clock, grad_norm, float(loss))
            t3 = time.perf_counter()
            self._account(step, len(batch), float(loss), staleness, t1 - t0, t2 - t1, t3 - t2, start)
            if self.on_eval and self.eval_every and (step + 1) % self.eval_every == 0:
                self.on_eval(step + 1)
        return self.stats

    def finish(self, lead: int) -> np.ndarray | None:
        """Collective: stop the servers; the lead worker (rank ``lead``) gets the final parameters."""
        faults.at("shutdown")
        for s in range(len(self.servers)):
            self.pusher.push(s, PushHeader(0, self.index, Codec.STOP, 0, 0, 0, 0.0, 0.0), None)
        self.pusher.drain()
        self.source.close()
        final = server_stats = None
        me = self.comm.Get_rank()
        if me == lead:
            plan = self.flat.plan
            final = np.empty(plan.numel, dtype=np.float32)
            counts = [0] * self.comm.Get_size()
            displs = [0] * self.comm.Get_size()
            for s, rank in enumerate(self.servers):
                counts[rank], displs[rank] = plan.shard_numel(s), plan.bounds[s]
            self.comm.Gatherv(np.empty(0, np.float32), [final, counts, displs, MPI.FLOAT], root=lead)
        else:
            self.comm.Gatherv(np.empty(0, np.float32), None, root=lead)
        gathered = self.comm.gather(None, root=lead)
        if me == lead:
            server_stats = [gathered[r] for r in self.servers]
        self.window.free()
        self.server_stats = server_stats
        return final

    # -- pull and push -----------------------------------------------------------------------
    def _need(self, step: int) -> int:
        """The slowest-worker clock the parameters for ``step`` must have reached."""
        if self.sync == "bsp":
            return step
        if self.sync == "ssp":
            return step - self.staleness
        return -1

    def pull(self, need: int) -> int:
        """Wait until every server's clock is at least ``need``, then pull; returns the clock."""
        if self.puller is not None:
            self.puller.pull(need, self.status, self.shards)
        else:
            targets, newest = self.servers, None

            def ready() -> bool:
                nonlocal newest
                newest = self.window.read_status(targets, self.status)
                return int(self.status[:, Slot.CLOCK].min()) >= need

            if need >= 0:
                wait_for(ready, lambda: self._lagging(need), self.stall_timeout)
            self.window.pull(targets, self.status, self.shards, which=newest)
        self.stats.bytes_pulled += 4 * self.flat.plan.numel
        self.flat.after_pull()
        return int(self.status[:, Slot.CLOCK].min())

    def _lagging(self, need: int) -> str:
        """Which servers a pull waits for, for the stall message."""
        late = [(s, int(c)) for s, c in enumerate(self.status[:, Slot.CLOCK]) if c < need]
        return (f"the servers to reach clock {need} (window status block): "
                + ", ".join(f"server {s} (rank {self.servers[s]} of the parameter-server communicator)"
                            f" at clock {c}" for s, c in late))

    def push(self, step: int, samples: int, clock: int, grad_norm: float, loss: float) -> None:
        for s in range(len(self.servers)):
            payload = self.flat.shard(s, grad=True)
            header = PushHeader(
                step, self.index, Codec.RAW32, samples, clock, payload.nbytes, grad_norm, loss,
                applied_seen=int(self.status[s, Slot.APPLIED]),
            )
            self.pusher.push(s, header, payload)

    def _account(self, step, samples, loss, staleness, t_pull, t_compute, t_push, start) -> None:
        st = self.stats
        st.steps += 1
        st.samples += samples
        st.pull_seconds += t_pull
        st.compute_seconds += t_compute
        st.push_seconds += t_push
        st.bytes_pushed = self.pusher.bytes_sent
        st.max_staleness = max(st.max_staleness, staleness)
        st.last_loss = loss
        elapsed = time.perf_counter() - start
        rate = st.samples / elapsed if elapsed > 0 else 0.0
        self.metrics.event(
            "step", step + 1, worker=self.index, loss=loss, samples_per_s=rate,
            bytes_pushed=st.bytes_pushed, bytes_pulled=st.bytes_pulled, staleness=staleness,
            server_queue=int(self.status[:, Slot.QUEUE].max()), data_wait_s=self.data_wait,
        )
        self.progress.update(step, loss=loss, **{"samples/s": rate * self.epoch_plan.workers})
