"""Regression on tabular data with a loss of your own, read in place from your HDF5 files.

    mpirun -n 4 python examples/regression.py                       # 1 server, 1 data server, 2 workers
    mpirun -n 4 python examples/regression.py --steps 300 --dir /tmp/reg

Rank 0 writes the data first, as a user's pipeline would: y = X w + b + noise (noise std 0.1,
so no model can beat a held-out MSE of 0.01), 16 features, in four training files of 2,500
rows (datasets ``features`` and ``target``) and one held-out file. ``mpips.fit`` reads them where
they are (no ``prepare``), trains a linear model with the loss below and returns, on the lead
worker, the model and the held-out ``mse``, ``mae`` and ``r2``.
"""

from __future__ import annotations

import argparse
import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import mpips

FEATURES, NOISE = 16, 0.1


def write_data(folder: str, files: int = 4, rows: int = 2500, val_rows: int = 2000) -> None:
    """Four training files and one held-out file of (features float32 (N, 16), target float32 (N,))."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal(FEATURES).astype(np.float32), np.float32(0.5)
    os.makedirs(folder, exist_ok=True)
    for name, n in [*((f"train_{i}.h5", rows) for i in range(files)), ("val.h5", val_rows)]:
        x = rng.standard_normal((n, FEATURES)).astype(np.float32)
        y = (x @ w + b + NOISE * rng.standard_normal(n)).astype(np.float32)
        with h5py.File(os.path.join(folder, name), "w") as f:
            f.create_dataset("features", data=x, chunks=(500, FEATURES))
            f.create_dataset("target", data=y, chunks=(500,))


def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The factory contract: one sample's shape (16,), and 1 output for a scalar target."""
    return nn.Linear(input_shape[0], num_classes)


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss: (B, 1) predictions against (B,) targets, the batch mean of the squared error."""
    return F.mse_loss(output.squeeze(-1), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dir", default="regression-data")
    parser.add_argument("--metrics", help="JSON-lines events (step, eval, end) to this file")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0 and not os.path.exists(os.path.join(args.dir, "val.h5")):
        write_data(args.dir)
    comm.Barrier()
    result = mpips.fit(
        linear, loss=squared_error, data=os.path.join(args.dir, "train_*.h5"),
        val_data=os.path.join(args.dir, "val.h5"),
        config={"x_key": "features", "y_key": "target", "steps": args.steps, "optimizer": "sgd", "lr": 0.1,
                "lr_schedule": "cosine", "log_every": max(1, args.steps // 5), "metrics": args.metrics},
    )
    if result.lead:
        m = result.metrics
        print(f"regression: held-out mse {m['mse']:.5f} mae {m['mae']:.5f} r2 {m['r2']:.5f}"
              f" (noise floor {NOISE**2:.4f})", flush=True)


if __name__ == "__main__":
    main()
