"""FlatModel: a module whose trainable parameters and gradients are views of flat buffers.

A pull writes straight into the model (no copy on the CPU; with ``--pull-codec`` bf16/fp16 the
window widens what it read) and each server's slice of the gradient is a contiguous range that
is pushed as it is, or encoded chunk by chunk (``mpips.compression``). A GPU worker's buffers
are staged through host memory (``mpips.client.staging``) unless MPI reads device memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mpips.client.staging import STAGE_CHUNK_BYTES, CopyEngine, CudaCopyEngine, ImmediateCopyEngine, Staging
from mpips.optim import sum_of_squares
from mpips.precision import param_dtype
from mpips.shard import ShardPlan

__all__ = ["FlatModel"]


class FlatModel:
    """A module whose trainable parameters and their gradients live in flat buffers.

    ``params`` / ``grads`` [plan.numel]: the model's dtype on its device; every trainable
    parameter and its ``.grad`` is a view of them. ``host`` / ``host_grad`` [plan.numel]: the
    float32 "wire" buffers MPI writes (pulls) and reads (pushes): numpy arrays over host memory
    (pinned for a CUDA worker), or float32 device tensors on the direct path (a CUDA-aware MPI).
    Where wire and model buffers are the same memory (a float32 model on the CPU, or on the
    direct path) nothing is copied; otherwise ``staging`` (``mpips.client.staging.Staging``) copies
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
