"""Tasks, losses and held-out metrics. Pure torch, no MPI.

A task says what a target is and how a model is judged on held-out samples:

============== ================================ ============ ===================================
task           target y (per sample)            loss (auto)  held-out metrics
============== ================================ ============ ===================================
classification int class index in [0, C)        cross_entropy loss, accuracy
regression     float, shape () or (k, ...)      mse          loss, mse, mae, r2
multilabel     0/1 per label, shape (C,)        bce          loss, f1 (micro, logit > 0)
tokens         int token ids (T,): next tokens  next_token   loss, perplexity, accuracy (per token)
============== ================================ ============ ===================================

``--loss`` names a built-in loss (``cross_entropy``, ``mse``, ``huber``, ``bce``,
``next_token``) or a user's ``package.module:function``, a callable ``(output, target) ->
scalar tensor`` (mean over the batch). The built-in losses are ``torch.nn.functional``'s; the
ones that compare shapes (mse, huber, bce) view the output as the target's shape when both hold
the same number of elements, so a model ending in ``(B, 1)`` fits targets of shape ``(B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mpips.plugins import load_callable

__all__ = [
    "LOSSES",
    "TASKS",
    "LossError",
    "LossFn",
    "TaskMetrics",
    "default_loss",
    "resolve_loss",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TASKS = ("classification", "regression", "multilabel", "tokens")


class LossError(ValueError):
    """``--loss`` names no built-in loss and no importable callable; the message says which."""


def _as_target(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """``output`` viewed as ``target``'s shape (same element count), else a clear ValueError."""
    if output.shape == target.shape:
        return output
    if output.numel() != target.numel():
        raise ValueError(f"{loss}: output of shape {tuple(output.shape)} does not match targets of shape"
                         f" {tuple(target.shape)} ({output.numel()} vs {target.numel()} values)")
    return output.reshape(target.shape)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``(B, C)`` (or ``(B, T, C)``) against class indices ``(B,)``
    (or ``(B, T)``)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1).long())


def next_token(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token: logits ``(B, T, V)``, next-token ids ``(B, T)``."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1).long())


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, in the target's units squared."""
    return F.mse_loss(_as_target(output, target, "mse"), target.to(output.dtype))


def huber(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss with delta 1 (equal to smooth-L1 with beta 1): squared below 1, linear above."""
    return F.huber_loss(_as_target(output, target, "huber"), target.to(output.dtype))


def bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of logits against 0/1 targets, averaged over samples and labels."""
    return F.binary_cross_entropy_with_logits(_as_target(output, target, "bce"), target.to(output.dtype))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy, "mse": mse, "huber": huber, "bce": bce, "next_token": next_token,
}
_DEFAULT = {"classification": "cross_entropy", "regression": "mse", "multilabel": "bce", "tokens": "next_token"}


def default_loss(task: str) -> str:
    """The built-in loss of ``task`` (``--loss auto``)."""
    return _DEFAULT[task]


def resolve_loss(spec: str | LossFn, task: str) -> LossFn:
    """The loss function ``spec`` names: ``auto``, a built-in name, ``package.module:function``,
    or a callable given as it is.

    Raises:
        LossError: an unknown name, a module that cannot be imported, or a non-callable.
    """
    if callable(spec):
        return spec
    if spec == "auto":
        spec = default_loss(task)
    if spec in LOSSES:
        return LOSSES[spec]
    return load_callable(spec, "--loss", LossError, f"one of auto, {', '.join(LOSSES)} or package.module:function")


@dataclass
class TaskMetrics:
    """Held-out metrics of ``task``, accumulated batch by batch in float64.

    ``update(output, target, loss)`` takes one batch: the model's output, the targets and the
    batch's mean loss; ``result()`` gives, by name (the names of the final table and of the
    ``eval``/``end`` events):

    - every task: ``loss``, the mean of the job's loss over samples (tokens: over tokens);
    - classification: ``accuracy``, the fraction of argmax predictions equal to the label;
    - regression: ``mse`` and ``mae`` (target units squared / target units, over all target
      values) and ``r2``, 1 - SSE / SST with SST about each target column's mean (all columns
      pooled; NaN when the targets do not vary);
    - multilabel: ``f1``, micro-averaged over all labels, a label predicted where its logit > 0;
    - tokens: ``perplexity``, exp of the mean next-token cross-entropy (whatever ``--loss``),
      and ``accuracy`` per token.
    """

    task: str
    count: int = 0  # samples (tokens: tokens) seen
    sums: dict[str, float] = field(default_factory=dict)
    _col: dict[str, torch.Tensor] = field(default_factory=dict)

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def update(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor | float) -> None:
        out = output.detach().double()
        if self.task in ("classification", "tokens"):
            logits = out.reshape(-1, out.shape[-1])
            y = target.reshape(-1).long()
            n = len(y)
            self._add("correct", (logits.argmax(-1) == y).sum())
            if self.task == "tokens":
                self._add("nll", F.cross_entropy(logits, y, reduction="sum"))
        elif self.task == "regression":
            y = target.double()
            pred = _as_target(out, y, "regression metrics")
            n = len(y)
            err = pred - y
            self._add("sse", (err**2).sum())
            self._add("sae", err.abs().sum())
            self._add("values", y.numel())
            cols = y.reshape(n, -1)
            for name, v in (("y", cols.sum(0)), ("yy", (cols**2).sum(0))):
                self._col[name] = self._col[name] + v if name in self._col else v
        elif self.task == "multilabel":
            y = target.double() > 0.5
            pred = _as_target(out, target, "multilabel metrics") > 0
            n = len(y)
            self._add("tp", (pred & y).sum())
            self._add("fp", (pred & ~y).sum())
            self._add("fn", (~pred & y).sum())
        else:
            raise ValueError(f"unknown task {self.task!r}")
        self._add("loss", float(loss) * n)
        self.count += n

    def result(self) -> dict[str, float] | None:
        """The metrics by name; None when no sample was seen."""
        if self.count == 0:
            return None
        s, n = self.sums, self.count
        out = {"loss": s["loss"] / n}
        if self.task == "classification":
            out["accuracy"] = s["correct"] / n
        elif self.task == "tokens":
            out["perplexity"] = math.exp(min(s["nll"] / n, 700.0))
            out["accuracy"] = s["correct"] / n
        elif self.task == "regression":
            sst = float((self._col["yy"] - self._col["y"] ** 2 / n).sum())
            out["mse"] = s["sse"] / s["values"]
            out["mae"] = s["sae"] / s["values"]
            out["r2"] = 1.0 - s["sse"] / sst if sst > 0 else float("nan")
        else:
            denom = 2 * s["tp"] + s["fp"] + s["fn"]
            out["f1"] = 2 * s["tp"] / denom if denom else 1.0
        return out

    @staticmethod
    def names(task: str) -> tuple[str, ...]:
        """The metric names ``result()`` gives for ``task``, in table order."""
        return {"classification": ("loss", "accuracy"), "regression": ("loss", "mse", "mae", "r2"),
                "multilabel": ("loss", "f1"), "tokens": ("loss", "perplexity", "accuracy")}[task]
