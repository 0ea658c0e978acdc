"""The worker's side of a registered model: a torch optimizer whose step pushes and pulls.

``job.optimizer(model, torch.optim.AdamW, lr=3e-4)`` (``mpips.job``) returns a
``DistributedOptimizer``. To the training loop it is a torch optimizer: ``param_groups`` (torch's
LR schedulers, warm-up and ``opt.param_groups[0]["lr"] = ...`` work unchanged), ``zero_grad``,
``step``, ``state_dict``. Its ``step()`` pushes the row gradients of the model's sparse tables
(``job.embedding``), then this worker's gradient to the parameter servers,
with every group's hyperparameters (``mpips.registration.HyperCodec``), and pulls the parameters
the next step computes on, as the sync mode says: bsp waits for the version every worker's
gradient of this step went into (the servers apply their mean, as DDP averages), ssp for one at
most ``staleness`` steps behind, asp for none. The servers run the optimizer; this rank never
steps one.

The model's trainable parameters and their ``.grad`` are views of flat buffers
(``mpips.worker.FlatModel``): several ``backward`` calls accumulate, as in torch. A parameter
that got no gradient since ``zero_grad`` is skipped by the servers, as torch.optim skips a
``None`` gradient. A ``.grad`` that user code replaced (``model.zero_grad()`` sets it to None; an
assignment sets a new tensor) is taken back into the flat buffer at ``step``.

A stop signal (SIGTERM, SIGUSR1 under Slurm; ``mpips.init(handle_signals=True)``) surfaces as
``Preempted`` raised by ``step()`` once the job has stopped at that step boundary, after the
checkpoint where one is configured: catch it, save what the loop needs, and exit with
``exc.status`` (75: requeue me).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mpips.registration import HyperCodec

if TYPE_CHECKING:
    from mpips.client.embedding import SparseEmbedding
    from mpips.client.pushpull import ParameterClient

__all__ = ["DistributedOptimizer", "Preempted"]


class Preempted(Exception):  # noqa: N818 - what the loop catches: the job was preempted
    """The job stopped at this step boundary on a stop signal (checkpointed where configured).

    Attributes:
        step: the optimizer steps taken before the stop.
        status: the exit status to end the process with (75: checkpointed, requeue; 143: stopped
            without a checkpoint directory).
    """

    def __init__(self, step: int, status: int):
        super().__init__(f"stopped on a signal after step {step}; exit with status {status}")
        self.step, self.status = step, status


class DistributedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose step runs on the parameter servers (made by ``Job.optimizer``).

    Args:
        client: the worker's client of this model's servers, started and pulled for step 0.
        local: the user's optimizer class built over the model on this worker (never stepped:
            its ``param_groups`` and ``defaults`` are torch's own, filled in by the class).
        hyper: packs the groups' hyperparameters for each push.
        on_stop: called with the step when the job stops on a signal; returns the exit status.
    """

    def __init__(self, client: ParameterClient, local: torch.optim.Optimizer, hyper: HyperCodec,
                 on_stop: Callable[[int], int], tables: Sequence[SparseEmbedding] = ()):
        self._client, self._hyper, self._on_stop, self._tables = client, hyper, on_stop, list(tables)
        super().__init__(local.param_groups, local.defaults)
        self._registered = True  # the servers' shards are laid out: no more groups
        self._views = [(p, p.grad) for p in client.flat.model.parameters() if p.requires_grad]

    @property
    def steps(self) -> int:
        """Optimizer steps taken (after a resume: counted from the run's start)."""
        return self._client.position

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient. ``.grad`` stays a view of the flat gradient (zeros) whatever
        ``set_to_none`` says; a parameter that then gets no gradient is skipped by the servers,
        exactly as torch.optim skips a ``None`` gradient."""
        self._client.flat.zero_grad()
        for table in self._tables:
            table.zero_grad()
        for p, view in self._views:
            p.grad = view

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Push this worker's gradient, then pull the parameters of the next step (per the sync mode).

        Args:
            closure: re-evaluates the model and returns the loss (called once, before the push).

        Returns:
            The closure's loss, or None.

        Raises:
            Preempted: the job stopped at this boundary on a stop signal.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._take_back_grads()
        for table in self._tables:  # the rows go ahead of the dense push (mpips.rowserver)
            table.push()
        client = self._client
        client.extras[:] = self._hyper.encode(self.param_groups).view("uint8")
        client.step_after_backward()
        if client.await_step(ahead=False) is None:
            raise Preempted(client.position, self._on_stop(client.position))
        return loss

    def server_values(self) -> contextlib.AbstractContextManager[None]:
        """``with opt.server_values(): evaluate(model)``: the model holds the servers' own values
        inside, the values pulled for the next step after it. Only asp/ssp with ``--lookahead``
        (the default there) pull other values: parameters led along the last update."""
        return self._client.server_values()

    def _take_back_grads(self) -> None:
        """Gradients user code put outside the flat buffer: copied in (None: no gradient)."""
        flat = self._client.flat
        for i, (p, view) in enumerate(self._views):
            if p.grad is view:
                continue
            with torch.no_grad():
                if p.grad is None:
                    view.zero_()
                    flat.used[i] = 0
                else:
                    view.copy_(p.grad)
                    flat.used[i] = 1
            p.grad = view

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict of this worker: the groups' hyperparameters and the steps
        taken. The optimizer state itself (moments, ...) lives on the servers: mpips checkpoints
        hold it (``checkpoint_dir``)."""
        state = super().state_dict()
        state["mpips"] = {"steps": self.steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k != "mpips"}
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_registered", False):
            raise ValueError("add_param_group after job.optimizer: the servers' shards are laid out at registration;"
                             " pass every group to job.optimizer(param_groups=...)")
        super().add_param_group(param_group)
