"""The HDF5 dataset format, the partition-aware epoch order, placement and routing, and the
up-front checks of ``open_dataset``. Plain pytest, no MPI."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpips.data import DatasetError, EpochPlan, open_dataset
from mpips.data.assign import DataAssignment
from mpips.data.hdf5 import DatasetFile, PartitionReader, SampleFormat
from mpips.data.prepare import ArraySource, split_ids, write_dataset


def id_source(n: int = 203, classes: int = 7) -> ArraySource:
    """Sample i has x filled with i and label i % classes, so content reveals the id."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 6, axis=1).reshape(n, 2, 3)
    y = np.arange(n) % classes
    train, val = split_ids(n, 0.1, seed=0, shuffle=False)
    return ArraySource(
        "ids",
        SampleFormat.classification((2, 3), np.float32, classes),
        {"x": x, "y": y},
        train,
        val,
    )


@pytest.fixture
def id_file(tmp_path):
    path = str(tmp_path / "ids.h5")
    src = id_source()
    write_dataset(src, path, partitions=7)
    return path, src


def test_roundtrip_reads_the_samples_written(id_file):
    path, src = id_file
    data = open_dataset("unused", path)
    assert len(data.train) == len(src.train_ids) and data.partitions.sizes == (
        27,
        26,
        26,
        26,
        26,
        26,
        26,
    )
    ids = np.array([5, 180, 0, 27, 26, 99, 5])
    x, y = data.train.take(ids)
    np.testing.assert_array_equal(x[:, 0, 0], src.train_ids[ids])
    np.testing.assert_array_equal(y, src.train_ids[ids] % 7)
    np.testing.assert_array_equal(data.val_x[:, 1, 2], src.val_ids)
    assert data.spec.input_shape == (2, 3) and data.spec.num_classes == 7


def test_reader_cache_stays_within_its_bound(id_file):
    path, _ = id_file
    with DatasetFile(path) as f:
        one = f.partitions.sizes[0] * f.format.record_bytes
        reader = PartitionReader(f, cache_bytes=2 * one)
        for p in range(7):
            lo, hi = f.partitions.range(p)
            got = reader.take(np.arange(lo, hi)[::-1])
            np.testing.assert_array_equal(got["y"], f.train["y"][lo:hi][::-1])
            assert reader.cached_bytes <= 2 * one
        assert reader.stats.reads == 7  # one contiguous read per partition
        tiny = PartitionReader(f, cache_bytes=10)  # smaller than a partition: covering spans
        assert (
            tiny.take(np.array([3, 1]))["x"][:, 0, 0].tolist()
            == f.train["x"][[1, 3]][::-1, 0, 0].tolist()
        )
        assert tiny.cached_bytes == 0


def test_partition_order_is_exactly_once_deterministic_and_worker_independent():
    sizes = (27, 26, 26, 26, 26, 26, 26)
    n = sum(sizes)
    a = EpochPlan(n, 2, 8, seed=3, partitions=sizes)
    for epoch in range(3):
        order = a.order(epoch)
        assert sorted(order.tolist()) == list(range(n))
        np.testing.assert_array_equal(order, EpochPlan(n, 2, 8, 3, sizes).order(epoch))
        # each partition is visited in one contiguous run of the order (large reads)
        offsets = np.cumsum((0, *sizes))
        part = np.searchsorted(offsets, order, side="right") - 1
        assert (np.diff(part) != 0).sum() == len(sizes) - 1
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), EpochPlan(n, 2, 8, 4, sizes).order(0))
    for w, b in ((1, 16), (4, 4), (16, 1)):  # same global batches whatever the workers
        other = EpochPlan(n, w, b, 3, sizes)
        for step in range(a.steps_per_epoch):
            np.testing.assert_array_equal(a.global_ids(1, step), other.global_ids(1, step))


@pytest.mark.parametrize(
    "servers,workers,replicas", [(1, 2, 1), (2, 2, 1), (2, 3, 2), (3, 5, 2), (4, 4, 4)]
)
def test_assignment_replicates_and_balances(servers, workers, replicas):
    sizes = (27, 26, 26, 26, 26, 26, 26, 26)
    a = DataAssignment.build(sizes, servers, workers, replicas)
    assert all(len(set(h)) == replicas for h in a.holders)
    for w in range(workers):
        assert all(a.route[w][p] in a.holders[p] for p in range(len(sizes)))
    load = a.load()
    assert sum(load) == pytest.approx(sum(sizes))
    assert max(load) - min(load) <= max(sizes)  # within one partition's worth
    assert all(a.workers_of(s) for s in range(servers))
    head = a.describe().splitlines()[0]
    assert head.startswith(f"data assignment: 8 partitions x {replicas} replica{'s' if replicas > 1 else ''}"
                           f" on {servers} data server{'s' if servers > 1 else ''}; {workers} worker")


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.h5 does not exist"):
        open_dataset("x", str(tmp_path / "nope.h5"))


@pytest.mark.parametrize(
    "attr,value,message",
    [
        (
            "schema",
            "something.else",
            r"is not an mpips dataset \(schema attribute 'something.else'",
        ),
        ("version", 99, r"has format version 99; this mpips reads version 1"),
    ],
)
def test_wrong_schema_or_version(id_file, attr, value, message):
    path, _ = id_file
    _edit(path, lambda f: f.attrs.__setitem__(attr, value))
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset("x", path)
    assert path in str(info.value)


def test_corrupt_partition_is_named(id_file):
    path, _ = id_file

    def flip(f):
        f["train/x"][60, 0, 0] = -1.0  # partition 2 holds samples 53..78

    _edit(path, flip)
    with pytest.raises(
        DatasetError, match=r"partition 2 \(samples 53\.\.78\) field 'x': checksum"
    ) as info:
        open_dataset("x", path)
    assert path in str(info.value) and "partition 1 " not in str(info.value)


def test_labels_out_of_range(tmp_path):
    src = id_source()
    src.arrays["y"] = src.arrays["y"].copy()
    src.arrays["y"][src.train_ids[100]] = 9  # 7 classes; sample 100 is in partition 3
    path = str(tmp_path / "labels.h5")
    write_dataset(src, path, partitions=7)
    with pytest.raises(
        DatasetError, match=r"labels\.h5: partition 3: label 9 of sample 100 is outside \[0, 7\)"
    ):
        open_dataset("x", path)


def test_too_few_partitions_for_the_layout(tmp_path):
    path = str(tmp_path / "two.h5")
    write_dataset(id_source(), path, partitions=2)
    open_dataset("x", path, data_servers=4, replicas=2)  # 2 partitions x 2 replicas: enough
    with pytest.raises(
        DatasetError,
        match=r"two\.h5 has 2 partition\(s\), but 3 data servers with --replicas 1 need at least 3",
    ):
        open_dataset("x", path, data_servers=3)


def test_empty_training_split(id_file, tmp_path):
    path, _ = id_file

    def empty(f):
        for name in ("x", "y"):
            shape = f["train"][name].shape
            del f["train"][name]
            f["train"].create_dataset(
                name, shape=(0, *shape[1:]), dtype="f4" if name == "x" else "i8"
            )

    _edit(path, empty)
    with pytest.raises(DatasetError, match=r"ids\.h5: the training split is empty"):
        open_dataset("x", path)
    with pytest.raises(DatasetError, match="empty training split|no training samples"):
        src = id_source()
        src.train_ids = src.train_ids[:0]
        write_dataset(src, str(tmp_path / "e.h5"), partitions=1)
