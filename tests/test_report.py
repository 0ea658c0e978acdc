"""mpips.report: own span times, the summary, the plots; and one real run with --trace and --metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_train

from mpips.report import UNTRACED, Span, load_metrics, main, own_times, summary

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ["loss", "heldout", "throughput", "staleness", "bytes"]


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _synthetic_metrics(path: Path, steps: int = 30, slow_worker: int = 1) -> None:
    """Two workers, worker ``slow_worker`` twice as slow; asp-like staleness; evals and an end event."""
    lines, t0 = [], 1_700_000_000.0
    for w in (0, 1):
        dt = 0.02 if w == slow_worker else 0.01
        for s in range(1, steps + 1):
            lines.append({"event": "step", "step": s, "time": t0 + s * dt, "rank": w, "worker": w,
                          "loss": 2.0 / s, "samples_per_s": 32 / dt, "bytes_pushed": 1000 * s,
                          "bytes_pulled": 1000 * s, "staleness": s % 4, "server_queue": 0,
                          "data_wait_s": 0.0005, "samples": 32})
    lines.append({"event": "eval", "step": 10, "time": t0 + 0.2, "rank": 0, "loss": 0.5, "accuracy": 0.8})
    lines.append({"event": "eval", "step": steps, "time": t0 + 0.7, "rank": 0, "loss": 0.25, "accuracy": 0.9})
    lines.append({"event": "end", "step": steps, "time": t0 + 0.7, "rank": 0, "loss": 0.25, "accuracy": 0.9,
                  "applied": 2 * steps, "dropped": 0, "max_staleness": 7, "staleness": [0, 1, 1, 2, 7, 3]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_summary_counts_the_late_gradients_of_backup_workers(tmp_path):
    path = tmp_path / "m.jsonl"
    _synthetic_metrics(path)
    assert "late gradients" not in summary(load_metrics(path), None)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    events[-1].update(late=12, staleness=[])
    path.write_text("".join(json.dumps(x) + "\n" for x in events))
    assert "late gradients dropped (bsp --backup-workers): 12, their workers" in summary(load_metrics(path), None)


def test_own_times_take_nested_spans_out_of_their_parent():
    spans = [
        Span(0, "pull", 0.0, 1.0), Span(0, "wait for parameters", 0.2, 0.7),  # nested: 0.5 of pull's 1.0
        Span(0, "push", 1.5, 2.0),  # 0.5 s untraced before it
        Span(1, "apply", 0.0, 2.0), Span(1, "optimizer step", 0.5, 1.0), Span(1, "publish", 1.0, 1.5),
    ]
    own = own_times(spans)
    assert own[0] == pytest.approx({"pull": 0.5, "wait for parameters": 0.5, "push": 0.5, UNTRACED: 0.5})
    assert own[1] == pytest.approx({"apply": 1.0, "optimizer step": 0.5, "publish": 0.5, UNTRACED: 0.0})
    assert sum(own[0].values()) == pytest.approx(2.0)  # first span's start to last span's end


def test_summary_names_the_slowest_worker_and_the_largest_staleness(tmp_path):
    _synthetic_metrics(tmp_path / "m.jsonl", slow_worker=1)
    text = summary(load_metrics(tmp_path / "m.jsonl"), None)
    assert "slowest worker: worker 1: 20.0 ms per step on average (fastest: worker 0, 10.0 ms)" in text
    assert "largest staleness: 7 steps among 6 applied gradients" in text
    assert "workers computed at most 3 steps behind" in text
    assert "held-out (final parameters, step 30): loss 0.2500, accuracy 0.9000" in text
    # the samples of steps that end after the first step event (1,920 - 32) over 0.59 s
    assert "throughput: 3,200 samples/s over all workers (1,920 samples)" in text


def test_summary_with_a_trace_names_the_rank_the_others_wait_for(tmp_path):
    _synthetic_metrics(tmp_path / "m.jsonl")
    labels = {0: "worker 0 (rank 0)", 1: "worker 1 (rank 1)", 2: "server 0 (rank 2)"}
    spans = [Span(0, "wait for parameters", 0.0, 0.8), Span(0, "forward/backward", 0.8, 1.0),
             Span(1, "wait for parameters", 0.0, 0.7), Span(1, "forward/backward", 0.7, 1.0),
             Span(2, "wait for pushes", 0.0, 0.1), Span(2, "apply", 0.1, 1.0)]
    other = {"ranks": {"0": {"role": "worker"}, "1": {"role": "worker"}, "2": {"role": "server"}}}
    text = summary(load_metrics(tmp_path / "m.jsonl"), (labels, spans, other))
    assert "least waiting (what the others likely wait for): server 0 (rank 2), 10% of its time" in text
    assert "  server:      apply 90%, wait for pushes 10%" in text
    assert "  worker:      wait for parameters 75%, forward/backward 25%" in text


def test_report_without_a_trace_writes_the_metric_plots_and_tensorboard_only_where_installed(tmp_path, capsys):
    _synthetic_metrics(tmp_path / "m.jsonl")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        installed = False
    else:
        installed = True
    status = main([str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"), "--tensorboard", str(tmp_path / "tb")])
    if installed:
        assert status == 0 and list((tmp_path / "tb").glob("events.out.tfevents.*"))
    else:  # optional: said in one line, and the plots and summary are written all the same
        assert status == 2
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{n}.png" for n in PLOTS] + ["summary.txt"])
    for name in PLOTS:
        width, height = _png_size(tmp_path / "out" / f"{name}.png")
        assert width >= 800 and height >= 300


def test_a_file_that_is_not_metrics_is_said_in_one_line(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"event": "step"\n')
    assert main([str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 1: not JSON" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_traced_run_has_spans_from_every_rank_and_role_and_the_report_shows_it(tmp_path):
    steps = 30
    trace, metrics = tmp_path / "trace.json", tmp_path / "m.jsonl"
    run_train(4, "--steps", str(steps), "--sync", "asp", "--trace", str(trace), "--metrics", str(metrics),
              "--eval-every", "15", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "15",
              "--data-dir", str(tmp_path), timeout=180, cwd=tmp_path, check=True)
    doc = json.loads(trace.read_text())
    events = doc["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "worker 0 (rank 0)", 1: "worker 1 (rank 1)", 2: "data-server 0 (rank 2)",
                     3: "server 0 (rank 3)"}
    spans: dict[int, dict[str, list[dict]]] = {pid: {} for pid in names}
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0 and e["pid"] in names
            spans[e["pid"]].setdefault(e["name"], []).append(e)
    expected = {
        "worker": {"pull", "wait for data", "forward/backward", "push", "checkpoint write", "start-up"},
        "server": {"receive", "apply", "optimizer step", "publish", "checkpoint write", "start-up"},
        "data-server": {"read", "serve", "start-up"},
    }
    for pid, label in names.items():
        role = label.split(" ")[0]
        assert expected[role] <= set(spans[pid]), f"{label}: {sorted(spans[pid])}"
        if role == "worker":  # one compute span per step, each naming its step
            assert sorted(e["args"]["step"] for e in spans[pid]["forward/backward"]) == list(range(steps))
    # a checkpoint is collective: every server and worker wrote the same ones (asp: at a step near 15, and 30)
    written = {pid: sorted(e["args"]["step"] for e in spans[pid]["checkpoint write"]) for pid in (0, 1, 3)}
    assert written[0] == written[1] == written[3] and len(written[0]) >= 2 and written[0][-1] == steps
    assert len(spans[0]["evaluate"]) == 2  # the lead worker, every 15 steps
    assert len(spans[3]["apply"]) == 2 * steps  # asp: every push of both workers, one span each
    # clocks on one line: a gradient is applied after some worker began pushing it
    unc = max(r["clock_uncertainty_us"] for r in doc["otherData"]["ranks"].values())
    first_push = {}
    for pid in (0, 1):
        for e in spans[pid]["push"]:
            s = e["args"]["step"]
            first_push[s] = min(first_push.get(s, float("inf")), e["ts"])
    for e in spans[3]["apply"]:
        assert first_push[e["args"]["step"]] <= e["ts"] + e["dur"] + unc

    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "mpips.report", str(metrics), "--trace", str(trace),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    for name in [*PLOTS, "time_breakdown", "timeline"]:
        width, height = _png_size(out / f"{name}.png")
        assert width >= 800 and height >= 300
    text = (out / "summary.txt").read_text()
    assert text in done.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    end = next(r for r in records if r["event"] == "end")
    assert f"largest staleness: {max(end['staleness'])} steps among {len(end['staleness']):,} applied" in text
    for role in ("worker:", "server:", "data-server:"):
        assert f"  {role}" in text
    assert "slowest worker: worker " in text
    assert "least waiting (what the others likely wait for): " in text
