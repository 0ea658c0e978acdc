"""bsp with backup workers (``--backup-workers b``): a step is applied once W - b pushes of it are
in, later ones are dropped and counted, and the late worker skips ahead. b = 0 is bsp, bit for
bit, whatever the workers' speeds; b = 1 with a 4x straggler ends, drops its pushes and resumes
after kill -9. Straggling is made with ``MPIPS_SLOW_WORKER`` (``mpips.worker.slow_factor``)."""

import json
import re
import signal

import pytest
import torch
from helpers import REPO, mpi_job, run_mpi, run_train, signal_at_line

from mpips.checkpoint.files import list_checkpoints
from mpips.checkpoint.preemption import REQUEUE_STATUS
from mpips.config import ConfigError, parse_args
from mpips.layout import LayoutError, RoleLayout
from mpips.sync import Bsp, sync_mode
from mpips.worker import device_time, slow_factor

FLAGS = ["--data-servers", "0", "--steps", "40", "--batch-size", "16"]
WIDE = ["--data-servers", "0", "--steps", "40", "--batch-size", "64", "--hidden", "1024"]  # compute > overheads


def test_backup_workers_need_bsp_and_fewer_than_the_workers():
    with pytest.raises(ConfigError, match="--backup-workers 1 needs --sync bsp"):
        parse_args(["--sync", "asp", "--backup-workers", "1"])
    with pytest.raises(ConfigError, match="--backup-workers must be 0 or more"):
        parse_args(["--backup-workers", "-1"])
    with pytest.raises(LayoutError, match="--backup-workers 2 needs more than 2 workers"):
        RoleLayout.from_counts(4, 1, 1, backup_workers=2)
    assert len(RoleLayout.from_counts(4, 1, 0, backup_workers=2).workers) == 3


def test_the_modes_halves_with_and_without_backup_workers():
    plain, backup = sync_mode("bsp", 2), sync_mode("bsp", 2, backup=1)
    assert isinstance(backup, Bsp) and backup.backup == 1
    assert plain.streams and plain.ahead and plain.position(3, 7) == 3
    assert not backup.streams and not backup.ahead
    assert backup.position(3, 7) == 7 and backup.position(3, 3) == 3


def test_slow_factor_names_one_worker():
    assert slow_factor("", 0) == 1.0
    assert slow_factor("1:4", 1) == 4.0 and slow_factor("1:4", 0) == 1.0
    with pytest.raises(ValueError, match="WORKER:FACTOR"):
        slow_factor("4", 0)


def test_device_time_is_milliseconds_and_refuses_the_rest():
    assert device_time("") == 0.0 and device_time("20") == 0.02
    for bad in ("fast", "-5"):
        with pytest.raises(ValueError, match="MPIPS_DEVICE_MS"):
            device_time(bad)


def _late(stdout: str) -> int:
    found = re.search(r"^gradients late, dropped \(backup workers\)\s+(\d+)$", stdout, re.M)
    assert found, stdout[-2000:]
    return int(found.group(1))


def test_zero_backup_workers_is_bsp_bit_for_bit_even_with_a_straggler(tmp_path):
    run_train(4, *FLAGS, "--save", str(tmp_path / "bsp.pt"), timeout=120, check=True)
    out = run_train(4, *FLAGS, "--backup-workers", "0", "--save", str(tmp_path / "b0.pt"),
                    env={"MPIPS_SLOW_WORKER": "1:3"}, timeout=120, check=True)
    assert "pipeline: push during backward on" in out.stdout
    a, b = torch.load(tmp_path / "bsp.pt", weights_only=True), torch.load(tmp_path / "b0.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_backup_worker_drops_a_4x_stragglers_pushes_and_resumes_after_kill_9(tmp_path):
    slow = {"MPIPS_SLOW_WORKER": "2:4"}
    out = run_train(4, *WIDE, "--backup-workers", "1", "--metrics", str(tmp_path / "m.jsonl"), env=slow,
                    timeout=120, check=True)
    assert re.search(r"^steps\s+40$", out.stdout, re.M)
    late = _late(out.stdout)
    assert late > 0
    steps = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    end = steps[-1]
    assert end["event"] == "end" and end["late"] == late and end["applied"] == 40
    # the straggler skipped steps: fewer step events from it than from the others
    per_worker = [sum(1 for e in steps if e.get("event") == "step" and e["worker"] == w) for w in range(3)]
    assert per_worker[2] < per_worker[0] == 40, per_worker

    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "10"]
    killed = run_train(4, *WIDE, "--backup-workers", "1", *ck, timeout=120,
                       env={**slow, "MPIPS_FAULT": "rank=0,phase=pull,step=25,kind=kill"})
    assert killed.returncode != 0
    resumed = run_train(4, *WIDE, "--backup-workers", "1", *ck, "--resume", env=slow, timeout=120, check=True)
    assert re.search(r"resuming from \S+ckpt-00000020\.h5 at step 20", resumed.stderr), resumed.stderr[-2000:]
    assert re.search(r"^steps\s+40$", resumed.stdout, re.M)
    accuracy = float(re.search(r"^held-out accuracy\s+([0-9.]+)$", resumed.stdout, re.M).group(1))
    assert accuracy > 0.7
    assert (tmp_path / "ck" / "ckpt-00000040.h5").exists()


@pytest.mark.parametrize("loop", ["loader", "range"])
def test_an_own_loop_with_a_backup_worker_ends_whatever_its_workers_do(loop, tmp_path):
    """job.loader follows a worker that skips ahead; a fixed range keeps the slow worker pushing
    after the others stopped, and its steps are applied alone (no hang)."""
    out = run_mpi(4, [str(REPO / "tests" / "backup_own_loop.py"), loop], timeout=120, cwd=tmp_path, check=True)
    lines = re.findall(r"worker (\d): position (\d+), (\d+) calls", out.stdout)
    found = {int(w): (int(p), int(c)) for w, p, c in lines}
    assert sorted(found) == [0, 1, 2], out.stdout
    assert found[0] == found[1] == (60, 60)
    position, calls = found[2]
    if loop == "loader":
        assert position == 60 and calls < 60  # it skipped the steps applied without it
    else:
        assert calls == 60 and position > 60
    assert float(re.search(r"held-out accuracy ([0-9.]+)", out.stdout).group(1)) > 0.5


def test_a_late_worker_skips_the_batches_its_data_server_sent_ahead(tmp_path):
    """With a data server (prefetching steps ahead), a worker that skips ahead takes in and drops
    the batches of the steps it skipped."""
    out = run_train(4, "--steps", "30", "--batch-size", "64", "--hidden", "1024", "--backup-workers", "1",
                    "--metrics", str(tmp_path / "m.jsonl"), env={"MPIPS_SLOW_WORKER": "1:4"}, timeout=120, check=True)
    assert "1 parameter server + 1 data server + 2 workers" in out.stdout
    assert re.search(r"^steps\s+30$", out.stdout, re.M) and _late(out.stdout) > 0
    steps = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    done = [e["step"] for e in steps if e.get("event") == "step" and e["worker"] == 1]
    assert len(done) < 30 and done == sorted(done), done  # it skipped, in order


def test_a_stop_signal_with_a_late_worker_checkpoints_exits_75_and_resumes(tmp_path):
    ck = tmp_path / "ck"
    args = ["-m", "mpips.train", *WIDE[:2], "--batch-size", "64", "--hidden", "1024", "--steps", "400",
            "--backup-workers", "1", "--stall-timeout", "20", "--log-every", "1", "--checkpoint-dir", str(ck)]
    with mpi_job(4, args, env={"MPIPS_SLOW_WORKER": "2:4"}, cwd=tmp_path) as proc:
        out, _ = signal_at_line(proc, "step 5/", signal.SIGUSR1)
    assert proc.returncode == REQUEUE_STATUS, out[-3000:]
    ((step, _),) = list_checkpoints(ck)
    assert 5 <= step < 400
    resumed = run_train(4, *args[2:], "--resume", env={"MPIPS_SLOW_WORKER": "2:4"}, timeout=240, check=True)
    assert f"at step {step}" in resumed.stderr and re.search(r"^steps\s+400$", resumed.stdout, re.M)
