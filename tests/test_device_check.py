"""jobs/device-check.sh fails loudly where there is no GPU: one line, exit status 1, nothing run."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import REPO, mpi_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the check itself")
def test_the_device_check_refuses_a_machine_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", str(REPO / "jobs" / "device-check.sh")], env=mpi_env({"OUT": str(tmp_path / "o")}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("device-check: FAILED: no CUDA device visible to torch (")
    assert done.stderr.count("\n") == 1 and done.stderr.rstrip().endswith("False); run it on a GPU machine")
    assert not (tmp_path / "o").exists()


def test_the_gpu_measurements_refuse_without_a_gpu_and_compare_state_dicts():
    from mpips.bench.gpu import main, relative_difference

    a = {"w": torch.tensor([3.0, 4.5]), "step": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 4.0]), "step": torch.tensor(3)}
    assert relative_difference(a, b) == pytest.approx(0.5 / 5)  # ||a - b|| / ||b||, integers ignored
    with pytest.raises(ValueError, match="different tensors"):
        relative_difference(a, {"w": torch.ones(3), "step": torch.tensor(3)})
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            main(["pull"])
        assert info.value.code == 1
