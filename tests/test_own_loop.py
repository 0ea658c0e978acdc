"""The library API (``mpips.init``, ``job.optimizer``): own training loops under mpirun, 2 servers
and 2 workers, as a user runs them: the examples reach what they promise, a ported torch script
ends where torch does, and bad input is one line before any work."""

import difflib
import re
import signal
import time

import pytest
import torch
from helpers import REPO, mpi_job, run_mpi, signal_at_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CASES = REPO / "tests" / "own_loop_cases.py"


def example(name: str, tmp_path, *args: str) -> str:
    out = run_mpi(4, [str(REPO / "examples" / name), *args], timeout=240, cwd=tmp_path, check=True)
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    return out.stdout


def test_gradient_accumulation_with_a_torch_scheduler_trains_the_digits(tmp_path):
    out = example("own_loop.py", tmp_path, "--steps", "150", "--accumulate", "2")
    lr, accuracy = map(float, re.search(r"lr now (\S+), held-out accuracy ([0-9.]+)", out).groups())
    assert accuracy >= 0.93, out
    assert lr == 0.0  # the cosine schedule ran to its end, on the optimizer job.optimizer returned


def test_gan_discriminator_and_generator_both_train(tmp_path):
    out = example("gan.py", tmp_path, "--steps", "300")
    d0, d1, g0, g1, off0, off1 = map(float, re.search(
        r"discriminator loss (\S+) -> (\S+), generator loss (\S+) -> (\S+); generated points (\S+) -> (\S+)", out
    ).groups())
    assert abs(d1 - d0) > 0.02 and abs(g1 - g0) > 0.02, out  # both models' losses move
    assert off1 < 0.6 * off0, out  # and the generator's points come nearer the real ring


def test_student_learns_a_frozen_teacher_that_is_never_registered(tmp_path):
    out = example("distill.py", tmp_path, "--steps", "200")
    first, last = map(float, re.search(r"KL\(teacher \|\| student\) (\S+) -> (\S+)", out).groups())
    assert last < 0.2 * first, out


def test_early_stopping_on_a_held_out_metric_in_the_loop(tmp_path):
    out = example("early_stopping.py", tmp_path, "--max-steps", "2000", "--patience", "3")
    step, best = re.search(r"stopped at step (\d+) of at most 2000; best held-out accuracy ([0-9.]+)", out).groups()
    assert int(step) < 2000 and float(best) >= 0.93, out  # every worker took the same decision, or bsp would stall


def test_a_torch_script_ported_in_ten_lines_ends_where_torch_ends(tmp_path):
    """bsp with 2 workers and 2 servers equals one torch process on the concatenated batch:
    AdamW, OneCycleLR (warm-up + cosine), two micro-batches accumulated, 30 steps."""
    plain, port = REPO / "examples/port/plain_torch.py", REPO / "examples/port/mpips_port.py"
    diff = [line for line in difflib.unified_diff(plain.read_text().splitlines(), port.read_text().splitlines(), n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len([line for line in diff if line.startswith("+")]) <= 10, "\n".join(diff)
    run_mpi(1, [str(plain), "--out", str(tmp_path / "plain.pt")], timeout=120, cwd=tmp_path, check=True)
    run_mpi(4, [str(port), "--out", str(tmp_path / "port.pt")], timeout=180, cwd=tmp_path, check=True)
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "port.pt")
    assert a.keys() == b.keys()
    for k in a:  # largest difference relative to the tensor's largest value
        assert float((a[k] - b[k]).abs().max() / a[k].abs().max()) <= 1e-5, k


def test_a_model_class_from_the_script_param_groups_and_a_scheduler_train(tmp_path):
    out = run_mpi(4, [str(CASES), "trains"], timeout=120, cwd=tmp_path, check=True).stdout
    for first, last in re.findall(r"loss ([0-9.]+) -> ([0-9.]+)", out):
        assert float(last) < 0.5 * float(first), out
    # both groups, each with its weight decay, and the StepLR's lr after 40 steps: 0.05 / 2**4
    assert out.count("groups [(2, 0.1, 0.003125), (2, 0.0, 0.003125)]") == 2, out
    # model.zero_grad() (.grad set to None, new tensors made by backward) trains the same
    again = run_mpi(4, [str(CASES), "trains_model_zero_grad"], timeout=120, cwd=tmp_path, check=True).stdout
    losses = r"worker \d: loss [0-9.]+ -> [0-9.]+"  # (two ranks' lines may reach mpirun's stdout glued)
    assert sorted(re.findall(losses, again)) == sorted(re.findall(losses, out)) and len(re.findall(losses, out)) == 2


def test_param_groups_per_group_schedules_and_skipped_parameters_equal_torch(tmp_path):
    """AdamW over two groups (weight decay 0.1 and 0), a LambdaLR with a schedule per group, and a
    layer used on even steps only (torch skips it on odd steps: no decay, no moment update): 2
    workers and 2 servers end where one torch process ends on the concatenated batch."""
    out = run_mpi(4, [str(CASES), "equals_torch"], timeout=120, cwd=tmp_path, check=True).stdout
    diff = float(re.search(r"equals torch: max relative difference (\S+)", out).group(1))
    assert diff <= 1e-5, out  # 0.08 when the unused layer is stepped with a zero gradient instead


def test_job_loader_streams_the_data_servers_batches(tmp_path):
    """1 server, 1 data server, 2 workers: job.loader's batches (the built-in digits, the epoch
    plan of mpips.train) train the model to a held-out accuracy the loop computes itself."""
    out = run_mpi(4, [str(CASES), "loader"], timeout=120, cwd=tmp_path, check=True).stdout
    found = re.findall(r"worker (\d): 150 steps of 150 \(23 per epoch\), (\d+) samples, held-out accuracy ([0-9.]+)",
                       out)
    assert len(found) == 2, out
    assert {int(n) for _, n, _ in found} == {4698}  # 1,438 samples: 64 a step, the last of each epoch short
    assert all(float(a) >= 0.9 for _, _, a in found), out


def test_an_exception_in_one_workers_loop_ends_the_whole_job_at_once(tmp_path):
    """Worker 1's loop raises while worker 0 and the servers wait for its push (bsp): the job ends
    in seconds with the traceback and one FATAL line naming the rank and role, not at a timeout."""
    t0 = time.monotonic()
    out = run_mpi(4, [str(CASES), "crash"], timeout=60, cwd=tmp_path)
    assert out.returncode != 0 and time.monotonic() - t0 < 45, out.stderr[-2000:]
    fatal = [s for s in out.stderr.splitlines() if s.startswith("mpips: FATAL")]
    assert fatal == ["mpips: FATAL on rank 1 (host " + fatal[0].split("host ")[1].split(",")[0]
                     + ", worker 1): RuntimeError: the user's loop failed"], out.stderr
    assert "Traceback" in out.stderr


def test_uneven_loops_end_at_once_in_bsp_and_train_in_ssp(tmp_path):
    """Worker 1 leaves its loop after 5 steps of worker 0's 10: in bsp the servers say so in one line
    each (no 120 s stall); in ssp the others go on without it; a worker whose script ends without
    job.finish() ends the job with one line."""
    bsp = run_mpi(4, [str(CASES), "uneven_bsp"], timeout=60, cwd=tmp_path)
    said = [s for s in bsp.stderr.splitlines() if s.startswith("mpips:")]
    assert bsp.returncode == 2 and said and all(  # whichever of worker 0's push and worker 1's stop came first
        "worker 1 finished after 5 steps" in s and "worker 0 pushed step 5" in s
        and "in bsp every worker takes the same number of steps" in s for s in said), bsp.stderr
    assert "Traceback" not in bsp.stderr
    ssp = run_mpi(4, [str(CASES), "uneven_ssp"], timeout=60, cwd=tmp_path, check=True)
    assert sorted(re.findall(r"worker \d: \d+ steps", ssp.stdout)) == ["worker 0: 10 steps", "worker 1: 5 steps"]
    gone = run_mpi(4, [str(CASES), "no_finish"], timeout=60, cwd=tmp_path)
    assert gone.returncode != 0
    assert [s for s in gone.stderr.splitlines() if s.startswith("mpips:")] == [
        "mpips: FATAL on rank 1 (host " + gone.stderr.split("(host ")[1].split(",")[0] + ", worker 1): the script ended"
        " without job.finish(); the other ranks would wait for it (every worker calls job.finish() after its last step,"
        " every other rank job.serve())"], gone.stderr


def test_asp_pulls_lead_the_servers_values_and_server_values_gives_them(tmp_path):
    """asp with --lookahead 2 (the default) and W = 2: what a step pulls is the servers' values
    led by 2 x (W - 1) = 2 updates along the last one (checked across an update only worker 0
    made); ``opt.server_values()`` holds the servers' own values, and the pulled ones come back."""
    out = run_mpi(4, [str(CASES), "lookahead"], timeout=120, cwd=tmp_path, check=True)
    said = re.search(r"pulled (\S+) of a step off .* moved (\S+); restored after: (\w+)", out.stdout)
    off, moved, restored = said.groups()
    assert float(off) < 1e-4 and float(moved) > 1e-4 and restored == "True", out.stdout


@pytest.mark.parametrize("case, line", [
    ("different_models", r"mpips: bad model: job.optimizer call #1: worker 1 registered tensor 0 as a.weight \[9, 4\],"
                         r" worker 0 as a.weight \[8, 4\]"),
    ("different_order", r"mpips: bad model: job.optimizer call #1: worker 1 registered tensor 0 as a.weight"),
    ("unimportable", r"mpips: bad configuration: cannot import the optimizer class 'no_such_package.optim:Fast'"),
    ("lbfgs", r"mpips: bad configuration: optimizer LBFGS cannot run shard by shard on parameter servers"),
    ("bad_argument", r"mpips: bad configuration: SGD\(...\) refused its arguments: Invalid learning rate: -1.0"),
    ("bad_sync", r"mpips: bad configuration: config key 'sync' must be one of bsp, asp, ssp, got 'bogus'"),
    ("loader_bad_data", r"mpips: bad dataset: dataset file /no/such/file.h5 does not exist"),
    ("optimizer_on_a_server", r"mpips: bad configuration on rank [23] \(host \S+, server [01]\): job.optimizer is for"
                              r" workers"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(tmp_path, case, line):
    out = run_mpi(4, [str(CASES), case], timeout=60, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    said = [s for s in out.stderr.splitlines() if s.startswith("mpips:")]
    assert re.match(line, said[0]), out.stderr
    assert len(said) <= (2 if case == "optimizer_on_a_server" else 1), said  # each server says its own
    assert "Traceback" not in out.stderr


RESUME = REPO / "tests" / "own_loop_resume.py"


def params(path) -> dict:
    return torch.load(path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Both models' final parameters after an uninterrupted run of own_loop_resume.py."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_mpi(4, [str(RESUME), str(tmp / "full.pt")], timeout=120, cwd=tmp, check=True)
    return params(tmp / "full.pt")


def test_own_loop_kill_9_and_resume_is_bitwise(tmp_path, uninterrupted):
    """Two models (Adam with BatchNorm and dropout; momentum SGD), checkpoints every 5 steps; a
    worker killed with SIGKILL at step 12; resumed from step 10 with --resume latest: the final
    parameters are bitwise an uninterrupted run's."""
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5"]
    killed = run_mpi(4, [str(RESUME), str(tmp_path / "resumed.pt"), *ck], timeout=120, cwd=tmp_path,
                     env={"MPIPS_FAULT": "rank=1,phase=pull,step=12,kind=kill"})
    assert killed.returncode != 0 and not (tmp_path / "resumed.pt").exists()
    resumed = run_mpi(4, [str(RESUME), str(tmp_path / "resumed.pt"), *ck, "--resume", "latest"], timeout=120,
                      cwd=tmp_path, check=True)
    assert "resuming from" in resumed.stderr and "at step 10" in resumed.stderr, resumed.stderr
    again = params(tmp_path / "resumed.pt")
    assert uninterrupted.keys() == again.keys()
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)


def test_resume_takes_the_newest_step_every_model_has(tmp_path, uninterrupted):
    """A job killed between its two models' checkpoints of one step: that step's lone checkpoint
    is moved aside (one line), both models resume from the step before, and the run ends bitwise."""
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5"]
    run_mpi(4, [str(RESUME), str(tmp_path / "first.pt"), *ck], timeout=120, cwd=tmp_path, check=True)
    (tmp_path / "ck" / "model-1" / "ckpt-00000015.h5").unlink()  # as if killed between the two
    resumed = run_mpi(4, [str(RESUME), str(tmp_path / "resumed.pt"), *ck, "--resume", "latest"], timeout=120,
                      cwd=tmp_path, check=True)
    assert "not every model has a checkpoint at step 15" in resumed.stderr, resumed.stderr
    assert (tmp_path / "ck" / "not-resumed" / "ckpt-00000015.h5").exists()
    again = params(tmp_path / "resumed.pt")
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)


def test_a_stop_signal_surfaces_at_step_as_preempted_and_the_job_requeues(tmp_path, uninterrupted):
    """SIGUSR1 (Slurm's --signal) mid-run: every worker's opt.step() raises mpips.Preempted after the
    checkpoint at that boundary, the loop exits with its status 75, the servers too; the rerun
    resumes from there and ends bitwise like an uninterrupted run."""
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    with mpi_job(4, [str(RESUME), str(tmp_path / "resumed.pt"), *ck], cwd=tmp_path,
                 env={"OWN_LOOP_PAUSE": "0.5"}) as proc:
        out, _ = signal_at_line(proc, "step 5/", signal.SIGUSR1)
    assert proc.returncode == 75, out
    assert re.search(r"worker 0: preempted after step (\d+)", out), out
    assert not (tmp_path / "resumed.pt").exists()
    run_mpi(4, [str(RESUME), str(tmp_path / "resumed.pt"), *ck, "--resume", "latest"], timeout=120, cwd=tmp_path,
            check=True)
    again = params(tmp_path / "resumed.pt")
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)

