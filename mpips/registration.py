"""Registration: what a worker tells the servers about a model and its optimizer. Pure: torch only.

Servers never build or import the user's model (ps-lite's way: workers initialise, servers
store). A worker's ``job.optimizer(model, cls, **kwargs)`` describes the model's trainable
tensors (names, shapes, dtype) and the optimizer (its class as ``"module:Qualname"``, and every
parameter group's hyperparameters as torch filled them in) in a ``TableSpec``; every worker
sends its own, the specs must agree, and each server builds the same torch optimizer class over
its shard's tensor runs, one parameter group per group of the worker's optimizer.

Hyperparameters travel with the step: ``HyperCodec`` packs the numeric ones of every group
(``lr``, ``betas``, ``weight_decay``, ...) into float64 values appended to each push, so a torch
LR scheduler or ``opt.param_groups[0]["lr"] = ...`` on the worker reaches the servers' optimizer
at the step it is made for. Flags (``nesterov``, ``amsgrad``, ``fused``, ...) are fixed at
registration.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpips.config import ConfigError
from mpips.models import ModelError

__all__ = ["HyperCodec", "TableSpec", "class_path", "resolve_optimizer", "spec_mismatch"]

# Optimizers whose step needs more than one shard's gradient and state: refused at registration.
WHOLE_MODEL = {"LBFGS": "its step re-evaluates the loss through a closure and keeps a history over the whole"
                        " model's parameters"}
SPARSE_ONLY = {"SparseAdam": "it takes sparse gradients only, and mpips pushes dense ones (a table on the servers,"
                             " job.embedding, takes it)"}


def class_path(cls: type) -> str:
    """``"package.module:Qualname"`` of a class, as the servers import it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_optimizer(spec: str | type, sparse: bool = False) -> type[torch.optim.Optimizer]:
    """The optimizer class ``spec`` names (a class, or ``"package.module:Class"``).

    ``sparse``: for a sparse table (``job.embedding``), where SparseAdam is at home.

    Raises:
        ConfigError: it cannot be imported, is not a ``torch.optim.Optimizer``, or cannot run
            shard by shard on parameter servers (LBFGS, SparseAdam).
    """
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ConfigError(f"optimizer {spec!r}: give a class or 'package.module:Class'")
        try:
            obj: Any = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import the optimizer class {spec!r} ({type(exc).__name__}: {exc})") from None
        cls = obj
    else:
        cls = spec
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer {spec!r} is not a torch.optim.Optimizer class")
    for base in cls.__mro__:
        why = WHOLE_MODEL.get(base.__name__) or (None if sparse else SPARSE_ONLY.get(base.__name__))
        if why and base.__module__.startswith("torch.optim"):
            raise ConfigError(f"optimizer {cls.__name__} cannot run shard by shard on parameter servers: {why};"
                              " use a first-order torch.optim optimizer (SGD, Adam, AdamW, Adagrad, ...)")
    return cls


def _is_hyper(value: Any) -> bool:
    """A hyperparameter that travels with the step: a number, or a tuple of numbers (betas)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, tuple) and bool(value) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value)


@dataclass(frozen=True)
class TableSpec:
    """One registered model and optimizer: what the servers store and how they update it.

    Attributes:
        names: the trainable tensors in flat order (``named_parameters``, ``requires_grad``).
        shapes: their shapes.
        dtype: their common dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); servers keep float32.
        optimizer: the optimizer class, ``"package.module:Qualname"``.
        groups: each parameter group's settings as torch filled them in (everything but ``params``).
        group_of: the group of each tensor.
        module: the buffers and frozen parameters the workers keep (``checkpoint.module_spec``:
            name, shape, dtype, kind), which checkpoints hold for them.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    optimizer: str
    groups: tuple[tuple[tuple[str, Any], ...], ...]
    group_of: tuple[int, ...]
    module: tuple[tuple[Any, ...], ...] = ()
    sparse: tuple[Any, ...] = ()  # mpips.sparse.EmbeddingSpec of each table in the model (job.embedding)

    @classmethod
    def of(cls, named: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
           module: Sequence[Sequence[Any]] = ()) -> TableSpec:
        """The spec of trainable tensors ``named`` (in flat order) under ``optimizer``, with the
        workers' ``module`` state (``checkpoint.module_spec``).

        Raises:
            ModelError: a trainable tensor is in no parameter group or in two, or a group holds
                a tensor that is not one of ``named``.
        """
        index = {id(p): i for i, (_, p) in enumerate(named)}
        group_of = [-1] * len(named)
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                i = index.get(id(p))
                if i is None:
                    raise ModelError("a parameter group holds a tensor that is not a trainable parameter of the"
                                     " model given to job.optimizer")
                if group_of[i] >= 0:
                    raise ModelError(f"parameter {named[i][0]} is in two parameter groups")
                group_of[i] = g
        missing = [named[i][0] for i, g in enumerate(group_of) if g < 0]
        if missing:
            raise ModelError(f"parameter groups leave out trainable parameters {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}: every trainable parameter must be in one group"
                             " (or set requires_grad=False on those that stay fixed)")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise ModelError(f"the model's trainable parameters mix dtypes {sorted(map(str, dtypes))}: use one")
        groups = tuple(tuple(sorted((k, _plain(v)) for k, v in group.items() if k != "params"))
                       for group in optimizer.param_groups)
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named),
                   str(next(iter(dtypes), torch.float32)).removeprefix("torch."),
                   class_path(type(optimizer)), groups, tuple(group_of),
                   tuple(tuple(tuple(x) if isinstance(x, list) else x for x in m) for m in module))

    def build(self, pieces: Sequence[torch.Tensor], tensor_of: Sequence[int]) -> torch.optim.Optimizer:
        """The servers' optimizer over ``pieces`` (views of the shard), piece ``j`` being part of
        tensor ``tensor_of[j]``: one group per registered group, with its settings."""
        cls = resolve_optimizer(self.optimizer)
        groups = [{"params": [], **dict(settings)} for settings in self.groups]
        for piece, t in zip(pieces, tensor_of, strict=True):
            groups[self.group_of[t]]["params"].append(piece)
        return cls(groups)

    @property
    def hyper_bytes(self) -> int:
        """Bytes of the hyperparameters each push carries (``HyperCodec``)."""
        return 8 * sum(len(v) if isinstance(v, tuple) else 1
                       for settings in self.groups for _, v in settings if _is_hyper(v))

    def hyper(self) -> HyperCodec:
        return HyperCodec([[k for k, v in settings if _is_hyper(v)] for settings in self.groups])


def _plain(value: Any) -> Any:
    """A group setting as it is compared and sent: tensors (a tensor lr) as Python numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, list):
        return tuple(value)
    return value


class HyperCodec:
    """Packs each group's numeric hyperparameters into float64 values, in a fixed order.

    Args:
        keys: the hyperparameter names of each group (as registered).
    """

    def __init__(self, keys: Sequence[Sequence[str]]):
        self.keys = [list(k) for k in keys]
        self.widths: list[list[int]] | None = None

    def encode(self, param_groups: Sequence[dict[str, Any]]) -> np.ndarray:
        """float64 values of every group's hyperparameters (tuples flattened)."""
        out: list[float] = []
        widths = []
        for keys, group in zip(self.keys, param_groups, strict=True):
            row = []
            for k in keys:
                v = _plain(group[k])
                values = v if isinstance(v, tuple) else (v,)
                row.append(len(values) if isinstance(v, tuple) else 0)
                out.extend(float(x) for x in values)
            widths.append(row)
        if self.widths is None:
            self.widths = widths
        elif widths != self.widths:
            raise ConfigError("a parameter group's hyperparameter changed shape (a tuple of another length) after"
                              " job.optimizer: keep the same structure")
        return np.array(out, dtype=np.float64)

    def apply(self, optimizer: torch.optim.Optimizer, values: np.ndarray, lr_scale: float = 1.0) -> None:
        """Set ``optimizer``'s groups to ``values`` (as ``encode`` made them); ``lr`` times ``lr_scale``."""
        at = 0
        for keys, group in zip(self.keys, optimizer.param_groups, strict=True):
            for k in keys:
                old = group[k]
                if isinstance(old, tuple):
                    group[k] = tuple(float(x) for x in values[at : at + len(old)])
                    at += len(old)
                else:
                    v = float(values[at])
                    at += 1
                    if k == "lr":
                        v *= lr_scale
                    group[k] = int(v) if isinstance(old, int) and v.is_integer() else v
        if at != values.size:
            raise ValueError(f"{values.size} hyperparameter values, the groups take {at}")


def spec_mismatch(specs: Sequence[TableSpec], table: int) -> str | None:
    """Why the workers' specs of registration ``table`` differ (the first difference), or None."""
    first = specs[0]
    for w, spec in enumerate(specs[1:], start=1):
        if spec == first:
            continue
        what = f"job.optimizer call #{table + 1}: worker {w} registered"
        if spec.names != first.names or spec.shapes != first.shapes:
            for i, (a, b) in enumerate(zip(first.names, spec.names, strict=False)):
                if a != b or first.shapes[i] != spec.shapes[i]:
                    return (f"{what} tensor {i} as {b} {list(spec.shapes[i])}, worker 0 as {a}"
                            f" {list(first.shapes[i])}: build the same model on every worker and register the"
                            " models in the same order")
            return (f"{what} {len(spec.names)} trainable tensors, worker 0 {len(first.names)}: build the same model"
                    " on every worker and register the models in the same order")
        if spec.dtype != first.dtype:
            return f"{what} {spec.dtype} parameters, worker 0 {first.dtype}"
        if spec.module != first.module:
            return f"{what} other buffers or frozen parameters than worker 0"
        if spec.optimizer != first.optimizer:
            return f"{what} optimizer {spec.optimizer}, worker 0 {first.optimizer}"
        if spec.sparse != first.sparse:
            return (f"{what} other embedding tables (job.embedding: names, shapes, optimizer or init) than worker 0:"
                    f" {[(e.name, e.rows, e.dim) for e in spec.sparse]} against"
                    f" {[(e.name, e.rows, e.dim) for e in first.sparse]}")
        return f"{what} other parameter groups or hyperparameters than worker 0: pass the same to every worker"
    return None
