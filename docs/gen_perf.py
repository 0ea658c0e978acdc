"""Write the performance tables from the committed benchmark results, ``bench/results/<machine>/*.json``.

Run by ``docs/conf.py`` at every build, or by hand::

    python docs/gen_perf.py docs/_generated/perf.md

Each JSON file is what ``python -m mpips.bench ... --json FILE`` writes (``machine``, ``settings``
and one list of rows per benchmark: ``rma``, ``apply``, ``train``, ``memory``, ``compress``, ``straggler``, and
the ``data`` dict), plus a ``source`` block: the command, the commit, the date, and how the file
was written (the tool's own output, or transcribed from an older README's table, which says so).
Every figure on the generated page comes from these files; nothing is typed by hand. Tables are
grouped by machine (the folder name), newest file first; each table's caption names its file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "fmt", "load_results", "render", "write"]

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def fmt(value: Any, scale: float = 1.0) -> str:
    """A figure as the page prints it: None as '-', thousands separated from 100 up, else 1 to 3
    decimals (the test reads these back against the JSON)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return value
    v = value * scale
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1 or v == 0:
        return f"{v:.2f}"
    return f"{v:.3f}"


Column = tuple[str, Callable[[dict[str, Any]], str]]


def _num(key: str, scale: float = 1.0) -> Callable[[dict[str, Any]], str]:
    return lambda r: fmt(r.get(key), scale)


def _text(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: "-" if r.get(key) is None else str(r.get(key))


COLUMNS: dict[str, list[Column]] = {
    "rma": [("MB pulled", _num("bytes", 1e-6)), ("servers", _text("servers")),
            ("mpips GB/s", _num("mpips_gbps")), ("raw Get GB/s", _num("raw_get_gbps")),
            ("x raw Get", _num("ratio_vs_raw_get")), ("Isend/Irecv GB/s", _num("isend_gbps")),
            ("x Isend", _num("ratio_vs_isend")), ("memcpy GB/s", _num("memcpy_gbps")),
            ("x memcpy", _num("ratio_vs_memcpy"))],
    "apply": [("optimizer", _text("optimizer")), ("M params", _num("params", 1e-6)),
              ("M params/s", _num("params_per_s", 1e-6)), ("GB/s touched", _num("gbps_touched")),
              ("copy GB/s", _num("copy_gbps")), ("x copy", _num("ratio_vs_copy")),
              ("server path M params/s", _num("server_params_per_s", 1e-6)),
              ("server path x copy", _num("server_ratio_vs_copy"))],
    "train": [("model", _text("model")), ("M params", _num("params", 1e-6)), ("W", _text("workers")),
              ("ranks", _text("ranks")), ("system", _text("system")), ("samples/s", _num("samples_per_s")),
              ("x DDP", _num("ratio_vs_ddp")), ("x allreduce", _num("ratio_vs_allreduce")),
              ("x fit", _num("ratio_vs_fit")),
              ("efficiency", _num("efficiency")), ("to target (s)", _num("time_to_target_s")),
              ("final loss", _num("final_loss"))],
    "memory": [("role", _text("role")), ("rank", _text("rank")), ("optimizer", _text("optimizer")),
               ("M params", _num("params", 1e-6)), ("workers", _text("workers")),
               ("bytes/param", _num("bytes_per_param")), ("expected", _num("expected_bytes_per_param"))],
    "compress": [("model", _text("model")), ("push", _text("push")), ("pull", _text("pull")),
                 ("variant", lambda r: r.get("variant") or "-"), ("EF", _num("error_feedback")),
                 ("push B/step", _num("push_bytes_per_step")), ("x fewer", _num("push_ratio")),
                 ("pull B/step", _num("pull_bytes_per_step")), ("x fewer ", _num("pull_ratio")),
                 ("encode MB/s", _num("encode_mb_s")), ("decode MB/s", _num("decode_mb_s")),
                 ("samples/s", _num("samples_per_s")), ("x fp32", _num("speed_ratio")),
                 ("held-out accuracy", _num("accuracy")), ("Δ points", _num("accuracy_delta", 100)),
                 ("held-out loss", _num("loss")), ("Δ loss", _num("loss_delta"))],
    "straggler": [("W", _text("workers")), ("slow", _num("slow")), ("system", _text("system")),
                  ("to target (s)", _num("time_to_target_s")), ("reached", _text("reached_target")),
                  ("x bsp", _num("ratio_vs_bsp")), ("to loss target (s)", _num("time_to_loss_target_s")),
                  ("x bsp (loss)", _num("loss_ratio_vs_bsp")), ("final accuracy", _num("final_metric")),
                  ("late", _num("late")), ("max staleness", _text("max_staleness"))],
    "sparse": [("system", _text("system")), ("W", _text("workers")), ("rows", _num("keys")), ("dim", _text("dim")),
               ("samples/s", _num("samples_per_s")), ("min", _num("min_samples_per_s")),
               ("max", _num("max_samples_per_s")), ("x torch", _num("ratio_vs_torch")),
               ("x dense path", _num("ratio_vs_dense")), ("unique rows/step", _num("unique_rows")),
               ("table B/step", _num("sparse_bytes")), ("dense B/step", _num("dense_bytes")),
               ("x bound", _num("ratio_to_bound")), ("table B/row", _num("bytes_per_row"))],
    "data": [("raw h5py MB/s", _num("raw_mb_per_s")), ("data servers MB/s", _num("server_mb_per_s")),
             ("data servers x raw", _num("server_over_raw")), ("workers MB/s", _num("worker_mb_per_s")),
             ("workers x data servers", _num("workers_over_server")),
             ("wait per step (ms)", _num("data_wait_per_step_s", 1e3))],
}

TITLES = {
    "rma": "Pull bandwidth: `ParameterWindow.pull` against a raw `Get`, `Isend/Irecv` and a memory copy",
    "apply": "Server optimizer step and the whole per-push server path against a memory copy",
    "train": "End-to-end training against PyTorch DDP (gloo) and an mpi4py `Allreduce` loop",
    "memory": "Peak memory per parameter of each role, against what the engine's buffers add up to",
    "compress": "Gradient codecs and low-precision pulls against float32 in the same job",
    "sparse": "A sparse table on the servers against one torch process (`nn.Embedding(sparse=True)`) and the"
              " dense path (bytes per worker and step; bound: 2 x unique rows x (row + key bytes) + dense bytes)",
    "data": "Data servers against a raw h5py read",
    "straggler": "Seconds to a held-out accuracy target with the last worker slowed, against bsp in the same job",
}


def load_results(root: Path = RESULTS) -> list[tuple[str, Path, dict[str, Any]]]:
    """[(machine, file, parsed JSON)], machines by name, each machine's files newest first (by
    ``source.date``, then name)."""
    out = []
    for machine in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [(f, json.loads(f.read_text())) for f in machine.glob("*.json")]
        files.sort(key=lambda fj: (str(fj[1].get("source", {}).get("date", "")), fj[0].name), reverse=True)
        out += [(machine.name, f, j) for f, j in files]
    return out


def table_rows(kind: str, result: dict[str, Any]) -> list[list[str]]:
    """The cells of one table: one list per JSON row (``data`` is one dict, so one row)."""
    rows = result[kind] if isinstance(result[kind], list) else [result[kind]]
    return [[cell(r) for _, cell in COLUMNS[kind]] for r in rows]


def _machine_line(m: dict[str, Any]) -> str:
    load = m.get("load_average_start")
    memory = f"{fmt(m['memory_gb'])} GB memory" if m.get("memory_gb") else None
    facts = [f"{m.get('cores')} cores ({m.get('cpu')})", memory,
             m.get("mpi_library"), f"MPI {m.get('mpi_standard')}", f"mpi4py {m.get('mpi4py')}",
             f"torch {m.get('torch')} with {m.get('torch_threads')} thread(s) per rank",
             f"{m.get('ranks')} ranks",
             f"load average {load[0]} at the start" if load and load[0] is not None else None]
    end = m.get("load_average_end")
    if end and end[0] is not None:
        facts.append(f"{end[0]} at the end")
    return "; ".join(str(f) for f in facts if f)


def render(root: Path = RESULTS) -> str:
    """The Markdown (MyST) of every table of every result file under ``root``."""
    out = ["<!-- Generated by docs/gen_perf.py from bench/results/ at build time: do not edit. -->", ""]
    machine_seen = None
    for machine, path, result in load_results(root):
        if machine != machine_seen:
            out += [f"## Machine `{machine}`", ""]
            machine_seen = machine
        src = result.get("source", {})
        rel = path.relative_to(root.parent.parent)
        out += [f"### `{rel}`", ""]
        out += [f"- **command**: `{src.get('command', '?')}`",
                f"- **commit, date**: {src.get('commit', '?')}, {src.get('date', '?')}",
                f"- **machine**: {_machine_line(result.get('machine', {}))}",
                f"- **how this file was written**: {src.get('written_by', '?')}"]
        if src.get("transcribed_from"):
            out.append(f"- **from**: {src['transcribed_from']}")
        if src.get("note"):
            out.append(f"- **note**: {src['note']}")
        out.append("")
        for kind, columns in COLUMNS.items():
            if kind not in result or (isinstance(result[kind], dict) and "skipped" in result[kind]):
                continue
            out += [f"**{TITLES[kind]}** (`{path.name}`: `{kind}`)", ""]
            out.append("| " + " | ".join(h.strip() for h, _ in columns) + " |")
            out.append("|" + "---|" * len(columns))
            out += ["| " + " | ".join(c.replace("|", "&#124;") for c in row) + " |"
                    for row in table_rows(kind, result)]
            out.append("")
    return "\n".join(out)


def write(path: str | Path, root: Path = RESULTS) -> Path:
    """Write ``render()`` to ``path`` (only when it changed)."""
    path = Path(path)
    text = render(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "_generated" / "perf.md"))
