"""The report's figures (PNG, matplotlib's Agg backend): loss, held-out metrics, throughput,
staleness, bytes, and with a trace the time breakdown and timeline."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mpips.report.runs import UNTRACED, Metrics, Span, throughput

__all__ = [
    "plot_breakdown",
    "plot_bytes",
    "plot_heldout",
    "plot_loss",
    "plot_staleness",
    "plot_throughput",
    "plot_timeline",
]


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
