"""Built-in models, loading a user's model from ``package.module:factory``, and the start-up check
that a model fits its data. Pure torch.

The factory contract: ``--model package.module:factory`` (or a callable given to
``mpips.fit``) is called, after ``torch.manual_seed(--seed)`` on every rank, with those of these
keywords that its signature names (all of them if it takes ``**kwargs``):

- ``input_shape``: tuple of ints, one sample's shape, e.g. ``(1, 8, 8)``; tokens: ``(T,)`` ids;
- ``num_classes``: int, the size of the output's last dimension: classes (classification),
  target values per sample (regression: 1 for a scalar target), labels (multilabel), vocabulary
  size (tokens; 256 for byte text);
- ``task``: str, ``classification`` | ``regression`` | ``multilabel`` | ``tokens``;
- ``target_shape``: tuple of ints, one sample's target shape (``()`` for a class or a scalar).

It must return an ``nn.Module`` whose trainable parameters are all float32, all bfloat16 or all
float16 (servers keep a float32 master) and whose output for a batch of B samples is
``(B, num_classes)`` (tokens: ``(B, T, num_classes)``; regression may also give the target's
shape, e.g. ``(B,)``), what the loss takes. Anything else is a ``ModelError``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpips.config import ModelConfig
from mpips.plugins import load_callable

__all__ = ["DLRM", "ByteGPT", "DataSpec", "ModelError", "build_model", "call_factory", "check_model",
           "loss_and_correct"]


class ModelError(ValueError):
    """The model cannot be built, or does not fit the data; the message names the model and why.

    Bad input, like a bad flag: the job reports it once and exits with status 2.
    """


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: sample shape, output size, task.

    ``kind`` is the stored format's: ``classification``, ``regression``, ``multilabel``,
    ``tokens``, or ``text`` (byte windows: ``input_shape`` is ``(context,)`` and ``num_classes``
    256; its task is ``tokens``). ``num_classes`` is the size of the model output's last
    dimension; ``target_shape`` one sample's target shape.
    """

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    target_shape: tuple[int, ...] = ()

    @property
    def task(self) -> str:
        return "tokens" if self.kind == "text" else self.kind

    @property
    def sequence(self) -> bool:
        """Token sequences: one prediction per position, ``(B, T, num_classes)``."""
        return self.task == "tokens"


class MLP(nn.Sequential):
    def __init__(self, spec: DataSpec, hidden: int):
        n_in = math.prod(spec.input_shape)
        super().__init__(
            nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes),
        )


class CNN(nn.Module):
    """Two 3x3 convolutions and a linear head, for small images (C, H, W)."""

    def __init__(self, spec: DataSpec, width: int = 16):
        super().__init__()
        if len(spec.input_shape) != 3:
            raise ValueError(f"cnn needs image samples (C, H, W), got shape {spec.input_shape}")
        c, h, w = spec.input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * (h // 2) * (w // 2), spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    """A small GPT-style causal transformer over bytes: (B, T) ids -> (B, T, 256) logits."""

    def __init__(self, context: int, layers: int, width: int, heads: int, vocab: int = 256):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=ids.device), 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


class DLRM(nn.Module):
    """A DLRM-style click model (Naumov et al. 2019) over one embedding table the categorical
    fields share: a bottom MLP maps the dense features to a vector, the pairwise dot products of
    it and the fields' rows are the interactions, a top MLP gives the click logit.

    Args:
        emb: the table (``job.embedding(...)`` or ``nn.Embedding``), called with ids [B, fields].
        fields, dense, dim: categorical fields, dense features, the table's row width.
    """

    def __init__(self, emb: nn.Module, fields: int, dense: int, dim: int):
        super().__init__()
        self.emb = emb
        self.bottom = nn.Sequential(nn.Linear(dense, 32), nn.ReLU(), nn.Linear(32, dim))
        self.top = nn.Sequential(nn.Linear(dim + (fields + 1) * fields // 2, 64), nn.ReLU(), nn.Linear(64, 1))
        self.pairs = torch.triu_indices(fields + 1, fields + 1, offset=1)  # a constant, not state

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        d = self.bottom(dense)  # [B, dim]
        vectors = torch.cat([d[:, None], self.emb(ids)], 1)  # [B, fields + 1, dim]
        dots = vectors @ vectors.transpose(1, 2)
        return self.top(torch.cat([d, dots[:, self.pairs[0], self.pairs[1]]], 1)).squeeze(1)


def _user_factory(path: str, spec: DataSpec) -> nn.Module:
    factory = load_callable(path, "--model", ModelError, "mlp, cnn, gpt or package.module:factory")
    return call_factory(factory, spec, f"--model {path!r}")


def call_factory(factory, spec: DataSpec, name: str) -> nn.Module:
    """``factory(**keywords)`` with the keywords of the factory contract its signature names."""
    offered = {"input_shape": spec.input_shape, "num_classes": spec.num_classes, "task": spec.task,
               "target_shape": spec.target_shape}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    varkw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if k in params or varkw}
    attr = getattr(factory, "__name__", type(factory).__name__)
    call = f"{attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelError(f"{name}: {call} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name}: {call} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(cfg: ModelConfig, spec: DataSpec, seed: int, model: object = None) -> nn.Module:
    """Build the model with parameters initialised from ``seed`` (same seed, same start).

    Args:
        cfg: ``--model`` and the built-in models' sizes.
        spec: the dataset's shapes and task.
        seed: seeds torch before the model is built.
        model: instead of ``cfg.model``, a factory (called as the contract above says) or an
            ``nn.Module`` taken as it is (``mpips.fit``).
    """
    torch.manual_seed(seed)
    if isinstance(model, nn.Module):
        return _checked_params(model, type(model).__name__)
    if model is not None:
        return _checked_params(call_factory(model, spec, f"model {getattr(model, '__name__', model)!r}"),
                               getattr(model, "__name__", "factory"))
    if cfg.model in ("mlp", "cnn") and spec.sequence:
        raise ModelError(f"--model {cfg.model} needs one target per sample; for token sequences use --model gpt")
    if cfg.model == "mlp":
        model = MLP(spec, cfg.hidden)
    elif cfg.model == "cnn":
        if len(spec.input_shape) != 3:
            raise ModelError(f"--model cnn needs image samples (C, H, W), the dataset's are {spec.input_shape}")
        model = CNN(spec)
    elif cfg.model == "gpt":
        if not spec.sequence:
            raise ModelError("--model gpt needs a text dataset or token sequences (e.g. --dataset pytext)")
        if cfg.gpt_width % cfg.gpt_heads:
            raise ModelError(f"--gpt-width {cfg.gpt_width} must be a multiple of --gpt-heads {cfg.gpt_heads}")
        model = ByteGPT(spec.input_shape[0], cfg.gpt_layers, cfg.gpt_width, cfg.gpt_heads, spec.num_classes)
    else:
        model = _user_factory(cfg.model, spec)
    return _checked_params(model, cfg.model)


def _checked_params(model: nn.Module, name: str) -> nn.Module:
    named = list(model.named_parameters())
    if not named:
        raise ModelError(f"--model {name!r}: the model has no parameters to train")
    trainable = [(n, p) for n, p in named if p.requires_grad]
    dtypes = {p.dtype for _, p in trainable}
    if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        found = ", ".join(f"{n} ({str(p.dtype).removeprefix('torch.')})" for n, p in trainable)
        raise ModelError(f"--model {name!r}: mpips trains float32, bfloat16 or float16 parameters, all"
                         f" trainable ones of one dtype (servers keep a float32 master); these are: {found}"
                         " (call .float() or .bfloat16() on the model)")
    return model


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, name: str, where: str,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Does ``model`` accept these samples and return what the loss needs? Raises ModelError if not.

    One forward under ``torch.no_grad`` in eval mode (training mode is restored; no buffer such as
    BatchNorm's running statistics moves), then the loss the workers will compute.

    Args:
        model: the freshly built model.
        x, y: a few samples of the dataset as the workers will feed them (float32 or token ids).
        spec: the dataset's shapes, output size and task.
        name: the ``--model`` value, for the message.
        where: the dataset, for the message (its file).
        loss: the job's loss ``(output, target) -> scalar``; default: cross-entropy.
    """
    from mpips.tasks import cross_entropy

    loss = loss if loss is not None else cross_entropy
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(f"--model {name!r}: parameter {pname} holds NaN or Inf before training")
    dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    if x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)  # as the workers feed it (mpips.precision.Precision.inputs)
    what = f"{len(x)} samples of shape {tuple(x.shape[1:])} ({x.dtype}) from {where}"
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelError(f"--model {name!r} rejects {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"--model {name!r} returned {got} for {what}; the loss needs a float tensor")
    classes, task = spec.num_classes, spec.task
    if task in ("classification", "tokens"):
        want = f"({len(x)}, {classes})" if task == "classification" else f"({len(x)}, {y.shape[1]}, {classes})"
        if out.dim() < 2 or out.shape[-1] != classes or out.numel() != y.numel() * classes:
            raise ModelError(f"--model {name!r} returned shape {tuple(out.shape)} for {what}; cross-entropy over"
                             f" {classes} classes needs {want}: the last layer must have {classes} outputs")
    elif out.numel() != y.numel():
        raise ModelError(f"--model {name!r} returned shape {tuple(out.shape)} for {what}; the {task} targets"
                         f" have shape {tuple(y.shape)}: the last layer must have {classes} output(s)")
    try:
        value = loss(out.float(), y)
    except Exception as exc:
        raise ModelError(f"--model {name!r}: the loss rejects its output for {what}: {type(exc).__name__}: {exc}"
                         ) from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ModelError(f"the loss returned {got} for {what}; it must return a scalar tensor (the batch mean)")
    if not torch.isfinite(value):
        raise ModelError(f"--model {name!r}: the loss of the untrained model on {what} is {value.item()}")


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy and the number of correct predictions (per token for text)."""
    logits = logits.reshape(-1, logits.shape[-1])
    y = y.reshape(-1).long()
    return F.cross_entropy(logits, y), int((logits.argmax(-1) == y).sum())
