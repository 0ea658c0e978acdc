"""Worker role of mpips' own loop (``mpips.fit``, ``python -m mpips.train``): a small trainer over
the parameter client.

Each step: ``await_step`` (pull, join a checkpoint), this worker's batch from its source (a data
server, or its own partition), forward and backward under ``--precision``, the push, metrics and
progress, and the lead worker's evaluation every ``--eval-every`` steps. Everything that talks
to the servers is ``mpips.client.ParameterClient``'s.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mpips import faults
from mpips.client import FlatModel, ParameterClient, WorkerStats
from mpips.data import BatchSource, EpochPlan
from mpips.metrics import MetricsLog, Progress
from mpips.precision import Precision, param_dtype
from mpips.tasks import LossFn, TaskMetrics, cross_entropy
from mpips.transport import Slot

if TYPE_CHECKING:
    from mpips.layout import PSContext

__all__ = ["FlatModel", "Worker", "WorkerStats", "device_time", "evaluate", "slow_factor"]

log = logging.getLogger("mpips.worker")


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 512, *,
    task: str = "classification", loss: LossFn | None = None, precision: Precision | None = None,
) -> dict[str, float] | None:
    """Held-out metrics of ``model`` on (x, y) by name (``mpips.tasks.TaskMetrics``: ``loss`` and
    ``accuracy``; ``mse``, ``mae``, ``r2``; ``f1``; ``perplexity``), in eval mode, ``batch``
    samples at a time; None when there are no samples.

    Args:
        x, y: inputs ``(N, *shape)`` and targets ``(N, *target)`` as the workers get them.
        task: ``classification`` | ``regression`` | ``multilabel`` | ``tokens``.
        loss: the job's loss ``(output, target) -> scalar`` (default: cross-entropy).
        precision: the workers' (autocast, input dtype); default: the model's dtype, no autocast.
    """
    if len(y) == 0:
        return None
    loss = loss if loss is not None else cross_entropy
    metrics = TaskMetrics(task)
    if precision is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        precision = Precision("fp32", device, param_dtype(trainable) if trainable else torch.float32)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(y), batch):
            xb = torch.from_numpy(x[i : i + batch])
            yb = torch.from_numpy(y[i : i + batch]).to(device)
            out = precision.forward(model, xb)
            metrics.update(out, yb, loss(out, yb))
    model.train()
    return metrics.result()


def slow_factor(spec: str, index: int) -> float:
    """How much slower worker ``index`` computes: ``MPIPS_SLOW_WORKER="w:f"`` (straggler benchmarks and
    tests) makes worker ``w`` sleep ``f - 1`` times each step's measured forward and backward; 1.0
    for every other worker and without the variable."""
    if not spec:
        return 1.0
    try:
        w, f = spec.split(":")
        which, factor = int(w), float(f)
    except ValueError:
        raise ValueError(f"MPIPS_SLOW_WORKER={spec!r}: expected WORKER:FACTOR, e.g. 1:4.0") from None
    return factor if which == index else 1.0


def device_time(spec: str) -> float:
    """Seconds each step's forward and backward also takes on a device that does not use this
    host's cores: ``MPIPS_DEVICE_MS`` (straggler benchmarks on a host with fewer cores than
    workers); 0.0 without the variable."""
    try:
        ms = float(spec or 0)
    except ValueError:
        raise ValueError(f"MPIPS_DEVICE_MS={spec!r}: expected milliseconds, e.g. 20") from None
    if ms < 0:
        raise ValueError(f"MPIPS_DEVICE_MS={spec!r}: expected milliseconds >= 0")
    return ms / 1000.0


class Worker(ParameterClient):
    """Worker ``index`` of mpips' own loop: pulls parameters, computes a gradient on its batch, pushes it.

    Args:
        ctx: what servers and workers share (communicator, ranks, plan, settings, checkpoints).
        index: worker index (0..W-1).
        flat: the model in flat buffers.
        source: where batches come from.
        epoch_plan: the sample-order contract.
        metrics: JSON-lines events; progress: the lead's progress line.
        on_eval: called with the step after every ``train.eval_every`` steps (the lead's held-out
            evaluation), or None.
        loss: ``(output, target) -> scalar tensor``, the batch mean (default: cross-entropy).
        precision: forward/backward under ``--precision`` (default: fp32, the model's dtype).
    """

    def __init__(
        self, ctx: PSContext, index: int, flat: FlatModel, source: BatchSource, epoch_plan: EpochPlan,
        metrics: MetricsLog, progress: Progress, on_eval: Callable[[int], None] | None = None,
        loss: LossFn | None = None, precision: Precision | None = None,
    ):
        super().__init__(ctx, index, flat, precision)
        self.source, self.epoch_plan = source, epoch_plan
        self.metrics, self.progress, self.on_eval = metrics, progress, on_eval
        self.eval_every = ctx.train.eval_every
        self.loss = loss if loss is not None else cross_entropy  # (output, target) -> scalar tensor
        self.data_wait = 0.0
        self._pulled_before = 0  # bytes_pulled at the end of the previous step (per-step figures)
        self.slow = slow_factor(os.environ.get("MPIPS_SLOW_WORKER", ""), index)
        self.device_s = device_time(os.environ.get("MPIPS_DEVICE_MS", ""))

    def run(self) -> WorkerStats:
        model, flat, tracer = self.flat.model, self.flat, self.tracer
        model.train()
        start = time.perf_counter()
        while self.position < self.total_steps:
            t0 = time.perf_counter()
            clock = self.await_step()
            if clock is None:
                break  # checkpointed (or told to stop) at this boundary; the job stops here
            step = self.position  # bsp --backup-workers: a worker whose push came late skipped ahead
            if step >= self.total_steps:
                break
            staleness = step - clock
            t1 = time.perf_counter()
            epoch, in_epoch = self.epoch_plan.position(step)
            faults.at("data", step)
            with tracer.span("wait for data", step):
                batch = self.source.batch(epoch, in_epoch)
            self.data_wait = time.perf_counter() - t1  # time this step waited for its samples
            flat.zero_grad()
            loss, samples = torch.zeros(()), len(batch)
            streaming = bool(self.streamed) and samples > 0
            if streaming:  # headers now; each chunk as soon as backward has finished it
                self.backward_push.begin(step, {s: self._header(s, step, samples, clock) for s in self.streamed})
            if samples:
                with tracer.span("forward/backward", step):
                    began = time.perf_counter()
                    loss = self._compute(batch)
                    if self.slow > 1.0 or self.device_s:  # a straggler made on purpose (benchmarks, tests)
                        took = time.perf_counter() - began
                        time.sleep(self.slow * (took + self.device_s) - took)
            waited = 0.0
            if self.pull_ahead is not None and self.pull_ahead.pending:
                with tracer.span("pull"):
                    self.pull_ahead.finish()  # the buckets forward did not need, the status blocks
                waited = self.pull_ahead.waited  # forward's waits for buckets count as pulling
            with tracer.span("push", step):
                grad_norm = flat.grad_norm()
                if samples and not math.isfinite(grad_norm) and self.precision.scaler is not None:
                    # fp16 overflow: a skipped step pushes a zero gradient of 0 samples, never NaN/Inf
                    flat.skip_gradient()
                    self.stats.skipped += 1
                    samples, grad_norm = 0, 0.0
                flat.before_push()  # staging: the chunks backward did not copy yet
                t2 = time.perf_counter()
                if streaming:  # what no hook sent, the tails; servers whose pushes fit one chunk: whole
                    self.backward_push.finish(grad_norm, float(loss))
                    whole = [s for s in range(len(self.servers)) if s not in self.streamed]
                    if whole:
                        self.push(step, samples, clock, grad_norm, float(loss), whole)
                else:
                    self.push(step, samples, clock, grad_norm, float(loss))
            self.position = step + 1
            t3 = time.perf_counter()
            self._account(step, len(batch), float(loss), staleness, t1 - t0 + waited, t2 - t1 - waited, t3 - t2,
                          start)
            if self.on_eval and self.eval_every and (step + 1) % self.eval_every == 0:
                with tracer.span("evaluate", step + 1), self.server_values():  # --lookahead: not the led ones
                    self.on_eval(step + 1)
        if not self.stats.preempted:
            self._final_checkpoint()
        return self.stats

    def _compute(self, batch) -> torch.Tensor:  # noqa: ANN001 (mpips.data.Batch)
        """Forward and backward of ``batch`` into the flat gradient; returns the loss (detached).

        Pulling ahead, a tensor that got a gradient though no forward hook waited for it was read
        before its bucket may have come (``mpips.client.pullahead``): the step is computed again after
        a whole pull, module buffers (BatchNorm's statistics) as they were before it, and
        pull-ahead is off for the rest of the run, said in one line.
        """
        flat, model, ahead = self.flat, self.flat.model, self.pull_ahead
        buffers = {k: v.clone() for k, v in model.named_buffers()} if ahead is not None and ahead.pending else None
        for again in (False, True):
            out = self.precision.forward(model, torch.from_numpy(batch.x))
            loss = self.loss(out, torch.from_numpy(batch.y).to(flat.device))
            self.precision.backward(loss)
            if again or buffers is None or not (flat.used.astype(bool) & ~ahead.covered).any():
                break
            unguarded = [t.name for t, u, c in zip(flat.plan.tensors, flat.used, ahead.covered, strict=True)
                         if u and not c]
            log.warning("worker %d: the model reads %s outside the forward of every module that holds it (e.g."
                        " F.linear(x, self.head.weight) without calling head): pull-ahead is off for this run, pulls"
                        " wait for the whole version (--no-pull-ahead says so up front)", self.index,
                        ", ".join(unguarded[:3]) + (" ..." if len(unguarded) > 3 else ""))
            ahead.finish()
            for handle in self._ahead_hooks:
                handle.remove()
            self.pull_ahead = None
            with torch.no_grad():
                for name, value in model.named_buffers():
                    value.copy_(buffers[name])
            flat.zero_grad()
        self.precision.unscale()  # fp16: gradients divided by the loss scale
        return loss.detach()

    def _final_checkpoint(self) -> None:
        """Wait until every worker's last step is applied, then write the run's last checkpoint."""
        if not self.checkpoints.enabled:
            return
        while True:
            clock = self.pull(self.total_steps)
            if self.mode.marks_anytime and self._join_checkpoint(self.position):
                if self.stats.preempted:
                    return
                continue
            if clock >= self.total_steps:
                break
        self.checkpoints.save_final(self.state_dict())

    def finish(self, lead: int) -> np.ndarray | None:
        """Collective: stop the data source and the servers; the lead worker (rank ``lead``) gets
        the final parameters."""
        self.source.close()
        return super().finish(lead)

    def _account(self, step, samples, loss, staleness, t_pull, t_compute, t_push, start) -> None:
        st = self.stats
        st.steps += 1
        st.samples += samples
        st.pull_seconds += t_pull
        st.compute_seconds += t_compute
        st.push_seconds += t_push
        if self.backward_push is not None:
            st.chunks_streamed, st.chunks_in_backward = self.backward_push.sent, self.backward_push.in_backward
        step_pushed, step_pulled = self.pusher.bytes_sent - st.bytes_pushed, st.bytes_pulled - self._pulled_before
        self._pulled_before = st.bytes_pulled
        st.bytes_pushed = self.pusher.bytes_sent
        st.max_staleness = max(st.max_staleness, staleness)
        st.last_loss = loss
        elapsed = time.perf_counter() - start
        rate = st.samples / elapsed if elapsed > 0 else 0.0
        self.metrics.event(
            "step", step + 1, worker=self.index, loss=loss, samples_per_s=rate,
            bytes_pushed=st.bytes_pushed, bytes_pulled=st.bytes_pulled, step_bytes_pushed=step_pushed,
            step_bytes_pulled=step_pulled, staleness=staleness,
            server_queue=int(self.status[:, Slot.QUEUE].max()), data_wait_s=self.data_wait, samples=samples,
        )
        self.progress.update(step, loss=loss, samples_per_s=rate * self.epoch_plan.workers, staleness=staleness,
                             data_wait_s=self.data_wait)
