"""Progress display and JSON-lines metrics.

``--metrics FILE.jsonl`` gets one JSON object per line, each with ``event`` and ``step``:
``step`` (per worker: loss, samples this step, samples/s since the start, bytes pushed/pulled so
far, staleness, server queue depth, seconds waited for data),
``eval`` (loss, accuracy on the held-out split), ``end`` (final metrics). Every worker appends
its own ``step`` events with one ``write`` per line on a file opened with O_APPEND.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

__all__ = ["MetricsLog", "Progress", "format_table", "on_terminal", "readable"]


class MetricsLog:
    """Append JSON events to a file; a no-op when ``path`` is None."""

    def __init__(self, path: str | None, **common: Any):
        self.common = common
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None

    def event(self, event: str, step: int, **fields: Any) -> None:
        if self.fd is None:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **self.common, **fields}
        os.write(self.fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def readable(value: Any) -> str:
    """A number as a person reads it: ``10,010``, ``123.5``, ``0.4312``; never ``1.001e+04``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 1 or size == 0:
        return f"{value:.4g}" if size < 100 else f"{value:.1f}"
    if size >= 1e-3:
        return f"{value:.4f}"
    return f"{value:.2e}"


def _seconds(value: float) -> str:
    """A short duration: ``0.41 ms``, ``12.3 ms``, ``1.25 s``."""
    return f"{value * 1e3:.2f} ms" if value < 0.1 else f"{value:.2f} s"


# what ``Progress.update`` shows of each keyword it knows: (label, formatter)
_SHOWN = {
    "loss": ("loss", lambda v: readable(float(v))),
    "samples_per_s": ("samples/s", lambda v: f"{v:,.0f}"),
    "staleness": ("staleness", lambda v: f"{int(v):,}"),
    "data_wait_s": ("data wait", _seconds),
}


def on_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal someone looks at: a tty with a known width.

    Under Open MPI's mpirun a rank's stdout is always a pseudo-terminal (its stderr a pipe), even
    when mpirun's output goes to a file; its width is then 0, and mpirun's own when mpirun runs
    on a terminal. So stdout with a width, not ``isatty()`` alone, and not stderr.
    """
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO), or closed
        return False


class Progress:
    """tqdm bar on stdout when it is a terminal (``on_terminal``), a plain line every ``every`` steps otherwise.

    ``update(step, loss=..., samples_per_s=..., staleness=..., data_wait_s=...)`` shows those
    values in readable units (``samples/s 10,010``, ``data wait 0.41 ms``); other keywords are
    shown as ``readable`` makes them. ``unit`` names what is counted (the plain line starts with
    it: ``step 20/690 ...``).
    """

    def __init__(self, total: int, every: int, enabled: bool = True, unit: str = "step"):
        self.total, self.every, self.enabled, self.unit = total, max(1, every), enabled, unit
        self.bar = None
        if enabled and on_terminal(sys.stdout):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stdout)

    @staticmethod
    def fields(**shown: Any) -> dict[str, str]:
        """label -> text of each value, as the bar and the line show them."""
        out = {}
        for key, value in shown.items():
            label, fmt = _SHOWN.get(key, (key, readable))
            out[label] = fmt(value)
        return out

    def update(self, step: int, **shown: Any) -> None:
        if not self.enabled:
            return
        text = self.fields(**shown)
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(step + 1 - self.bar.n)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            fields = ", ".join(f"{k} {v}" for k, v in text.items())
            print(f"{self.unit} {step + 1}/{self.total} {fields}".rstrip(), flush=True)

    def write(self, line: str) -> None:
        """Print ``line`` (when enabled) above the bar, which stays whole and at the bottom."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_table(rows: dict[str, Any], title: str) -> str:
    """A two-column table of final metrics."""
    width = max(len(k) for k in rows)
    lines = [title, "-" * (width + 16)]
    for k, v in rows.items():
        if isinstance(v, float):  # 0.9830, 10,010: never 1.001e+04
            v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
