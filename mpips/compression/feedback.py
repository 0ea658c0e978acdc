"""Error feedback and momentum correction over any codec. Pure: torch and numpy, no MPI.

Error feedback (``ErrorFeedback``) wraps any codec: per worker it keeps a float32 residual as
long as the flat gradient; a chunk at flat offset ``at`` is sent as ``C(g + e)`` and the residual
becomes ``e <- (g + e) - decode(C(g + e))`` (1-bit SGD with error feedback: Seide et al. 2014;
EF-SGD: Karimireddy et al. 2019). The residual is worker state (``state_dict``) that checkpoints
keep, so resuming is exact.

Deep gradient compression (Lin et al., ICLR 2018) adds, for the sparse codecs:

- **momentum correction** (``MomentumCorrection``): the worker runs the momentum itself, per
  element, ``u <- m u + g``, ``v <- v + u`` (Nesterov: ``u <- m (u + g)``, ``v <- v + u + g``),
  sends ``C(v)`` and zeroes ``u`` and ``v`` where it sent (momentum factor masking), so the
  servers apply plain SGD to the sum of what arrives (``v`` is error feedback's residual, with
  momentum in it). DGC's Algorithm 4 and its code (``DGCSGDMemory``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mpips.compression.record import ChunkCodec, parse_chunk

__all__ = [
    "ErrorFeedback",
    "MomentumCorrection",
    "NoFeedback",
    "make_encoder",
]

class NoFeedback:
    """A codec used as it is: ``encode(x, seed, at)`` ignores ``at``; no state."""

    def __init__(self, codec: ChunkCodec):
        self.codec = codec

    def begin_step(self, step: int) -> None:
        self.codec.begin_step(step)

    def encode(self, x: torch.Tensor, seed: int, at: int) -> np.ndarray:
        return self.codec.encode(x, seed)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ErrorFeedback:
    """Error feedback over any codec: ``e`` float32 [numel] holds what was not sent yet.

    ``encode(g, seed, at)`` sends ``C(g + e[at:at+n])`` and sets ``e[at:at+n]`` to what that
    left out, so sent + new residual = gradient + old residual (up to float32 rounding of the
    sum). Seide et al. 2014 (1-bit SGD); Karimireddy et al. 2019 (EF-SignSGD); Stich et al. 2018.
    """

    def __init__(self, codec: ChunkCodec, numel: int):
        self.codec = codec
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def begin_step(self, step: int) -> None:
        """The worker starts encoding ``step`` (the codec's sparsity warm-up follows it)."""
        self.codec.begin_step(step)

    def encode(self, x: torch.Tensor, seed: int, at: int) -> np.ndarray:
        """The record of chunk ``x`` (float32 [n]) at flat offset ``at``, residual included."""
        e = self.residual[at : at + x.numel()]
        corrected = x + e
        record = self.codec.encode(corrected, seed)
        sent = parse_chunk(self.codec, record, x.numel(), seed)[0]
        torch.sub(corrected, sent.dense(), out=e)
        return record

    def state_dict(self) -> dict[str, Any]:
        """``residual``: float32 [numel] (a view: copy before changing it)."""
        return {"residual": self.residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r = state.get("residual")
        if r is None:
            self.residual.zero_()
            return
        if r.numel() != self.residual.numel():
            raise ValueError(f"error-feedback residual of {r.numel()} elements, the model has {self.residual.numel()}")
        self.residual.copy_(r.reshape(-1))


class MomentumCorrection(ErrorFeedback):
    """DGC's momentum correction over a sparse codec (topk, randomk): the worker's own momentum.

    Per element: ``u <- m u + g`` and ``v <- v + u`` (``nesterov``: ``u <- m (u + g)``,
    ``v <- v + u + g``, torch's Nesterov SGD rewritten for accumulation); send ``C(v)``; then
    ``v <- v - sent`` and, momentum factor masking, ``u <- 0`` where something was sent. With every
    entry sent each step and no masking this is torch's momentum SGD (the servers applying plain
    SGD to what arrives); DGC sends a few and lets the rest accumulate in ``v``, which is error
    feedback's residual with the momentum in it (Lin et al. 2018, Section 3.2 and Algorithm 4).
    """

    def __init__(self, codec: ChunkCodec, numel: int, momentum: float, nesterov: bool = False):
        if not codec.sparse:
            raise ValueError(f"momentum correction needs a sparse codec (topk, randomk), not {codec.name}")
        if getattr(codec, "scaled", False):
            raise ValueError("momentum correction needs randomk unscaled, as error feedback has it"
                             " (make_codec(..., error_feedback=True))")
        super().__init__(codec, numel)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity = torch.zeros(numel, dtype=torch.float32)  # u

    def encode(self, x: torch.Tensor, seed: int, at: int) -> np.ndarray:
        """The record of chunk ``x`` (float32 [n], the gradient) at flat offset ``at``."""
        n = x.numel()
        u, v = self.velocity[at : at + n], self.residual[at : at + n]
        if self.nesterov:
            u.add_(x).mul_(self.momentum)
            v.add_(u).add_(x)
        else:
            u.mul_(self.momentum).add_(x)
            v.add_(u)
        record = self.codec.encode(v, seed)
        sent = parse_chunk(self.codec, record, n, seed)[0]
        v.index_add_(0, sent.indices, sent.values, alpha=-1.0)  # topk: exactly 0 there
        u.index_fill_(0, sent.indices, 0.0)
        return record

    def state_dict(self) -> dict[str, Any]:
        """``residual``: v, float32 [numel]; ``momentum``: u, float32 [numel] (views)."""
        return {"residual": self.residual, "momentum": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        u = state.get("momentum")
        if u is None:
            self.velocity.zero_()
            return
        if u.numel() != self.velocity.numel():
            raise ValueError(f"momentum-correction velocity of {u.numel()} elements, the model has"
                             f" {self.velocity.numel()}")
        self.velocity.copy_(u.reshape(-1))


def make_encoder(codec: ChunkCodec, numel: int, error_feedback: bool, momentum: float | None = None,
                 nesterov: bool = False) -> ErrorFeedback | NoFeedback:
    """The worker's encoder: ``codec`` with or without an error-feedback residual of ``numel``.

    ``momentum``: not None, DGC's momentum correction with this factor (``MomentumCorrection``;
    it keeps a residual of its own, whatever ``error_feedback`` says).
    """
    if momentum is not None:
        return MomentumCorrection(codec, numel, momentum, nesterov)
    return ErrorFeedback(codec, numel) if error_feedback else NoFeedback(codec)
