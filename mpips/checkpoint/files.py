"""Checkpoint files: names, the HDF5 format and its verification, the collective write, publishing,
and what a restart does with files that are not whole (set aside, removed) or a disk without room
(``preflight``). The format is described in ``mpips.checkpoint``."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from mpi4py import MPI

from mpips.transport import DEFAULT_CHUNK_BYTES, Tag, chunks, recv_chunks, send_chunks, wait_all

__all__ = [
    "module_dataset",
    "module_spec",
    "per_worker",
    "FORMAT",
    "HDF5_OVERHEAD",
    "PIECE_OVERHEAD",
    "READABLE",
    "SCALER",
    "VERSION",
    "CheckpointError",
    "Piece",
    "checkpoint_name",
    "find_latest",
    "free_bytes",
    "has_mpio",
    "list_checkpoints",
    "preflight",
    "publish",
    "remove_partial",
    "set_aside",
    "slabs",
    "verify",
    "write_collective",
]

log = logging.getLogger("mpips.checkpoint")

# bytes a checkpoint file takes beyond its data (HDF5's headers, the manifest), measured here at 20 KiB
# for 13 datasets: a generous 64 KiB, and 4 KiB more per piece written
HDF5_OVERHEAD, PIECE_OVERHEAD = 64 << 10, 4 << 10
FORMAT = "mpips-checkpoint"
VERSION = 5  # 3: workers/residual (error feedback); 4: workers/momentum; 5: workers/scaler; older files load
READABLE = (2, 3, 4, 5)
SCALER = ("scale", "growth_tracker")  # the columns of workers/scaler
_NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")


class CheckpointError(RuntimeError):
    """A checkpoint file is incomplete, corrupt or unreadable; the message names it."""


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
    return hashlib.sha256(np.ascontiguousarray(array)).hexdigest()  # hashes the buffer: no copy


def verify(path: str | Path) -> dict[str, Any]:
    """Read the manifest and check every piece's checksum; returns the manifest.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            manifest = json.loads(str(f.attrs["manifest"]))
            if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE:
                raise CheckpointError(f"{path}: not an mpips checkpoint of version"
                                      f" {' or '.join(map(str, READABLE))}")
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


def find_latest(directory: str | Path, aside: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies; a warning names each one skipped.

    Args:
        aside: rename each one skipped out of the way (``set_aside``), so that it no longer
            counts as a checkpoint of the directory (a requeued job then resumes every time).
    """
    for _, path in list_checkpoints(directory):
        try:
            return path, verify(path)
        except CheckpointError as exc:
            moved = f"; moved aside to {set_aside(path).name}" if aside else ""
            log.warning("skipping checkpoint: %s%s", exc, moved)
    return None


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not verify to ``<name>.corrupt`` (``.corrupt.1``, ... when
    taken), next to it: kept for inspection, no longer listed, never pruned. Returns the new path."""
    target, n = path.with_name(path.name + ".corrupt"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, target)
    return target


def remove_partial(directory: str | Path) -> list[str]:
    """Delete the temporary files (``.ckpt-*.h5.tmp``) of writes that never completed; their names."""
    d = Path(directory)
    gone = sorted(p.name for p in d.glob(".ckpt-*.tmp")) if d.is_dir() else []
    for name in gone:
        (d / name).unlink(missing_ok=True)
    return gone


def preflight(directory: Path, needed: int) -> str | None:
    """Can ``directory`` take a file of ``needed`` bytes now? None, or what stops it.

    Reserves the bytes for real (``posix_fallocate`` of a probe file, removed at once), so a full
    disk, a quota, a read-only or failing file system is found before any rank writes, where the
    whole job can stop cleanly, rather than in the middle of a collective write.
    """
    probe = directory / f".ckpt-probe-{os.getpid()}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(1, needed))
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return f"{os.strerror(exc.errno) if exc.errno else exc}"
    return None


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use in ``directory``'s file system (-1: unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


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


def slabs(shape: tuple[int, ...], itemsize: int, limit: int) -> list[tuple[int | slice, ...]]:
    """Indices into an array of ``shape`` that cover it in order, each at most ``limit`` bytes.

    Blocks of whole rows where a row fits in ``limit``, else (2-D) column ranges of one row.
    """
    if 0 in shape:
        return []
    row = itemsize * math.prod(shape[1:])  # bytes of one row (one element for 1-D)
    if row <= limit:
        per = limit // row * row
        return [(slice(a // row, b // row),) for a, b in chunks(shape[0] * row, per)]
    if len(shape) != 2:
        raise ValueError(f"cannot cut a {shape} array into slabs of {limit} bytes")
    per = limit // itemsize * itemsize
    return [(r, slice(a // itemsize, b // itemsize)) for r in range(shape[0]) for a, b in chunks(row, per)]


def _write(handle: h5py.Dataset, start: int, data: np.ndarray, chunk_bytes: int) -> None:
    """Rows ``start:start+len(data)`` of ``handle`` := ``data``, one slab at a time."""
    for index in slabs(data.shape, data.dtype.itemsize, chunk_bytes):
        rows, *rest = index
        at = slice(start + rows.start, start + rows.stop) if isinstance(rows, slice) else start + rows
        handle[(at, *rest)] = data[index]


def has_mpio() -> bool:
    """Whether this h5py writes through MPI-IO (parallel HDF5)."""
    return bool(h5py.get_config().mpi)


def write_collective(
    comm: MPI.Comm, path: Path, pieces: list[Piece], manifest: dict[str, Any],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float = 600.0,
) -> None:
    """Collective over ``comm``: write every rank's pieces and the manifest into ``path``.

    Each piece goes in slabs of at most ``chunk_bytes``. Without MPI-IO, rank 0 writes alone: the
    other ranks send it their pieces in chunks, one rank after another; ``timeout`` bounds a
    sender's wait for its turn.
    """
    by_rank = comm.allgather([p.meta() for p in pieces])
    metas = [m for rank_metas in by_rank for m in rank_metas]
    datasets = {m["dataset"]: (tuple(m["shape"]), m["dtype"]) for m in metas}
    manifest = dict(manifest, pieces=sorted(metas, key=lambda m: (m["dataset"], m["start"])))
    text = json.dumps(comm.bcast(manifest, root=0), sort_keys=True)
    if has_mpio():
        with h5py.File(path, "w", driver="mpio", comm=comm) as f:
            handles = {
                n: f.create_dataset(n, shape=s, dtype=np.dtype(d))
                for n, (s, d) in sorted(datasets.items())
            }
            for p in pieces:
                _write(handles[p.name], p.start, p.data, chunk_bytes)
            f.attrs["manifest"] = text
        return
    # no MPI-IO in this h5py: one writer, receiving one piece at a time
    if comm.Get_rank() != 0:
        requests = [r for p in pieces for r in send_chunks(comm, p.data, 0, Tag.CHECKPOINT, chunk_bytes)]
        wait_all(requests, f"rank 0 to receive this rank's checkpoint pieces for {path.name} (one writer:"
                 " h5py without MPI-IO)", timeout)
        return
    with h5py.File(path, "w") as f:
        handles = {
            n: f.create_dataset(n, shape=s, dtype=np.dtype(d))
            for n, (s, d) in sorted(datasets.items())
        }
        for p in pieces:
            _write(handles[p.name], p.start, p.data, chunk_bytes)
        for rank, theirs in enumerate(by_rank[1:], start=1):
            for m in theirs:
                data = np.empty((m["stop"] - m["start"], *m["shape"][1:]), dtype=np.dtype(m["dtype"]))
                wait_all(recv_chunks(comm, data, rank, Tag.CHECKPOINT, chunk_bytes),
                         f"rank {rank}'s checkpoint piece {m['dataset']}[{m['start']}:] for {path.name}", timeout)
                _write(handles[m["dataset"]], m["start"], data, chunk_bytes)
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
    others = [path for _, path in list_checkpoints(final.parent) if path != final]
    for old in others[max(1, keep) - 1 :]:  # never the one just written, whatever its step
        old.unlink(missing_ok=True)
    for stale in final.parent.glob(".ckpt-*.tmp"):  # left by a job that died while writing
        stale.unlink(missing_ok=True)


def module_spec(state: dict[str, torch.Tensor]) -> list[list[Any]]:
    """[name, shape, dtype, "buffer" | "frozen"] of each tensor of a worker's module state, for the manifest."""
    return [[n, list(t.shape), str(t.dtype), "buffer" if per_worker(t) else "frozen"] for n, t in state.items()]


def per_worker(t: torch.Tensor) -> bool:
    """Buffers are each worker's own; frozen parameters are the same on every worker."""
    return not isinstance(t, torch.nn.Parameter)


def module_dataset(name: str, t: torch.Tensor) -> str:
    """Where a worker's buffer (one row per worker) or a frozen parameter (one row) is in the file."""
    return f"workers/buffers/{name}" if per_worker(t) else f"frozen/{name}"
