"""A CNN on images in an HDF5 file of your own: ``images`` (N, 1, 8, 8) uint8, ``labels`` (N,) int.

    mpirun -n 4 python examples/cnn_images.py                       # 1 server, 1 data server, 2 workers
    mpirun -n 5 python examples/cnn_images.py --steps 600 --dir /tmp/img

Rank 0 first writes the images as a user's own code would (here: the 1,797 UCI handwritten digits
that ship with mpips, scaled to 0-255, 1,437 for training in two files and 360 held out), with
h5py and dataset names of its choosing. ``mpips.fit`` reads the files in place (``x_key="images"``,
``y_key="labels"``), the CNN below comes from a factory, the loss is cross-entropy (the default of
the classification task), and the lead worker gets the model and the held-out accuracy.
"""

from __future__ import annotations

import argparse
import os

import h5py
import numpy as np
from mpi4py import MPI
from torch import nn

import mpips
from mpips.data import load_builtin


def write_images(folder: str) -> None:
    """Two training files and one held-out file, as a user's own pipeline might write them."""
    digits = load_builtin("digits")
    images = np.round(digits["x"] / digits["x"].max() * 255).astype(np.uint8)  # (N, 1, 8, 8)
    labels = digits["y"].astype(np.int16)
    order = np.random.default_rng(0).permutation(len(labels))
    train, val = order[:1437], order[1437:]
    os.makedirs(folder, exist_ok=True)
    for name, ids in (("train_a.h5", train[:720]), ("train_b.h5", train[720:]), ("val.h5", val)):
        with h5py.File(os.path.join(folder, name), "w") as f:
            f.create_dataset("images", data=images[ids], chunks=(64, 1, 8, 8), compression="gzip")
            f.create_dataset("labels", data=labels[ids])


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """(B, 1, 8, 8) images -> (B, num_classes) logits; inputs arrive as float32 0-255."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * (h // 2) * (w // 2), num_classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--dir", default="image-data")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0 and not os.path.exists(os.path.join(args.dir, "val.h5")):
        write_images(args.dir)
    comm.Barrier()
    result = mpips.fit(
        small_cnn, data=[os.path.join(args.dir, f) for f in ("train_a.h5", "train_b.h5")],
        val_data=os.path.join(args.dir, "val.h5"),
        config={"x_key": "images", "y_key": "labels", "steps": args.steps, "lr": 1e-3,
                "log_every": max(1, args.steps // 5)},
    )
    if result.lead:
        print(f"cnn: held-out accuracy {result.metrics['accuracy']:.4f} loss {result.metrics['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
