"""A synthetic click log for sparse models: ``python -m mpips.data clicks -o clicks.h5``.

Each sample is one impression: ``fields`` categorical ids (a user, an item, ...), ``dense``
float features and a 0/1 click. Field ``f`` owns the keys ``[f * R, (f + 1) * R)`` of one table of
``fields * R`` rows (``R = keys // fields``), so one ``job.embedding(keys, dim)`` serves them all.
Ids are Zipf-distributed (exponent ``zipf``: a few keys are very frequent, most are rare, as in
real click logs) and scattered over the field's keys by a fixed bijection, so the frequent keys
are not the small ones.

The rule a model can learn: every key has a hidden weight ``w(key) ~ N(0, 1)`` (a hash of the
seed and the key) and the click probability is
``sigmoid(signal * (sum of the ids' weights + dense @ v) / sqrt(fields + 1) + bias)``, where ``v`` is a
fixed unit vector. A model that learns the frequent keys' rows and ``v`` reaches a held-out AUC
well above 0.5; the Bayes AUC (the true probabilities as scores) is stored as an attribute so a run can
say how close it came.

The file: ``/train`` and ``/val`` groups, each with ``ids`` int64 [N, fields], ``dense`` float32
[N, dense] and ``label`` float32 [N]; attributes ``keys``, ``fields``, ``dense``, ``zipf``,
``seed``, ``bayes_auc``. Written in slabs (never whole in memory), by one process. Workers read
it with ``ClickLog`` (any iterable feeds an own loop; data servers stream the x/y format only).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np

from mpips.sparse import init_rows

__all__ = ["ClickLog", "auc", "write_clicks"]

SLAB = 1 << 17  # samples generated and written at a time


@dataclass(frozen=True)
class ClickRule:
    keys: int
    fields: int
    dense: int
    zipf: float
    seed: int
    signal: float = 2.5
    bias: float = -0.5

    @property
    def per_field(self) -> int:
        return self.keys // self.fields

    def ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """int64 [n, fields]: Zipf ranks over each field's keys (inverse CDF of a truncated power
        law), scattered by ``rank * a + b mod R`` (a bijection: ``a`` is prime to ``R``)."""
        r, s = self.per_field, self.zipf
        u = rng.random((n, self.fields))
        if abs(s - 1.0) < 1e-9:
            rank = np.floor(np.exp(u * math.log(r + 1))) - 1
        else:
            rank = np.floor(((float(r + 1) ** (1 - s) - 1) * u + 1) ** (1 / (1 - s))) - 1
        rank = np.clip(rank, 0, r - 1).astype(np.int64)
        a = _coprime(r, 2_654_435_761)
        scattered = (rank * a + 12_345) % r
        return scattered + np.arange(self.fields, dtype=np.int64) * r

    def probability(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        w = init_rows(ids.reshape(-1), 1, self.seed, 1_000_003, 1.0).reshape(ids.shape)
        v = np.random.default_rng([self.seed, 7]).standard_normal(self.dense)
        v /= np.linalg.norm(v)
        logit = self.signal * (w.sum(1) + dense @ v) / math.sqrt(self.fields + 1) + self.bias
        return 1 / (1 + np.exp(-logit))

    def samples(self, n: int, part: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, dense, label, true probability) slabs of ``n`` samples of stream ``part``."""
        for lo in range(0, n, SLAB):
            m = min(SLAB, n - lo)
            rng = np.random.default_rng([self.seed, part, lo])
            ids = self.ids(rng, m)
            dense = rng.standard_normal((m, self.dense)).astype(np.float32)
            p = self.probability(ids, dense)
            yield ids, dense, (rng.random(m) < p).astype(np.float32), p


def _coprime(n: int, a: int) -> int:
    a %= n
    while math.gcd(a, n) != 1:
        a += 1
    return a


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    bounds = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def write_clicks(path: str, samples: int, *, keys: int = 20_000_000, fields: int = 4, dense: int = 4,
                 zipf: float = 1.1, val_fraction: float = 0.1, seed: int = 0) -> dict[str, float]:
    """Write the click log; returns its attributes."""
    if keys < fields or samples < 10 or fields < 1 or dense < 1 or not 0 < val_fraction < 1:
        raise ValueError("clicks: need keys >= fields >= 1, dense >= 1, samples >= 10 and 0 < val-fraction < 1")
    rule = ClickRule(keys - keys % fields, fields, dense, zipf, seed)
    n_val = max(1, int(samples * val_fraction))
    sizes = {"train": samples - n_val, "val": n_val}
    probs, labels = [], []
    with h5py.File(path, "w") as f:
        for part, (name, n) in enumerate(sizes.items()):
            g = f.create_group(name)
            ids_ds = g.create_dataset("ids", (n, fields), np.int64, chunks=(min(n, 8192), fields))
            dense_ds = g.create_dataset("dense", (n, dense), np.float32, chunks=(min(n, 8192), dense))
            label_ds = g.create_dataset("label", (n,), np.float32, chunks=(min(n, 8192),))
            lo = 0
            for ids, x, y, p in rule.samples(n, part):
                ids_ds[lo : lo + len(y)], dense_ds[lo : lo + len(y)], label_ds[lo : lo + len(y)] = ids, x, y
                lo += len(y)
                if name == "val":
                    probs.append(p), labels.append(y)
        attrs = {"keys": rule.keys, "fields": fields, "dense": dense, "zipf": zipf, "seed": seed,
                 "bayes_auc": auc(np.concatenate(probs), np.concatenate(labels)),
                 "click_rate": float(np.concatenate(labels).mean())}
        f.attrs.update(attrs)
    return attrs


class ClickLog:
    """Batches of a click log for one worker: its share of ``/train`` in order, or all of ``/val``.

    Args:
        path: the file ``write_clicks`` wrote.
        split: ``"train"`` or ``"val"``.
        batch: samples per batch.
        part, parts: this worker's share (``job.worker_index``, ``job.num_workers``): every
            ``parts``-th block of ``batch`` samples from block ``part`` on.
    """

    def __init__(self, path: str, split: str = "train", batch: int = 256, part: int = 0, parts: int = 1):
        self.path, self.split, self.batch, self.part, self.parts = path, split, batch, part, parts
        with h5py.File(path, "r") as f:
            self.attrs = dict(f.attrs)
            self.samples = len(f[split]["label"])

    def __len__(self) -> int:
        blocks = self.samples // self.batch
        return max(0, (blocks - self.part + self.parts - 1) // self.parts)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids int64 [B, fields], dense float32 [B, dense], label float32 [B]) per batch."""
        with h5py.File(self.path, "r") as f:
            g = f[self.split]
            for block in range(self.part, self.samples // self.batch, self.parts):
                lo, hi = block * self.batch, (block + 1) * self.batch
                yield g["ids"][lo:hi], g["dense"][lo:hi], g["label"][lo:hi]
