"""Plots and a short summary of one run, from its ``--metrics`` file and, optionally, its ``--trace``.

``python -m mpips.report`` (see ``mpips.report``): ``write_report`` writes every file,
``write_tensorboard`` the TensorBoard scalars.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpips.report.plots import (
    plot_breakdown,
    plot_bytes,
    plot_heldout,
    plot_loss,
    plot_staleness,
    plot_throughput,
    plot_timeline,
)
from mpips.report.runs import Metrics, load_metrics, load_trace, own_times
from mpips.report.text import summary

__all__ = [
    "main",
    "write_report",
    "write_tensorboard",
]


def write_tensorboard(m: Metrics, directory: str | Path) -> None:
    """The metrics as TensorBoard scalars; ImportError when tensorboard is not installed."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    writer = SummaryWriter(log_dir=str(directory))
    try:
        for e in sorted(m.steps, key=lambda e: e["time"]):
            w, step, when = e["worker"], e["step"], e["time"]
            writer.add_scalar(f"train/loss/worker{w}", e["loss"], step, walltime=when)
            writer.add_scalar(f"train/staleness/worker{w}", e["staleness"], step, walltime=when)
            writer.add_scalar(f"train/samples_per_s/worker{w}", e["samples_per_s"], step, walltime=when)
            writer.add_scalar(f"train/data_wait_ms/worker{w}", e.get("data_wait_s", 0.0) * 1e3, step, walltime=when)
        for e in m.evals:
            writer.add_scalar("heldout/loss", e["loss"], e["step"], walltime=e["time"])
            if e.get("accuracy") is not None:
                writer.add_scalar("heldout/accuracy", e["accuracy"], e["step"], walltime=e["time"])
    finally:
        writer.close()


def write_report(metrics: str | Path, out: str | Path, trace: str | Path | None = None) -> list[Path]:
    """Write the plots and ``summary.txt`` into ``out``; returns the files written."""
    m = load_metrics(metrics)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (("loss", plot_loss), ("heldout", plot_heldout), ("throughput", plot_throughput),
                       ("staleness", plot_staleness), ("bytes", plot_bytes)):
        plot(m, out / f"{name}.png")
        written.append(out / f"{name}.png")
    loaded = load_trace(trace) if trace else None
    if loaded is not None and loaded[1]:
        labels, spans, _ = loaded
        own = own_times(spans)
        plot_breakdown(labels, own, out / "time_breakdown.png")
        plot_timeline(labels, spans, own, out / "timeline.png")
        written += [out / "time_breakdown.png", out / "timeline.png"]
    (out / "summary.txt").write_text(summary(m, loaded))
    written.append(out / "summary.txt")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpips.report", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="the --metrics JSON-lines file of a run")
    p.add_argument("--trace", help="the --trace file of the same run (adds the time breakdown and timeline)")
    p.add_argument("--out", required=True, help="directory for the PNGs and summary.txt")
    p.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard scalars here (needs tensorboard)")
    args = p.parse_args(argv)
    try:
        written = write_report(args.metrics, args.out, args.trace)
        if args.tensorboard:
            try:
                write_tensorboard(load_metrics(args.metrics), args.tensorboard)
            except ImportError as exc:
                print(f"mpips.report: --tensorboard needs the tensorboard package (pip install tensorboard):"
                      f" {exc}; the plots and summary are written", file=sys.stderr)
                return 2
            written.append(Path(args.tensorboard))
    except (OSError, ValueError, KeyError) as exc:
        print(f"mpips.report: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "summary.txt").read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
