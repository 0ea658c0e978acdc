"""Plots and a short summary of one run, from its ``--metrics`` file and, optionally, its ``--trace``.

    mpirun -n 4 python -m mpips.train --metrics run.jsonl --trace run.json --eval-every 50
    python -m mpips.report run.jsonl --trace run.json --out report/
    python -m mpips.report run.jsonl --out report/ --tensorboard tb/     # also TensorBoard scalars

Writes into ``--out`` (PNG, matplotlib's Agg backend, no display needed):

- ``loss.png``: training loss of every worker (thin) and its moving mean (thick), and the
  held-out loss (black dots), against the step and against wall time;
- ``heldout.png``: held-out accuracy against the step and against wall time;
- ``throughput.png``: samples/s of every worker and of all of them, against wall time;
- ``staleness.png``: histograms of the staleness of the gradients the servers applied, and of how
  far behind the parameters each worker computed on were;
- ``bytes.png``: bytes each worker pushed and pulled per step, and in total;
- with ``--trace``: ``time_breakdown.png``, each rank's time by span (a span's own time, its
  nested spans' time taken out; "untraced" is the rest of the rank's traced time), and
  ``timeline.png``, every rank's spans over a few steps from the middle of the run;
- ``summary.txt``: where the time went per role, the slowest worker, the largest staleness,
  throughput and the final held-out metrics (also printed).

``--tensorboard DIR`` also writes the metrics as TensorBoard scalars where
``torch.utils.tensorboard`` is importable (``pip install tensorboard``; not a dependency).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpips.metrics import readable

__all__ = ["Metrics", "Span", "load_metrics", "load_trace", "main", "own_times", "write_report"]

UNTRACED = "untraced"


@dataclass
class Metrics:
    """The events of one ``--metrics`` file, by kind."""

    steps: list[dict[str, Any]] = field(default_factory=list)  # every worker's "step" events
    evals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @property
    def workers(self) -> list[int]:
        return sorted({int(e["worker"]) for e in self.steps})

    def of_worker(self, w: int) -> list[dict[str, Any]]:
        return sorted((e for e in self.steps if e["worker"] == w), key=lambda e: e["step"])

    def split_evals(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """(evaluations during training, the evaluation of the final parameters or None).

        The final one is the ``eval`` event the lead worker writes with the ``end`` event (same
        step and loss): it sees every push applied, while one at the same step during training
        saw the lead worker's last pull.
        """
        evals = [e for e in self.evals if e.get("loss") is not None]
        end = self.end
        if evals and end is not None and evals[-1]["step"] == end["step"] and evals[-1]["loss"] == end.get("loss"):
            return evals[:-1], evals[-1]
        return evals, None

    @property
    def t0(self) -> float:
        """Unix time of the first step event (wall-time axes start here)."""
        return min(e["time"] for e in self.steps)


@dataclass
class Span:
    """One complete event of a trace: times in seconds from the trace's zero."""

    rank: int
    name: str
    start: float
    end: float


def load_metrics(path: str | Path) -> Metrics:
    """Read a ``--metrics`` JSON-lines file; ValueError on a line that is not a JSON object."""
    out = Metrics()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc.msg})") from None
            kind = event.get("event")
            if kind == "step":
                out.steps.append(event)
            elif kind == "eval":
                out.evals.append(event)
            elif kind == "end":
                out.end = event
    if not out.steps:
        raise ValueError(f"{path}: no step events (was it written by mpips.train --metrics?)")
    return out


def load_trace(path: str | Path) -> tuple[dict[int, str], list[Span], dict[str, Any]]:
    """(rank -> label, spans, otherData) of a Chrome trace written by ``--trace``."""
    doc = json.loads(Path(path).read_text())
    labels: dict[int, str] = {}
    spans: list[Span] = []
    for e in doc["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            labels[int(e["pid"])] = e["args"]["name"]
        elif e.get("ph") == "X":
            start = e["ts"] / 1e6
            spans.append(Span(int(e["pid"]), e["name"], start, start + e["dur"] / 1e6))
    return labels, spans, doc.get("otherData", {})


def own_times(spans: list[Span]) -> dict[int, dict[str, float]]:
    """rank -> span name -> seconds spent in spans of that name, minus the spans nested in them.

    Also ``UNTRACED``: the rank's time from its first span's start to its last span's end that no
    span covers. So each rank's values add up to that interval.
    """
    by_rank: dict[int, list[Span]] = defaultdict(list)
    for s in spans:
        by_rank[s.rank].append(s)
    out: dict[int, dict[str, float]] = {}
    for rank, mine in by_rank.items():
        mine.sort(key=lambda s: (s.start, -s.end))
        own: dict[str, float] = defaultdict(float)
        stack: list[Span] = []
        covered, reach = 0.0, mine[0].start
        for s in mine:
            while stack and stack[-1].end <= s.start:
                stack.pop()
            own[s.name] += s.end - s.start
            if stack:  # nested: its time belongs to it, not to the span around it
                own[stack[-1].name] -= min(s.end, stack[-1].end) - s.start
            stack.append(s)
            covered += max(0.0, s.end - max(s.start, reach))
            reach = max(reach, s.end)
        total = max(s.end for s in mine) - mine[0].start
        own[UNTRACED] = max(0.0, total - covered)
        out[rank] = dict(own)
    return out


# -- plots ----------------------------------------------------------------------------------------

def _figure(rows: int, cols: int, width: float = 12.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _plain_numbers(ax, axis: str = "y") -> None:
    """Tick labels as ``10,000``, never ``1e4`` or an offset."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 10 or v == 0 else f"{v:g}")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_loss(m: Metrics, path: Path) -> None:
    fig, axes = _figure(1, 2)
    colors = _colors(len(m.workers))
    window = max(1, len(m.of_worker(m.workers[0])) // 25)
    for ax, x_of, xlabel in ((axes[0, 0], "step", "step"), (axes[0, 1], "time", "wall time (s)")):
        for w, color in zip(m.workers, colors, strict=True):
            ev = m.of_worker(w)
            x = np.array([e["step"] if x_of == "step" else e["time"] - m.t0 for e in ev])
            y = np.array([e["loss"] for e in ev], dtype=float)
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, _moving_mean(y, window), color=color, linewidth=1.8,
                    label=f"worker {w} (training, mean of {window} steps)" if window > 1 else f"worker {w} (training)")
        during, final = m.split_evals()
        if during:
            x = [e["step"] if x_of == "step" else e["time"] - m.t0 for e in during]
            ax.plot(x, [e["loss"] for e in during], "o-", color="black", markersize=5,
                    label="held-out, during training")
        if final is not None:
            x = final["step"] if x_of == "step" else final["time"] - m.t0
            ax.plot([x], [final["loss"]], "*", color="crimson", markersize=14, label="held-out, final parameters")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title("loss against step")
    axes[0, 1].set_title("loss against wall time (from the first step)")
    fig.savefig(path, dpi=100)


def plot_heldout(m: Metrics, path: Path) -> None:
    fig, axes = _figure(1, 2)
    during, final = m.split_evals()
    during = [e for e in during if e.get("accuracy") is not None]
    final = final if final is not None and final.get("accuracy") is not None else None
    for ax, x_of, xlabel in ((axes[0, 0], "step", "step"), (axes[0, 1], "time", "wall time (s)")):
        if not during and final is None:
            _no_data(ax, "no held-out evaluation in this run\n(--eval-every N evaluates every N steps)")
            continue
        if during:
            x = [e["step"] if x_of == "step" else e["time"] - m.t0 for e in during]
            ax.plot(x, [e["accuracy"] for e in during], "o-", color="black", markersize=5, label="during training")
        if final is not None:
            x = final["step"] if x_of == "step" else final["time"] - m.t0
            ax.plot([x], [final["accuracy"]], "*", color="crimson", markersize=14,
                    label=f"final parameters: {final['accuracy']:.4f}")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("held-out accuracy against step")
    axes[0, 1].set_title("held-out accuracy against wall time (from the first step)")
    fig.savefig(path, dpi=100)


def throughput(m: Metrics, bins: int = 40) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(bin centres in s from the first step, worker -> samples/s in each bin)."""
    end = max(e["time"] for e in m.steps) - m.t0
    bins = max(1, min(bins, len(m.steps) // (2 * len(m.workers))))
    edges = np.linspace(0.0, end, bins + 1) if end > 0 else np.array([0.0, 1.0])
    width = edges[1] - edges[0]
    rates = {}
    for w in m.workers:
        ev = m.of_worker(w)
        t = np.array([e["time"] - m.t0 for e in ev])
        n = np.array([e.get("samples", 0) for e in ev], dtype=float)
        counts, _ = np.histogram(t, bins=edges, weights=n)
        rates[w] = counts / width
    return (edges[:-1] + edges[1:]) / 2, rates


def plot_throughput(m: Metrics, path: Path) -> None:
    fig, axes = _figure(1, 1, width=10)
    ax = axes[0, 0]
    if not all("samples" in e for e in m.steps):
        # metrics written before step events had "samples": the running mean of each worker
        for w, color in zip(m.workers, _colors(len(m.workers)), strict=True):
            ev = m.of_worker(w)
            ax.plot([e["time"] - m.t0 for e in ev], [e["samples_per_s"] for e in ev], color=color,
                    label=f"worker {w} (mean since its start)")
    else:
        centres, rates = throughput(m)
        for (w, r), color in zip(rates.items(), _colors(len(rates)), strict=True):
            ax.plot(centres, r, color=color, linewidth=1.2, label=f"worker {w}")
        total = np.sum(list(rates.values()), axis=0)
        ax.plot(centres, total, color="black", linewidth=2.2, label="all workers")
        wall = max(e["time"] for e in m.steps) - m.t0
        if wall > 0:
            mean = sum(e["samples"] for e in m.steps if e["time"] > m.t0) / wall
            ax.axhline(mean, color="black", linestyle=":", linewidth=1,
                       label=f"all workers, first step to last: {mean:,.0f} samples/s")
    ax.set_xlabel("wall time (s, from the first step)")
    ax.set_ylabel("samples/s")
    ax.set_ylim(bottom=0)
    _plain_numbers(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training throughput (samples per second, in bins of wall time)")
    fig.savefig(path, dpi=100)


def _int_hist(ax, values: list[int], color: str) -> None:
    values = np.asarray(values, dtype=int)
    top = int(values.max())
    counts = np.bincount(values, minlength=top + 1)
    ax.bar(np.arange(top + 1), counts, width=0.85, color=color)
    ax.set_xlabel("staleness (steps)")
    ax.set_ylabel("count")
    step = max(1, (top + 1) // 15)
    ax.set_xticks(np.arange(0, top + 1, step))
    _plain_numbers(ax)
    ax.grid(alpha=0.3, axis="y")


def plot_staleness(m: Metrics, path: Path) -> None:
    fig, axes = _figure(1, 2)
    applied = (m.end or {}).get("staleness") or []
    if applied:
        _int_hist(axes[0, 0], applied, "tab:blue")
        axes[0, 0].set_title(f"gradients the servers applied: {len(applied):,}, max {max(applied)},"
                             f" median {np.median(applied):g}")
    else:
        _no_data(axes[0, 0], "no staleness recorded by the servers\n(bsp applies every gradient at staleness 0;"
                 "\nan interrupted run has no end event)")
        axes[0, 0].set_title("gradients the servers applied")
    seen = [int(e["staleness"]) for e in m.steps]
    _int_hist(axes[0, 1], seen, "tab:orange")
    axes[0, 1].set_title(f"steps behind at each worker step (all workers): max {max(seen)}")
    fig.savefig(path, dpi=100)


def plot_bytes(m: Metrics, path: Path) -> None:
    fig, axes = _figure(1, 2)
    colors = _colors(len(m.workers))
    for w, color in zip(m.workers, colors, strict=True):
        ev = m.of_worker(w)
        steps = np.array([e["step"] for e in ev])
        for key, style, what in (("bytes_pushed", "-", "pushed"), ("bytes_pulled", "--", "pulled")):
            total = np.array([e[key] for e in ev], dtype=float) / 1e6
            per_step = np.diff(total, prepend=0.0)
            axes[0, 0].plot(steps, per_step, style, color=color, label=f"worker {w} {what}")
            axes[0, 1].plot(steps, total, style, color=color, label=f"worker {w} {what}")
    for ax, title in ((axes[0, 0], "MB per step"), (axes[0, 1], "MB so far")):
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title("bytes pushed and pulled per step (a pull-again after a checkpoint counts twice)")
    axes[0, 1].set_title("bytes pushed and pulled in total")
    fig.savefig(path, dpi=100)


def _span_colors(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]  # ten hues, each dark then light: the ten largest spans get ten hues
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    out = {UNTRACED: (0.85, 0.85, 0.85, 1.0)}
    for i, name in enumerate(n for n in names if n != UNTRACED):
        out[name] = cmap(order[i % 20])
    return out


def _ordered_names(own: dict[int, dict[str, float]]) -> list[str]:
    """Span names, most time first, ``UNTRACED`` last."""
    total: dict[str, float] = defaultdict(float)
    for times in own.values():
        for k, v in times.items():
            total[k] += v
    return sorted((k for k in total if k != UNTRACED), key=lambda k: -total[k]) + [UNTRACED]


def plot_breakdown(labels: dict[int, str], own: dict[int, dict[str, float]], path: Path) -> None:
    ranks = sorted(own)
    names = _ordered_names(own)
    colors = _span_colors(names)
    fig, axes = _figure(1, 1, width=12, height=max(3.0, 0.55 * len(ranks) + 2.2))
    ax = axes[0, 0]
    y = np.arange(len(ranks))[::-1]
    left = np.zeros(len(ranks))
    for name in names:
        widths = np.array([own[r].get(name, 0.0) for r in ranks])
        if not widths.any():
            continue
        ax.barh(y, widths, left=left, color=colors[name], label=name, edgecolor="white", linewidth=0.5)
        for yi, x0, wdt, r in zip(y, left, widths, ranks, strict=True):
            share = wdt / max(1e-12, sum(own[r].values()))
            if share >= 0.08:
                ax.text(x0 + wdt / 2, yi, f"{share:.0%}", ha="center", va="center", fontsize=8)
        left += widths
    ax.set_yticks(y)
    ax.set_yticklabels([labels.get(r, f"rank {r}") for r in ranks])
    ax.set_xlabel("seconds (each span's own time; nested spans counted once, in the innermost)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="span")
    ax.set_title("where each rank's time went (from its first traced span to its last)")
    fig.savefig(path, dpi=100)


def _window(spans: list[Span], steps: int) -> tuple[float, float]:
    """About ``steps`` steps of the first worker (ranks with "push" spans), from the middle of its run."""
    pushers = sorted({s.rank for s in spans if s.name == "push"})
    pushes = sorted(s.start for s in spans if s.name == "push" and pushers and s.rank == pushers[0])
    if len(pushes) < 3:
        return min(s.start for s in spans), max(s.end for s in spans)
    mid = len(pushes) // 2
    lo, hi = pushes[max(0, mid - steps // 2)], pushes[min(len(pushes) - 1, mid + (steps + 1) // 2)]
    return lo, hi


def plot_timeline(labels: dict[int, str], spans: list[Span], own: dict[int, dict[str, float]], path: Path,
                  steps: int = 6) -> None:
    lo, hi = _window(spans, steps)
    ranks = sorted({s.rank for s in spans})
    names = _ordered_names(own)
    colors = _span_colors(names)
    fig, axes = _figure(1, 1, width=13, height=max(3.0, 0.6 * len(ranks) + 2.2))
    ax = axes[0, 0]
    row = {r: len(ranks) - 1 - i for i, r in enumerate(ranks)}
    depth_of: dict[int, list[Span]] = defaultdict(list)
    shown = set()
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if s.end < lo or s.start > hi:
            continue
        stack = depth_of[s.rank]
        while stack and stack[-1].end <= s.start:
            stack.pop()
        depth = len(stack)  # nested spans drawn thinner, on top of their parent
        stack.append(s)
        height = 0.8 * (0.6 ** depth)
        ax.broken_barh([((s.start - lo) * 1e3, (s.end - s.start) * 1e3)], (row[s.rank] - height / 2, height),
                       facecolors=colors.get(s.name), edgecolor="none",
                       label=s.name if s.name not in shown else None)
        shown.add(s.name)
    ax.set_yticks(list(row.values()))
    ax.set_yticklabels([labels.get(r, f"rank {r}") for r in row])
    ax.set_xlim(0, (hi - lo) * 1e3)
    ax.set_xlabel(f"milliseconds from {lo:.3f} s into the trace")
    ax.grid(alpha=0.3, axis="x")
    handles, texts = ax.get_legend_handles_labels()
    order = sorted(range(len(texts)), key=lambda i: names.index(texts[i]) if texts[i] in names else 99)
    ax.legend([handles[i] for i in order], [texts[i] for i in order], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, title="span")
    ax.set_title(f"timeline: about {steps} steps from the middle of the run (nested spans drawn thinner)")
    fig.savefig(path, dpi=100)


# -- summary --------------------------------------------------------------------------------------

def _shares(times: dict[str, float], top: int = 5) -> str:
    total = sum(times.values())
    parts = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {v / total:.0%}" for name, v in parts if total > 0 and v / total >= 0.005)


def summary(m: Metrics, trace: tuple[dict[int, str], list[Span], dict[str, Any]] | None) -> str:
    """The text of ``summary.txt``."""
    lines = []
    workers = m.workers
    last = max(e["step"] for e in m.steps)
    wall = max(e["time"] for e in m.steps) - m.t0
    lines.append(f"run: {last:,} steps, {len(workers)} worker{'s' if len(workers) > 1 else ''},"
                 f" {wall:.2f} s from the first step to the last")
    if all("samples" in e for e in m.steps) and wall > 0:
        samples = sum(e["samples"] for e in m.steps)
        after = sum(e["samples"] for e in m.steps if e["time"] > m.t0)  # computed between the first and last
        lines.append(f"throughput: {after / wall:,.0f} samples/s over all workers ({samples:,} samples)")
    during, final = m.split_evals()
    if final is not None or during:
        e, what = (final, "final parameters") if final is not None else (during[-1], "last evaluation")
        lines.append(f"held-out ({what}, step {e['step']:,}): loss {readable(e['loss'])},"
                     f" accuracy {readable(e.get('accuracy'))}")
    # the slowest worker: the longest mean time per step (first to last step event)
    step_times = {}
    for w in workers:
        t = [e["time"] for e in m.of_worker(w)]
        if len(t) >= 2:
            step_times[w] = (t[-1] - t[0]) / (len(t) - 1)
    labels, own = ({}, {})
    if trace is not None:
        labels, spans, other = trace
        own = own_times(spans)
        lines.append("where the time went (each rank's own span time, summed over the ranks of a role):")
        by_role: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for rank, times in own.items():
            role = other.get("ranks", {}).get(str(rank), {}).get("role") or labels.get(rank, "?").split(" ")[0]
            for k, v in times.items():
                by_role[role][k] += v
        for role in sorted(by_role):
            lines.append(f"  {role + ':':<13}{_shares(by_role[role])}")
        # who waits for whom: the rank that waits least is the one the others wait for
        waiting = {r: sum(v for k, v in t.items() if "wait" in k) / max(1e-12, sum(t.values()))
                   for r, t in own.items()}
        busy = min(waiting, key=waiting.get)
        lines.append(f"least waiting (what the others likely wait for): {labels.get(busy, f'rank {busy}')},"
                     f" {waiting[busy]:.0%} of its time in wait spans; its own time: {_shares(own[busy], top=3)}")
        uncertain = [v.get("clock_uncertainty_us", 0.0) for v in other.get("ranks", {}).values()]
        if uncertain:
            lines.append(f"clocks aligned to rank 0 within {max(uncertain):,.0f} us (half the best round trip)")
        dropped = sum(v.get("dropped_spans", 0) for v in other.get("ranks", {}).values())
        if dropped:
            lines.append(f"warning: {dropped:,} spans past the per-rank bound were not kept")
    if step_times:
        slow = max(step_times, key=step_times.get)
        fast = min(step_times, key=step_times.get)
        text = f"slowest worker: worker {slow}: {step_times[slow] * 1e3:,.1f} ms per step on average"
        if len(step_times) > 1:
            text += f" (fastest: worker {fast}, {step_times[fast] * 1e3:,.1f} ms)"
        rank = next((int(e["rank"]) for e in m.of_worker(slow) if "rank" in e), None)
        if rank is not None and rank in own:
            text += f"; rank {rank} spent its time on: {_shares(own[rank], top=3)}"
        lines.append(text)
    applied = (m.end or {}).get("staleness") or []
    seen = [int(e["staleness"]) for e in m.steps]
    if applied:
        p95 = np.percentile(applied, 95, method="higher")
        lines.append(f"largest staleness: {max(applied)} steps among {len(applied):,} applied gradients"
                     f" (median {np.median(applied):g}, 95th percentile {p95:g});"
                     f" workers computed at most {max(seen)} steps behind")
    else:
        lines.append(f"largest staleness: workers computed at most {max(seen)} steps behind"
                     + (" (bsp: the servers apply every gradient at staleness 0)" if max(seen) == 0 else ""))
    waits = [e.get("data_wait_s", 0.0) for e in m.steps]
    lines.append(f"data wait: median {np.median(waits) * 1e3:,.2f} ms per step, at most {max(waits) * 1e3:,.1f} ms")
    return "\n".join(lines) + "\n"


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


if __name__ == "__main__":
    sys.exit(main())
