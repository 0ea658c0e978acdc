"""A small token-level language model on token ids in HDF5: ``inputs`` (N, T), ``targets`` (N, T).

    mpirun -n 4 python examples/token_lm.py                         # 1 server, 1 data server, 2 workers
    mpirun -n 4 python examples/token_lm.py --steps 600 --dir /tmp/lm

Rank 0 first writes sequences of a vocabulary of 64 tokens from a seeded Markov chain in which
each token has 4 likely successors (so a model that learns the chain reaches a perplexity near
4, against 64 for a uniform guess): ``targets`` are ``inputs`` shifted by one. ``mpips.fit``
reads them in place (task ``tokens``: integer inputs and targets of one shape), trains the
embedding + GRU below with the next-token cross-entropy and reports the held-out perplexity.
"""

from __future__ import annotations

import argparse
import os

import h5py
import numpy as np
import torch
from mpi4py import MPI
from torch import nn

import mpips

VOCAB, CONTEXT, SUCCESSORS = 64, 32, 4


def write_tokens(folder: str, train: int = 4000, val: int = 500) -> None:
    """Markov-chain sequences of CONTEXT + 1 tokens, cut into inputs and next-token targets."""
    rng = np.random.default_rng(0)
    successors = np.stack([rng.choice(VOCAB, SUCCESSORS, replace=False) for _ in range(VOCAB)])
    n = train + val
    seq = np.empty((n, CONTEXT + 1), dtype=np.int32)
    seq[:, 0] = rng.integers(0, VOCAB, n)
    for t in range(1, CONTEXT + 1):
        seq[:, t] = successors[seq[:, t - 1], rng.integers(0, SUCCESSORS, n)]
    os.makedirs(folder, exist_ok=True)
    for name, rows in (("train.h5", seq[:train]), ("val.h5", seq[train:])):
        with h5py.File(os.path.join(folder, name), "w") as f:
            f.create_dataset("inputs", data=rows[:, :-1])
            f.create_dataset("targets", data=rows[:, 1:])


class TinyLM(nn.Module):
    """(B, T) token ids -> (B, T, vocab) next-token logits."""

    def __init__(self, vocab: int, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def tiny_lm(num_classes: int, task: str) -> nn.Module:
    """The factory: ``num_classes`` is the vocabulary (largest id + 1 in the files)."""
    assert task == "tokens", task
    return TinyLM(num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--dir", default="token-data")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0 and not os.path.exists(os.path.join(args.dir, "val.h5")):
        write_tokens(args.dir)
    comm.Barrier()
    result = mpips.fit(
        tiny_lm, loss="next_token", data=os.path.join(args.dir, "train.h5"),
        val_data=os.path.join(args.dir, "val.h5"),
        config={"x_key": "inputs", "y_key": "targets", "steps": args.steps, "lr": 3e-3,
                "log_every": max(1, args.steps // 5)},
    )
    if result.lead:
        m = result.metrics
        print(f"token lm: held-out perplexity {m['perplexity']:.3f} (uniform: {VOCAB}, the chain: {SUCCESSORS})"
              f" next-token accuracy {m['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
