"""``python -m mpips.bench {rma,apply,train,memory,data,compress,sparse,straggler,all}``: run under
mpirun; rank 0 prints a table in which every figure stands next to its same-job baseline as a ratio, and
writes ``--json FILE``.

The JSON holds ``machine`` (cores, memory, MPI library, mpi4py/torch/numpy versions, torch
threads per rank, ranks), ``settings`` (the parsed flags) and one key per benchmark run:
``rma``, ``apply``, ``train``, ``memory``, ``compress``, ``sparse`` and ``straggler`` are lists of rows (see each
module's docstring), ``data`` is what ``mpips.bench.data.main`` returns.

    mpirun -n 4 python -m mpips.bench all --json bench.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from typing import Any

import torch
from mpi4py import MPI

from mpips.bench import apply as apply_bench
from mpips.bench import compress as compress_bench
from mpips.bench import memory as memory_bench
from mpips.bench import rma as rma_bench
from mpips.bench import sparse as sparse_bench
from mpips.bench import straggler as straggler_bench
from mpips.bench import train as train_bench
from mpips.bench.common import BenchError, default_threads, load_average, machine_facts
from mpips.watchdog import abort_job

__all__ = ["main"]

BENCHMARKS = {"rma": rma_bench, "apply": apply_bench, "train": train_bench, "memory": memory_bench}
# not in ``all``: compress trains the default job to the end once per codec (minutes); sparse
# needs its own rank count (servers and 2 workers); straggler trains every mode to a target (minutes)
SEPARATE = {"compress": compress_bench, "sparse": sparse_bench, "straggler": straggler_bench}


def _data_module():
    """``mpips.bench.data`` (the data-server benchmark), or None with the reason."""
    try:
        return importlib.import_module("mpips.bench.data"), None
    except ModuleNotFoundError as exc:
        if exc.name != "mpips.bench.data":
            raise
        return None, "mpips.bench.data is not installed in this checkout"


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common")
    g.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE (rank 0)")
    g.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    g.add_argument("--warmup", type=int, default=1, help="untimed repetitions before them")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank, the same for mpips and baselines"
                        " (default: cores on the host / ranks on the host, at least 1)")
    parser = argparse.ArgumentParser(
        prog="python -m mpips.bench", description=__doc__.split("\n\n")[0],
        formatter_class=_DefaultsHelp,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = _DefaultsHelp
    rma_bench.add_arguments(sub.add_parser("rma", parents=[common], formatter_class=fmt,
                                           help="pull bandwidth vs raw Get, Isend, memcpy"))
    apply_bench.add_arguments(sub.add_parser("apply", parents=[common], formatter_class=fmt,
                                             help="server optimizer step vs memory copy"))
    train_bench.add_arguments(sub.add_parser("train", parents=[common], formatter_class=fmt,
                                             help="end-to-end training vs DDP and Allreduce"))
    memory_bench.add_arguments(sub.add_parser("memory", parents=[common], formatter_class=fmt,
                                              help="peak memory per role and parameter vs a bare process"))
    compress_bench.add_arguments(sub.add_parser("compress", parents=[common], formatter_class=fmt,
                                                help="gradient codecs and low-precision pulls vs float32"))
    sparse_bench.add_arguments(sub.add_parser("sparse", parents=[common], formatter_class=fmt,
                                              help="a sparse table on the servers vs one torch process and the"
                                                   " dense path"))
    straggler_bench.add_arguments(sub.add_parser("straggler", parents=[common], formatter_class=fmt,
                                                 help="time to a held-out target with one worker slowed"))
    sub.add_parser("data", add_help=False,
                   help="data-server throughput vs raw h5py (flags: python -m mpips.bench data -h)")
    every = sub.add_parser("all", parents=[common], formatter_class=fmt,
                           help="every benchmark at small sizes")
    rma_bench.add_arguments(every, sizes="1M,10M,100M")
    apply_bench.add_arguments(every, params="4M")
    train_bench.add_arguments(every, steps=30, train_reps=1)
    memory_bench.add_arguments(every, params="4M")
    every.add_argument("--data-args", default="--size-mb 32",
                       help="arguments for the data benchmark, as one string")
    return parser


def _run_data(argv: list[str], results: dict[str, Any], comm: MPI.Comm) -> int:
    module, why = _data_module()
    if module is None:
        if comm.Get_rank() == 0:
            print(f"data: skipped: {why}", flush=True)
        results["data"] = {"skipped": why}
        return 0
    out = module.main(argv)
    if isinstance(out, dict):
        results["data"] = out
        return 0
    return int(out or 0)


def run(argv: list[str], comm: MPI.Comm) -> int:
    parser = build_parser()
    if argv[:1] == ["data"]:  # the data benchmark parses its own flags
        results: dict[str, Any] = {}
        return _run_data(argv[1:], results, comm)
    args = parser.parse_args(argv)
    args.threads = args.threads or default_threads(comm)
    torch.set_num_threads(args.threads)
    rank = comm.Get_rank()
    results = {"machine": machine_facts(comm), "settings": vars(args), "argv": argv}
    names = list(BENCHMARKS) if args.command == "all" else [args.command]
    if rank == 0:
        m = results["machine"]
        print(f"mpips.bench {args.command}: {m['ranks']} ranks on {', '.join(m['hosts'])}"
              f" ({m['cores']} cores, {m['cpu']}); {m['mpi_library']}; torch {m['torch']}"
              f" with {args.threads} thread(s) per rank; mpi4py {m['mpi4py']}", flush=True)
        load = m["load_average_start"]
        if load and load[0] > (m["cores_usable"] or m["cores"] or 1):
            print(f"warning: load average {load[0]} exceeds the {m['cores']} cores: other work"
                  " is sharing them and the timings below will be low and noisy", flush=True)
    status = 0
    for name in names:
        t0 = time.perf_counter()
        bench = {**BENCHMARKS, **SEPARATE}[name]
        rows = bench.run(args, comm)
        if rank == 0:
            results[name] = rows
            print("\n" + bench.format_rows(rows), flush=True)
            print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    if args.command == "all":
        status = _run_data(args.data_args.split(), results, comm)
    if rank == 0:
        results["machine"]["load_average_end"] = load_average()
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.json}", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    comm = MPI.COMM_WORLD
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv, comm)
    except BenchError as exc:  # raised alike on every rank: say it once
        if comm.Get_rank() == 0:
            print(f"mpips.bench: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException as exc:  # noqa: BLE001 - one failed rank must end the whole job
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            return 0
        if isinstance(exc, SystemExit):
            return int(exc.code) if isinstance(exc.code, int) else 2
        traceback.print_exc(file=sys.stderr)
        print(f"mpips.bench: FATAL on rank {comm.Get_rank()}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        abort_job(comm)
        return 1


if __name__ == "__main__":
    sys.exit(main())
