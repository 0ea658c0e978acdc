"""End-to-end: `mpirun -n K python -m mpips.train ...` as a user runs it (subprocess, with timeouts)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, mpi_job, run_train, signal_at_line

from mpips.checkpoint import list_checkpoints, verify
from mpips.config import ModelConfig
from mpips.data import open_dataset
from mpips.models import build_model
from mpips.worker import evaluate

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5, 6])
def test_dry_run_prints_the_role_map_or_says_why_not(nprocs, tmp_path):
    out = run_train(nprocs, "--dry-run", "--data-dir", str(tmp_path), timeout=90)
    if nprocs < 3:  # defaults: 1 server + 1 data server + at least 1 worker
        assert out.returncode == 2, out.stderr
        rank_s = "1 rank" if nprocs == 1 else f"{nprocs} ranks"
        assert out.stderr.splitlines()[0] == (
            f"mpips: bad configuration: {rank_s} cannot hold 1 parameter server + 1 data server + at least 1"
            " worker: launch with at least 3 ranks (mpirun -n 3) or lower --servers / --data-servers")
        assert out.stderr.count("mpips:") == 1  # said once, by rank 0
        return
    assert out.returncode == 0, out.stderr[-2000:]
    roles = re.findall(r"^\s+(\d+)\s+\S+\s+(worker|server|data-server)\s", out.stdout, re.M)
    assert [int(r) for r, _ in roles] == list(range(nprocs))
    assert [role for _, role in roles].count("worker") == nprocs - 2
    workers = "1 worker" if nprocs == 3 else f"{nprocs - 2} workers"
    assert f"role map: {nprocs} ranks = 1 parameter server + 1 data server + {workers}\n" in out.stdout
    assert "shard plan: 6 tensors" in out.stdout and "imbalance" in out.stdout
    assert "codecs: pushes float32 (--compress none); pulls float32\n" in out.stdout
    assert "pipeline: push during backward on, per-bucket apply and pull ahead on" in out.stdout
    assert "step 1/" not in out.stdout  # a dry run trains nothing


def test_dry_run_takes_a_shard_over_2_gib_and_says_how_it_travels(tmp_path):
    """One server holds a 2 GiB + 64-byte parameter: the dry run plans it and says how many
    chunks of --chunk-bytes it moves in (each MPI call within the MPI-3.1 count limit)."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    out = run_train(2, "--dry-run", "--data-servers", "0", "--model", "bigmodels:over_2gib",
                    "--data-dir", str(tmp_path), env={"PYTHONPATH": path}, timeout=120, check=True)
    assert "536,871,578 parameters" in out.stdout  # 2**29 + 16, and 650 in the 64 -> 10 head
    assert ("transfers: at most 4,194,304 bytes per MPI call (--chunk-bytes); the largest shard"
            " (2,048.00 MiB) moves in 513 chunks per pull and per push") in out.stdout
    assert "WARNING" not in out.stderr and "step 1/" not in out.stdout


def test_saved_model_loads_into_plain_torch_and_reproduces_the_accuracy(tmp_path):
    save, metrics = tmp_path / "model.pt", tmp_path / "m.jsonl"
    out = run_train(4, "--servers", "2", "--data-servers", "0", "--epochs", "8", "--save", str(save),
                    "--metrics", str(metrics), "--eval-every", "40", "--data-dir", str(tmp_path),
                    timeout=180, check=True)
    reported = float(re.search(r"held-out accuracy\s+([0-9.]+)", out.stdout).group(1))
    assert reported >= 0.9
    # the model built outside mpips, as a user would
    data = open_dataset("digits", None, data_dir=str(tmp_path))
    model = build_model(ModelConfig(model="mlp"), data.spec, seed=12345)
    model.load_state_dict(torch.load(save, weights_only=True))
    acc = evaluate(model, data.val_x, data.val_y, torch.device("cpu"))["accuracy"]
    assert acc == pytest.approx(reported, abs=1e-4)
    # the metrics file: one JSON object per line, each with event and step
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all({"event", "step"} <= r.keys() for r in records)
    steps = [r for r in records if r["event"] == "step"]
    assert {r["worker"] for r in steps} == {0, 1}
    assert {"loss", "samples_per_s", "bytes_pushed", "bytes_pulled", "staleness", "server_queue"} <= steps[0].keys()
    assert steps[-1]["bytes_pulled"] > 0 and steps[-1]["bytes_pushed"] > 0
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) >= 3 and all(0 <= r["accuracy"] <= 1 for r in evals)
    assert evals[-1]["accuracy"] == pytest.approx(reported, abs=1e-4)
    assert [r["event"] for r in records][-1] == "end"


def test_user_model_factory_trains(tmp_path):
    out = run_train(3, "--data-servers", "0", "--model", "toymodels:tiny_linear", "--epochs", "6",
                    "--optimizer", "sgd", "--lr", "0.5", "--data-dir", str(tmp_path),
                    env={"PYTHONPATH": str(REPO / "tests")}, timeout=120, check=True)
    assert "shard plan: 2 tensors, 650 parameters" in out.stdout  # Linear(64, 10)
    acc = float(re.search(r"held-out accuracy\s+([0-9.]+)", out.stdout).group(1))
    assert acc >= 0.85  # a linear model on digits; chance is 0.1


def test_config_file_with_cli_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('servers = 2\ndata-servers = 0\n[optim]\noptimizer = "sgd"\nlr = 0.2\n[train]\nsteps = 5\n')
    out = run_train(4, "--config", str(cfg), "--steps", "3", "--data-dir", str(tmp_path), timeout=90, check=True)
    assert "2 parameter servers + 0 data servers + 2 workers" in out.stdout
    assert re.search(r"^steps\s+3$", out.stdout, re.M)
    assert "pulls: one-sided MPI_Get from the servers' windows (rma)\n" in out.stdout


def test_final_parameters_are_the_same_for_one_and_two_servers(tmp_path):
    """Sharding is invisible to the math: 1 or 2 servers, bitwise-close final models."""
    paths = []
    for servers in (1, 2):
        path = tmp_path / f"s{servers}.pt"
        run_train(2 + servers, "--servers", str(servers), "--data-servers", "0", "--steps", "25",
                  "--save", str(path), "--data-dir", str(tmp_path), timeout=90, check=True)
        paths.append(torch.load(path, weights_only=True))
    for k in paths[0]:
        np.testing.assert_allclose(paths[0][k].numpy(), paths[1][k].numpy(), rtol=1e-5, atol=1e-6)


def test_gpt_on_python_sources_through_a_data_server(tmp_path):
    """The byte-level transformer on the built-in text corpus, default roles."""
    metrics = tmp_path / "m.jsonl"
    out = run_train(4, "--model", "gpt", "--dataset", "pytext", "--gpt-layers", "1", "--gpt-width", "32",
                    "--gpt-heads", "2", "--gpt-context", "32", "--batch-size", "8", "--steps", "40",
                    "--lr", "3e-3", "--metrics", str(metrics), "--data-dir", str(tmp_path),
                    timeout=240, check=True)
    assert "data assignment" in out.stdout
    losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "step"]
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    assert first > 4.0 and last < first - 1.0  # from about ln(256) = 5.5 towards byte statistics


def test_falls_back_to_message_pulls_where_the_transport_has_no_rma(tmp_path):
    """Debian's Open MPI over TCP only (as on a multi-node Ethernet cluster) cannot create RMA
    windows: the job says so and trains with message-based pulls instead of failing."""
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version:
        pytest.skip("OMPI_MCA_btl selects the transport of Open MPI only")
    out = run_train(4, "--epochs", "5", "--data-dir", str(tmp_path), env={"OMPI_MCA_btl": "self,tcp"},
                    timeout=180, check=True)
    assert "no RMA windows on this MPI transport (MPI_ERR_WIN: invalid window, on 3 of 3 ranks)" in out.stderr
    assert "message pulls" in out.stderr
    # the start-up says what the windows decided, not what was asked for
    assert "pulls by rma" not in out.stdout and "(rma)" not in out.stdout
    assert ("pulls: request/reply messages that the servers answer (message; no RMA windows on this MPI"
            " transport)\n") in out.stdout
    assert float(re.search(r"held-out accuracy\s+([0-9.]+)", out.stdout).group(1)) >= 0.9


def test_no_held_out_samples_skips_evaluation_and_still_saves_the_model(tmp_path):
    data, save, arrays = tmp_path / "d.h5", tmp_path / "model.pt", tmp_path / "digits.npz"
    digits = open_dataset("digits", None, data_dir=str(tmp_path))
    np.savez(arrays, x=digits.val_x, y=digits.val_y)
    subprocess.run([sys.executable, "-m", "mpips.data", "prepare", str(arrays), "-o", str(data),
                    "--val-fraction", "0"], check=True, capture_output=True, timeout=120)
    out = run_train(3, "--data", str(data), "--data-servers", "0", "--steps", "12", "--eval-every", "5",
                    "--save", str(save), "--metrics", str(tmp_path / "m.jsonl"), timeout=120, check=True)
    assert out.stdout.count("no held-out samples: evaluation skipped") == 1
    assert re.search(r"^held-out accuracy\s+none \(no held-out samples\)$", out.stdout, re.M)
    state = torch.load(save, weights_only=True)
    assert set(state) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    end = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["accuracy"] is None


def _run_sh(tmp_path, *flags, np_=3):
    """``bash jobs/run.sh *flags`` in its own session, stdout+stderr merged, as a user starts it."""
    env = dict(os.environ, NP=str(np_), PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", str(REPO / "jobs" / "run.sh"), *flags], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.parametrize(
    "sig, checkpoint, status",
    [(signal.SIGTERM, True, 75), (signal.SIGTERM, False, 143), (signal.SIGINT, False, 130)],
    ids=["sigterm-checkpoint", "sigterm-no-checkpoint", "sigint-no-checkpoint"],
)
def test_a_signal_to_run_sh_stops_every_rank_and_leaves_no_orphan(sig, checkpoint, status, tmp_path):
    """SIGTERM/SIGINT to jobs/run.sh: the job stops at its next step (checkpoint, exit 75; or a
    clean stop, exit 128 + signal, the model saved); no rank of it is left running."""
    tag = f"mpips-signal-test-{uuid.uuid4().hex}"  # names this job's ranks (only) for pgrep
    ck = tmp_path / "ck"
    flags = ["--data-servers", "0", "--steps", "100000", "--log-every", "1", "--stall-timeout", "20",
             "--data-dir", str(tmp_path), "--save", str(tmp_path / f"{tag}.pt")]
    flags += ["--checkpoint-dir", str(ck)] if checkpoint else []
    proc = _run_sh(tmp_path, *flags)
    try:
        out, _ = signal_at_line(proc, "step 3/", sig)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, out[-3000:]
    assert subprocess.run(["pgrep", "-f", tag], capture_output=True).returncode == 1  # none left
    assert (tmp_path / f"{tag}.pt").exists()
    if checkpoint:
        ((step, path),) = list_checkpoints(ck)
        assert verify(path)["reason"] == "preemption" and step >= 3
        assert "exiting with status 75" in out
    else:
        assert "stopped on SIGUSR1 at step" in out and "nothing to resume from" in out


def test_a_stop_signal_during_start_up_stops_the_job_at_its_first_step(tmp_path):
    """SIGUSR1 to every rank while it is still importing, before MPI_Init (``scancel
    --signal=USR1`` early in a job, Slurm's ``--signal=USR1@T`` on a short job), is held from the
    first instant (``mpips.launch``): the job starts, stops at its first step boundary and exits 143; no rank dies."""
    tag = f"mpips-early-signal-{uuid.uuid4().hex}"
    flags = ["-m", "mpips.train", "--data-servers", "0", "--steps", "50", "--data-dir", str(tmp_path),
             "--save", str(tmp_path / f"{tag}.pt")]
    with mpi_job(3, flags, cwd=tmp_path) as proc:
        signalled: set[int] = set()
        deadline = time.monotonic() + 60
        while len(signalled) < 3 and time.monotonic() < deadline:
            found = subprocess.run(["pgrep", "-f", f"python.*{tag}"], capture_output=True, text=True).stdout
            for pid in map(int, found.split()):
                state = _start_up_state(pid)
                assert state != "MPI loaded", "a rank loaded MPI before it held SIGUSR1"
                if pid not in signalled and state == "holding":
                    os.kill(pid, signal.SIGUSR1)
                    signalled.add(pid)
            time.sleep(0.01)
        assert len(signalled) == 3, f"ranks signalled before MPI_Init: {sorted(signalled)}"
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    stopped = re.search(r"stopped on SIGUSR1 at step (\d+) of 50", out)
    assert stopped and int(stopped.group(1)) <= 2, out[-3000:]  # the first boundary the servers agree on
    assert (tmp_path / f"{tag}.pt").exists()


def _start_up_state(pid: int) -> str:
    """A rank's start-up, from /proc: "holding" (SIGUSR1 caught, no MPI library mapped yet),
    "MPI loaded" (mapped, SIGUSR1 not caught), or "" (neither: too early, or not a rank)."""
    try:
        if not (Path("/proc") / str(pid) / "comm").read_text().startswith("python"):
            return ""
        status = (Path("/proc") / str(pid) / "status").read_text()
        mpi = "libmpi" in (Path("/proc") / str(pid) / "maps").read_text()
    except OSError:  # gone
        return ""
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16) >> (signal.SIGUSR1 - 1) & 1
    if caught and not mpi:
        return "holding"
    return "MPI loaded" if mpi and not caught else ""


def test_output_folders_are_made_or_refused_before_any_work(tmp_path):
    """--metrics, --trace and --save into folders that do not exist yet: made at start-up; into a
    folder that cannot be made: one line, status 2, before training (not a crash at the end)."""
    out = run_train(4, "--steps", "3", "--metrics", "new/a/m.jsonl", "--trace", "new/b/t.json", "--save",
                    "new/c/model.pt", timeout=120, cwd=tmp_path, check=True)
    assert all((tmp_path / "new" / p).is_file() for p in ("a/m.jsonl", "b/t.json", "c/model.pt")), out.stdout
    bad = run_train(4, "--steps", "3", "--save", "/proc/no-such/model.pt", timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert [s for s in bad.stderr.splitlines() if s.startswith("mpips:")] == [
        "mpips: bad configuration: --save /proc/no-such/model.pt: cannot make the folder /proc/no-such (No such file"
        " or directory)"]
    assert "step 1/" not in bad.stdout
