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

Modules: ``runs`` (reading a run's metrics and trace), ``plots``, ``text`` (the summary), ``cli`` (``main``,
``write_report``).
"""

from mpips.report.cli import main, write_report, write_tensorboard
from mpips.report.runs import UNTRACED, Metrics, Span, load_metrics, load_trace, own_times, throughput
from mpips.report.text import summary

__all__ = [
    "UNTRACED",
    "Metrics",
    "Span",
    "load_metrics",
    "load_trace",
    "main",
    "own_times",
    "summary",
    "throughput",
    "write_report",
    "write_tensorboard",
]
