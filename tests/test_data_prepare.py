"""``python -m mpips.data prepare | synth | inspect`` on every kind of source, serially and
through MPI-IO (mpirun -n 2 and 4), and ``--verify`` catching a corrupt partition."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import run_mpi

from mpips.data import open_dataset
from mpips.data.__main__ import main
from mpips.data.hdf5 import DatasetError, DatasetFile


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 3, 4)).astype(np.float32)
    y = rng.integers(0, 6, 1000)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return x, y


def _rows(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[f"{s}/{k}"][()] for s in ("train", "val") for k in f[s]}


def test_prepare_npz_and_npy_keep_every_sample(tmp_path, arrays, capsys):
    x, y = arrays
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "a.npz"),
                "-o",
                str(tmp_path / "a.h5"),
                "--partitions",
                "5",
                "--compression",
                "gzip",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "x.npy"),
                "--labels",
                str(tmp_path / "y.npy"),
                "-o",
                str(tmp_path / "b.h5"),
                "--partitions",
                "5",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    a, b = _rows(str(tmp_path / "a.h5")), _rows(str(tmp_path / "b.h5"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with h5py.File(tmp_path / "a.h5") as f:  # train + held-out = the source, each sample once
        both = np.concatenate([f["train/x"][()], f["val/x"][()]])
        labels = np.concatenate([f["train/y"][()], f["val/y"][()]])
    order = np.argsort(both[:, 0, 0])
    np.testing.assert_array_equal(both[order], x[np.argsort(x[:, 0, 0])])
    np.testing.assert_array_equal(labels[order], y[np.argsort(x[:, 0, 0])])
    d = open_dataset("unused", str(tmp_path / "a.h5"), data_servers=5)
    assert d.spec.input_shape == (3, 4) and d.spec.num_classes == 6 and len(d.train) == 800
    with DatasetFile(str(tmp_path / "a.h5")) as f:
        assert f.train["x"].compression == "gzip" and f.train["x"].chunks is not None
    assert main(["inspect", str(tmp_path / "a.h5"), "--verify"]) == 0
    assert "verified: all partitions match" in capsys.readouterr().out


def test_prepare_text_folder_and_builtin(tmp_path):
    src = tmp_path / "corpus"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", src)
    assert (
        main(
            [
                "prepare",
                str(src),
                "-o",
                str(tmp_path / "t.h5"),
                "--context",
                "32",
                "--suffix",
                ".py",
            ]
        )
        == 0
    )
    d = open_dataset("unused", str(tmp_path / "t.h5"), context=32)
    x, y = d.train.take(np.array([0, 5]))
    assert d.spec.kind == "text" and x.shape == (2, 32) and (x[:, 1:] == y[:, :-1]).all()
    text = b"".join(p.read_bytes() for p in sorted(src.rglob("*.py")))
    with h5py.File(tmp_path / "t.h5") as f:  # every window is a piece of the corpus
        assert bytes(f["train/tokens"][0]) in text
    assert (
        main(["prepare", "builtin:digits", "-o", str(tmp_path / "d.h5"), "--partitions", "3"]) == 0
    )
    d = open_dataset("unused", str(tmp_path / "d.h5"))
    assert len(d.train) == 1438 and len(d.val_y) == 359 and d.partitions.sizes == (480, 479, 479)


def test_inspect_verify_finds_the_corrupt_partition(tmp_path, arrays, capsys):
    out = str(tmp_path / "a.h5")
    main(["prepare", str(tmp_path / "a.npz"), "-o", out, "--partitions", "4"])
    with h5py.File(out, "r+") as f:
        f["train/y"][500] = 3 - f["train/y"][500]
    assert main(["inspect", out, "--verify"]) == 1
    captured = capsys.readouterr()
    assert "partition 2 (samples 450..674) field 'y': checksum" in captured.err
    assert "verified: 1 bad partition(s)" in captured.out


def test_synth_streams_any_size(tmp_path):
    out = str(tmp_path / "s.h5")
    assert (
        main(
            [
                "synth",
                "-o",
                out,
                "--samples",
                "3000",
                "--shape",
                "2,5",
                "--classes",
                "4",
                "--partitions",
                "3",
            ]
        )
        == 0
    )
    d = open_dataset("unused", out, data_servers=3)
    assert len(d.train) == 2700 and d.spec.num_classes == 4


@pytest.mark.parametrize("nprocs", [2, 4])
def test_prepare_under_mpiio_matches_serial(tmp_path, arrays, nprocs):
    serial, parallel = str(tmp_path / "serial.h5"), str(tmp_path / "mpi.h5")
    args = [str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--partitions", "6"]
    main(["prepare", *args, "-o", serial])
    result = run_mpi(
        nprocs, ["-m", "mpips.data", "prepare", *args, "-o", parallel], timeout=90, check=True
    )
    assert f"(MPI-IO on {nprocs} ranks)" in result.stdout
    a, b = _rows(serial), _rows(parallel)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with DatasetFile(serial) as f, DatasetFile(parallel) as g:
        np.testing.assert_array_equal(f.crc, g.crc)
        assert all(not g.check_partition(p) for p in range(6))


def _with_nan(tmp_path, arrays):
    x, y = arrays
    x = x.copy()
    x[317, 2, 1] = np.nan
    x[640, 0, 0] = -np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    return str(tmp_path / "nan.npz")


def test_prepare_refuses_non_finite_features(tmp_path, arrays, capsys):
    out = tmp_path / "nan.h5"
    assert main(["prepare", _with_nan(tmp_path, arrays), "-o", str(out), "--partitions", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"mpips.data: {tmp_path}/nan.npz: sample 317 has NaN at x[2, 1] (1 NaN, 0 Inf in this sample): mpips"
        " refuses non-finite features (every gradient of a batch holding one is NaN); clean or drop those"
        " samples, then prepare again"
    ]
    assert not out.exists()  # no half-written file that looks like a dataset


@pytest.mark.parametrize(
    "labels, flags, message",
    [
        ([0, 1, 2, 5, 1] * 200, ["--num-classes", "5"],
         "label 5 of sample 3 is outside [0, 5) (--num-classes = 5; 200 such labels)"),
        ([0, -1] * 500, [], "label -1 of sample 1 is outside [0, 1) (largest label + 1 = 1; 500 such labels)"),
        ([0] * 1000, [], "1 class(es) (largest label + 1): a classifier needs at least 2"),
        (list(range(1000)), ["--num-classes", "5000"],
         "5000 classes (--num-classes) for 1000 samples: labels must be class indices 0..C-1, not ids"),
    ],
)
def test_prepare_refuses_labels_that_are_not_class_indices(tmp_path, arrays, labels, flags, message, capsys):
    np.savez(tmp_path / "l.npz", x=arrays[0], y=np.array(labels))
    assert main(["prepare", str(tmp_path / "l.npz"), "-o", str(tmp_path / "l.h5"), *flags]) == 2
    assert message in capsys.readouterr().err


def _write_unchecked(path, x, y, partitions=4, val=100):
    """A file as an older mpips (or another tool) could write it: no finiteness check."""
    from mpips.data.hdf5 import DatasetWriter, SampleFormat

    w = DatasetWriter(str(path), SampleFormat.classification(x.shape[1:], x.dtype, int(y.max()) + 1), "old",
                      len(x) - val, val, partitions)
    for p in range(partitions):
        lo, hi = w.parts.range(p)
        w.write_train(lo, {"x": x[lo:hi], "y": y[lo:hi]})
    w.write_val(0, {"x": x[len(x) - val:], "y": y[len(x) - val:]})
    w.close()


def test_verify_and_open_report_non_finite_features(tmp_path, arrays, capsys):
    x, y = arrays
    x = x.copy()
    x[317, 2, 1], x[950, 1, 3] = np.nan, np.inf  # 950: in the held-out split
    path = tmp_path / "old.h5"
    _write_unchecked(path, x, y)
    assert main(["inspect", str(path), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "verified: 1 bad partition(s); 1 problem(s) elsewhere in the file (above)" in captured.out
    assert captured.err.splitlines() == [
        f"{path}: training sample 317 has NaN at x[2, 1] (1 NaN, 0 Inf in this sample): training on it would"
        " make every gradient NaN; clean the source and re-create the file with `python -m mpips.data prepare`",
        f"{path}: held-out sample 50 has inf at x[1, 3] (0 NaN, 1 Inf in this sample): training on it would"
        " make every gradient NaN; clean the source and re-create the file with `python -m mpips.data prepare`",
    ]
    with pytest.raises(DatasetError, match=r"training sample 317 has NaN at x\[2, 1\]") as info:
        open_dataset("unused", str(path))
    assert "held-out sample 50 has inf" in str(info.value)


def test_open_refuses_an_implausible_class_count(tmp_path, arrays):
    x, y = arrays
    path = tmp_path / "ids.h5"
    _write_unchecked(path, x, 1000 + np.arange(len(x)))  # record numbers stored as labels
    with pytest.raises(DatasetError, match=r"2000 classes for 1000 samples: labels must be class indices 0..C-1"):
        open_dataset("unused", str(path))


def test_prepare_under_mpiio_refuses_non_finite_features_once(tmp_path, arrays):
    """Rank 1 writes the partition with the NaN; both ranks agree, rank 0 says it, nothing is left."""
    src, out = _with_nan(tmp_path, arrays), tmp_path / "nan.h5"
    result = run_mpi(2, ["-m", "mpips.data", "prepare", src, "-o", str(out), "--partitions", "4"], timeout=90)
    assert result.returncode == 2
    said = [line for line in result.stderr.splitlines() if line.startswith("mpips.data:")]
    assert said == [f"mpips.data: {src}: sample 317 has NaN at x[2, 1] (1 NaN, 0 Inf in this sample): mpips refuses"
                    " non-finite features (every gradient of a batch holding one is NaN); clean or drop those"
                    " samples, then prepare again"]
    assert not out.exists()
