"""Built-in datasets that need no download: UCI handwritten digits and Python's own sources.

``digits``: 1797 8x8 images (pixels 0..16, scaled to 0..1) of the digits 0-9, the UCI set
that scikit-learn ships (file and licence in ``mpips/datasets``). ``pytext``: byte-level text
cut into fixed windows from the standard library's ``.py`` files, for the GPT model.
"""

from __future__ import annotations

import gzip
import sysconfig
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["BUILTIN", "load_builtin"]

VALIDATION_FRACTION = 0.2
SPLIT_SEED = 1234  # fixed: the held-out split never depends on --seed


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = int(round(n * VALIDATION_FRACTION))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _digits() -> dict:
    raw = resources.files("mpips").joinpath("datasets/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    x = (table[:, :64] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    y = table[:, 64].astype(np.int64)
    return {"x": x, "y": y, "kind": "classification", "num_classes": 10}


def _pytext(context: int = 64, max_bytes: int = 4 << 20) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    stream = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    n = len(stream) // (context + 1)
    windows = stream[: n * (context + 1)].reshape(n, context + 1)
    return {"x": windows[:, :-1].astype(np.int64), "y": windows[:, 1:].astype(np.int64),
            "kind": "text", "num_classes": 256}


BUILTIN = {"digits": _digits, "pytext": _pytext}


def load_builtin(name: str, context: int = 64) -> dict:
    """Arrays of a built-in dataset: x, y, kind, num_classes, train_ids, val_ids.

    ``context`` is the window length of text datasets.
    """
    if name not in BUILTIN:
        raise ValueError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN)}")
    out = _pytext(context) if name == "pytext" else BUILTIN[name]()
    out["train_ids"], out["val_ids"] = _split(len(out["y"]))
    return out
