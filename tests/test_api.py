"""mpips.fit, the Python API, on 4 ranks in-process: it trains the default job to the same
parameters as the command line's run, hands the lead worker the model and the metrics, and
fails like the command line (bad input: SystemExit(2) on every rank)."""

import re
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.timeout(300)
MPI4 = pytest.mark.mpi(min_size=4, sizes=(4,))


def shared_tmpdir(comm) -> Path:
    return Path(comm.bcast(tempfile.mkdtemp(prefix="mpips-test-") if comm.rank == 0 else None))


@MPI4
def test_fit_with_a_model_object_and_a_loss_trains_like_the_command_line():
    from mpi4py import MPI

    import mpips
    from mpips.config import parse_args
    from mpips.train import run

    comm = MPI.COMM_WORLD
    tmp = shared_tmpdir(comm)
    flags = ["--steps", "15", "--data-dir", str(tmp)]
    assert run(parse_args([*flags, "--save", str(tmp / "cli.pt")]), comm) == 0
    torch.manual_seed(0)  # the default --seed: the default MLP, built by the user
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    result = mpips.fit(model, loss=nn.CrossEntropyLoss(), config=flags)
    roles = comm.allgather((result.role, result.lead, result.status))
    assert sorted(roles) == [("data server", False, 0), ("server", False, 0), ("worker", False, 0),
                             ("worker", True, 0)]
    if result.lead:
        cli = torch.load(tmp / "cli.pt")
        mine = result.model.state_dict()
        assert cli.keys() == mine.keys() and all(torch.equal(cli[k], mine[k]) for k in cli)
        m = result.metrics
        assert m["steps"] == 15 and m["gradients_applied"] == 15 and 0.5 < m["accuracy"] <= 1
        assert m["loss"] > 0 and set(m) >= {"last_train_loss", "samples_per_s", "max_staleness"}
    else:
        assert result.model is None and result.metrics is None


@MPI4
def test_fit_bad_input_is_system_exit_2_on_every_rank_said_once(capsys):
    from mpi4py import MPI

    import mpips

    comm = MPI.COMM_WORLD
    with pytest.raises(SystemExit) as info:
        mpips.fit(config={"lr": -1.0})
    assert comm.allgather(info.value.code) == [2] * 4
    said = comm.allgather(capsys.readouterr().err)
    assert said[0].strip() == "mpips: bad configuration: --lr must be positive (got -1.0)" and not any(said[1:])
    torch.manual_seed(comm.rank)  # a different model on every rank: refused, not trained
    with pytest.raises(SystemExit) as info:
        mpips.fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), config={"steps": 2,
                                                                          "data_dir": str(shared_tmpdir(comm))})
    assert comm.allgather(info.value.code) == [2] * 4
    said = comm.allgather(capsys.readouterr().err)
    assert said[0].strip().splitlines()[-1] == (
        "mpips: bad model: the model given to mpips.fit has different parameters on different ranks: seed torch"
        " before building it (torch.manual_seed) or pass a factory, which mpips calls after seeding with --seed")


SCRIPT = """
import sys
import torch.nn.functional as F
import mpips

calls = [0]

def loss(output, target):  # fails on the worker's third step (call 1 is the start-up check)
    calls[0] += 1
    if calls[0] == 4:
        raise RuntimeError("boom in the user's loss")
    return F.cross_entropy(output, target)

mpips.fit("mlp", loss=loss, config={"steps": 50, "data_servers": 0, "data_dir": sys.argv[1]})
print("returned", flush=True)
"""


def test_an_exception_in_the_users_loss_ends_the_whole_job_naming_rank_and_role(tmp_path):
    from helpers import run_mpi

    (tmp_path / "fails.py").write_text(SCRIPT)
    out = run_mpi(2, [str(tmp_path / "fails.py"), str(tmp_path)], timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and "returned" not in out.stdout
    fatal = [line for line in out.stderr.splitlines() if line.startswith("mpips: FATAL")]
    assert len(fatal) == 1, out.stderr[-3000:]
    # 2 ranks: the worker is rank 0, the server rank 1 (mpips.layout)
    assert re.fullmatch(r"mpips: FATAL on rank 0 \(host \S+, worker 0\): RuntimeError: boom in the user's loss",
                        fatal[0]), fatal[0]
