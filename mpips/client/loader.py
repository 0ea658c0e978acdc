"""``job.loader``: a worker's batches of the job's dataset, in the order of ``mpips.data.EpochPlan``.

Opening one is collective over the workers and data servers (``open_data``): the dataset is
opened as ``mpips.train`` opens it, the epochs are planned, and a data server serves its
partitions (``mpips.dataserver``) until every worker's source is closed; without data servers
each worker reads its own partition.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from mpips.data import DatasetHandle, EpochPlan, LocalSource, open_dataset
from mpips.dataserver import RemoteSource, run_data_server
from mpips.errors import INPUT_ERRORS, what
from mpips.startup import total_steps
from mpips.watchdog import abort_job

if TYPE_CHECKING:
    from mpips.job import Job

__all__ = ["Loader", "open_data"]


class Loader:
    """A worker's batches of the run's steps (made by ``Job.loader``).

    Iterating it yields ``(x, y)`` tensors for each global step from the optimizer's position to
    ``steps`` (across epochs: ``steps_per_epoch`` steps make one), then closes the source.

    Attributes:
        steps: the run's global steps.
        steps_per_epoch: steps in one epoch over the training split.
        val_x, val_y: the held-out split (numpy arrays), for the loop's own evaluation.
    """

    def __init__(self, source: Any, plan: EpochPlan, steps: int, data: DatasetHandle, start: Callable[[], int]):
        self.source, self.plan, self.steps, self._start = source, plan, steps, start
        self.steps_per_epoch = plan.steps_per_epoch
        self.val_x, self.val_y = data.val_x, data.val_y

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self._start()
        while step < self.steps:
            batch = self.source.batch(*self.plan.position(step))
            yield torch.from_numpy(batch.x), torch.from_numpy(batch.y)
            # one step on, or to where the optimizer is (bsp's backup workers: a late worker skips ahead)
            step = max(step + 1, self._start())
        self.close()

    def close(self) -> None:
        """Tell the data servers this worker is done (also done by ``job.finish``)."""
        self.source.close()


def open_data(job: Job, request: dict[str, Any]) -> tuple[Any, EpochPlan, int, DatasetHandle]:
    """Collective over workers and data servers: open the dataset, plan the epochs; a data
    server serves its partitions until every worker's source is closed."""
    cfg = copy.deepcopy(job.config)
    cfg.data.data = request["data"] if request["data"] is not None else cfg.data.data
    cfg.data.batch_size = request["batch_size"] or cfg.data.batch_size
    cfg.train.steps = request["steps"] if request["steps"] is not None else cfg.train.steps
    cfg.train.epochs = request["epochs"] if request["epochs"] is not None else cfg.train.epochs
    d = cfg.data
    try:
        cfg.validate()
        with job.dog.blocking("job.loader: opening the dataset (collective over workers and data servers)"):
            data = open_dataset(d.dataset, d.data, context=cfg.model.gpt_context, comm=job.data_comm,
                                data_dir=d.data_dir, data_servers=len(job.layout.data_servers),
                                replicas=d.replicas, cache_mb=d.cache_mb, x_key=d.x_key, y_key=d.y_key,
                                task=d.task, num_classes=d.num_classes, val_data=d.val_data)
    except INPUT_ERRORS as exc:  # the same on every worker and data server; the servers wait elsewhere
        if job.data_comm.Get_rank() == 0:
            print(f"mpips: bad {what(exc)}: {exc}", file=sys.stderr, flush=True)
        job.data_comm.Barrier()
        abort_job(job.comm, 2)
    plan = data.plan(job.num_workers, d.batch_size, cfg.train.seed)
    total = total_steps(cfg, plan)
    if job.is_data_server:
        run_data_server(cfg, job.layout, job.comms, data, plan, total)
        return None, plan, total, data
    if job.layout.data_servers:
        source = RemoteSource.for_job(job.comm, cfg, job.layout, job.index, plan, data, total)
    else:
        source = LocalSource(data.train, plan, job.index)
    return source, plan, total, data
