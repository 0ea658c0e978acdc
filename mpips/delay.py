"""Delay compensation for asynchronous pushes (DC-ASGD, Zheng et al., ICML 2017). Pure: torch only.

A push computed at the parameters a worker pulled, ``w_pulled``, is applied to the newer
``w_now``. DC-ASGD corrects the gradient with the first-order Taylor term of the change, the
Hessian approximated by the gradient's outer product (its diagonal): ``g + λ g ⊙ g ⊙ (w_now -
w_pulled)``. Its adaptive form (DC-ASGD-a) scales λ by the running root mean square of the
gradients, ``λ = λ0 / (sqrt(ms) + eps)`` with ``ms ← m ms + (1 - m) g ⊙ g`` elementwise, so λ0 does
not depend on the gradient's scale (the paper: λ0 = 2, m = 0.95).

The server knows which version a push was computed at: the header's ``applied_seen``, the count of
updates applied when the worker pulled. ``DelayCompensation`` keeps the last ``keep`` versions of
the shard by that count (a ring of copies: ``keep`` x the shard's memory); a push older than the
ring is compensated from the oldest copy kept (the change since then is the larger part).

Units: elements of one server's shard, float32.

The look-ahead (``--lookahead L``, ``lookahead_lead``) works the other way round: instead of
correcting a stale gradient where it lands, workers compute it at the parameters extrapolated
along the last update, ``w + L (W - 1) (w - w_before)`` (``ParameterWindow``'s ``lead``), where
the parameters will be after the ``W - 1`` updates other workers apply while it is computed (a
look-ahead like DANA's, Hakimi et al. 2019; Adam's updates change direction slowly, so the last
one is a fair guess of the next ones).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DelayCompensation", "lookahead_lead"]


class DelayCompensation:
    """The ring of recent shard versions and the adaptive λ of one server.

    Args:
        numel: elements in the shard.
        lam: λ0 (``--dc-lambda``).
        keep: versions kept (the ring's length).
        momentum: ``m`` of the running mean square.
        eps: added to the root mean square.
    """

    def __init__(self, numel: int, lam: float, keep: int, momentum: float = 0.95, eps: float = 1e-8):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.lam, self.keep, self.momentum, self.eps = lam, keep, momentum, eps
        self.ring = torch.zeros(keep, numel)
        self.version = [-1] * keep  # the update count each slot holds (-1: none)
        self.mean_square = torch.zeros(numel)
        self._square, self._work = torch.empty(numel), torch.empty(numel)
        self.started = False  # the mean square holds a gradient
        self.compensated = 0  # pushes corrected
        self.beyond = 0  # of those, older than the ring (corrected from its oldest copy)

    def record(self, applied: int, params: np.ndarray) -> None:
        """The shard after ``applied`` updates (copied; it may be a read-only view)."""
        slot = applied % self.keep
        self.ring[slot].numpy()[:] = params
        self.version[slot] = applied

    def _pulled(self, applied_seen: int) -> torch.Tensor | None:
        slot = applied_seen % self.keep
        if self.version[slot] == applied_seen:
            return self.ring[slot]
        known = [(v, s) for s, v in enumerate(self.version) if v >= 0]
        if not known:
            return None
        self.beyond += 1
        return self.ring[min(known)[1]]

    def compensate(self, grad: torch.Tensor, applied_seen: int, applied: int) -> None:
        """In place: ``grad``, computed at the version after ``applied_seen`` updates, corrected to
        the version after ``applied`` (the newest, ``record``-ed). In place over preallocated
        buffers: on a server it runs once per push, next to the optimizer's own step."""
        square, work = self._square, self._work
        torch.mul(grad, grad, out=square)
        if self.started:
            self.mean_square.lerp_(square, 1.0 - self.momentum)
        else:
            self.mean_square.copy_(square)
            self.started = True
        pulled, slot = self._pulled(applied_seen), applied % self.keep
        if pulled is None or self.version[slot] != applied:
            return
        torch.sub(self.ring[slot], pulled, out=work)  # w_now - w_pulled
        work.mul_(square).div_(self.mean_square.sqrt().add_(self.eps))
        grad.add_(work, alpha=self.lam)
        self.compensated += 1


def lookahead_lead(lookahead: float, sync: str, workers: int) -> float:
    """Updates ahead of the optimizer's values that workers pull: ``lookahead`` x (W - 1) in asp
    and ssp, 0 in bsp (every gradient there is computed at the values it is applied to)."""
    return lookahead * (workers - 1) if sync != "bsp" else 0.0
