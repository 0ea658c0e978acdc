"""``summary.txt``: where the time went per role, the slowest worker, the largest staleness,
throughput and the final held-out metrics."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from mpips.metrics import readable
from mpips.report.runs import Metrics, Span, own_times

__all__ = [
    "summary",
]


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
    late = int((m.end or {}).get("late") or 0)
    if late:
        lines.append(f"late gradients dropped (bsp --backup-workers): {late:,}, their workers skipped to the newest"
                     " version")
    waits = [e.get("data_wait_s", 0.0) for e in m.steps]
    lines.append(f"data wait: median {np.median(waits) * 1e3:,.2f} ms per step, at most {max(waits) * 1e3:,.1f} ms")
    return "\n".join(lines) + "\n"
