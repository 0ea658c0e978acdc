"""``python -m mpips.data prepare | synth | clicks | inspect``: make and check mpips dataset files.

    python -m mpips.data prepare arrays.npz -o data.h5 --partitions 16      # arrays x, y
    python -m mpips.data prepare x.npy --labels y.npy -o data.h5 --compression gzip
    python -m mpips.data prepare corpus/ -o text.h5 --context 128           # folder of text files
    python -m mpips.data prepare builtin:digits -o digits.h5
    mpirun -n 4 python -m mpips.data prepare x.npy --labels y.npy -o data.h5  # MPI-IO, collective
    python -m mpips.data synth -o big.h5 --size-gb 5 --shape 3,32,32        # streamed in slabs
    python -m mpips.data clicks -o clicks.h5 --samples 2000000 --keys 20000000   # sparse ids, Zipf
    python -m mpips.data inspect data.h5 --verify

Under mpirun (more than one rank) with MPI-enabled h5py, ``prepare`` and ``synth`` write
collectively through MPI-IO, each rank its own partitions; otherwise rank 0 writes serially.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from mpips.data.hdf5 import DatasetError, DatasetFile, SampleFormat
from mpips.data.prepare import (
    SynthSource,
    array_source,
    builtin_source,
    default_partitions,
    has_mpio,
    split_ids,
    text_source,
    write_dataset,
)

__all__ = ["main"]


def _world():
    """COMM_WORLD when launched by mpirun with more than one rank, else None (MPI untouched)."""
    import os

    if not any(
        k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID")
    ):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="the .h5 file to write")
    p.add_argument(
        "--partitions", type=int, help="training partitions (default: ~64 MB each, at least 8)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held-out fraction (built-ins keep their own)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out split (and --shuffle)")
    p.add_argument(
        "--shuffle", action="store_true", help="shuffle training rows before partitioning"
    )
    p.add_argument(
        "--compression", choices=["gzip", "lzf"], help="compress chunks (serial writes only)"
    )
    p.add_argument("--chunk-mb", type=float, default=1.0, help="target chunk size, MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpips.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare", help="write a dataset file from arrays, a text folder or a built-in"
    )
    p.add_argument(
        "source", help="FILE.npz | FILE.npy (with --labels) | FOLDER of text | builtin:NAME"
    )
    p.add_argument("--labels", help=".npy of labels or targets, for an .npy source")
    p.add_argument("--task", choices=["classification", "regression", "multilabel", "tokens"],
                   default="classification", help="what y is: class indices; float targets; 0/1 per label"
                   " (N, C); next-token ids with x of the same shape (N, T)")
    p.add_argument("--x-key", default="x", help=".npz array of inputs")
    p.add_argument("--y-key", default="y", help=".npz array of labels")
    p.add_argument("--num-classes", type=int, help="default: largest label + 1 (tokens: largest id + 1)")
    p.add_argument("--context", type=int, default=64, help="text: window of context + 1 bytes")
    p.add_argument(
        "--suffix",
        action="append",
        default=[],
        help="text: only files with this suffix (repeatable)",
    )
    _common(p)
    s = sub.add_parser("synth", help="write a synthetic dataset of any size, streamed")
    s.add_argument("--samples", type=int, help="training + held-out samples")
    s.add_argument("--size-gb", type=float, help="size instead of --samples")
    s.add_argument("--kind", choices=["classification", "text"], default="classification")
    s.add_argument("--shape", default="1,28,28", help="classification: sample shape")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--context", type=int, default=64, help="text: window of context + 1 bytes")
    _common(s)
    c = sub.add_parser("clicks", help="write a synthetic click log (Zipf ids, dense features, 0/1 label)"
                       " for sparse tables (mpips.data.clicks)")
    c.add_argument("-o", "--output", required=True, help="the .h5 file to write")
    c.add_argument("--samples", type=int, default=2_000_000, help="training + held-out impressions")
    c.add_argument("--keys", type=int, default=20_000_000, help="rows of the one table the fields share")
    c.add_argument("--fields", type=int, default=4, help="categorical ids per impression")
    c.add_argument("--dense", type=int, default=4, help="dense features per impression")
    c.add_argument("--zipf", type=float, default=1.1, help="exponent of the ids' power law")
    c.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction")
    c.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("inspect", help="print partitions, sizes, dtypes and checksums")
    i.add_argument("file")
    i.add_argument("--verify", action="store_true", help="re-read every partition and check it")
    return parser


def _source(args: argparse.Namespace):
    src = args.source
    if src.startswith("builtin:"):
        return builtin_source(src.split(":", 1)[1], args.context)
    if src.endswith((".npz", ".npy")):
        return array_source(
            src,
            args.labels,
            x_key=args.x_key,
            y_key=args.y_key,
            num_classes=args.num_classes,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shuffle=args.shuffle,
            task=args.task,
        )
    return text_source(
        src,
        context=args.context,
        suffixes=tuple(args.suffix),
        val_fraction=args.val_fraction,
        seed=args.seed,
        shuffle=args.shuffle,
    )


def _synth(args: argparse.Namespace) -> SynthSource:
    if args.kind == "text":
        fmt = SampleFormat.text(args.context + 1)
    else:
        fmt = SampleFormat.classification(
            tuple(int(v) for v in args.shape.split(",")), np.float32, args.classes
        )
    n = args.samples or (math.ceil(args.size_gb * 1e9 / fmt.record_bytes) if args.size_gb else None)
    if not n:
        raise DatasetError("synth needs --samples N or --size-gb G")
    train, val = split_ids(n, args.val_fraction, args.seed, False)
    return SynthSource(f"synth-{args.kind}", fmt, train, val, args.seed)


def _write(args: argparse.Namespace, source) -> None:
    comm = _world()
    if comm is not None and not has_mpio():
        print("h5py has no MPI-IO: rank 0 writes serially", file=sys.stderr)
    rank = comm.Get_rank() if comm is not None else 0
    parallel = comm if comm is not None and has_mpio() else None
    parts = args.partitions or default_partitions(source.fmt.record_bytes, len(source.train_ids))
    t0 = time.perf_counter()
    error = None
    if parallel is not None or rank == 0:
        try:
            write_dataset(
                source,
                args.output,
                partitions=parts,
                comm=parallel,
                compression=args.compression,
                chunk_mb=args.chunk_mb,
            )
        except DatasetError as exc:
            error = str(exc)
    if comm is not None:  # rank 0 alone may have written: every rank learns how it went
        error = next((e for e in comm.allgather(error) if e), None)
    if error:
        raise DatasetError(error)
    if rank == 0:
        n = len(source.train_ids) + len(source.val_ids)
        mb = n * source.fmt.record_bytes / 1e6
        how = f"MPI-IO on {comm.Get_size()} ranks" if parallel is not None else "serially"
        print(
            f"wrote {args.output}: {len(source.train_ids)} training"
            f" + {len(source.val_ids)} held-out samples,"
            f" {parts} partitions, {mb:.1f} MB in {time.perf_counter() - t0:.1f} s ({how})"
        )


def inspect(path: str, verify: bool) -> int:
    with DatasetFile(path) as f:
        fmt = f.format
        print(
            f"{path}: {f.name}, kind {fmt.kind}, {fmt.num_classes} classes,"
            f" format version {f.h5.attrs['version']}"
        )
        print(
            f"training {f.samples} samples, held-out {f.val_samples};"
            f" {fmt.record_bytes} bytes per sample"
        )
        for fld in fmt.fields:
            d = f.train[fld.name]
            print(
                f"  /train/{fld.name}: shape {d.shape} {d.dtype} chunks {d.chunks}"
                f" compression {d.compression}"
            )
        print(
            f"{'partition':>9} {'offset':>10} {'samples':>9}  checksums (crc32 per field)"
            + ("  verified" if verify else "")
        )
        bad = 0
        for p in range(len(f.partitions)):
            lo, _ = f.partitions.range(p)
            crcs = " ".join(f"{int(c):#010x}" for c in f.crc[p])
            line = f"{p:>9} {lo:>10} {f.partitions.sizes[p]:>9}  {crcs}"
            if verify:
                problems = f.check_partition(p)
                bad += bool(problems)
                line += "  ok" if not problems else "  BAD"
                for msg in problems:
                    print(msg, file=sys.stderr)
            print(line)
        if verify:
            others = f.check_val() + f.check_classes()
            for msg in others:
                print(msg, file=sys.stderr)
            parts = f"{bad} bad partition(s)" if bad else "all partitions match"
            elsewhere = f"; {len(others)} problem(s) elsewhere in the file (above)" if others else ""
            print(f"verified: {parts}{elsewhere}")
            bad += len(others)
    return 1 if bad else 0


def _clicks(args: argparse.Namespace) -> int:
    from mpips.data.clicks import write_clicks

    t0 = time.perf_counter()
    try:
        attrs = write_clicks(args.output, args.samples, keys=args.keys, fields=args.fields, dense=args.dense,
                             zipf=args.zipf, val_fraction=args.val_fraction, seed=args.seed)
    except (ValueError, OSError) as exc:
        raise DatasetError(str(exc)) from None
    print(f"wrote {args.output}: {args.samples:,} impressions, {attrs['keys']:,} keys over {args.fields} fields,"
          f" click rate {attrs['click_rate']:.3f}, Bayes held-out AUC {attrs['bayes_auc']:.3f},"
          f" in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect(args.file, args.verify)
        if args.command == "clicks":
            return _clicks(args)
        _write(args, _source(args) if args.command == "prepare" else _synth(args))
    except DatasetError as exc:
        comm = _world()
        if comm is None or comm.Get_rank() == 0:  # the same on every rank: said once
            print(f"mpips.data: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
