"""The client: what a worker links to train on the parameter servers.

``FlatModel`` (parameters and gradients in flat buffers), ``ParameterClient`` (pull, push,
checkpoint joins and stop for one registered model), ``DistributedOptimizer`` (a torch
optimizer whose step is a push and a pull: what ``job.optimizer`` returns), ``SparseEmbedding``
(a table on the servers, pulled and pushed by key: ``job.embedding``), and the overlaps:
pull ahead, push during backward, staging through host memory for GPU workers.
"""

from mpips.client.embedding import SparseEmbedding
from mpips.client.flat import FlatModel
from mpips.client.optimizer import DistributedOptimizer, Preempted
from mpips.client.pushpull import ParameterClient, WorkerStats

__all__ = ["DistributedOptimizer", "FlatModel", "ParameterClient", "Preempted", "SparseEmbedding", "WorkerStats"]
