"""A run's records: its ``--metrics`` events (``Metrics``), its ``--trace`` spans (``Span``), each
rank's own time per span, and throughput."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Metrics",
    "Span",
    "load_metrics",
    "load_trace",
    "own_times",
    "UNTRACED",
    "throughput",
]


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
