"""Data servers: exactly-once delivery by sample id, replication, prefetch, the same batches as
workers reading their own data, and whole jobs (accuracy, bad input ends the job).

The ``mpi``-marked tests run the DataServer / RemoteSource pair directly:
``mpirun -n 4 python -m pytest --with-mpi tests/test_dataserver.py``. The rest start mpirun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import h5py
import numpy as np
import pytest
import torch
from helpers import run_train

from mpips.data import EpochPlan
from mpips.data.assign import DataAssignment
from mpips.data.hdf5 import DatasetFile, HDF5Store, SampleFormat
from mpips.data.prepare import ArraySource, split_ids, write_dataset
from mpips.data.source import LocalSource

N, BATCH, PARTS = 203, 8, 7


def _id_file(comm) -> str:
    """Rank 0 writes a file whose sample i has x = i, y = i % 7; every rank gets its path."""
    path = None
    if comm.Get_rank() == 0:
        x = np.repeat(np.arange(N, dtype=np.float32)[:, None], 6, axis=1).reshape(N, 2, 3)
        train, val = split_ids(N, 0.1, seed=0, shuffle=False)
        src = ArraySource(
            "ids",
            SampleFormat.classification((2, 3), np.float32, 7),
            {"x": x, "y": np.arange(N) % 7},
            train,
            val,
        )
        path = tempfile.mkdtemp(prefix="mpips-ds-") + "/ids.h5"
        write_dataset(src, path, partitions=PARTS)
    return comm.bcast(path, root=0)


@pytest.mark.mpi(min_size=2, sizes=(2, 4))
@pytest.mark.parametrize("prefetch", [1, 3])
def test_every_sample_once_per_epoch_one_data_server(prefetch):
    check_every_sample_once_per_epoch(1, 1, prefetch)


@pytest.mark.mpi(min_size=4, sizes=(4,))
@pytest.mark.parametrize("replicas,prefetch", [(1, 2), (2, 2), (2, 1)])
def test_every_sample_once_per_epoch_two_data_servers(replicas, prefetch):
    check_every_sample_once_per_epoch(2, replicas, prefetch)


def check_every_sample_once_per_epoch(data_servers, replicas, prefetch):
    from mpi4py import MPI

    from mpips.dataserver import DataServer, RemoteSource

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    path = _id_file(comm)
    with DatasetFile(path) as f:
        fmt, parts, n = f.format, f.partitions, f.samples
    workers = size - data_servers
    plan = EpochPlan(n, workers, BATCH, seed=5, partitions=parts.sizes)
    steps = 2 * plan.steps_per_epoch + 3  # two whole epochs and a bit
    assign = DataAssignment.build(parts.sizes, data_servers, workers, replicas)
    sub = comm.Split(0 if rank < data_servers else 1, rank)
    got, served = [], 0
    if rank < data_servers:
        # a cache of two partitions: reads must evict and re-read, and still serve the right rows
        server = DataServer(
            comm=comm,
            servers=sub,
            index=rank,
            workers=list(range(data_servers, size)),
            path=path,
            held=assign.held_by(rank),
            max_ids=BATCH,
            cache_bytes=2 * 30 * fmt.record_bytes,
            stall_timeout=60,
        )
        server.start()
        served = server.serve().samples
        server.finish()
    else:
        w = rank - data_servers
        source = RemoteSource(
            comm=comm,
            data_servers=tuple(range(data_servers)),
            assignment=assign,
            worker=w,
            plan=plan,
            fmt=fmt,
            partitions=parts,
            prefetch=prefetch,
            total_steps=steps,
            stall_timeout=60,
        )
        local = LocalSource(HDF5Store(path, fmt, n, 1 << 20), plan, w)
        for g in range(steps):
            epoch, step = plan.position(g)
            batch, ref = source.batch(epoch, step), local.batch(epoch, step)
            np.testing.assert_array_equal(batch.ids, ref.ids)
            np.testing.assert_array_equal(batch.x, ref.x)
            np.testing.assert_array_equal(batch.y, ref.y)
            with h5py.File(path, "r") as f:
                assert batch.x[:, 0, 0].tolist() == f["train/x"][:, 0, 0][batch.ids].tolist()
            got.append((epoch, batch.ids.tolist()))
        source.close()
        assert len(source.pending) == 0
    sub.Free()
    everything = comm.allgather(got)
    per_epoch: dict[int, list[int]] = {}
    for worker_batches in everything:
        for epoch, ids in worker_batches:
            per_epoch.setdefault(epoch, []).extend(ids)
    assert sorted(per_epoch[0]) == list(range(n))
    assert sorted(per_epoch[1]) == list(range(n))
    served_all = comm.allgather(served)[:data_servers]
    assert sum(served_all) == sum(len(ids) for wb in everything for _, ids in wb)
    if replicas > 1:  # both replicas take a share
        assert min(served_all) > 0
    comm.Barrier()
    if rank == 0:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _data_file(tmp_path, name="d.h5", partitions=4, classes=10, **edit) -> str:
    """A small digits-like file (random data) for the end-to-end error cases."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 1, 8, 8)).astype(np.float32)
    train, val = split_ids(200, 0.2, 0, False)
    src = ArraySource(
        "d",
        SampleFormat.classification((1, 8, 8), np.float32, classes),
        {"x": x, "y": rng.integers(0, classes, 200)},
        train,
        val,
    )
    path = str(tmp_path / name)
    write_dataset(src, path, partitions=partitions)
    return path


def _corrupt(path):
    with h5py.File(path, "r+") as f:
        f["train/x"][100, 0, 0, 0] += 1.0


def _schema(path):
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = 7


def _labels(path):
    with h5py.File(path, "r+") as f:
        f["train/y"][10] = 42
        f["train"].attrs["partition_crc32"] = _recrc(f)


def _recrc(f):
    import zlib

    off, size = f["train"].attrs["partition_offsets"], f["train"].attrs["partition_sizes"]
    return np.array(
        [
            [zlib.crc32(np.ascontiguousarray(f["train"][k][o : o + s]).data) for k in ("x", "y")]
            for o, s in zip(off, size, strict=True)
        ],
        dtype=np.int64,
    )


def _empty(path):
    with h5py.File(path, "r+") as f:
        del f["train/x"], f["train/y"]
        f["train"].create_dataset("x", shape=(0, 1, 8, 8), dtype="f4")
        f["train"].create_dataset("y", shape=(0,), dtype="i8")


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("missing", [], r"missing\.h5 does not exist"),
        ("schema", [], r"has format version 7; this mpips reads version 1"),
        (
            "checksum",
            [],
            r"partition 2 \(samples 80\.\.119\) field 'x': checksum .* does not match",
        ),
        ("labels", [], r"partition 0: label 42 of sample 10 is outside \[0, 10\)"),
        ("partitions", ["--data-servers", "2"], r"has 1 partition\(s\), but 2 data servers"),
        ("empty", [], r"the training split is empty"),
    ],
)
def test_bad_dataset_ends_the_job_before_training(tmp_path, case, flags, message):
    path = str(tmp_path / "missing.h5")
    if case != "missing":
        path = _data_file(tmp_path, partitions=1 if case == "partitions" else 4)
        {"schema": _schema, "checksum": _corrupt, "labels": _labels, "empty": _empty}.get(
            case, lambda p: None
        )(path)
    nprocs = 4 if case == "partitions" else 3
    result = run_train(nprocs, "--data", path, "--steps", "5", *flags, timeout=90, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert result.stderr.count("mpips: bad dataset:") == 1 and path in result.stderr
    assert "step 1" not in result.stdout  # nothing trained


def test_default_job_runs_through_the_data_server(tmp_path):
    metrics = tmp_path / "m.jsonl"
    out = run_train(
        4,
        "--data-dir",
        str(tmp_path),
        "--metrics",
        str(metrics),
        timeout=240,
        cwd=tmp_path,
        check=True,
    )
    assert "data assignment: 16 partitions x 1 replica on 1 data server; 2 workers" in out.stdout
    acc = float(re.search(r"held-out accuracy\s+([0-9.]+)", out.stdout).group(1))
    assert acc >= 0.95, out.stdout[-1500:]
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    waits = [e["data_wait_s"] for e in steps if e["event"] == "step"]
    assert len(waits) == 2 * 690 and all(w >= 0 for w in waits)


def test_data_servers_give_the_same_batches_as_workers_reading_themselves(tmp_path):
    """bsp, 2 workers: no data server and 2 data servers (replicated) train the same model.
    (One data server is the default job's case, and the mpi tests compare batches directly.)"""
    common = ["--data-dir", str(tmp_path), "--steps", "30", "--optimizer", "sgd", "--lr", "0.05"]
    runs = {
        "local": (3, ["--data-servers", "0"]),
        "two": (5, ["--data-servers", "2", "--replicas", "2", "--prefetch", "3"]),
    }
    states = {}
    for name, (n, flags) in runs.items():
        run_train(
            n,
            *common,
            *flags,
            "--save",
            str(tmp_path / f"{name}.pt"),
            timeout=120,
            cwd=tmp_path,
            check=True,
        )
        states[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    for k, v in states["local"].items():
        torch.testing.assert_close(states["two"][k], v, rtol=1e-5, atol=1e-6)
