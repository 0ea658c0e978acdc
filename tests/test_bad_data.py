"""Bad data is said as bad data, in one line, before it becomes a gradient: a NaN or infinite input
names its file, dataset and row (files read in place, as ``prepare`` names a source's); a batch larger
than the training split is refused."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
from helpers import run_mpi, run_train

from mpips.config import ConfigError
from mpips.data import DatasetError, open_dataset
from mpips.data.foreign import check_finite


def _file(path, bad_row=None, value=np.nan, rows=300):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 1, 4, 4)).astype(np.float32)
    if bad_row is not None:
        x[bad_row, 0, 2, 1] = value
    with h5py.File(path, "w") as f:
        f["img"], f["label"] = x, rng.integers(0, 4, rows).astype(np.int64)
    return str(path)


def test_check_finite_names_the_first_non_finite_row():
    x = np.zeros((6, 3), np.float32)
    x[4, 1], x[2, 0] = np.inf, np.nan
    with pytest.raises(DatasetError, match=r"^f\.h5: dataset 'x' row 12 has NaN at x\[0\] \(1 NaN, 0 Inf in this"
                                           r" sample\): mpips refuses non-finite features"):
        check_finite(x, "f.h5", "x", 10)
    assert check_finite(np.arange(4), "f.h5", "x", 0) is not None  # integers: nothing to check


def test_a_file_read_in_place_with_a_nan_input_names_file_and_row(tmp_path):
    data = open_dataset("digits", _file(tmp_path / "bad.h5", bad_row=137), x_key="img", y_key="label")
    with data.open_file() as f, pytest.raises(DatasetError, match=r"bad\.h5: dataset 'img' row 137 has NaN"):
        f.read_train(0, data.partitions.sizes[0])


def test_a_held_out_file_with_an_infinite_input_names_file_and_row(tmp_path):
    val = _file(tmp_path / "val.h5", bad_row=3, value=np.inf, rows=20)
    with pytest.raises(DatasetError, match=r"val\.h5: dataset 'img' row 3 has inf at x\[0, 2, 1\]"):
        data = open_dataset("digits", _file(tmp_path / "ok.h5"), x_key="img", y_key="label", val_data=val)
        data.val_x  # noqa: B018 - read on first use


def test_a_batch_larger_than_the_training_split_is_refused(tmp_path):
    data = open_dataset("digits", _file(tmp_path / "ok.h5", rows=100), x_key="img", y_key="label")
    assert data.plan(2, 50, 0).steps_per_epoch == 1  # exactly the split: fine
    with pytest.raises(ConfigError, match=r"^--batch-size 51 x 2 workers is 102 samples a step, more than the 100"
                                          r" training samples of .*ok\.h5: use --batch-size 50 or less$"):
        data.plan(2, 51, 0)


def test_nan_features_read_in_place_end_the_job_in_one_line_with_status_2(tmp_path):
    """The default layout (a data server reads the file): one line from mpips naming the file, the
    dataset and the row, no traceback, status 2; no gradient was dropped first."""
    path = _file(tmp_path / "bad.h5", bad_row=137)
    out = run_train(4, "--data", path, "--x-key", "img", "--y-key", "label", "--steps", "20",
                    "--batch-size", "16", "--stall-timeout", "60", timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("mpips")]
    assert len(lines) == 1 and lines[0].startswith(f"mpips: bad dataset: {path}: dataset 'img' row 137 has NaN")
    assert "Traceback" not in out.stderr and "non-finite gradient" not in out.stderr


def test_a_batch_larger_than_the_dataset_is_one_line_before_any_work(tmp_path):
    out = run_mpi(3, ["-m", "mpips.train", "--batch-size", "1000000000", "--data-servers", "0", "--dry-run"],
                  timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("mpips")]
    assert len(lines) == 1 and re.match(r"mpips: bad configuration: --batch-size 1,000,000,000 x 2 workers is"
                                        r" 2,000,000,000 samples a step, more than the 1,438 training samples of"
                                        r" digits: use --batch-size 719 or less$", lines[0]), out.stderr
