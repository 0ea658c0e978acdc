"""ShardPlan: balanced by bytes, every element mapped both ways. No MPI."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpips.shard import ShardPlan

shapes = st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=8)


@given(shapes=shapes, servers=st.integers(1, 5))
def test_pieces_cover_every_element_once_and_map_back(shapes, servers):
    plan = ShardPlan.build([(f"t{i}", s) for i, s in enumerate(shapes)], servers)
    sizes = [plan.shard_numel(s) for s in range(servers)]
    assert sum(sizes) == plan.numel and max(sizes) - min(sizes) <= 1
    seen = set()
    for spec in plan.tensors:
        covered = 0
        for p in plan.pieces(spec.name):
            assert p.tensor_offset == covered
            covered += p.length
            for k in range(p.length):
                flat = spec.offset + p.tensor_offset + k
                assert plan.locate(flat) == (p.server, p.server_offset + k)
                seen.add(flat)
        assert covered == spec.numel
    assert seen == set(range(plan.numel))
    for s in range(servers):
        offsets = [p.server_offset for p in plan.server_pieces(s)]
        assert offsets == sorted(offsets)
        assert sum(p.length for p in plan.server_pieces(s)) == sizes[s]


def test_large_tensor_is_split_and_small_ones_packed():
    plan = ShardPlan.build([("big", (100,)), ("b1", (3,)), ("b2", (3,))], servers=2)
    assert [p.server for p in plan.pieces("big")] == [0, 1]
    assert plan.shard_range(0) == (0, 53) and plan.imbalance() == 0.0
    assert {p.tensor for p in plan.server_pieces(1)} == {"big", "b1", "b2"}


def test_describe_reports_bytes_and_imbalance():
    text = ShardPlan.build([("w", (10, 10)), ("b", (1,))], 2).describe(optimizer_factor=2.0)
    assert "101 parameters" in text and "imbalance" in text and "over 2 servers" in text


def test_locate_out_of_range():
    with pytest.raises(IndexError):
        ShardPlan.build([("w", (4,))], 2).locate(4)


def test_describe_counts_in_words():
    one = ShardPlan.build([("w", (3, 4))], 1).describe(2).splitlines()[0]
    assert one.startswith("shard plan: 1 tensor, 12 parameters (0.00 MiB) over 1 server,")
    two = ShardPlan.build([("w", (3, 4)), ("b", (1,))], 2).describe(2).splitlines()[0]
    assert two.startswith("shard plan: 2 tensors, 13 parameters (0.00 MiB) over 2 servers,")


def test_split_pieces_cuts_runs_at_bucket_starts_and_nowhere_else():
    from mpips.chunking import bucket_ranges
    from mpips.shard import split_pieces

    plan = ShardPlan.build([("a", (10,)), ("big", (300, 1000)), ("b", (5,))], 2)
    for s in range(2):
        runs = plan.server_pieces(s)
        buckets = bucket_ranges(plan.shard_numel(s), 1)  # the smallest buckets: 4096 elements
        starts = [lo for lo, _ in buckets]
        cut, source = split_pieces(runs, starts)
        # the cut pieces tile the shard in order, each inside one bucket and one run
        assert [p.server_offset for p in cut] == sorted({*(r.server_offset for r in runs), *starts[1:]})
        assert sum(p.length for p in cut) == plan.shard_numel(s)
        for p, i in zip(cut, source, strict=True):
            r = runs[i]
            assert p.tensor == r.tensor and r.server_offset <= p.server_offset
            assert p.tensor_offset - r.tensor_offset == p.server_offset - r.server_offset
            assert p.server_offset + p.length <= r.server_offset + r.length
            assert any(lo <= p.server_offset and p.server_offset + p.length <= hi for lo, hi in buckets)
