"""HDF5 files mpips did not write, read in place (mpips.data.foreign): checks, partitions, reads;
and on 4 ranks, three such files read by two data servers train bitwise like a prepared file."""

import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpips.data import DatasetError, open_dataset
from mpips.data import foreign as foreign_mod
from mpips.data.foreign import ForeignData, expand_paths, is_foreign
from mpips.data.hdf5 import DatasetFile, PartitionReader


def write(path, x, y, x_key="x", y_key="y", chunks=None):
    with h5py.File(path, "w") as f:
        f.create_dataset(x_key, data=x, chunks=chunks)
        f.create_dataset(y_key, data=y)
    return str(path)


def three_files(folder, rows=(40, 50, 30), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    paths, xs, ys = [], [], []
    for i, n in enumerate(rows):
        x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
        y = rng.integers(0, classes, n).astype(np.int32)
        paths.append(write(Path(folder) / f"part_{i}.h5", x, y, "img", "label", chunks=x.shape))  # one chunk
        xs.append(x)
        ys.append(y)
    return paths, np.concatenate(xs), np.concatenate(ys)


def test_files_are_partitions_read_in_place_in_the_order_given(tmp_path):
    paths, x, y = three_files(tmp_path)
    assert expand_paths(str(tmp_path / "part_*.h5")) == paths  # a glob, sorted
    assert expand_paths(",".join(paths)) == paths and is_foreign(paths[0])
    data = ForeignData.scan(str(tmp_path / "part_*.h5"), x_key="img", y_key="label")
    assert data.format.kind == "classification" and data.format.num_classes == 4  # auto: integer labels
    assert data.partitions.sizes == (40, 50, 30) and data.samples == 120
    with data.open() as reader:
        got = PartitionReader(reader, 1 << 20).take(np.array([119, 0, 45, 40, 89]))
    np.testing.assert_array_equal(got["x"], x[[119, 0, 45, 40, 89]])
    np.testing.assert_array_equal(got["y"], y[[119, 0, 45, 40, 89]])


def test_a_large_file_is_cut_along_its_chunks_to_feed_every_data_server(tmp_path, monkeypatch):
    x = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    path = write(tmp_path / "big.h5", x, np.zeros(1000, np.float32), chunks=(64, 3))
    monkeypatch.setattr(foreign_mod, "PARTITION_BYTES", 4000)  # 16 bytes per sample: ~250 rows each
    data = ForeignData.scan(path)
    assert data.format.kind == "regression" and data.format.num_classes == 1  # float targets
    assert all(o % 64 == 0 for o in data.partitions.offsets) and sum(data.partitions.sizes) == 1000
    assert len(data.partitions) == 4
    monkeypatch.setattr(foreign_mod, "PARTITION_BYTES", 1 << 30)
    assert len(ForeignData.scan(path).partitions) == 1
    more = ForeignData.scan(path, min_partitions=6)  # six data servers: six chunk-aligned ranges
    assert len(more.partitions) == 6 and all(o % 64 == 0 for o in more.partitions.offsets)
    with more.open() as reader:
        lo, hi = more.partitions.range(3)
        np.testing.assert_array_equal(reader.read_train(lo, hi)["x"], x[lo:hi])


def test_every_problem_of_every_file_is_one_line(tmp_path):
    good = write(tmp_path / "a.h5", np.zeros((5, 3), np.float32), np.arange(5) % 2)
    rows = write(tmp_path / "b.h5", np.zeros((5, 3), np.float32), np.arange(4) % 2)
    shape = write(tmp_path / "c.h5", np.zeros((5, 4), np.float32), np.arange(5) % 2)
    keys = write(tmp_path / "d.h5", np.zeros((5, 3), np.float32), np.arange(5) % 2, "inputs", "y")
    (tmp_path / "e.h5").write_text("not hdf5")
    files = [good, rows, shape, keys, str(tmp_path / "e.h5"), str(tmp_path / "missing.h5")]
    with pytest.raises(DatasetError) as info:
        ForeignData.scan(files)
    lines = str(info.value).split("\n  ")
    assert lines == [
        f"{rows}: 'x' has 5 rows, 'y' 4: one row per sample in each",
        f"{keys}: no dataset 'x' (--x-key); datasets here: inputs, y",
        f"{tmp_path / 'e.h5'}: not a readable HDF5 file" + lines[2].split("not a readable HDF5 file")[1],
        f"{tmp_path / 'missing.h5'}: no such file",
    ]
    with pytest.raises(DatasetError, match=re.escape(
            f"{shape}: 'x' holds float32 samples of shape (4,), {good} float32 of shape (3,): every file must"
            " hold the same")):
        ForeignData.scan([good, shape])
    neg = write(tmp_path / "n.h5", np.zeros((3, 3), np.float32), np.array([0, -1, 1]))
    with pytest.raises(DatasetError, match=re.escape(f"{neg}: label -1 is negative")):
        ForeignData.scan([good, neg])
    with pytest.raises(DatasetError, match=r"label 1 is outside \[0, 1\) \(--num-classes\)"):
        ForeignData.scan(good, num_classes=1)
    nan = write(tmp_path / "r.h5", np.zeros((3, 3), np.float32), np.array([0.5, np.nan, 1.0]))
    with pytest.raises(DatasetError, match=re.escape(f"{nan}: target 'y' of sample 1 is NaN or Inf")):
        ForeignData.scan(nan)
    with pytest.raises(DatasetError, match=r"classification targets 'y' must be integers, got float64"):
        ForeignData.scan(nan, task="classification")


def test_open_dataset_reads_files_in_place_with_their_held_out_file(tmp_path):
    paths, x, y = three_files(tmp_path)
    val = write(tmp_path / "val.h5", x[:7], y[:7], "img", "label")
    data = open_dataset("digits", f"{tmp_path}/part_*.h5", x_key="img", y_key="label", val_data=val,
                        data_servers=2)
    assert data.spec.task == "classification" and data.spec.input_shape == (1, 4, 4) and data.spec.num_classes == 4
    np.testing.assert_array_equal(data.val_y, y[:7].astype(np.int64))
    assert data.val_x.dtype == np.float32 and data.val_y.dtype == np.int64
    got_x, got_y = data.train.take(np.array([3, 100]))
    np.testing.assert_array_equal(got_x, x[[3, 100]])
    # each file is one HDF5 chunk: three partitions at most
    with pytest.raises(DatasetError, match=r"3 partition\(s\) \(files, or chunk-aligned ranges of them\), but 4 data"
                       " servers with --replicas 1 need at least 4"):
        open_dataset("digits", paths, x_key="img", y_key="label", data_servers=4)


def test_prepare_regression_multilabel_and_tokens_keep_their_targets(tmp_path):
    from mpips.data.__main__ import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", x=rng.standard_normal((30, 3)), y=rng.standard_normal((30, 2)))
    assert main(["prepare", str(tmp_path / "r.npz"), "-o", str(tmp_path / "r.h5"), "--task", "regression",
                 "--partitions", "2"]) == 0
    with DatasetFile(tmp_path / "r.h5") as f:
        assert f.format.kind == "regression" and f.format.num_classes == 2 and not f.check_partition(0)
        x, y = f.format.to_xy(f.read_train(0, 3))
    assert y.dtype == np.float32 and y.shape == (3, 2)
    np.savez(tmp_path / "m.npz", x=rng.standard_normal((30, 3)), y=rng.integers(0, 2, (30, 5)))
    assert main(["prepare", str(tmp_path / "m.npz"), "-o", str(tmp_path / "m.h5"), "--task", "multilabel"]) == 0
    data = open_dataset("digits", str(tmp_path / "m.h5"))
    assert data.spec.task == "multilabel" and data.spec.num_classes == 5
    np.savez(tmp_path / "bad.npz", x=rng.standard_normal((30, 3)), y=rng.integers(0, 3, (30, 5)))
    assert main(["prepare", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "b.h5"), "--task", "multilabel"]) == 2
    seq = rng.integers(0, 7, (30, 9))
    np.savez(tmp_path / "t.npz", x=seq[:, :-1], y=seq[:, 1:])
    assert main(["prepare", str(tmp_path / "t.npz"), "-o", str(tmp_path / "t.h5"), "--task", "tokens",
                 "--num-classes", "10"]) == 0
    data = open_dataset("digits", str(tmp_path / "t.h5"))
    assert data.spec.task == "tokens" and data.spec.num_classes == 10 and data.spec.input_shape == (8,)
    x, y = data.train.take(np.arange(3))
    assert x.dtype == y.dtype == np.int64 and np.array_equal(x[:, 1:], y[:, :-1])


@pytest.mark.mpi(min_size=4, sizes=(4,))
def test_three_files_read_in_place_by_two_data_servers_train_bitwise_like_a_prepared_file():
    """1 server + 2 data servers + 1 worker; the prepared file holds the same samples in the same
    three partitions, so the sample order is the same."""
    from mpi4py import MPI

    from mpips.config import parse_args
    from mpips.data.prepare import array_source, write_dataset
    from mpips.train import run

    comm = MPI.COMM_WORLD
    folder = Path(comm.bcast(tempfile.mkdtemp(prefix="mpips-test-") if comm.rank == 0 else None))
    if comm.rank == 0:
        _, x, y = three_files(folder, rows=(40, 40, 40))
        np.savez(folder / "all.npz", x=x, y=y.astype(np.int64))
        # `python -m mpips.data prepare all.npz -o prepared.h5 --partitions 3 --val-fraction 0` (serially,
        # on this rank alone: under mpirun the command would write collectively)
        source = array_source(str(folder / "all.npz"), num_classes=4, val_fraction=0)
        write_dataset(source, str(folder / "prepared.h5"), partitions=3)
    comm.Barrier()
    flags = ["--data-servers", "2", "--steps", "12", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.1",
             "--no-final-eval"]
    assert run(parse_args([*flags, "--data", str(folder / "prepared.h5"), "--save", str(folder / "a.pt")]), comm) == 0
    assert run(parse_args([*flags, "--data", f"{folder}/part_*.h5", "--x-key", "img", "--y-key", "label",
                           "--save", str(folder / "b.pt")]), comm) == 0
    comm.Barrier()
    if comm.rank == 0:
        a, b = torch.load(folder / "a.pt"), torch.load(folder / "b.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
