"""A sparse table's pieces in a checkpoint file: ``sparse/<table>/`` holds its rows and their
per-element optimizer state in server-major row order (``weight``, ``optim/<key>``,
``optim_sparse/<key>``), its per-shard numbers indexed by server (``scalar/<key>``,
``scalar_int/<key>``, ``has_state``). Written by the server's ``state_dict()`` through
``table_pieces`` and read back by ``table_state``; the same server count is needed to resume.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from mpips.checkpoint.files import CheckpointError, Piece

__all__ = ["table_pieces", "table_state"]


def table_pieces(at: str, s: int, st: dict[str, Any]) -> list[Piece]:
    """Server ``s``'s pieces of a sparse table (``RowServer.state_dict``): its rows and their
    per-element state at its rows' start in server-major order, its per-shard numbers at ``s``."""
    start, shape, S = st["start"], (st["rows"], st["weight"].shape[1]), st["servers"]
    pieces = [Piece(f"{at}/weight", start, st["weight"].copy(), shape),
              Piece(f"{at}/has_state", s, np.array([bool(st["elem"] or st["scalar"])], np.uint8), (S,))]
    for key, v in sorted(st["elem"].items()):
        kind = "optim_sparse" if key in st["sparse"] else "optim"
        pieces.append(Piece(f"{at}/{kind}/{key}", start, np.ascontiguousarray(v, np.float32), shape))
    for key, v in sorted(st["scalar"].items()):
        kind = "scalar_int" if key in st["ints"] else "scalar"
        pieces.append(Piece(f"{at}/{kind}/{key}", s, np.array([v], np.float64), (S,)))
    return pieces


def table_state(f: h5py.File, at: str, s: int, template: dict[str, Any]) -> dict[str, Any]:
    """Server ``s``'s state of a sparse table from checkpoint ``f`` (as ``table_pieces`` wrote it)."""
    lo, hi = template["start"], template["start"] + template["weight"].shape[0]
    group = f[at]
    if group["weight"].shape[0] != template["rows"] or group["has_state"].shape[0] != template["servers"]:
        raise CheckpointError(f"{at}: written for a table of {group['weight'].shape[0]} rows over"
                              f" {group['has_state'].shape[0]} servers, this job has {template['rows']} over"
                              f" {template['servers']}")
    state: dict[str, Any] = {"weight": group["weight"][lo:hi], "elem": {}, "scalar": {}, "sparse": [], "ints": []}
    if group["has_state"][s]:
        for kind in ("optim", "optim_sparse"):
            for key, ds in group.get(kind, {}).items():
                state["elem"][key] = ds[lo:hi]
                if kind == "optim_sparse":
                    state["sparse"].append(key)
        for kind in ("scalar", "scalar_int"):
            for key, ds in group.get(kind, {}).items():
                state["scalar"][key] = float(ds[s])
                if kind == "scalar_int":
                    state["ints"].append(key)
    return state
