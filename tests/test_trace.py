"""mpips.trace: span recording, idle merging, the offset estimate, the Chrome trace document; the
clock sync and the gather on real ranks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mpips.trace import IDLE_GAP, NULL_TRACER, RankTrace, Tracer, chrome_trace, estimate_offset


def test_spans_keep_name_order_nesting_and_step():
    tracer = Tracer(rank=3, role="worker", index=1)
    with tracer.span("pull", step=7), tracer.span("wait for parameters"):
        time.sleep(0.002)
    with tracer.span("push", step=7):
        pass
    rt = tracer.collect()
    names = [rt.names[i] for i in rt.name_ids]
    assert names == ["wait for parameters", "pull", "push"]  # recorded as each span ends
    assert rt.step.tolist() == [-1, 7, 7]
    wait, pull, push = range(3)
    assert rt.end[wait] - rt.start[wait] >= 0.002
    assert rt.start[pull] <= rt.start[wait] and rt.end[wait] <= rt.end[pull]  # nested inside pull
    assert rt.end[pull] <= rt.start[push]
    assert (rt.rank, rt.role, rt.index, rt.dropped) == (3, "worker", 1, 0)


def test_offset_is_added_to_every_span():
    tracer = Tracer(0, "server", 0, offset=100.0)
    tracer.record("apply", 1.0, 2.5)
    rt = tracer.collect()
    assert (rt.start.tolist(), rt.end.tolist()) == ([101.0], [102.5])


def test_null_tracer_records_nothing_and_its_span_is_shared():
    assert NULL_TRACER.span("a") is NULL_TRACER.span("b")
    with NULL_TRACER.span("push"):
        pass
    NULL_TRACER.record("x", 0.0, 1.0)
    NULL_TRACER.idle("x", 0.0)
    assert not NULL_TRACER.enabled


def test_idle_rounds_merge_until_something_else_happens_or_a_gap():
    tracer = Tracer(0, "server", 0)
    first = tracer.now()
    tracer.idle("wait for pushes", first)
    for _ in range(4):  # a polling loop's empty rounds: one span
        tracer.idle("wait for pushes", tracer.now())
    merged_end = tracer.collect().end[0]
    tracer.record("apply", tracer.now(), tracer.now())  # work in between: a new idle span after it
    tracer.idle("wait for pushes", tracer.now())
    late = tracer.now() + 2 * IDLE_GAP  # an idle round that starts after a gap: not merged
    tracer.idle("wait for pushes", late)
    rt = tracer.collect()
    assert [rt.names[i] for i in rt.name_ids] == ["wait for pushes", "apply", "wait for pushes", "wait for pushes"]
    assert (rt.start[0], rt.end[0]) == (first, merged_end)  # the five rounds, start of the first to end of the last


def test_spans_past_the_bound_are_counted_not_kept():
    tracer = Tracer(0, "worker", 0, max_spans=3)
    for i in range(5):
        tracer.record("push", float(i), float(i) + 0.5)
    assert len(tracer) == 3 and tracer.collect().dropped == 2


def test_offset_estimate_takes_the_shortest_round_trip():
    true = 5.0  # the reference clock is 5 s ahead
    delays = [(0.004, 0.001), (0.0002, 0.0003), (0.01, 0.0001), (0.001, 0.003)]  # (out, back)
    samples, t = [], 100.0
    for out, back in delays:
        samples.append((t, t + out + true, t + out + back))
        t += 1.0
    offset, uncertainty = estimate_offset(samples)
    assert uncertainty == pytest.approx(0.00025)  # half the shortest round trip (0.2 + 0.3 ms)
    assert abs(offset - true) <= uncertainty
    assert offset == pytest.approx(true - 0.00005)  # the asymmetric 0.2 / 0.3 ms split
    with pytest.raises(ValueError):
        estimate_offset([])


def _rank(rank: int, role: str, spans: list[tuple[str, float, float, int]]) -> RankTrace:
    names = sorted({s[0] for s in spans})
    return RankTrace(
        rank=rank, role=role, index=0, names=names,
        name_ids=np.array([names.index(s[0]) for s in spans], dtype=np.int32),
        start=np.array([s[1] for s in spans]), end=np.array([s[2] for s in spans]),
        step=np.array([s[3] for s in spans], dtype=np.int64), offset=0.001 * rank, uncertainty=2e-5,
    )


def test_chrome_trace_has_one_named_process_per_rank_and_complete_events():
    ranks = [_rank(1, "server", [("apply", 10.5, 10.75, 3)]),
             _rank(0, "worker", [("push", 10.25, 10.5, 3), ("pull", 10.0, 10.25, -1)])]
    doc = json.loads(json.dumps(chrome_trace(ranks, zero=(10.0, 1.7e9))))  # JSON all the way
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "worker 0 (rank 0)", 1: "server 0 (rank 1)"}
    spans = sorted((e["pid"], e["name"], e["ts"], e["dur"], e.get("args")) for e in doc["traceEvents"]
                   if e["ph"] == "X")
    assert spans == [(0, "pull", 0.0, 250000.0, None), (0, "push", 250000.0, 250000.0, {"step": 3}),
                     (1, "apply", 500000.0, 250000.0, {"step": 3})]
    other = doc["otherData"]
    assert other["epoch_at_zero"] == 1.7e9
    assert other["ranks"]["1"]["clock_offset_us"] == pytest.approx(1000.0)
    assert other["ranks"]["1"]["clock_uncertainty_us"] == pytest.approx(20.0)


@pytest.mark.mpi(min_size=2, sizes=(2, 4))
def test_clock_offsets_and_the_gathered_trace_on_real_ranks(tmp_path_factory):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    tracer = Tracer.start(comm, "worker" if rank % 2 else "server", rank // 2)
    # one host: CLOCK_MONOTONIC is shared, so the true offset is 0 and must lie within the bound
    assert abs(tracer.offset) <= tracer.uncertainty + 1e-6
    assert tracer.uncertainty < 0.05  # a round trip on one host, even loaded, is far below 100 ms
    with tracer.span("compute", step=rank):
        time.sleep(0.001)
    path = comm.bcast(str(tmp_path_factory.mktemp("trace") / "t.json") if rank == 0 else None)
    tracer.write(comm, path)
    comm.Barrier()
    doc = json.loads(Path(path).read_text())
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {r: f"{'worker' if r % 2 else 'server'} {r // 2} (rank {r})" for r in range(size)}
    compute = {e["pid"]: e for e in doc["traceEvents"] if e["ph"] == "X"}
    assert sorted(compute) == list(range(size))
    assert all(e["args"]["step"] == e["pid"] and e["dur"] >= 1000 for e in compute.values())


def test_a_span_before_rank_0s_zero_moves_ts_0_back_and_epoch_with_it():
    doc = chrome_trace([_rank(1, "data-server", [("start-up", 9.75, 10.5, -1)])], zero=(10.0, 1.7e9))
    (span,) = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert (span["ts"], span["dur"]) == (0.0, 750000.0)
    assert doc["otherData"]["epoch_at_zero"] == pytest.approx(1.7e9 - 0.25)
