"""Worker role: pull parameters, compute a gradient on its batch, push it to the servers.

The model's parameters and gradients are views into two flat float32 buffers laid out by the
ShardPlan, so a pull writes straight into the model (no copy on the CPU; with ``--pull-codec``
bf16/fp16 the window widens what it read) and each server's slice of the gradient is a
contiguous range that is sent as it is, or with ``--compress`` encoded chunk by chunk
(``mpips.compression``, error-feedback residuals in ``state_dict``).

In bsp over windows a CPU worker pulls ahead (``mpips.pullahead``): it starts a step once every
server has published a first bucket of the version, and each module's forward waits only for
the buckets of its own parameters.

Push during backward (``mpips.backwardpush``, ``--push-during-backward``, bsp): a push longer
than one chunk leaves while backward runs: the gradient hooks ``FlatModel`` registers send each
chunk as soon as every tensor on it has its gradient, last first (``BackwardChunks``), the first
after the push's header; the tail (mask, norm, loss) follows backward. Only where a gradient
is final when its hook fires: float32 parameters on the CPU, no fp16 loss scaling; elsewhere the
push goes after backward in the same messages (see ``mpips.transport``).

Lifecycle: ``start()`` creates the window (collective over the parameter-server communicator)
-> ``run()`` trains -> ``finish()`` sends the stop messages, receives the final parameters (lead
worker) and frees the window (collective).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mpips import faults
from mpips.backwardpush import BackwardPush
from mpips.compression import chunk_ranges, chunk_seed, make_codec, make_encoder, parse_chunk
from mpips.data import BatchSource, EpochPlan
from mpips.metrics import MetricsLog, Progress
from mpips.optim import sum_of_squares
from mpips.precision import Precision, param_dtype
from mpips.pullahead import PullAhead
from mpips.shard import ShardPlan
from mpips.staging import STAGE_CHUNK_BYTES, CopyEngine, CudaCopyEngine, ImmediateCopyEngine, Staging
from mpips.tasks import LossFn, TaskMetrics, cross_entropy
from mpips.trace import NULL_TRACER, NullTracer, Tracer
from mpips.transport import (
    HEADER_BYTES,
    PULL_CODECS,
    Codec,
    MessagePuller,
    NoticeReceiver,
    ParameterWindow,
    Pusher,
    PushHeader,
    PushLayout,
    Slot,
    Tag,
    recv_chunks,
    wait_all,
    wait_for,
)

if TYPE_CHECKING:
    from mpips.layout import PSContext

__all__ = ["FlatModel", "Worker", "evaluate"]

log = logging.getLogger("mpips.worker")


class FlatModel:
    """A module whose trainable parameters and their gradients live in flat buffers.

    ``params`` / ``grads`` [plan.numel]: the model's dtype on its device; every trainable
    parameter and its ``.grad`` is a view of them. ``host`` / ``host_grad`` [plan.numel]: the
    float32 "wire" buffers MPI writes (pulls) and reads (pushes): numpy arrays over host memory
    (pinned for a CUDA worker), or float32 device tensors on the direct path (a CUDA-aware MPI).
    Where wire and model buffers are the same memory (a float32 model on the CPU, or on the
    direct path) nothing is copied; otherwise ``staging`` (``mpips.staging.Staging``) copies
    chunk by chunk, overlapped with forward and backward, on ``engine``.

    Only parameters with ``requires_grad`` are in the flat buffers (``plan``); frozen parameters
    and buffers stay in the module, as they are. ``used[i]`` says whether tensor ``i`` of the plan
    received a gradient since ``zero_grad()`` (torch leaves ``.grad`` None for the others, and
    torch.optim then skips them: the servers do the same with this mask).

    Args:
        model: the module; its trainable parameters must share one dtype (float32, bfloat16 or
            float16; ``mpips.precision.param_dtype``).
        plan: the shard plan of its trainable parameters.
        device: where it computes.
        path: ``"host"`` or ``"staging"`` (wire in host memory) or ``"direct"`` (wire on the
            device); see ``mpips.cuda_aware.decide``.
        engine: the copy engine for staging (default: ``CudaCopyEngine`` on a CUDA device,
            ``ImmediateCopyEngine`` on the CPU).
        overlap_backward: copy gradient chunks during backward (off under fp16 loss scaling).
        stage_chunk_elements: the largest staged copy, in elements.
    """

    def __init__(self, model: nn.Module, plan: ShardPlan, device: torch.device, path: str = "host",
                 engine: CopyEngine | None = None, overlap_backward: bool = True,
                 stage_chunk_elements: int = STAGE_CHUNK_BYTES // 4):
        if path not in ("host", "staging", "direct"):
            raise ValueError(f"path must be host, staging or direct, got {path!r}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.dtype = param_dtype(trainable)
        self.model, self.plan, self.device, self.path = model.to(device), plan, device, path
        n, cuda = plan.numel, device.type == "cuda"
        if path == "direct":
            wire, wire_grad = torch.zeros(n, device=device), torch.zeros(n, device=device)
            self.host, self.host_grad = wire, wire_grad
        else:  # host memory; pinned for a GPU, or asynchronous copies would be synchronous
            wire = torch.zeros(n, dtype=torch.float32, pin_memory=cuda)
            wire_grad = torch.zeros(n, dtype=torch.float32, pin_memory=cuda)
            self.host, self.host_grad = wire.numpy(), wire_grad.numpy()  # what MPI reads and writes
        if path != "staging" and wire.device == device and self.dtype == torch.float32:
            self.params, self.grads = wire, wire_grad  # one buffer: MPI and the model share it
        else:
            self.params = torch.zeros(n, dtype=self.dtype, device=device)
            self.grads = torch.zeros(n, dtype=self.dtype, device=device)
        self.used = np.zeros(len(trainable), dtype=np.uint8)
        # called with i after tensor i's gradient is accumulated (Worker: streams pushes in backward)
        self.on_grad: Callable[[int], None] | None = None
        self.staging: Staging | None = None
        if self.params is not wire:
            engine = engine or (CudaCopyEngine(device) if cuda else ImmediateCopyEngine())
            self.staging = Staging(engine, plan, wire, wire_grad, self.params, self.grads,
                                   chunk_elements=stage_chunk_elements, overlap_backward=overlap_backward)
        for i, (spec, p) in enumerate(zip(plan.tensors, trainable, strict=True)):
            view = slice(spec.offset, spec.offset + spec.numel)
            with torch.no_grad():
                self.params[view].copy_(p.data.reshape(-1))
                wire[view].copy_(p.data.reshape(-1))
            p.data = self.params[view].view_as(p)
            p.grad = self.grads[view].view_as(p)
            p.register_post_accumulate_grad_hook(lambda _, i=i: self._grad_done(i))
        if self.staging is not None:
            self.staging.forward_hooks(self.model, trainable)
        self._mask_index = [plan.server_tensor_indices(s) for s in range(plan.servers)]

    def _grad_done(self, i: int) -> None:
        self.used[i] = 1
        if self.staging is not None:
            self.staging.grad_done(i)
        if self.on_grad is not None:
            self.on_grad(i)

    @property
    def final_in_backward(self) -> bool:
        """Whether a tensor's gradient is final when its hook fires, in the wire buffer MPI reads:
        float32 parameters on the CPU, no staging (fp16 loss scaling unscales after backward:
        the caller checks that)."""
        return self.staging is None and self.device.type == "cpu"

    def shard(self, s: int, grad: bool = False) -> np.ndarray | torch.Tensor:
        """Server ``s``'s slice of the wire buffer (float32; numpy, or a device tensor if direct)."""
        lo, hi = self.plan.shard_range(s)
        return (self.host_grad if grad else self.host)[lo:hi]

    def mask(self, s: int) -> np.ndarray:
        """uint8 [tensor runs of server ``s``]: 1 where that run's tensor got a gradient."""
        return self.used[self._mask_index[s]]

    def zero_grad(self) -> None:
        if self.staging is not None:
            self.staging.start_backward()  # the last step's gradient copies are done
        self.grads.zero_()
        self.used[:] = 0

    def before_pull(self) -> None:
        """Before MPI overwrites the wire: the last pull's copies out of it are done."""
        if self.staging is not None:
            self.staging.before_pull()

    def after_pull(self) -> None:
        """After a pull: queue the copies to the model (forward waits for each module's chunks)."""
        if self.staging is not None:
            self.staging.after_pull()

    def before_push(self) -> None:
        """After backward (and unscaling): the gradient chunks backward did not copy yet."""
        if self.staging is not None:
            self.staging.finish_backward()

    def grads_ready(self, s: int) -> None:
        """Before MPI reads server ``s``'s gradient slice: its copies are done, or on the direct
        path the compute stream that produced it is (a CUDA-aware MPI does not wait on streams)."""
        if self.staging is not None:
            self.staging.grads_ready(s)
        elif self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def grad_norm(self) -> float:
        """L2 norm of the whole gradient (float; NaN or Inf where it is not finite)."""
        if self.staging is None and isinstance(self.host_grad, np.ndarray):
            return sum_of_squares(self.host_grad) ** 0.5  # numpy, float32 on the host (as before)
        return float(torch.linalg.vector_norm(self.grads, dtype=torch.float32))

    def skip_gradient(self) -> None:
        """A skipped step (fp16 overflow): zero gradient, no tensor marked as having one."""
        self.grads.zero_()
        self.used[:] = 0

    def load_wire(self, values: np.ndarray) -> None:
        """Set the parameters to float32 ``values`` [plan.numel] (the final gather), through the wire."""
        if isinstance(self.host, np.ndarray):
            self.before_pull()
            self.host[:] = values
        else:
            self.host.copy_(torch.from_numpy(values))
        self.after_pull()

    @staticmethod
    def module_state_of(model: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state the servers do not hold: buffers and frozen parameters, by name."""
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        return {**dict(model.named_buffers()), **frozen}

    def module_state(self) -> dict[str, torch.Tensor]:
        return self.module_state_of(self.model)

    def load_module_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as ``module_state`` returns it) into the module, in place."""
        mine = self.module_state()
        if state.keys() != mine.keys():
            raise ValueError(f"module state has {sorted(state)}, the model {sorted(mine)}")
        with torch.no_grad():
            for name, value in state.items():
                mine[name].copy_(value)


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
    skipped: int = 0  # fp16: steps whose gradient overflowed and was not pushed (0 samples instead)
    chunks_streamed: int = 0  # gradient chunks of streamed pushes (push during backward)
    chunks_in_backward: int = 0  # of those, sent from a gradient hook, before backward returned
    preempted: bool = False  # stopped early after a preemption checkpoint


class Worker:
    """Worker ``index``: pulls parameters, computes a gradient on its batch, pushes it.

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

    ``tracer`` (an attribute, set after construction; ``mpips.trace``) records the spans of a step.
    """

    tracer: Tracer | NullTracer = NULL_TRACER

    def __init__(
        self, ctx: PSContext, index: int, flat: FlatModel, source: BatchSource, epoch_plan: EpochPlan,
        metrics: MetricsLog, progress: Progress, on_eval: Callable[[int], None] | None = None,
        loss: LossFn | None = None, precision: Precision | None = None,
    ):
        self.ctx, self.index, self.flat, self.source, self.epoch_plan = ctx, index, flat, source, epoch_plan
        self.precision = precision if precision is not None else Precision("fp32", flat.device, flat.dtype)
        self.metrics, self.progress, self.on_eval = metrics, progress, on_eval
        train = ctx.train
        self.comm, self.servers, self.checkpoints = ctx.comm, ctx.servers, ctx.checkpoints
        self.sync, self.staleness, self.eval_every = train.sync, train.staleness, train.eval_every
        self.total_steps, self.pull_mode = ctx.total_steps, ctx.pull  # pull_mode: "message" if no RMA
        self.max_inflight, self.stall_timeout = train.max_inflight, train.stall_timeout
        self.chunk_bytes = train.chunk_bytes
        self.compression, self.seed = ctx.compression, train.seed  # the push codec (None: float32)
        self.codec, self.encoder = None, None  # set by start()
        self.stats = WorkerStats()
        self.loss = loss if loss is not None else cross_entropy  # (output, target) -> scalar tensor
        self.position = 0  # the next step this worker computes (``load_state_dict`` sets it on resume)
        self.data_wait = 0.0
        self._pulled_before = 0  # bytes_pulled at the end of the previous step (per-step figures)
        self.status = np.zeros((len(self.servers), HEADER_BYTES // 8), dtype=np.int64)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        plan = self.flat.plan
        sizes = [plan.shard_numel(s) for s in range(plan.servers)]
        runs = [len(plan.server_pieces(s)) for s in range(plan.servers)]
        c = self.compression
        self.pull_codec = c.pull_codec if c else "fp32"
        self.window = ParameterWindow(self.comm, 0, chunk_bytes=self.chunk_bytes, pull_codec=self.pull_codec)
        self.codec = (make_codec(c.compress, c.compress_ratio, c.qsgd_levels, c.feedback(), c.sparsity_warmup)
                      if c else None)
        self.encoder = (make_encoder(self.codec, plan.numel, c.feedback(), *c.worker_momentum(self.ctx.optim))
                        if self.codec else None)
        self.wire_codec = Codec(self.codec.wire_id) if self.codec is not None else Codec.RAW32  # push headers
        if self.flat.path == "direct" and (self.codec is not None or self.pull_codec != "fp32"):
            raise ValueError("the direct path moves float32 device buffers: no --compress or --pull-codec"
                             " (mpips.train stages through host memory when they are set)")
        self.ranges = [chunk_ranges(n, self.chunk_bytes) for n in sizes]  # the codec's chunks per slice
        layouts = [PushLayout.of(self.codec, rg, r) for rg, r in zip(self.ranges, runs, strict=True)]
        # bsp: a worker's next push comes after the notice that its last one is applied, so one
        # send buffer per server is never waited on; asp/ssp keep --max-inflight in flight
        inflight = 1 if self.sync == "bsp" else self.max_inflight
        self.pusher = Pusher(self.comm, self.servers, layouts, inflight, chunk_bytes=self.chunk_bytes,
                             device=self.flat.device if self.flat.path == "direct" else None)
        # push during backward, in bsp: the servers whose pushes take more than one chunk, where
        # each tensor's gradient is final when its hook fires (not under fp16 loss scaling: the
        # scaler unscales, and finds overflows, only after backward; not staged: copies come
        # later). Not in asp/ssp: a server takes in one push at a time, and a streamed push holds
        # it for the whole of its worker's backward while the others' pushes wait (measured: a
        # GPT at 2 workers, asp, 39 samples/s streamed against 58 pushed after backward)
        streamed = [s for s, st in enumerate(self.pusher.streamed) if st]
        final = self.flat.final_in_backward and self.precision.scaler is None
        on = self.ctx.train.push_during_backward and self.sync == "bsp"
        self.streamed = streamed if on and final else []
        if not self.window.rma:
            self.pull_mode = "message"
        self.puller = (
            MessagePuller(self.comm, self.servers, sizes, self.stall_timeout, chunk_bytes=self.chunk_bytes,
                          pull_codec=self.pull_codec)
            if self.pull_mode == "message" else None
        )
        self.shards = [self.flat.shard(s) for s in range(plan.servers)]
        self.backward_push = (BackwardPush(self.flat, self.pusher, self.streamed, self.ranges, self.chunk_bytes,
                                           self.codec, self.encoder, self.seed, self.index)
                              if self.streamed else None)
        # bsp over windows: the servers announce each version (transport.NoticeSender), bucket
        # by bucket, and a CPU worker pulls the buckets as they come (mpips.pullahead)
        self.notices = (NoticeReceiver(self.comm, self.servers)
                        if self.sync == "bsp" and self.pull_mode == "rma" else None)
        self.pull_ahead = None
        if self.notices is not None and self.ctx.train.pull_ahead and self.flat.staging is None \
                and self.flat.path == "host":
            self.pull_ahead = PullAhead(self.window, self.notices, self.servers, plan, self.chunk_bytes, self.shards,
                                        self.status, lambda need: self._lagging(need, self.notices.clock),
                                        self.stall_timeout)
            trainable = [p for p in self.flat.model.parameters() if p.requires_grad]
            self._ahead_hooks = self.pull_ahead.hooks(self.flat.model, trainable)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this worker.

        ``position``: the next step (int); ``rng``: torch's CPU RNG state (uint8 tensor);
        ``module``: buffers and frozen parameters by name (``FlatModel.module_state``);
        ``residual``: the error-feedback residual, float32 [numel] (a view), only with error feedback;
        ``momentum``: --momentum-correction's momentum, float32 [numel] (a view), only with it;
        ``scaler``: ``Precision.state_dict()``, fp16's loss scale and growth tracker ({} otherwise).
        """
        state = {"position": self.position, "rng": torch.get_rng_state(), "module": self.flat.module_state()}
        if self.encoder is not None:
            state.update(self.encoder.state_dict())
        state["scaler"] = self.precision.state_dict()  # [restart] fp16's loss scale; {} otherwise
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        torch.set_rng_state(state["rng"])
        self.flat.load_module_state(state["module"])
        self.precision.load_state_dict(state.get("scaler"))  # [restart]
        if self.encoder is not None:
            self.encoder.load_state_dict(state)

    def run(self) -> WorkerStats:
        model, flat, tracer = self.flat.model, self.flat, self.tracer
        model.train()
        start = time.perf_counter()
        while self.position < self.total_steps:
            step = self.position
            t0 = time.perf_counter()
            faults.at("pull", step)
            clock = self.pull(self._need(step), ahead=True)
            joined = self._join_checkpoint(step)
            if self.stats.preempted:
                break  # checkpointed (or told to stop) at this boundary; the job stops here
            if joined and self.sync != "bsp":
                continue  # the servers applied the other workers' last pushes meanwhile: pull again
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
                    loss = self._compute(batch)
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
                with tracer.span("evaluate", step + 1):
                    self.on_eval(step + 1)
        if not self.stats.preempted:
            self._final_checkpoint()
        return self.stats

    def _compute(self, batch) -> torch.Tensor:  # noqa: ANN001 (mpips.data.Batch)
        """Forward and backward of ``batch`` into the flat gradient; returns the loss (detached).

        Pulling ahead, a tensor that got a gradient though no forward hook waited for it was read
        before its bucket may have come (``mpips.pullahead``): the step is computed again after
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

    def _join_checkpoint(self, step: int) -> bool:
        """Join a checkpoint (or stop) the servers published; True if one was joined.

        bsp: the servers publish mark ``k`` (``-k``: then stop) with clock ``k``, agreed among
        them; a worker about to compute step ``k`` joins. asp/ssp: server 0 publishes a mark at
        any time; a worker sees it in its next pull, sends JOIN after its last push (so every
        server has applied all its pushes first) and joins with its position. See
        ``mpips.checkpoint`` for what each protocol guarantees.
        """
        ckpt = self.checkpoints
        ckpt.ring(self.window, self.servers[0])
        marks = {int(m) for m in self.status[:, Slot.CHECKPOINT]} - {0}
        if self.sync == "bsp":
            if step == 0 or marks not in ({step}, {-step}):
                return False
        elif not marks:
            return False
        if len(marks) != 1:
            raise RuntimeError(f"worker {self.index}: the servers published different checkpoint marks {marks}")
        mark = marks.pop()
        if self.sync != "bsp":
            for s in range(len(self.servers)):
                self.pusher.push(s, PushHeader(self.position, self.index, Codec.JOIN, 0, mark, 0, 0.0, 0.0))
        self.stats.preempted = ckpt.save(abs(mark), mark < 0, self.state_dict())
        return True

    def _final_checkpoint(self) -> None:
        """Wait until every worker's last step is applied, then write the run's last checkpoint."""
        if not self.checkpoints.enabled:
            return
        while True:
            clock = self.pull(self.total_steps)
            if self.sync != "bsp" and self._join_checkpoint(self.position):
                if self.stats.preempted:
                    return
                continue
            if clock >= self.total_steps:
                break
        self.checkpoints.save_final(self.state_dict())

    def finish(self, lead: int) -> np.ndarray | None:
        """Collective: stop the servers; the lead worker (rank ``lead``) gets the final parameters."""
        faults.at("shutdown")
        for s in range(len(self.servers)):
            self.pusher.push(s, PushHeader(0, self.index, Codec.STOP, 0, 0, 0, 0.0, 0.0))
        self.pusher.drain()
        if self.notices is not None:
            self.notices.close(self.stall_timeout)
        self.source.close()
        final = server_stats = None
        me = self.comm.Get_rank()
        if me == lead:  # every server sends its shard here, in chunks
            plan = self.flat.plan
            final = np.empty(plan.numel, dtype=np.float32)
            requests = [r for s, rank in enumerate(self.servers)
                        for r in recv_chunks(self.comm, final[slice(*plan.shard_range(s))], rank, Tag.FINAL,
                                             self.chunk_bytes)]
            wait_all(requests, "the final shards of every server", self.stall_timeout)
        gathered = self.comm.gather(self.stats, root=lead)  # servers send theirs, workers these
        if me == lead:
            server_stats = [gathered[r] for r in self.servers]
            self.worker_stats = [g for g in gathered if isinstance(g, WorkerStats)]
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

    def pull(self, need: int, ahead: bool = False) -> int:
        """Wait until every server's clock is at least ``need``, then pull; returns the clock.

        ``ahead`` (a step's pull, bsp with ``self.pull_ahead``): wait only until every server has
        exposed a first bucket of that version; forward pulls the rest as it goes
        (``mpips.pullahead``) and ``pull_ahead.finish()`` completes it. A checkpoint mark in
        the notices makes it a whole pull (the boundary's checkpoint reads the status blocks).
        """
        self.flat.before_pull()
        if ahead and self.pull_ahead is not None:
            with self.tracer.span("wait for parameters"):
                self.notices.wait_started(need, lambda: self._lagging(need, self.notices.clock), self.stall_timeout)
            self.pull_ahead.begin(need)
            if self.notices.mark.any():
                self.pull_ahead.finish()
            else:
                self.status[:, Slot.CHECKPOINT] = 0
            self.stats.bytes_pulled += PULL_CODECS[self.pull_codec].itemsize * self.flat.plan.numel
            return need
        if self.puller is not None:
            with self.tracer.span("pull"):
                self.puller.pull(need, self.status, self.shards)
        elif self.notices is not None:  # bsp: wait for the notices, pull the buffers they name
            with self.tracer.span("wait for parameters"):
                self.notices.wait(need, lambda: self._lagging(need, self.notices.clock), self.stall_timeout)
            with self.tracer.span("pull"):
                self.window.pull(self.servers, self.status, self.shards, which=list(self.notices.buffer))
        else:
            targets, newest = self.servers, None

            def ready() -> bool:
                nonlocal newest
                newest = self.window.read_status(targets, self.status)
                # asp/ssp: a checkpoint mark ends the wait too (a waiting worker must join it)
                marked = self.sync != "bsp" and bool(self.status[:, Slot.CHECKPOINT].any())
                return int(self.status[:, Slot.CLOCK].min()) >= need or marked

            if need >= 0:
                with self.tracer.span("wait for parameters"):
                    wait_for(ready, lambda: self._lagging(need), self.stall_timeout)
            with self.tracer.span("pull"):
                self.window.pull(targets, self.status, self.shards, which=newest)
        self.stats.bytes_pulled += PULL_CODECS[self.pull_codec].itemsize * self.flat.plan.numel
        self.flat.after_pull()
        return int(self.status[:, Slot.CLOCK].min())

    def _lagging(self, need: int, clocks: np.ndarray | None = None) -> str:
        """Which servers a pull waits for, for the stall message (``clocks``: from notices)."""
        told = "window status block" if clocks is None else "their notices"
        clocks = self.status[:, Slot.CLOCK] if clocks is None else clocks
        late = [(s, int(c)) for s, c in enumerate(clocks) if c < need]
        return (f"the servers to reach clock {need} ({told}): "
                + ", ".join(f"server {s} (rank {self.servers[s]} of the parameter-server communicator)"
                            f" at clock {c}" for s, c in late))

    def _header(self, s: int, step: int, samples: int, clock: int) -> PushHeader:
        """A streamed push's header: what is known before backward (``Pusher.begin``)."""
        return PushHeader(step, self.index, self.wire_codec, samples, clock, 0, 0.0, 0.0,
                          applied_seen=int(self.status[s, Slot.APPLIED]))

    def push(self, step: int, samples: int, clock: int, grad_norm: float, loss: float,
             servers: list[int] | None = None) -> None:
        """Push the whole gradient (after backward) to ``servers`` (default: all)."""
        targets = range(len(self.servers)) if servers is None else servers
        encoded: dict[int, list[np.ndarray]] = {}
        if self.codec is not None and self.sync != "bsp" and self.ctx.optim.clip_grad_norm and math.isfinite(grad_norm):
            encoded = {s: self._parts(s, step, True) for s in targets}  # [restart] asp/ssp clip by the norm
            grad_norm = self._decoded_norm(step, encoded)  # of what the servers decode and apply
        for s in targets:
            parts, mask = encoded.get(s) or self._parts(s, step, np.isfinite(grad_norm)), self.flat.mask(s)
            header = PushHeader(
                step, self.index, self.wire_codec, samples, clock, sum(p.nbytes for p in parts) + mask.nbytes,
                grad_norm, loss, applied_seen=int(self.status[s, Slot.APPLIED]),
            )
            self.pusher.push(s, header, *parts, mask)

    def _parts(self, s: int, step: int, finite: bool) -> list[np.ndarray]:
        """Server ``s``'s slice of the gradient as it is sent: raw, or one codec record per chunk."""
        self.flat.grads_ready(s)  # staged: this shard's chunks are copied; direct: computed
        payload = self.flat.shard(s, grad=True)
        return [payload] if self.codec is None else self._encode(s, step, payload, finite)

    def _decoded_norm(self, step: int, encoded: dict[int, list[np.ndarray]]) -> float:
        """[restart] The L2 norm of the whole gradient as the servers decode it from ``encoded``
        (every server's records), which asp/ssp servers clip by (``--clip-grad-norm``)."""
        total = 0.0
        for s, records in encoded.items():
            for c, ((a, b), record) in enumerate(zip(self.ranges[s], records, strict=True)):
                seed = chunk_seed(self.seed, step, self.index, s, c)
                total += sum_of_squares(parse_chunk(self.codec, record, b - a, seed)[0].values.numpy())
        return math.sqrt(total)

    def _encode(self, s: int, step: int, grad: np.ndarray, finite: bool) -> list[np.ndarray]:
        """One codec record per chunk of server ``s``'s gradient slice (``mpips.compression``).

        A non-finite gradient (which the server drops) is encoded without error feedback, so
        its NaN or Inf does not stay in the residual.
        """
        g, lo = torch.from_numpy(grad), self.flat.plan.shard_range(s)[0]
        self.encoder.begin_step(step)  # --sparsity-warmup: this step's fraction
        seeds = [chunk_seed(self.seed, step, self.index, s, c) for c in range(len(self.ranges[s]))]
        if not finite:
            return [self.codec.encode(g[a:b], seed) for (a, b), seed in zip(self.ranges[s], seeds, strict=True)]
        return [self.encoder.encode(g[a:b], seed, lo + a) for (a, b), seed in zip(self.ranges[s], seeds, strict=True)]

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
