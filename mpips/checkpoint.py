"""Checkpoint and resume: one HDF5 file per checkpoint, written at a bsp step boundary.

File ``ckpt-<step>.h5`` in ``--checkpoint-dir`` holds (tensors only, nothing pickled):

    params                  float32 [numel]     the flat parameter vector (every server's shard)
    optim/<key>             float32 [numel]     per-element optimizer state (exp_avg, ...)
    optim_scalar/<key>      [servers]           scalar optimizer state per server (Adam's step)
    workers/position        int64 [workers, 3]  (global step, epoch, step in epoch) of next batch
    workers/rng_torch       uint8 [workers, n]  each worker's torch CPU RNG state
    attrs["manifest"]       JSON: step, world, model tensors, optimizer, config, and the sha256 of
                            every piece each rank wrote

It is written collectively through MPI-IO (h5py ``driver="mpio"``) by servers and workers when
h5py has it, else gathered to one writer; under a temporary name, renamed when complete, and the
last ``--keep`` are kept. Data servers save nothing: their position is a function of the global
step (the EpochPlan is a pure, seeded plan), so they restart from the checkpoint's step.

The protocol (bsp only): before a server publishes clock ``k`` it agrees with the other servers
(one allreduce) whether boundary ``k`` is a checkpoint (every N steps, every T seconds, or a
preemption signal seen by any server or rung by any worker) and publishes that in its window's
status block with the clock. A worker that pulls for step ``k`` sees it and joins the checkpoint
instead of computing step ``k``; the servers have applied step ``k - 1`` and wait for the
workers (still answering message pulls) in a nonblocking barrier. On a preemption the job then
stops and every rank exits with ``REQUEUE_STATUS``.

Resume: the flat vector is the same whatever the number of servers, so a checkpoint loads into
any ``--servers`` (re-shard on load). The number of workers and the batch size fix the sample
order of every step, so resuming with different ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from mpi4py import MPI

from mpips import faults
from mpips.config import Config, ConfigError
from mpips.transport import Slot, wait_for

__all__ = [
    "REQUEUE_STATUS",
    "CheckpointError",
    "Checkpointing",
    "Preemption",
    "ResumeError",
    "find_latest",
    "list_checkpoints",
    "verify",
]

log = logging.getLogger("mpips.checkpoint")

REQUEUE_STATUS = 75  # EX_TEMPFAIL: "checkpointed, requeue me" (jobs/slurm scripts requeue on it)
FORMAT = "mpips-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")


class CheckpointError(RuntimeError):
    """A checkpoint file is incomplete, corrupt or unreadable; the message names it."""


class ResumeError(ConfigError):
    """The run's configuration cannot resume from the chosen checkpoint; says which setting."""


# -- files (pure: h5py and hashlib, no MPI) --------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.h5"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints in ``directory`` as (step, path), newest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / p.name) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def verify(path: str | Path) -> dict[str, Any]:
    """Read the manifest and check every piece's checksum; returns the manifest.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            manifest = json.loads(str(f.attrs["manifest"]))
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise CheckpointError(f"{path}: not an mpips checkpoint of version {VERSION}")
            for piece in manifest["pieces"]:
                data = f[piece["dataset"]][piece["start"] : piece["stop"]]
                if _sha256(data) != piece["sha256"]:
                    raise CheckpointError(
                        f"{path}: checksum mismatch in"
                        f" {piece['dataset']}[{piece['start']}:{piece['stop']}]"
                    )
    except CheckpointError:
        raise
    except Exception as exc:  # h5py/OS/JSON/KeyError: all mean "this file is not usable"
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    return manifest


def find_latest(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies; a warning names each one skipped."""
    for _, path in list_checkpoints(directory):
        try:
            return path, verify(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def read_rows(path: str | Path, dataset: str, start: int, stop: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[dataset][start:stop]


@dataclass
class Piece:
    """Rows ``start:start+len(data)`` of dataset ``name`` (full shape ``shape``), from one rank."""

    name: str
    start: int
    data: np.ndarray
    shape: tuple[int, ...]

    def meta(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "start": self.start,
            "stop": self.start + len(self.data),
            "dtype": self.data.dtype.str,
            "shape": list(self.shape),
            "sha256": _sha256(self.data),
        }


def write_collective(
    comm: MPI.Comm, path: Path, pieces: list[Piece], manifest: dict[str, Any]
) -> None:
    """Collective over ``comm``: write every rank's pieces and the manifest into ``path``."""
    metas = [m for rank_metas in comm.allgather([p.meta() for p in pieces]) for m in rank_metas]
    datasets = {m["dataset"]: (tuple(m["shape"]), m["dtype"]) for m in metas}
    manifest = dict(manifest, pieces=sorted(metas, key=lambda m: (m["dataset"], m["start"])))
    text = json.dumps(comm.bcast(manifest, root=0), sort_keys=True)
    if h5py.get_config().mpi:
        with h5py.File(path, "w", driver="mpio", comm=comm) as f:
            handles = {
                n: f.create_dataset(n, shape=s, dtype=np.dtype(d))
                for n, (s, d) in sorted(datasets.items())
            }
            for p in pieces:
                handles[p.name][p.start : p.start + len(p.data)] = p.data
            f.attrs["manifest"] = text
        return
    gathered = comm.gather(pieces, root=0)  # no MPI-IO in this h5py: one writer
    if comm.Get_rank() == 0:
        with h5py.File(path, "w") as f:
            handles = {
                n: f.create_dataset(n, shape=s, dtype=np.dtype(d))
                for n, (s, d) in sorted(datasets.items())
            }
            for p in (p for rank_pieces in gathered for p in rank_pieces):
                handles[p.name][p.start : p.start + len(p.data)] = p.data
            f.attrs["manifest"] = text


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Make ``tmp`` visible as ``final`` atomically, then keep only the newest ``keep``."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for _, old in list_checkpoints(final.parent)[max(1, keep) :]:
        old.unlink(missing_ok=True)
    for stale in final.parent.glob(".ckpt-*.tmp"):  # left by a job that died while writing
        stale.unlink(missing_ok=True)


# -- preemption --------------------------------------------------------------------------------
class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the job checkpoints at the next step boundary and exits 75."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    @classmethod
    def for_config(cls, cfg: Config) -> Preemption:
        """Handlers installed when checkpoints are on (else the signals keep ending the process)."""
        p = cls()
        if cfg.checkpoint.checkpoint_dir is not None:
            for sig in cls.SIGNALS:
                signal.signal(sig, p._handle)
        return p

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


# -- the job's side ----------------------------------------------------------------------------
@dataclass
class Checkpointing:
    """One rank's checkpoint state: what to resume from, when to save, and whether it stopped.

    Built by ``setup`` (collective over the world); servers and workers call ``schedule`` /
    ``save_server`` and ``at_boundary``.
    """

    cfg: Config
    comm: MPI.Comm  # the world until ``bind`` gives the parameter-server communicator
    layout_counts: dict[str, int]
    tensors: list[list[Any]]
    total_steps: int
    resume_path: Path | None = None
    manifest: dict[str, Any] | None = None
    preemption: Preemption = field(default_factory=Preemption)
    preempted: bool = False
    last_path: Path | None = None
    _last_time: float = field(default_factory=time.monotonic)
    shard_lo: int = 0
    _rung: bool = False

    @property
    def first_step(self) -> int:
        return int(self.manifest["step"]) if self.manifest else 0

    @property
    def enabled(self) -> bool:
        return self.cfg.checkpoint.checkpoint_dir is not None

    @classmethod
    def setup(
        cls,
        cfg: Config,
        comm: MPI.Comm,
        counts: dict[str, int],
        tensors: list[list[Any]] | None,
        total_steps: int,
        preemption: Preemption,
    ) -> Checkpointing:
        """Collective over the world ``comm``: choose the checkpoint to resume from, check it fits.

        World rank 0 (always a worker, so it has the model's ``tensors``) chooses and checks;
        every rank gets its answer.

        Raises:
            ResumeError: the same on every rank, when the checkpoint cannot be resumed here.
        """
        ck = cls(cfg, comm, counts, tensors or [], total_steps, preemption=preemption)
        c = cfg.checkpoint
        if (ck.enabled or c.resume) and cfg.train.sync != "bsp":
            raise ResumeError(
                f"checkpoints need --sync bsp (a global step boundary);"
                f" --sync {cfg.train.sync} has none"
            )
        if c.resume:
            chosen: Any = None
            if comm.Get_rank() == 0:
                chosen = _choose(c.resume, c.checkpoint_dir)
                if isinstance(chosen, tuple):
                    chosen = ck._misfit(*chosen) or chosen
                if chosen is None:
                    log.warning(
                        "--resume: no complete checkpoint in %s yet; starting at step 0",
                        c.checkpoint_dir,
                    )
                elif isinstance(chosen, tuple):
                    log.warning("resuming from %s at step %d", chosen[0], chosen[1]["step"])
            chosen = comm.bcast(chosen, root=0)
            if isinstance(chosen, str):
                raise ResumeError(chosen)
            if chosen is not None:
                ck.resume_path, ck.manifest = Path(chosen[0]), chosen[1]
        if ck.enabled:
            Path(c.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        return ck

    def _misfit(self, path: str, m: dict[str, Any]) -> str | None:
        """Why this job cannot resume from manifest ``m``, or None."""
        cfg, problems = self.cfg, []
        if [list(t) for t in m["tensors"]] != [list(t) for t in self.tensors]:
            problems.append("the model's parameter tensors differ (names or shapes)")
        if m["world"]["workers"] != self.layout_counts["workers"]:
            problems.append(
                f"it was written by {m['world']['workers']} workers, this job has"
                f" {self.layout_counts['workers']} (the samples of every step depend on it)"
            )
        for key, now in (
            ("batch_size", cfg.data.batch_size),
            ("optimizer", cfg.optim.optimizer),
            ("seed", cfg.train.seed),
        ):
            if m[key] != now:
                problems.append(f"it used --{key.replace('_', '-')} {m[key]}, this job {now}")
        if m["step"] >= self.total_steps:
            problems.append(f"it is at step {m['step']}, this job trains {self.total_steps} steps")
        if not problems:
            return None
        return (
            f"cannot resume from {path}: " + "; ".join(problems) + ". (A different --servers"
            " or --data-servers is fine: shards are re-cut on load.)"
        )

    # -- resume ------------------------------------------------------------------------------
    def server_init(self, lo: int, hi: int) -> np.ndarray | None:
        """This shard's parameters from the checkpoint (any number of servers), or None."""
        return read_rows(self.resume_path, "params", lo, hi) if self.manifest else None

    def restore_optimizer(
        self, optimizer: torch.optim.Optimizer, param: torch.Tensor, lo: int, hi: int
    ) -> None:
        if not self.manifest:
            return
        state: dict[str, torch.Tensor] = {}
        with h5py.File(self.resume_path, "r") as f:
            for key, ds in f.get("optim", {}).items():
                state[key] = torch.from_numpy(ds[lo:hi]).view_as(param)
            for key, ds in f.get("optim_scalar", {}).items():
                values = np.unique(ds[:])
                if len(values) != 1:
                    raise CheckpointError(
                        f"{self.resume_path}: servers disagree on optimizer {key}: {values}"
                    )
                state[key] = torch.tensor(values[0])
        if state:
            sd = optimizer.state_dict()
            sd["state"] = {0: state}
            optimizer.load_state_dict(sd)

    def restore_worker(self, index: int) -> None:
        if self.manifest:
            rng = read_rows(self.resume_path, "workers/rng_torch", index, index + 1)[0]
            torch.set_rng_state(torch.from_numpy(rng.copy()))

    # -- save ---------------------------------------------------------------------------------
    def bind(self, ps_comm: MPI.Comm, shard_lo: int = 0) -> None:
        """Checkpoints are collective over ``ps_comm``; a server's shard starts at ``shard_lo``."""
        self.comm, self.shard_lo = ps_comm, shard_lo

    def schedule(self, window, servers: MPI.Comm, boundary: int) -> int:  # noqa: ANN001
        """Server, before publishing clock ``boundary``, agree on and publish if it is a checkpoint.

        Collective over the servers. Returns the mark published: ``boundary`` (checkpoint),
        ``-boundary`` (checkpoint, then stop: preemption) or 0.
        """
        if not self.enabled:
            return 0
        c = self.cfg.checkpoint
        rung = window.flag(Slot.REQUEST)  # doorbell raised by workers (lead: double-buffer window)
        interval_due = (
            bool(c.checkpoint_interval)
            and time.monotonic() - self._last_time >= c.checkpoint_interval
        )
        want = np.array([self.preemption.requested or rung > 0, interval_due], dtype=np.int8)
        servers.Allreduce(MPI.IN_PLACE, want, op=MPI.MAX)
        periodic = bool(c.checkpoint_every) and boundary % c.checkpoint_every == 0
        at = boundary if (periodic or want.any()) and boundary < self.total_steps else 0
        mark = -at if want[0] else at
        window.status[Slot.CHECKPOINT] = mark  # published with the boundary's version
        return mark

    def save_server(self, server, mark: int) -> None:  # noqa: ANN001 (a ParameterServer)
        """Server side of checkpoint ``mark`` (see ``schedule``), collective with the workers."""
        n, lo = self.layout_counts, self.shard_lo
        pieces = [Piece("params", lo, server.window.params.copy(), (self._numel(),))]
        for key, value in server.optimizer.state_dict()["state"].get(0, {}).items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() == 0:
                pieces.append(
                    Piece(
                        f"optim_scalar/{key}",
                        server.index,
                        value.reshape(1).numpy().copy(),
                        (n["servers"],),
                    )
                )
            else:
                pieces.append(
                    Piece(
                        f"optim/{key}",
                        lo,
                        value.detach().reshape(-1).numpy().copy(),
                        (self._numel(),),
                    )
                )
        self._save(
            abs(mark), pieces, mark < 0, server.pull_server.poll if server.pull_server else None
        )

    def at_boundary(self, worker, step: int) -> bool:  # noqa: ANN001 (a Worker)
        """Worker, after pulling for ``step``: ring a preemption to the servers, join a checkpoint.

        Returns True when the job is to stop here (preemption): step ``step`` is not computed.
        """
        if not self.enabled:
            return False
        if self.preemption.requested and not self._rung:
            worker.window.raise_flag(worker.servers[0], Slot.REQUEST, 1)
            self._rung = True
        marks = {int(m) for m in worker.status[:, Slot.CHECKPOINT]}  # the servers agreed: one value
        if step == 0 or (marks != {step} and marks != {-step}):  # 0: no checkpoint published
            return False
        stop = marks == {-step}
        W, index = self.layout_counts["workers"], worker.index
        rng = torch.get_rng_state().numpy()
        pieces = [
            Piece(
                "workers/position",
                index,
                np.array([[step, *worker.epoch_plan.position(step)]], np.int64),
                (W, 3),
            ),
            Piece("workers/rng_torch", index, rng[None].copy(), (W, rng.size)),
        ]
        self._save(step, pieces, stop, None)
        return stop

    def _numel(self) -> int:
        total = 0
        for _, shape in self.tensors:
            total += int(np.prod(shape, dtype=np.int64))
        return total

    def _save(self, step: int, pieces: list[Piece], stop: bool, serve) -> None:  # noqa: ANN001
        faults.at("checkpoint", step)
        comm, t0 = self.comm, time.monotonic()
        rendezvous = comm.Ibarrier()

        def arrived() -> bool:
            if serve is not None:
                serve()
            return rendezvous.Test()

        wait_for(
            arrived,
            f"checkpoint at step {step}: every server and worker to reach the step boundary"
            " (nonblocking barrier over the parameter-server communicator)",
            self.cfg.train.stall_timeout,
        )
        directory = Path(self.cfg.checkpoint.checkpoint_dir)
        final = directory / checkpoint_name(step)
        tmp = directory / f".{final.name}.tmp"
        write_collective(comm, tmp, pieces, self._manifest(step, stop))
        comm.Barrier()
        if comm.Get_rank() == 0:
            publish(tmp, final, self.cfg.checkpoint.keep)
            log.warning(
                "checkpoint at step %d written to %s (%.1f MiB, %.2f s)%s",
                step,
                final,
                final.stat().st_size / 2**20,
                time.monotonic() - t0,
                f"; stopping on {self.preemption.signal_name or 'a preemption signal'}"
                f" with exit status {REQUEUE_STATUS} (requeue)"
                if stop
                else "",
            )
        self.last_path, self._last_time = final, time.monotonic()
        if stop:
            self.preempted = True

    def _manifest(self, step: int, stop: bool) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "created": time.time(),
            "reason": "preemption" if stop else "scheduled",
            "world": dict(self.layout_counts),
            "tensors": self.tensors,
            "numel": self._numel(),
            "optimizer": cfg.optim.optimizer,
            "batch_size": cfg.data.batch_size,
            "seed": cfg.train.seed,
            "sync": cfg.train.sync,
            "total_steps": self.total_steps,
            "config": cfg.as_dict(),
        }


def _choose(resume: str, directory: str | None) -> tuple[str, dict[str, Any]] | str | None:
    """(path, manifest) to resume from, None to start afresh, or an error message (one rank).

    ``--resume`` alone finds nothing in a new ``--checkpoint-dir`` on a job's first run: that
    starts from step 0, so one requeueable job script serves the first run and every restart.
    """
    if resume == "latest":
        if directory is None:
            return "--resume without a path needs --checkpoint-dir"
        found = find_latest(directory)
        if found is None:
            return None
        return str(found[0]), found[1]
    try:
        return resume, verify(resume)
    except CheckpointError as exc:
        return f"--resume {resume}: {exc}"
