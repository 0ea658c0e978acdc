"""The job's side of checkpoints: ``Checkpointing`` decides when to save or stop, writes what the
roles' ``state_dict()`` return and hands back ``load_state_dict()`` input on resume."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from mpi4py import MPI

from mpips import faults
from mpips.checkpoint.files import (
    FORMAT,
    HDF5_OVERHEAD,
    PIECE_OVERHEAD,
    SCALER,
    VERSION,
    Piece,
    checkpoint_name,
    free_bytes,
    list_checkpoints,
    module_dataset,
    per_worker,
    preflight,
    publish,
    remove_partial,
    write_collective,
)
from mpips.checkpoint.preemption import REQUEUE_STATUS, STOPPED_STATUS, WRITE_FAILED_STATUS, Preemption
from mpips.checkpoint.resume import ResumeError, choose, clash
from mpips.checkpoint.rows import table_pieces, table_state
from mpips.config import Config
from mpips.optim import STATE_FACTOR
from mpips.shard import ShardPlan
from mpips.trace import NULL_TRACER
from mpips.transport import Slot, wait_for
from mpips.watchdog import abort_job

__all__ = ["Checkpointing"]

log = logging.getLogger("mpips.checkpoint")

ABORT_WAIT_S = 10.0  # how long a rank waits for rank 0 to end the job after a failed checkpoint write


@dataclass
class Checkpointing:
    """One rank's checkpoint state: what to resume from, when to save or stop, whether it stopped.

    Built by ``setup`` (collective over the world) and bound to a role by ``bind``. Roles hand
    it their ``state_dict()`` and take back ``load_state_dict()`` input from ``server_state`` /
    ``worker_state``; it knows nothing else of them. Stop requests (signals) work without a
    checkpoint directory too: then nothing is written and the job stops cleanly.
    """

    cfg: Config
    comm: MPI.Comm  # the world until ``bind`` gives the parameter-server communicator
    layout_counts: dict[str, int]
    plan: ShardPlan | None
    module: list[list[Any]]  # [name, shape, dtype, kind] of each buffer and frozen parameter
    total_steps: int
    resume_path: Path | None = None
    manifest: dict[str, Any] | None = None
    preemption: Preemption = field(default_factory=Preemption)
    stopped: bool = False  # the job stopped early on a signal
    preempted: bool = False  # ... after writing a checkpoint
    last_path: Path | None = None
    role: str = ""
    index: int = 0
    epoch_plan: Any = None
    _last_time: float = field(default_factory=time.monotonic)
    _rung: bool = False
    _next_async: int = 0
    _position: int = -1
    complete: bool = False  # the checkpoint resumed from is this run's last step: nothing to train
    tracer: Any = NULL_TRACER  # mpips.trace: the job sets its Tracer here when --trace is on
    world: Any = None  # the job's world (``setup``'s ``comm``): a failed write aborts all of it

    @property
    def enabled(self) -> bool:
        return self.cfg.checkpoint.checkpoint_dir is not None

    def exit_status(self) -> int:
        if not self.stopped:
            return 0
        return REQUEUE_STATUS if self.preempted else STOPPED_STATUS

    @classmethod
    def setup(
        cls,
        cfg: Config,
        comm: MPI.Comm,
        counts: dict[str, int],
        plan: ShardPlan | None,
        module: list[list[Any]] | None,
        total_steps: int,
        preemption: Preemption,
    ) -> Checkpointing:
        """Collective over the world ``comm``: choose the checkpoint to resume from, check it fits.

        World rank 0 (always a worker, so it has the model) chooses and checks; every rank gets
        its answer. A run that does not resume refuses a ``--checkpoint-dir`` that already holds
        checkpoints, and a resume refuses a directory holding checkpoints newer than the one it
        resumes from: both would mix two runs' checkpoints, and pruning would delete one of them.

        Raises:
            ResumeError: the same on every rank, when the checkpoint cannot be resumed here.
        """
        ck = cls(cfg, comm, counts, plan, module or [], total_steps, preemption=preemption, world=comm)
        c = cfg.checkpoint
        chosen: Any = None
        if comm.Get_rank() == 0:
            if ck.enabled and c.resume:
                gone = remove_partial(c.checkpoint_dir)
                if gone:
                    log.warning("removed %d partial file(s) of an interrupted checkpoint write from %s: %s",
                                len(gone), c.checkpoint_dir, ", ".join(gone))
            chosen = choose(c.resume, c.checkpoint_dir) if c.resume else None
            if isinstance(chosen, tuple):
                chosen = ck._misfit(*chosen) or chosen
            if not isinstance(chosen, str) and ck.enabled:
                chosen = clash(chosen, c.checkpoint_dir, bool(c.resume)) or chosen
            if chosen is None and c.resume:
                log.warning("--resume: no checkpoint in %s yet; starting at step 0", c.checkpoint_dir)
            elif isinstance(chosen, tuple) and chosen[1]["step"] == total_steps:
                print(f"mpips: the run is complete: {chosen[0]} is its checkpoint of step {total_steps} of"
                      f" {total_steps}; nothing to train, exiting with status 0", flush=True)
            elif isinstance(chosen, tuple):
                log.warning("resuming from %s at step %d", chosen[0], chosen[1]["step"])
            if ck.enabled and not isinstance(chosen, str):
                ck._warn_if_small(Path(chosen[0]) if isinstance(chosen, tuple) else None)
        chosen = comm.bcast(chosen, root=0)
        if isinstance(chosen, str):
            raise ResumeError(chosen)
        if chosen is not None:
            ck.resume_path, ck.manifest = Path(chosen[0]), chosen[1]
            ck.complete = chosen[1]["step"] == total_steps
        if ck.enabled:
            Path(c.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        return ck

    def estimate_bytes(self) -> int:
        """About how large one checkpoint of this job is: parameters, optimizer state, each worker's
        error-feedback residual and momentum, RNG state and module state."""
        cfg, numel, workers = self.cfg, self.plan.numel if self.plan is not None else 0, self.layout_counts["workers"]
        floats = numel * (1 + STATE_FACTOR.get(cfg.server_optim().optimizer, 2.0))
        if cfg.compression.compress != "none" and cfg.compression.feedback():
            floats += workers * numel * (2 if cfg.compression.worker_momentum(cfg.optim)[0] is not None else 1)
        module = sum(math.prod(shape) * getattr(torch, dtype.removeprefix("torch.")).itemsize
                     for _, shape, dtype, _ in self.module)
        pieces = 3 + 2 * workers * (2 + len(self.module))
        return int(4 * floats + workers * (module + 5056)) + PIECE_OVERHEAD * pieces + HDF5_OVERHEAD

    def _warn_if_small(self, resumed: Path | None) -> None:
        """Rank 0 at start-up: warn when the directory cannot hold two more checkpoints (a write
        needs room for the new one before the oldest is pruned)."""
        directory = Path(self.cfg.checkpoint.checkpoint_dir)
        one = resumed.stat().st_size if resumed is not None else self.estimate_bytes()
        free = free_bytes(directory if directory.is_dir() else directory.parent)
        if 0 <= free < 2 * one:
            log.warning("--checkpoint-dir %s has %s free, less than two checkpoints of this job (%s each): a"
                        " checkpoint write that does not fit ends the job with status %d, keeping the last good"
                        " one", directory, _mib(free), _mib(one), WRITE_FAILED_STATUS)

    def _misfit(self, path: str, m: dict[str, Any]) -> str | None:
        """Why this job cannot resume from manifest ``m``, or None."""
        cfg, problems = self.cfg, []
        if [list(t) for t in m["tensors"]] != [list(t) for t in self._tensors()]:
            problems.append("the model's trainable parameter tensors differ (names or shapes)")
        if [list(t) for t in m["module"]] != [list(t) for t in self.module]:
            problems.append("the model's buffers or frozen parameters differ (names, shapes or dtypes)")
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
        if cfg.train.sync == "bsp" and len(set(m["positions"])) > 1:
            problems.append(f"its workers stopped at different steps ({m['sync']}), which --sync bsp cannot continue")
        if m["step"] > self.total_steps:  # == : the run is complete (``setup`` says so and trains nothing)
            problems.append(f"it is at step {m['step']}, this job trains {self.total_steps} steps")
        if not problems:
            return None
        return (
            f"cannot resume from {path}: " + "; ".join(problems) + ". (A different --servers"
            " or --data-servers is fine: shards are re-cut on load.)"
        )

    def _tensors(self) -> list[list[Any]]:
        return [[t.name, list(t.shape)] for t in self.plan.tensors] if self.plan is not None else []

    # -- roles -------------------------------------------------------------------------------
    def bind(self, ps_comm: MPI.Comm, role: str = "", index: int = 0, epoch_plan: Any = None) -> None:
        """Checkpoints are collective over ``ps_comm``; this rank is ``role`` ``index``."""
        self.comm, self.role, self.index, self.epoch_plan = ps_comm, role, index, epoch_plan
        if self.manifest and self.cfg.checkpoint.checkpoint_every:
            every = self.cfg.checkpoint.checkpoint_every
            self._next_async = (min(self.manifest["positions"]) // every + 1) * every

    def server_state(self, template: dict[str, Any]) -> dict[str, Any] | None:
        """Server ``index``'s state from the checkpoint, re-cut for this job's plan, or None."""
        if not self.manifest:
            return None
        plan, s = self.plan, self.index
        lo, hi = plan.shard_range(s)
        runs, tix = self._runs(template["pieces"])
        with h5py.File(self.resume_path, "r") as f:
            params = f["params"][lo:hi]
            has = f["optim_has_state"][:] if "optim_has_state" in f else np.zeros(len(plan.tensors), np.uint8)
            elem = {k: ds[lo:hi] for k, ds in f.get("optim", {}).items()}
            scalar = {k: ds[:] for k, ds in f.get("optim_tensor", {}).items()}
            applied = int(f["servers/applied"][0])
            before = f["params_before"][lo:hi] if "params_before" in f else None
            sparse = [table_state(f, f"sparse/{t}", s, rows) for t, rows in enumerate(template.get("sparse", []))]
        state = {}
        for i, r in enumerate(runs):
            if has[tix[i]]:
                a, b = r.server_offset, r.server_offset + r.length
                state[i] = {k: torch.from_numpy(v[a:b].copy()) for k, v in elem.items()}
                state[i].update({k: torch.tensor(v[tix[i]], dtype=torch.float32) for k, v in scalar.items()})
        optimizer = dict(template["optimizer"], state=state)
        return {"params": params, "params_before": before, "optimizer": optimizer, "pieces": runs,
                "applied": applied, "clocks": list(self.manifest["positions"]),
                "sparse": [dict(t, clocks=list(self.manifest["positions"])) for t in sparse]}

    def restore_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A complete run's model (``complete``): ``model`` given the checkpoint's parameters and
        worker 0's buffers and frozen parameters (what the lead worker ends with), in place."""
        with h5py.File(self.resume_path, "r") as f, torch.no_grad():
            flat = torch.from_numpy(f["params"][:])
            params = dict(model.named_parameters())
            for t in self.plan.tensors:
                params[t.name].copy_(flat[t.offset : t.offset + t.numel].view(t.shape))
            state = {**dict(model.named_buffers()), **params}
            for name, _, _, _ in self.module:
                t = state[name]
                raw = f[module_dataset(name, t)][0]
                t.copy_(torch.from_numpy(raw.copy()).view(t.dtype).reshape(t.shape))
        return model

    def _runs(self, pieces: list) -> tuple[list, list[int]]:
        """The server's optimizer pieces (``ParameterServer.state_dict()["pieces"]``: tensor runs,
        some cut where a bucket ends) and each one's tensor index in the plan."""
        index = {t.name: i for i, t in enumerate(self.plan.tensors)}
        return list(pieces), [index[p.tensor] for p in pieces]

    def worker_state(self, template: dict[str, Any]) -> dict[str, Any] | None:
        """Worker ``index``'s state from the checkpoint (shaped like ``template``), or None."""
        if not self.manifest:
            return None
        i = self.index
        with h5py.File(self.resume_path, "r") as f:
            rng = f["workers/rng_torch"][i]
            module = {}
            for name, t in template["module"].items():
                raw = f[module_dataset(name, t)][i if per_worker(t) else 0]
                module[name] = torch.from_numpy(raw.copy()).view(t.dtype).reshape(t.shape)
            state = {"position": self.manifest["positions"][i], "rng": torch.from_numpy(rng.copy()), "module": module}
            for key in ("residual", "momentum"):  # the encoder's state, or zeros where none was saved
                if key in template:
                    state[key] = torch.from_numpy(f[f"workers/{key}"][i]) if f"workers/{key}" in f else None
            if template.get("scaler") and "workers/scaler" in f:  # else (version < 5): the scaler starts afresh
                state["scaler"] = dict(zip(SCALER, map(float, f["workers/scaler"][i]), strict=True))
        return state

    def _pieces(self, state: dict[str, Any]) -> list[Piece]:
        return self._server_pieces(state) if self.role == "server" else self._worker_pieces(state)

    def _server_pieces(self, st: dict[str, Any]) -> list[Piece]:
        plan, s, numel = self.plan, self.index, self.plan.numel
        lo, hi = plan.shard_range(s)
        runs, tix = self._runs(st["pieces"])
        pieces = [
            Piece("params", lo, st["params"].copy(), (numel,)),
            Piece("servers/applied", s, np.array([st["applied"]], np.int64), (plan.servers,)),
        ]
        if st.get("params_before") is not None:  # asp/ssp --lookahead: the last update's start
            pieces.append(Piece("params_before", lo, st["params_before"].copy(), (numel,)))
        # per-element state as flat vectors (re-cut on load); per-tensor scalars (Adam's step) and
        # whether a tensor has state at all, written by the server holding its first element
        firsts = [tix[i] for i, r in enumerate(runs) if r.tensor_offset == 0]
        t_lo, t_hi = (firsts[0], firsts[-1] + 1) if firsts else (0, 0)
        has = np.zeros(t_hi - t_lo, np.uint8)
        elem: dict[str, np.ndarray] = {}
        scalar: dict[str, np.ndarray] = {}
        for i, r in enumerate(runs):
            state = st["optimizer"]["state"].get(i, {})
            first = r.tensor_offset == 0
            for key, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.dim() == 0:
                    if first:
                        scalar.setdefault(key, np.zeros(t_hi - t_lo, np.float64))[tix[i] - t_lo] = float(v)
                else:
                    out = elem.setdefault(key, np.zeros(hi - lo, np.float32))
                    out[r.server_offset : r.server_offset + r.length] = v.detach().reshape(-1).numpy()
            if first and state:
                has[tix[i] - t_lo] = 1
        pieces += [Piece(f"optim/{k}", lo, v, (numel,)) for k, v in sorted(elem.items())]
        if t_hi > t_lo:
            tensors = len(plan.tensors)
            pieces.append(Piece("optim_has_state", t_lo, has, (tensors,)))
            pieces += [Piece(f"optim_tensor/{k}", t_lo, v, (tensors,)) for k, v in sorted(scalar.items())]
        for t, rows in enumerate(st.get("sparse", [])):
            pieces += table_pieces(f"sparse/{t}", s, rows)
        return pieces

    def _worker_pieces(self, st: dict[str, Any]) -> list[Piece]:
        W, i, position = self.layout_counts["workers"], self.index, st["position"]
        self._position = position
        rng = st["rng"].numpy()
        pieces = [
            Piece("workers/position", i, np.array([[position, *self.epoch_plan.position(position)]], np.int64),
                  (W, 3)),
            Piece("workers/rng_torch", i, rng[None].copy(), (W, rng.size)),
        ]
        for key in ("residual", "momentum"):  # error feedback, --momentum-correction
            if key in st:
                vec = st[key].numpy()
                pieces.append(Piece(f"workers/{key}", i, vec[None].copy(), (W, vec.size)))
        if st.get("scaler"):  # fp16's loss scaler
            pieces.append(Piece("workers/scaler", i, np.array([[st["scaler"][k] for k in SCALER]]), (W, len(SCALER))))
        for name, t in st["module"].items():
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            if per_worker(t):
                pieces.append(Piece(module_dataset(name, t), i, raw[None].copy(), (W, raw.size)))
            elif i == 0:  # frozen parameters are the same on every worker: worker 0 writes them
                pieces.append(Piece(module_dataset(name, t), 0, raw[None].copy(), (1, raw.size)))
        return pieces

    # -- when to save or stop ----------------------------------------------------------------
    def ring(self, window, target: int) -> None:  # noqa: ANN001 (a ParameterWindow)
        """Worker: on a stop signal, raise the doorbell of server rank ``target`` (once)."""
        if self.preemption.requested and not self._rung:
            window.raise_flag(target, Slot.REQUEST, 1)
            self._rung = True

    def _stop_requested(self, window) -> bool:  # noqa: ANN001
        return not self.stopped and (self.preemption.requested or window.flag(Slot.REQUEST) > 0)

    def _interval_due(self) -> bool:
        c = self.cfg.checkpoint
        return bool(c.checkpoint_interval) and time.monotonic() - self._last_time >= c.checkpoint_interval

    def schedule(self, window, servers: MPI.Comm, boundary: int) -> int:  # noqa: ANN001
        """bsp server, before publishing clock ``boundary``: agree on and publish a checkpoint or stop.

        Collective over the servers. Returns the mark published: ``boundary`` (checkpoint),
        ``-boundary`` (checkpoint if enabled, then stop: a signal) or 0.
        """
        want = np.array([self._stop_requested(window), self.enabled and self._interval_due()], dtype=np.int8)
        servers.Allreduce(MPI.IN_PLACE, want, op=MPI.MAX)
        every = self.cfg.checkpoint.checkpoint_every
        periodic = self.enabled and bool(every) and boundary % every == 0
        at = boundary if (periodic or want.any()) and boundary < self.total_steps else 0
        mark = -at if want[0] else at
        window.status[Slot.CHECKPOINT] = mark  # published with the boundary's version
        return mark

    def due_async(self, window, clock: int) -> int:  # noqa: ANN001
        """asp/ssp server 0: the mark to publish now (0: none); ``clock`` is the slowest worker's."""
        stop = self._stop_requested(window)
        if clock >= self.total_steps or not (stop or self.enabled):
            return 0
        every = self.cfg.checkpoint.checkpoint_every
        periodic = bool(every) and clock >= max(every, self._next_async)
        if not (stop or periodic or self._interval_due()):
            return 0
        if every:
            self._next_async = (clock // every + 1) * every
        at = max(1, clock)
        return -at if stop else at

    # -- save ---------------------------------------------------------------------------------
    def save(self, step: int, stop: bool, state: dict[str, Any], serve=None) -> bool:  # noqa: ANN001
        """Collective over servers and workers: write checkpoint ``step`` (when enabled).

        ``stop``: the job stops after it (a signal). ``serve`` is called while waiting for the
        others (a server answers message pulls). Returns ``stop``.
        """
        if self.enabled:
            self._save(step, self._pieces(state), stop, serve)
        if stop:
            self.stopped = True
            self.preempted = self.enabled
        return stop

    def save_final(self, state: dict[str, Any], serve=None) -> None:  # noqa: ANN001
        """Collective, at the end of a run with checkpoints on: the checkpoint of the last step."""
        if self.enabled:
            self._save(self.total_steps, self._pieces(state), False, serve)

    def _save(self, step: int, pieces: list[Piece], stop: bool, serve) -> None:  # noqa: ANN001
        faults.at("checkpoint", step)
        tracer = self.tracer
        comm, t0 = self.comm, time.monotonic()
        began = tracer.now()
        rendezvous = comm.Ibarrier()

        def arrived() -> bool:
            if serve is not None:
                serve()
            return rendezvous.Test()

        wait_for(
            arrived,
            f"checkpoint at step {step}: every server and worker to reach it"
            " (nonblocking barrier over the parameter-server communicator)",
            self.cfg.train.stall_timeout,
        )
        tracer.record("checkpoint: wait for the others", began, step=step)
        began = tracer.now()
        directory = Path(self.cfg.checkpoint.checkpoint_dir)
        final = directory / checkpoint_name(step)
        tmp = directory / f".{final.name}.tmp"
        ranks = comm.allgather((self.role, self.index, self._position,
                                sum(p.data.nbytes for p in pieces) + PIECE_OVERHEAD * len(pieces)))
        positions = [r[2] for r in sorted(r for r in ranks if r[0] == "worker")]
        needed = sum(r[3] for r in ranks) + HDF5_OVERHEAD
        lead = comm.Get_rank() == 0
        problem = comm.bcast(preflight(directory, needed) if lead else None, root=0)
        if problem is not None:  # every rank knows: one line from rank 0, the others wait for its abort
            self._write_failed(step, needed, problem, speaker=lead)
        try:
            with _deadline(self.cfg.train.stall_timeout, lambda: self._write_failed(
                    step, needed, f"the write did not finish in {self.cfg.train.stall_timeout:g} s"
                    " (--stall-timeout)", speaker=True)):
                write_collective(comm, tmp, pieces, dict(self._manifest(step, stop), positions=positions),
                                 chunk_bytes=self.cfg.train.chunk_bytes)
                comm.Barrier()
                if lead:
                    publish(tmp, final, self.cfg.checkpoint.keep)
        except Exception as exc:  # noqa: BLE001 - an I/O error on this rank: end the job, keep the last good one
            self._write_failed(step, needed, f"{type(exc).__name__}: {exc}", speaker=True)
        if lead:
            log.warning(
                "checkpoint at step %d written to %s (%.1f MiB, %.2f s)%s",
                step,
                final,
                final.stat().st_size / 2**20,
                time.monotonic() - t0,
                f"; stopping on {self.preemption.signal_name or 'a stop signal'}"
                f" with exit status {REQUEUE_STATUS} (requeue)"
                if stop
                else "",
            )
        tracer.record("checkpoint write", began, step=step)
        self.last_path, self._last_time = final, time.monotonic()

    def _write_failed(self, step: int, needed: int, why: str, speaker: bool) -> None:
        """Checkpoint ``step`` cannot be written: say so in one line (``speaker``) and end the whole
        job with ``WRITE_FAILED_STATUS``; the checkpoints already written stay as they are."""
        if speaker:
            directory = Path(self.cfg.checkpoint.checkpoint_dir)
            (directory / f".{checkpoint_name(step)}.tmp").unlink(missing_ok=True)
            good = list_checkpoints(directory)
            last = f"the last good checkpoint is {good[0][1]} (intact)" if good else "no earlier checkpoint"
            print(f"mpips: checkpoint of step {step} not written to {directory}: {why}; it needs"
                  f" {_mib(needed)}, {_mib(max(0, free_bytes(directory)))} free; {last}; exiting with status"
                  f" {WRITE_FAILED_STATUS}", file=sys.stderr, flush=True)
            abort_job(self.world or self.comm, WRITE_FAILED_STATUS)
        else:
            time.sleep(ABORT_WAIT_S)  # rank 0 aborts the job meanwhile; if it could not, this rank does
            abort_job(self.world or self.comm, WRITE_FAILED_STATUS)

    def _manifest(self, step: int, stop: bool) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "created": time.time(),
            "reason": "preemption" if stop else "final" if step == self.total_steps else "scheduled",
            "world": dict(self.layout_counts),
            "tensors": self._tensors(),
            "module": self.module,
            "numel": self.plan.numel if self.plan is not None else 0,
            "optimizer": cfg.optim.optimizer,
            "batch_size": cfg.data.batch_size,
            "seed": cfg.train.seed,
            "sync": cfg.train.sync,
            "total_steps": self.total_steps,
            "config": cfg.as_dict(),
        }


@contextlib.contextmanager
def _deadline(seconds: float, expired: Callable[[], None]) -> Iterator[None]:
    """Call ``expired`` (from a timer thread) if the block lasts more than ``seconds`` (0: never)."""
    timer = threading.Timer(seconds, expired) if seconds > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB ({n:,} bytes)"
