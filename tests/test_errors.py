"""Bad input: one line, said once, exit status 2, before any step; the traceback only with --debug.

Unit tests of ``mpips.errors`` with stand-in communicators (no MPI), then end-to-end runs of
``mpirun -n K python -m mpips.train`` with each mistake a new user makes, asserting what the
user sees: the one ``mpips:`` line, the status, no traceback, and a short output (what remains
is mpirun's own 11-line notice that a process exited with a non-zero status).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, mpi_env, run_train
from mpi4py import MPI

from mpips import errors
from mpips.config import ConfigError
from mpips.data.hdf5 import DatasetError
from mpips.errors import LaunchError, Reporter, agree, check_launch, speaks
from mpips.models import ModelError

MPI_VENDOR = MPI.get_vendor()[0]  # the library the jobs here use


# -- stand-ins for communicators ---------------------------------------------------------------
class _Request:
    def __init__(self, done: bool):
        self.done = done

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.done


class _Comm:
    """What Reporter and agree use of a communicator; ``everyone`` says whether Ibarrier completes."""

    def __init__(self, rank: int = 0, everyone: bool = True, gathered: list | None = None):
        self.rank, self.everyone, self.gathered, self.calls = rank, everyone, gathered, []

    def Dup(self):  # noqa: N802
        return self

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Ibarrier(self):  # noqa: N802
        return _Request(self.everyone)

    def allgather(self, value):
        self.calls.append(value)
        return self.gathered if self.gathered is not None else [value]


def test_bad_input_seen_by_every_rank_is_said_once_by_the_speaker():
    outs = []
    for rank in range(3):
        err = io.StringIO()
        reporter = Reporter(_Comm(rank), speaker=rank == 0, host="n1")
        status = reporter.bad_input(ConfigError("--lr must be positive"), err)
        assert status == 2
        outs.append(err.getvalue())
    assert outs == ["mpips: bad configuration: --lr must be positive\n", "", ""]


def test_debug_adds_the_traceback_of_the_rank_that_raised_it():
    err = io.StringIO()
    exc = ModelError("--model 'm:f': f() raised RuntimeError: boom")
    exc.traceback_text = "Traceback (most recent call last):\n  File \"m.py\", line 3, in f\nRuntimeError: boom\n"
    Reporter(_Comm(), speaker=True, host="n1", debug=True).bad_input(exc, err)
    assert err.getvalue().splitlines() == [
        "Traceback (most recent call last):", '  File "m.py", line 3, in f', "RuntimeError: boom",
        "mpips: bad model: --model 'm:f': f() raised RuntimeError: boom",
    ]


def test_bad_input_seen_by_some_ranks_only_aborts_instead_of_hanging_the_others(monkeypatch):
    """The other ranks are elsewhere, maybe in a collective this rank will never join: abort."""
    monkeypatch.setattr(errors, "AGREE_S", 0.05)
    aborted, err = [], io.StringIO()
    reporter = Reporter(_Comm(rank=1, everyone=False), speaker=False, host="n2", abort=aborted.append)
    assert reporter.bad_input(DatasetError("data.h5 does not exist"), err) == 2
    assert aborted == [2]
    assert err.getvalue() == ("mpips: bad dataset: data.h5 does not exist (seen on rank 1, host n2, but not on"
                              " every rank within 0.05 s: aborting the job)\n")


def test_agree_raises_the_first_ranks_bad_input_on_every_rank():
    problem = (errors.INPUT_ERRORS.index(ModelError), "--model 'm:f': no weights", "Traceback ...\n")
    comm = _Comm(rank=0, gathered=[None, problem, None])
    with pytest.raises(ModelError, match="^--model 'm:f': no weights$") as info:
        agree(comm, lambda: "model")  # this rank was fine; rank 1 was not
    assert info.value.traceback_text == "Traceback ...\n"
    assert agree(_Comm(gathered=[None, None]), lambda: "model") == "model"


def test_agree_lets_a_crash_through_without_the_collective():
    comm = _Comm()
    with pytest.raises(ZeroDivisionError):
        agree(comm, lambda: 1 / 0)
    assert comm.calls == []  # a crash aborts the job: no collective to wait in


@pytest.mark.parametrize(
    "environ, size, rank, speaker",
    [
        ({}, 4, 0, True),
        ({}, 4, 2, False),
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}, 1, 0, True),
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, 1, 0, False),
        ({"PMI_SIZE": "4", "PMI_RANK": "2"}, 1, 0, False),
        ({"SLURM_STEP_NUM_TASKS": "4"}, 1, 0, True),  # no rank to tell them apart: every one speaks
    ],
)
def test_one_process_speaks_even_when_every_one_is_rank_0(environ, size, rank, speaker):
    assert speaks(rank, size, environ) is speaker


def test_launch_matches_or_names_the_launcher_to_use(monkeypatch):
    import mpips.doctor

    monkeypatch.setattr(mpips.doctor, "matching_launcher", lambda vendor: "/usr/bin/mpirun.mpich")
    mpich = ("MPICH", (4, 0, 2))
    check_launch(1, {}, mpich)  # launched by hand: fine (the layout says what is missing)
    check_launch(4, {"OMPI_COMM_WORLD_SIZE": "4"}, mpich)
    with pytest.raises(LaunchError) as info:
        check_launch(1, {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, mpich)
    assert str(info.value) == (
        "Open MPI's mpirun started 4 processes (OMPI_COMM_WORLD_SIZE=4), but MPI sees a world of 1: mpi4py here"
        " uses MPICH 4.0.2, which cannot get its ranks from that launcher. Launch with MPICH 4.0.2's own"
        " launcher: `/usr/bin/mpirun.mpich -n 4 python -m mpips.train ...` (bash jobs/run.sh picks it)"
    )
    with pytest.raises(LaunchError, match=r"^srun started 8 processes \(SLURM_STEP_NUM_TASKS=8\).* Run `srun"
                                          r" --mpi=pmix` or `srun --mpi=pmi2`"):
        check_launch(1, {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "0"}, ("Open MPI", (4, 1, 4)))
    monkeypatch.setattr(mpips.doctor, "matching_launcher", lambda vendor: None)
    with pytest.raises(LaunchError, match=r"Put MPICH's mpirun first on PATH \(`module load` it\), or rebuild"):
        check_launch(1, {"PMI_SIZE": "2"}, mpich)


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def nan_file(tmp_path_factory):
    """A dataset file with a NaN feature, as an mpips without the prepare check could write it."""
    from mpips.data.hdf5 import DatasetWriter, SampleFormat

    path = tmp_path_factory.mktemp("nan") / "nan.h5"
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 200)
    x[57, 0, 2, 1] = np.nan
    w = DatasetWriter(str(path), SampleFormat.classification((1, 8, 8), np.float32, 10), "nan", 180, 20, 4)
    for p in range(4):
        lo, hi = w.parts.range(p)
        w.write_train(lo, {"x": x[lo:hi], "y": y[lo:hi]})
    w.write_val(0, {"x": x[180:], "y": y[180:]})
    w.close()
    return str(path)


TOYS = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
FACTORY_CONTRACT = r" \(is its folder on PYTHONPATH on every node\?\)"

# id, ranks, flags, environment, the one line the user sees
CASES = [
    ("lr", 3, ["--lr", "-1"], {}, r"mpips: bad configuration: --lr must be positive \(got -1.0\)"),
    ("sync-choice", 3, ["--sync", "foo"], {},
     r"mpips: bad configuration: argument --sync: invalid choice: 'foo' \(choose from 'bsp', 'asp', 'ssp'\)"
     r" \(see python -m mpips.train --help\)"),
    ("no-module", 4, ["--model", "nosuchpkg.mod:make"], {},
     r"mpips: bad model: --model 'nosuchpkg.mod:make': cannot import nosuchpkg.mod: ModuleNotFoundError: No"
     r" module named 'nosuchpkg'" + FACTORY_CONTRACT),
    ("factory-raises", 3, ["--model", "toymodels:raises", "--data-servers", "0"], TOYS,
     r"mpips: bad model: --model 'toymodels:raises': raises\(input_shape=\(1, 8, 8\), num_classes=10\) raised"
     r" RuntimeError: out of ideas"),
    ("factory-returns-int", 3, ["--model", "toymodels:returns_int", "--data-servers", "0"], TOYS,
     r"mpips: bad model: --model 'toymodels:returns_int': returns_int\(num_classes=10\) returned int, not a"
     r" torch.nn.Module"),
    ("raises-on-rank-1-only", 3, ["--model", "toymodels:raises_on_rank", "--data-servers", "0"],
     {**TOYS, "MPIPS_TEST_BAD_RANK": "1"},
     r"mpips: bad model: --model 'toymodels:raises_on_rank': raises_on_rank\(input_shape=\(1, 8, 8\),"
     r" num_classes=10\) raised ValueError: no weights file on this node"),
    ("output-width", 3, ["--model", "toymodels:wrong_width", "--data-servers", "0"], TOYS,
     r"mpips: bad model: --model 'toymodels:wrong_width' returned shape \(2, 7\) for 2 samples of shape"
     r" \(1, 8, 8\) \(torch.float32\) from \S+digits-v1.h5; cross-entropy over 10 classes needs \(2, 10\): the"
     r" last layer must have 10 outputs"),
    ("nan-data", 3, ["--data", "NAN", "--data-servers", "0"], {},
     r"mpips: bad dataset: \S+nan.h5: training sample 57 has NaN at x\[0, 2, 1\] \(1 NaN, 0 Inf in this"
     r" sample\): training on it would make every gradient NaN; clean the source and re-create the file with"
     r" `python -m mpips.data prepare`"),
]


@pytest.mark.slow
@pytest.mark.parametrize("ranks, flags, env, line", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_said_once_with_status_2(ranks, flags, env, line, data_dir, nan_file):
    flags = [nan_file if f == "NAN" else f for f in flags]
    out = run_train(ranks, *flags, "--steps", "3", "--data-dir", data_dir, env=env, timeout=90)
    text = out.stdout + out.stderr
    said = [s for s in text.splitlines() if s.startswith("mpips")]
    assert out.returncode == 2, text[-3000:]
    assert len(said) == 1 and re.fullmatch(line, said[0]), text[-3000:]
    assert "Traceback" not in text and "step 1/" not in text and "role map" not in text
    assert len(text.splitlines()) <= 15, text  # ours, plus mpirun's 11-line notice of a non-zero exit


@pytest.mark.slow
def test_debug_shows_the_traceback_once(data_dir):
    out = run_train(3, "--model", "toymodels:raises", "--data-servers", "0", "--debug", "--data-dir", data_dir,
                    env=TOYS, timeout=90)
    assert out.returncode == 2
    assert out.stderr.count('toymodels.py", line') == 1, out.stderr  # the factory's frame, from one rank
    assert out.stderr.count("mpips: bad model:") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, line",
    [
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"},
         r"mpips: bad launch: Open MPI's mpirun started 4 processes \(OMPI_COMM_WORLD_SIZE=4\), but MPI sees a"
         r" world of 1: mpi4py here uses \S.*\. (Launch with .* `\S+ -n 4 python -m mpips.train \.\.\.` .*|Put .*)"),
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, None),  # the others say nothing
        ({"PMI_SIZE": "4", "PMI_RANK": "0"}, r"mpips: bad launch: a PMI launcher .* started 4 processes .*"),
        # Open MPI would abort inside MPI_Init there: named before it (mpips.launch); others after
        ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"},
         r"mpips: bad launch: srun started 4 tasks \(SLURM_STEP_NUM_TASKS=4\) without a PMI plugin .*"
         r" Run `srun --mpi=pmix` .*" if MPI_VENDOR == "Open MPI" else
         r"mpips: bad launch: srun started 4 processes \(SLURM_STEP_NUM_TASKS=4\), but MPI sees a world of 1:"
         r" .* Run `srun --mpi=pmix` or `srun --mpi=pmi2` .*"),
    ],
    ids=["mpirun-rank-0", "mpirun-rank-2", "pmi", "srun"],
)
def test_a_launcher_of_another_mpi_is_named_by_the_job(launcher, line, data_dir):
    """Each of the N processes the wrong launcher starts is alone in a world of 1 (faked here with
    the launcher's variables around a plain process): the one numbered 0 says so, once."""
    env = mpi_env({**launcher, "PYTHONPATH": str(REPO)})
    out = subprocess.run([sys.executable, "-m", "mpips.train", "--data-dir", data_dir], env=env, cwd=data_dir,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    if line is None:
        assert out.stderr == ""
    else:
        assert len(out.stderr.splitlines()) == 1 and re.fullmatch(line, out.stderr.strip()), out.stderr
