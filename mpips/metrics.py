"""Progress display and JSON-lines metrics.

``--metrics FILE.jsonl`` gets one JSON object per line, each with ``event`` and ``step``:
``step`` (per worker: loss, samples/s, bytes pushed/pulled, staleness, server queue depth),
``eval`` (loss, accuracy on the held-out split), ``end`` (final metrics). Every worker appends
its own ``step`` events with one ``write`` per line on a file opened with O_APPEND.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

__all__ = ["MetricsLog", "Progress", "format_table"]


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


class Progress:
    """tqdm bar on a terminal, a plain line every ``every`` steps otherwise."""

    def __init__(self, total: int, every: int, enabled: bool = True):
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, step: int, **shown: Any) -> None:
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(step + 1 - self.bar.n)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            fields = " ".join(f"{k} {v}" for k, v in text.items())
            print(f"step {step + 1}/{self.total} {fields}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_table(rows: dict[str, Any], title: str) -> str:
    """A two-column table of final metrics."""
    width = max(len(k) for k in rows)
    lines = [title, "-" * (width + 16)]
    for k, v in rows.items():
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
