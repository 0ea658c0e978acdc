"""Checkpoint and resume: kill-and-resume is bit-exact in bsp, preemption checkpoints and exits 75,
an incomplete or corrupt checkpoint is skipped with a warning naming it, a misfit is refused.

Layout: ``-n 3 --data-servers 0`` = ranks 0, 1 workers, rank 2 server 0.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path

import h5py
import pytest
import torch
from helpers import REPO, mpi_job, run_train

from mpips.checkpoint import REQUEUE_STATUS, Checkpointing, find_latest, list_checkpoints, verify
from mpips.config import parse_args

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


def test_kill_and_resume_is_bitwise_identical(killed_run):
    d, killed = killed_run
    assert killed.returncode != 0
    assert [s for s, _ in list_checkpoints(d / "ck")] == [8, 4]
    assert not list((d / "ck").glob(".*.tmp"))  # only complete checkpoints are visible
    resumed = run_train(
        3,
        *FLAGS,
        "--checkpoint-dir",
        str(d / "ck"),
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
    ck = Checkpointing(cfg, None, counts, manifest["tensors"][:-1], 100)
    why = ck._misfit(str(path), manifest)
    assert why.startswith(f"cannot resume from {path}: the model's parameter tensors differ")
    assert "written by 2 workers, this job has 3" in why and "--batch-size 32, this job 16" in why
    assert "A different --servers" in why
    assert (
        Checkpointing(
            parse_args(FLAGS), None, dict(manifest["world"]), manifest["tensors"], 14
        )._misfit(str(path), manifest)
        is None
    )


def test_preemption_signal_checkpoints_and_exits_75(tmp_path):
    ck = tmp_path / "ck"
    args = ["-m", "mpips.train", *FLAGS[:2], "--steps", "5000", "--stall-timeout", "10",
            "--log-every", "1", "--checkpoint-dir", str(ck)]
    lines = []
    with mpi_job(3, args, cwd=REPO) as proc:  # leaving the block ends the job, ranks included
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                break
            assert time.monotonic() < deadline, "".join(lines)
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    out = "".join(lines) + rest
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
