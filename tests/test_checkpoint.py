"""Checkpoint and resume: kill-and-resume is bit-exact in bsp, preemption checkpoints and exits 75,
an incomplete or corrupt checkpoint is skipped with a warning naming it, a misfit is refused.

Layout: ``-n 3 --data-servers 0`` = ranks 0, 1 workers, rank 2 server 0. The model has a frozen
layer, a layer its forward never calls and BatchNorm buffers (``tests/toymodels.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import REPO, mpi_job, run_train, signal_at_line

from mpips.checkpoint import (
    HDF5_OVERHEAD,
    PIECE_OVERHEAD,
    REQUEUE_STATUS,
    WRITE_FAILED_STATUS,
    Checkpointing,
    find_latest,
    list_checkpoints,
    preflight,
    publish,
    remove_partial,
    verify,
)
from mpips.checkpoint.resume import clash
from mpips.config import parse_args
from mpips.shard import ShardPlan

FLAGS = (
    "--data-servers",
    "0",
    "--steps",
    "14",
    "--stall-timeout",
    "10",
    "--optimizer",
    "adam",
    "--seed",
    "3",
    "--log-every",
    "100",
    "--model",  # a frozen layer, a never-called one and BatchNorm buffers: all must resume exactly
    "toymodels:frozen_unused_batchnorm",
)


def _equal(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """An uninterrupted run, and a run with checkpoints every 4 steps SIGKILLed at step 10."""
    d = tmp_path_factory.mktemp("ckpt")
    run_train(3, *FLAGS, "--save", str(d / "reference.pt"), timeout=120, check=True)
    killed = run_train(
        3,
        *FLAGS,
        "--checkpoint-dir",
        str(d / "ck"),
        "--checkpoint-every",
        "4",
        env={"MPIPS_FAULT": "rank=0,phase=pull,step=10,kind=kill"},
        timeout=120,
    )
    return d, killed


def test_kill_and_resume_is_bitwise_identical(killed_run, tmp_path):
    d, killed = killed_run
    assert killed.returncode != 0
    assert [s for s, _ in list_checkpoints(d / "ck")] == [8, 4]
    assert not list((d / "ck").glob(".*.tmp"))  # only complete checkpoints are visible
    shutil.copytree(d / "ck", tmp_path / "ck")  # the other tests read the killed run's directory
    resumed = run_train(
        3,
        *FLAGS,
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--checkpoint-every",
        "4",
        "--resume",
        "--save",
        str(d / "resumed.pt"),
        timeout=120,
        check=True,
    )
    assert "resuming from" in resumed.stderr and "ckpt-00000008.h5 at step 8" in resumed.stderr
    assert _equal(d / "reference.pt", d / "resumed.pt")
    # the run's last step is checkpointed too (14), and --keep 3 pruned the oldest
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [14, 12, 8]
    assert verify(tmp_path / "ck" / "ckpt-00000014.h5")["reason"] == "final"
    # run again, as a requeued job would after a rank died past its final checkpoint: the run is
    # complete, exit 0, the final model written again, nothing in the directory touched
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    again = run_train(3, *FLAGS, "--checkpoint-dir", str(tmp_path / "ck"), "--resume", "--save",
                      str(tmp_path / "again.pt"), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("mpips: the run is complete: ") == 1 and "step 1/" not in again.stdout
    assert f"{tmp_path / 'ck'}/ckpt-00000014.h5 is its checkpoint of step 14 of 14" in again.stdout
    assert _equal(d / "reference.pt", tmp_path / "again.pt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


def test_kill_and_resume_in_chunks_of_1000_bytes_is_bitwise_the_default_run(killed_run, tmp_path):
    """Every transfer and checkpoint write in pieces of 1000 bytes (floats cut in two, one rank's RNG
    state written in column slabs): killed, resumed, bit for bit the uninterrupted default run."""
    d, _ = killed_run
    flags = (*FLAGS, "--chunk-bytes", "1000", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "4")
    killed = run_train(3, *flags, env={"MPIPS_FAULT": "rank=0,phase=pull,step=10,kind=kill"}, timeout=120)
    assert killed.returncode != 0
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [8, 4]
    run_train(3, *flags, "--resume", "--save", str(tmp_path / "resumed.pt"), timeout=120, check=True)
    assert _equal(d / "reference.pt", tmp_path / "resumed.pt")


def test_corrupt_and_incomplete_checkpoints_are_skipped(killed_run, tmp_path, caplog):
    d, _ = killed_run
    ck = tmp_path / "ck"
    shutil.copytree(d / "ck", ck)
    newest = ck / "ckpt-00000008.h5"
    with h5py.File(newest, "r+") as f:  # one flipped value: the checksum must catch it
        f["params"][5] = f["params"][5] + 1.0
    shutil.copy(ck / "ckpt-00000004.h5", ck / "ckpt-00000012.h5")
    with open(ck / "ckpt-00000012.h5", "r+b") as f:  # truncated: a writer that died
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="mpips.checkpoint"):
        path, manifest = find_latest(ck)
    assert path.name == "ckpt-00000004.h5" and manifest["step"] == 4
    assert "ckpt-00000012.h5: unreadable" in caplog.text
    assert "ckpt-00000008.h5: checksum mismatch in params" in caplog.text
    assert verify(ck / "ckpt-00000004.h5")["world"] == {
        "servers": 1,
        "data_servers": 0,
        "workers": 2,
    }


def _flip_16_bytes_of_params(path: Path) -> None:
    with h5py.File(path, "r") as f:
        at = f["params"].id.get_offset() + 64  # inside the data of ``params``, not HDF5's headers
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(16)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("damage", ["truncated to half", "16 bytes flipped"])
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        killed_run, tmp_path, damage):
    """What a requeued job meets after a writer died or a disk lied: --resume alone skips the newest
    checkpoint in one line, moves it aside (so the next restart does not meet it again, and the
    one-run-per-directory guard does not count it), removes an interrupted write's partial file,
    resumes from the one before and ends bitwise equal to the uninterrupted run."""
    d, _ = killed_run
    ck = tmp_path / "ck"
    shutil.copytree(d / "ck", ck)
    newest = ck / "ckpt-00000008.h5"
    if damage == "truncated to half":
        with open(newest, "r+b") as f:
            f.truncate(newest.stat().st_size // 2)
    else:
        _flip_16_bytes_of_params(newest)
    (ck / ".ckpt-00000012.h5.tmp").write_bytes(b"partial")  # a write that never completed
    out = run_train(3, *FLAGS, "--checkpoint-dir", str(ck), "--checkpoint-every", "4", "--resume",
                    "--save", str(tmp_path / "resumed.pt"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    skipped = [line for line in out.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and f"{newest}: " in skipped[0], out.stderr[-2000:]
    assert "moved aside to ckpt-00000008.h5.corrupt" in skipped[0]
    assert ("checksum mismatch in params" if "flipped" in damage else "unreadable") in skipped[0]
    assert "removed 1 partial file(s) of an interrupted checkpoint write" in out.stderr
    assert f"resuming from {ck}/ckpt-00000004.h5 at step 4" in out.stderr
    assert _equal(d / "reference.pt", tmp_path / "resumed.pt")
    assert (ck / "ckpt-00000008.h5.corrupt").exists() and not list(ck.glob(".*.tmp"))
    assert [s for s, _ in list_checkpoints(ck)] == [14, 12, 8]  # 8 written again by the resumed run


def test_resume_from_a_path_sets_aside_newer_checkpoints_that_do_not_verify(killed_run, tmp_path):
    """--resume PATH: a newer checkpoint that does not verify is no run's state (moved aside); one
    that verifies still belongs to a run and is refused, as before."""
    d, _ = killed_run
    ck = tmp_path / "ck"
    shutil.copytree(d / "ck", ck)
    (ck / "ckpt-00000012.h5").write_bytes(b"not HDF5")
    (ck / ".ckpt-00000016.h5.tmp").write_bytes(b"partial")
    oldest = ck / "ckpt-00000004.h5"
    why = clash((str(oldest), verify(oldest)), str(ck), True)
    assert "holds newer checkpoints (steps 8)" in why
    assert (ck / "ckpt-00000012.h5.corrupt").read_bytes() == b"not HDF5"
    assert [s for s, _ in list_checkpoints(ck)] == [8, 4]
    assert remove_partial(ck) == [".ckpt-00000016.h5.tmp"] and not list(ck.glob(".*.tmp"))


def test_preflight_says_why_a_directory_cannot_take_a_checkpoint(tmp_path):
    assert preflight(tmp_path, 1 << 20) is None and not list(tmp_path.iterdir())  # the probe is gone
    assert preflight(tmp_path / "missing", 10) == "No such file or directory"
    assert preflight(tmp_path, 1 << 62) in ("No space left on device", "File too large")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only: skipped elsewhere), unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_ends_the_job_in_one_line_keeping_the_last_good_checkpoint(killed_run, small_disk):
    """The checkpoint directory fills up after the first checkpoint: the job ends within seconds
    with one line naming the directory, the bytes needed and free and the last good checkpoint,
    exit status 74 (EX_IOERR), no partial file left; freed, the same command resumes from it."""
    d, _ = killed_run
    manifest = verify(d / "ck" / "ckpt-00000004.h5")
    data = sum((m["stop"] - m["start"]) * np.dtype(m["dtype"]).itemsize * int(np.prod(m["shape"][1:]))
               for m in manifest["pieces"])
    needed = data + PIECE_OVERHEAD * len(manifest["pieces"]) + HDF5_OVERHEAD  # what a write asks for
    size = (d / "ck" / "ckpt-00000004.h5").stat().st_size
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - needed - size // 2))  # room for one
    ck = small_disk / "ck"
    flags = (*FLAGS, "--checkpoint-dir", str(ck), "--checkpoint-every", "4")
    began = time.monotonic()
    full = run_train(3, *flags, timeout=120)
    elapsed = time.monotonic() - began
    assert full.returncode == WRITE_FAILED_STATUS == 74, full.stderr[-3000:]
    assert elapsed < 30
    lines = [line for line in full.stderr.splitlines() if line.startswith("mpips: ")]
    assert len(lines) == 1, full.stderr[-3000:]
    assert lines[0].startswith(f"mpips: checkpoint of step 8 not written to {ck}: No space left on device; it needs")
    assert f"({needed:,} bytes)" in lines[0] and " free; the last good checkpoint is" in lines[0]
    assert f"{ck}/ckpt-00000004.h5 (intact); exiting with status 74" in lines[0]
    assert "Traceback" not in full.stderr
    assert "less than two checkpoints of this job" in full.stderr  # said at start-up
    assert [s for s, _ in list_checkpoints(ck)] == [4] and not list(ck.glob(".*.tmp"))
    verify(ck / "ckpt-00000004.h5")
    filler.unlink()  # space freed: the same job resumes and ends as the uninterrupted run
    run_train(3, *flags, "--resume", "--save", str(small_disk / "resumed.pt"), timeout=120, check=True)
    assert _equal(d / "reference.pt", small_disk / "resumed.pt")


def test_resume_reshards_onto_more_servers(killed_run, tmp_path):
    d, _ = killed_run
    out = run_train(
        4,
        *FLAGS,
        "--servers",
        "2",
        "--resume",
        str(d / "ck" / "ckpt-00000008.h5"),
        "--save",
        str(tmp_path / "two.pt"),
        timeout=120,
        check=True,
    )
    assert "ckpt-00000008.h5 at step 8" in out.stderr
    ref = torch.load(d / "reference.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for k in ref:  # the same arithmetic per element; only the sharding changed
        torch.testing.assert_close(ref[k], two[k], rtol=1e-5, atol=1e-6)


def test_resume_with_other_workers_or_model_is_refused(killed_run):
    d, _ = killed_run
    path = d / "ck" / "ckpt-00000004.h5"
    manifest = verify(path)
    cfg = parse_args(["--resume", str(path), "--batch-size", "16"])
    counts = {"servers": 3, "data_servers": 0, "workers": 3}
    ck = Checkpointing(cfg, None, counts, ShardPlan.build(manifest["tensors"][:-1], 3), manifest["module"], 100)
    why = ck._misfit(str(path), manifest)
    assert why.startswith(f"cannot resume from {path}: the model's trainable parameter tensors differ")
    assert "written by 2 workers, this job has 3" in why and "--batch-size 32, this job 16" in why
    assert "A different --servers" in why
    assert (
        Checkpointing(
            parse_args(FLAGS), None, dict(manifest["world"]), ShardPlan.build(manifest["tensors"], 1),
            manifest["module"], 14,
        )._misfit(str(path), manifest)
        is None
    )


def test_preemption_signal_checkpoints_and_exits_75(tmp_path):
    ck = tmp_path / "ck"
    args = ["-m", "mpips.train", *FLAGS[:2], "--steps", "5000", "--stall-timeout", "10",
            "--log-every", "1", "--checkpoint-dir", str(ck)]
    with mpi_job(3, args, cwd=REPO) as proc:  # leaving the block ends the job, ranks included
        out, elapsed = signal_at_line(proc, "step 3/", signal.SIGUSR1)  # mpirun forwards it to every rank
    assert proc.returncode == REQUEUE_STATUS, out[-3000:]
    assert elapsed < 30
    ((step, path),) = list_checkpoints(ck)
    assert verify(path)["reason"] == "preemption" and 3 <= step < 5000
    assert f"exiting with status {REQUEUE_STATUS}" in out and "stopping on SIGUSR1" in out


def test_kill_and_resume_through_a_data_server_with_three_workers(tmp_path):
    """The default roles plus a third worker: bsp sums in worker order, so resume is bit-exact
    whatever order the pushes arrive in, and the data server serves the same samples again."""
    common = ("--steps", "12", "--stall-timeout", "10", "--seed", "5", "--data-dir", str(tmp_path))
    run_train(5, *common, "--save", str(tmp_path / "reference.pt"), timeout=120, check=True)
    flags = (*common, "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5")
    killed = run_train(5, *flags, env={"MPIPS_FAULT": "rank=1,phase=pull,step=8,kind=kill"}, timeout=120)
    assert killed.returncode != 0
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [5]
    run_train(5, *flags, "--resume", "--save", str(tmp_path / "resumed.pt"), timeout=120, check=True)
    assert _equal(tmp_path / "reference.pt", tmp_path / "resumed.pt")


def test_publish_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    """A checkpoint of a lower step than the others in the directory (a run resumed from an
    earlier one) survives its own pruning; the oldest others go."""
    for step in (20, 40, 60):
        (tmp_path / f"ckpt-{step:08d}.h5").write_bytes(b"x")
    tmp = tmp_path / ".ckpt-00000010.h5.tmp"
    tmp.write_bytes(b"new")
    publish(tmp, tmp_path / "ckpt-00000010.h5", keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [60, 10]
    assert (tmp_path / "ckpt-00000010.h5").read_bytes() == b"new"


def test_a_fresh_run_refuses_a_used_checkpoint_dir_and_loses_nothing(tmp_path):
    ck = tmp_path / "ck"
    flags = (*FLAGS[:2], "--steps", "9", "--checkpoint-dir", str(ck), "--checkpoint-every", "4", "--keep", "2")
    run_train(3, *flags, timeout=120, check=True)
    assert [s for s, _ in list_checkpoints(ck)] == [9, 8]  # the last step is checkpointed too
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    again = run_train(3, *(f if f != "4" else "3" for f in flags), timeout=120)  # no --resume
    assert again.returncode == 2, again.stderr[-2000:]
    assert again.stderr.count("already holds checkpoints (newest: step 9)") == 1
    assert "add --resume" in again.stderr and "step 1/" not in again.stdout
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # not one byte changed
    # resuming from an older one while newer ones are there would interleave two runs: refused
    older = run_train(3, *flags, "--steps", "12", "--resume", str(ck / "ckpt-00000008.h5"), timeout=120)
    assert older.returncode == 2 and "holds newer checkpoints (steps 9)" in older.stderr
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


@pytest.mark.parametrize("sync", ["asp", "ssp"])
def test_async_run_preempted_and_resumed_reaches_the_uninterrupted_accuracy(sync, tmp_path):
    """asp/ssp checkpoint at a consistent cut: stopped by SIGUSR1 mid-run, resumed, the run
    still reaches the 0.95 that test_engine's uninterrupted asp/ssp runs reach, within the bound."""
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    flags = ["--data-servers", "0", "--sync", sync, "--staleness", "2", "--epochs", "60",
             "--lr-schedule", "cosine", "--checkpoint-dir", str(ck), "--checkpoint-every", "150",
             "--stall-timeout", "20", "--log-every", "10"]
    with mpi_job(4, ["-m", "mpips.train", *flags], cwd=REPO) as proc:
        out, _ = signal_at_line(proc, "step 400/", signal.SIGUSR1, wait=120)
    assert proc.returncode == REQUEUE_STATUS, out[-3000:]
    found = list_checkpoints(ck)
    assert len(found) >= 2  # periodic ones (every 150 steps of the slowest worker), then the stop
    stop = verify(found[0][1])
    assert stop["reason"] == "preemption" and stop["sync"] == sync
    positions = stop["positions"]
    assert len(positions) == 3 and min(positions) >= 400 - 3 * 40  # each worker's own next step
    if sync == "ssp":
        assert max(positions) - min(positions) <= 2 + 1  # the cut keeps the bound (+ the step in flight)
    resumed = run_train(4, *flags, "--resume", "--metrics", str(metrics), timeout=240, check=True)
    assert f"at step {stop['step']}" in resumed.stderr
    end = [json.loads(x) for x in metrics.read_text().splitlines() if '"end"' in x][0]
    assert end["accuracy"] >= 0.95, end["accuracy"]
    if sync == "ssp":
        assert end["max_staleness"] <= 2
    assert list_checkpoints(ck)[0][0] == end["step"]  # and the last step is checkpointed


def test_ssp_checkpoints_with_message_pulls_do_not_deadlock(tmp_path):
    """A waiting ssp worker must see the checkpoint mark also when pulls go by messages
    (MPICH, TCP-only Open MPI): servers answer a waiting pull once a checkpoint is open. Worker 0
    evaluates at the checkpoints' steps: without a notice to wait on, it asks every server for its
    values (a MASTER message), answered in a checkpoint too."""
    ck = tmp_path / "ck"
    run_train(4, "--data-servers", "0", "--sync", "ssp", "--staleness", "1", "--pull", "message",
              "--steps", "60", "--checkpoint-dir", str(ck), "--checkpoint-every", "10", "--eval-every", "10",
              "--model", "toymodels:slow_on_rank", "--stall-timeout", "20",
              env={"PYTHONPATH": str(REPO / "tests"), "MPIPS_TEST_SLOW_RANK": "1"}, timeout=180, check=True)
    steps = [s for s, _ in list_checkpoints(ck)]
    assert steps[0] == 60 and len(steps) == 3  # --keep 3: the last step and two periodic ones
    for _, path in list_checkpoints(ck)[1:]:
        m = verify(path)
        # the cut: at or past the mark, and the workers within the bound (+ the step in flight)
        assert m["step"] <= min(m["positions"]) and max(m["positions"]) - min(m["positions"]) <= 1 + 1


def test_slabs_cover_a_piece_in_order_within_the_limit():
    from mpips.checkpoint import slabs

    for shape, itemsize, limit in [((1001,), 4, 100), ((3, 10), 8, 100), ((2, 333), 1, 100), ((5,), 4, 2**30),
                                   ((0, 7), 1, 64), ((4, 25), 4, 100)]:
        a = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        parts = [a[index].reshape(-1) for index in slabs(shape, itemsize, limit)]
        assert all(part.size * itemsize <= limit for part in parts), (shape, limit)
        assert np.array_equal(np.concatenate(parts) if parts else a.reshape(-1), a.reshape(-1)), shape


@pytest.mark.mpi(min_size=2, sizes=(2,))
@pytest.mark.parametrize("mpio", [True, False], ids=["mpi-io", "one-writer"])
def test_write_collective_writes_every_piece_in_slabs(mpio, monkeypatch):
    """Pieces of 1-D and 2-D datasets from two ranks, written in slabs of 100 bytes, through MPI-IO
    or (h5py without it) sent to rank 0 in chunks: every byte where it belongs, checksums verify."""
    import tempfile

    from mpi4py import MPI

    from mpips import checkpoint

    comm = MPI.COMM_WORLD
    if mpio and not checkpoint.has_mpio():
        pytest.skip("this h5py has no MPI-IO")
    monkeypatch.setattr(checkpoint.files, "has_mpio", lambda: mpio)  # what write_collective asks
    path = Path(comm.bcast(tempfile.mkdtemp(prefix="mpips-test-") if comm.rank == 0 else None)) / "c.h5"
    rng = np.random.default_rng(comm.rank)
    params = np.random.default_rng(9).standard_normal(1501).astype(np.float32)
    lo, hi = (0, 1001) if comm.rank == 0 else (1001, 1501)
    rows = rng.integers(0, 2**40, (3, 10))
    state = rng.integers(0, 256, (1, 333), dtype=np.uint8)
    pieces = [
        checkpoint.Piece("params", lo, params[lo:hi], (1501,)),
        checkpoint.Piece("rows", 3 * comm.rank, rows, (6, 10)),
        checkpoint.Piece("state", comm.rank, state, (2, 333)),
    ]
    checkpoint.write_collective(comm, path, pieces, {"format": checkpoint.FORMAT, "version": checkpoint.VERSION},
                                chunk_bytes=100)
    every = comm.allgather((rows, state))
    if comm.rank == 0:
        checkpoint.verify(path)
        with h5py.File(path, "r") as f:
            assert np.array_equal(f["params"][:], params)
            assert np.array_equal(f["rows"][:], np.concatenate([r for r, _ in every]))
            assert np.array_equal(f["state"][:], np.concatenate([s for _, s in every]))
    comm.Barrier()
