"""Checkpoint and resume: one HDF5 file per checkpoint, at a consistent cut of the whole job.

File ``ckpt-<step>.h5`` in ``--checkpoint-dir`` holds (tensors only, nothing pickled):

    params                  float32 [numel]     the flat trainable-parameter vector (every shard)
    optim/<key>             float32 [numel]     per-element optimizer state (exp_avg, ...)
    optim_tensor/<key>      float64 [tensors]   per-tensor scalar optimizer state (Adam's step)
    optim_has_state         uint8 [tensors]     1 where torch.optim holds state for the tensor
    servers/applied         int64 [servers]     gradients applied (asp/ssp learning-rate scaling)
    params_before           float32 [numel]     asp/ssp with --lookahead: params before the last update,
                            what the pulled values lead by (absent: resumed leading by nothing)
    workers/position        int64 [workers, 3]  (next global step, epoch, step in epoch)
    workers/rng_torch       uint8 [workers, n]  each worker's torch CPU RNG state
    workers/buffers/<name>  uint8 [workers, n]  each worker's module buffers (raw bytes)
    workers/residual        float32 [workers, numel]  error-feedback residuals (with error feedback only;
                            version 3 on; absent: resumed as zeros); with --momentum-correction
                            the accumulated velocities
    workers/momentum        float32 [workers, numel]  --momentum-correction's momentum buffers (version
                            4 on; absent: resumed as zeros)
    workers/scaler          float64 [workers, 2]  --precision fp16: each worker's loss scale and growth
                            tracker (version 5 on; absent: the scaler starts afresh at 2**16)
    frozen/<name>           uint8 [1, n]        frozen parameters (raw bytes; the same everywhere)
    attrs["manifest"]       JSON: step, worker positions, model tensors, module buffers, optimizer,
                            config, and the sha256 of every piece each rank wrote

It is written collectively through MPI-IO (h5py ``driver="mpio"``) by servers and workers when
h5py has it, else sent to one writer piece by piece; either way in slabs of at most
``--chunk-bytes`` (HDF5 1.10's MPI-IO driver fails a single write over 2 GiB, and a message that
large fails on MPI-3.1); under a temporary name, renamed when complete; the
newest ``--keep`` are kept and the one just written is never deleted. A run writes one at its
last step too. Data servers save nothing: a worker's samples are a function of its step (the
EpochPlan is a pure, seeded plan), so they serve whatever step a worker asks for next.

Buffers (BatchNorm's running statistics, ...) are each worker's own, updated by its own
batches; worker 0's are the model's (``--save``, evaluation), as with DDP, which broadcasts rank
0's buffers. Each worker's are checkpointed, so a resumed run ends bitwise equal, buffers too.

The cut. bsp: before a server publishes clock ``k`` it agrees with the other servers (one
allreduce) whether boundary ``k`` is a checkpoint (every N steps, every T seconds, or a stop
signal seen by any server or rung by any worker) and publishes the mark with the clock; a
worker that pulls for step ``k`` sees it and joins instead of computing step ``k``. asp/ssp:
server 0 decides (when the slowest worker's clock passes a multiple of N, every T seconds, or
on a signal) and publishes a mark; each worker sees it in its next pull (waiting ssp workers
too), sends a JOIN message after its last push and joins with its position; a server saves once
every worker joined, so it holds exactly the updates of steps ``< position[w]`` of every worker
``w``, and resuming restarts each worker at its own position with the servers' clocks, applied
counts and staleness bound as they were. Exact in bsp: a resumed run is bitwise the
uninterrupted one. In asp/ssp the state at the cut is exact, but the order in which later
pushes arrive is not repeatable (as in any asynchronous run).

Resume: the flat vector is the same whatever the number of servers, so a checkpoint loads into
any ``--servers`` (re-shard on load). The number of workers and the batch size fix the sample
order of every step, so resuming with different ones is refused. A run that does not resume
refuses a directory that holds checkpoints, so two runs never prune each other's.

Restarts always make progress or end cleanly (what a requeued job needs): a checkpoint that does
not verify is named once and set aside (``ckpt-<step>.h5.corrupt``), and the newest one that
verifies is resumed; the partial files of an interrupted write are removed at start; a run whose
checkpoint of its last step is there is complete (``Checkpointing.complete``: the job trains
nothing, writes the final model from it and exits 0). A checkpoint that cannot be written (disk
full, quota, read-only or failing file system; found before writing by reserving its bytes) ends
the whole job with one line naming the directory, the bytes needed and free and the last good
checkpoint, status ``WRITE_FAILED_STATUS`` (74); start-up warns when the directory cannot hold two.

The package: ``files`` (the format, verification, the collective write, publishing, setting
aside), ``resume`` (which checkpoint a job resumes from), ``manager`` (``Checkpointing``: when
to save or stop, over the roles' ``state_dict()``), ``preemption`` (stop signals, exit statuses).
"""

from mpips.checkpoint.files import (
    FORMAT,
    HDF5_OVERHEAD,
    PIECE_OVERHEAD,
    VERSION,
    CheckpointError,
    Piece,
    checkpoint_name,
    find_latest,
    has_mpio,
    list_checkpoints,
    module_spec,
    preflight,
    publish,
    remove_partial,
    set_aside,
    slabs,
    verify,
    write_collective,
)
from mpips.checkpoint.manager import Checkpointing
from mpips.checkpoint.preemption import REQUEUE_STATUS, STOPPED_STATUS, WRITE_FAILED_STATUS, Preemption
from mpips.checkpoint.resume import ResumeError

__all__ = [
    "FORMAT",
    "HDF5_OVERHEAD",
    "PIECE_OVERHEAD",
    "REQUEUE_STATUS",
    "STOPPED_STATUS",
    "VERSION",
    "WRITE_FAILED_STATUS",
    "CheckpointError",
    "Checkpointing",
    "Piece",
    "Preemption",
    "ResumeError",
    "checkpoint_name",
    "find_latest",
    "has_mpio",
    "list_checkpoints",
    "module_spec",
    "preflight",
    "publish",
    "remove_partial",
    "set_aside",
    "slabs",
    "verify",
    "write_collective",
]
