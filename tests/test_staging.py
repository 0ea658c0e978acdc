"""The staging path (GPU workers without a CUDA-aware MPI) driven on CPU through its copy-engine seam.

``DeferredCopyEngine`` stands in for a side CUDA stream: a copy reads its source when it is
issued (a stream copies what the work before it produced, not what comes later) and writes its
destination only when someone waits for it (the host, or the compute stream), in issue order.
A parameter used before its chunk was waited for therefore still holds its old value, and a
gradient chunk copied before backward finished it carries a partial gradient: either way the
numbers differ from the same model run without staging, which the tests compare with.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mpips.client.staging import stage_chunks
from mpips.shard import ShardPlan
from mpips.worker import FlatModel


class DeferredCopyEngine:
    """A fake side stream: a copy snapshots its source when issued and lands when waited for."""

    def __init__(self):
        self.queue: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.issued = self.done = 0
        self.log: list[str] = []  # "copy k" when issued, "run k" when it runs

    def after_producer(self) -> None:
        self.log.append("producer")

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        self.issued += 1
        self.queue.append((self.issued, dst, src.clone()))
        self.log.append(f"copy {self.issued}")
        return self.issued

    def _run_until(self, event: int) -> None:
        while self.queue and self.queue[0][0] <= event:
            k, dst, src = self.queue.pop(0)
            dst.copy_(src)
            self.done = k
            self.log.append(f"run {k}")

    def wait_host(self, event: int) -> None:
        self._run_until(event)

    def wait_compute(self, event: int) -> None:
        self._run_until(event)


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype)


def _wire_values(plan: ShardPlan, model: nn.Module) -> np.ndarray:
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    assert flat.numel() == plan.numel
    return flat.numpy()


def test_chunks_stay_inside_one_shard_and_cover_every_element():
    plan = ShardPlan.for_module(_model(), 2)
    chunks = stage_chunks(plan, 100)
    covered = np.zeros(plan.numel, dtype=int)
    for s, lo, hi in chunks:
        assert plan.shard_range(s)[0] <= lo < hi <= plan.shard_range(s)[1] and hi - lo <= 100
        covered[lo:hi] += 1
    assert (covered == 1).all()


def test_a_pull_queues_chunk_copies_and_each_layer_waits_only_for_its_own():
    model, plan = _model(), ShardPlan.for_module(_model(), 2)
    engine = DeferredCopyEngine()
    flat = FlatModel(model, plan, torch.device("cpu"), path="staging", engine=engine, stage_chunk_elements=128)
    target = _model(seed=1)  # what the servers publish
    flat.before_pull()
    flat.host[:] = _wire_values(plan, target)
    flat.after_pull()
    chunks = len(stage_chunks(plan, 128))
    assert engine.issued == chunks > 8 and engine.done == 0  # queued; the host waited for nothing
    seen_at_first_layer = []
    model[0].register_forward_hook(lambda *_: seen_at_first_layer.append(engine.done))
    x = torch.randn(7, 16)
    out = model(x)
    torch.testing.assert_close(out, target(x), rtol=0, atol=0)  # every parameter was waited for
    # the first layer computed while the chunks of the later layers were still queued
    first_layer_chunks = -(-(16 * 32 + 32) // 128)
    assert seen_at_first_layer[0] <= first_layer_chunks + 1 < chunks
    assert engine.done == chunks
    # the next pull: before MPI overwrites the wire, every copy reading it has run (a stream
    # reads a host source when it runs, which the snapshots above do not model)
    flat.after_pull()
    assert engine.done < engine.issued
    flat.before_pull()
    assert engine.done == engine.issued == 2 * chunks


def test_backward_copies_each_chunk_once_its_tensors_have_gradients_and_a_push_waits_for_its_shard():
    model, plan = _model(), ShardPlan.for_module(_model(), 2)
    reference = copy.deepcopy(model)
    engine = DeferredCopyEngine()
    flat = FlatModel(model, plan, torch.device("cpu"), path="staging", engine=engine, stage_chunk_elements=128)
    x, y = torch.randn(7, 16), torch.randint(0, 5, (7,))
    flat.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    chunks = len(stage_chunks(plan, 128))
    up_during_backward = flat.staging.copies_up
    # autograd produces the last layer's gradients first: their chunks are copied while the
    # first layer's gradient is still to come
    assert 0 < up_during_backward <= chunks
    first_up = engine.log.index(f"copy {flat.staging.copies_down + 1}")
    assert engine.log[first_up - 1] == "producer"
    flat.before_push()
    assert flat.staging.copies_up == chunks
    nn.functional.cross_entropy(reference(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).numpy()
    for s in range(plan.servers):
        flat.grads_ready(s)
        lo, hi = plan.shard_range(s)
        np.testing.assert_array_equal(flat.shard(s, grad=True), want[lo:hi])
    assert flat.grad_norm() == pytest.approx(float(np.linalg.norm(want)), rel=1e-6)


def test_without_overlap_nothing_is_copied_until_backward_is_done():
    """fp16 loss scaling: the gradients are unscaled after backward, so they are copied after it."""
    model, plan = _model(), ShardPlan.for_module(_model(), 1)
    flat = FlatModel(model, plan, torch.device("cpu"), path="staging", engine=DeferredCopyEngine(),
                     overlap_backward=False, stage_chunk_elements=128)
    flat.zero_grad()
    model(torch.randn(3, 16)).sum().backward()
    assert flat.staging.copies_up == 0
    flat.grads.mul_(0.5)  # what unscaling does
    flat.before_push()
    flat.grads_ready(0)
    assert np.array_equal(flat.shard(0, grad=True), (flat.grads).numpy())


def test_a_tensor_without_gradient_is_copied_as_zeros_at_the_end_of_backward():
    model, plan = _model(), ShardPlan.for_module(_model(), 1)
    engine = DeferredCopyEngine()
    flat = FlatModel(model, plan, torch.device("cpu"), path="staging", engine=engine, stage_chunk_elements=64)
    flat.host_grad[:] = 7.0  # stale bytes from an earlier step
    flat.zero_grad()
    model[4](torch.randn(2, 32)).sum().backward()  # only the last layer gets a gradient
    flat.before_push()
    flat.grads_ready(0)
    last = plan.tensors[-2].offset
    assert (flat.host_grad[:last] == 0).all() and (flat.host_grad[last:] != 7.0).all()
    assert list(flat.mask(0)) == [0, 0, 0, 0, 1, 1]


def test_a_bf16_model_on_cpu_keeps_bf16_parameters_and_a_float32_wire():
    """The real CPU path of a low-precision model: ImmediateCopyEngine casts between the two."""
    model, plan = _model(dtype=torch.bfloat16), ShardPlan.for_module(_model(), 2)
    flat = FlatModel(model, plan, torch.device("cpu"))
    assert flat.staging is not None and flat.dtype == torch.bfloat16 and flat.host.dtype == np.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    values = np.random.default_rng(0).standard_normal(plan.numel).astype(np.float32)
    flat.before_pull()
    flat.host[:] = values
    flat.after_pull()
    np.testing.assert_array_equal(flat.params.float().numpy(), torch.from_numpy(values).bfloat16().float().numpy())
    flat.zero_grad()
    model(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    flat.before_push()
    for s in range(2):
        flat.grads_ready(s)
    np.testing.assert_array_equal(flat.host_grad, flat.grads.float().numpy())


def test_staging_refuses_an_unknown_path():
    with pytest.raises(ValueError, match="path must be host, staging or direct"):
        FlatModel(_model(), ShardPlan.for_module(_model(), 1), torch.device("cpu"), path="rdma")



def test_twenty_steps_through_the_staging_path_are_bitwise_the_host_path():
    """The CPU stand-in for "bsp on GPU against CPU": a loop of pull, forward, backward, push and
    an SGD step on the wire values, once with MPI's buffers shared with the model (the CPU host
    path) and once through staged, deferred chunk copies. A copy missed, or reused from the step
    before, changes the numbers."""
    torch.manual_seed(3)
    data = [(torch.randn(8, 16), torch.randint(0, 5, (8,))) for _ in range(20)]

    def train(path: str, engine) -> np.ndarray:
        model = _model()
        plan = ShardPlan.for_module(model, 2)
        flat = FlatModel(model, plan, torch.device("cpu"), path=path, engine=engine, stage_chunk_elements=100)
        values = _wire_values(plan, _model()).copy()  # the servers' float32 master
        for x, y in data:
            flat.before_pull()
            flat.host[:] = values
            flat.after_pull()
            flat.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            flat.before_push()
            for s in range(plan.servers):
                flat.grads_ready(s)
                lo, hi = plan.shard_range(s)
                values[lo:hi] -= 0.1 * flat.shard(s, grad=True)
        return values

    host = train("host", None)
    staged = train("staging", DeferredCopyEngine())
    np.testing.assert_array_equal(staged, host)
    assert not np.array_equal(host, _wire_values(ShardPlan.for_module(_model(), 2), _model()))
