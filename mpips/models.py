"""Built-in models and loading a user's model from ``package.module:factory``. Pure torch."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpips.config import ModelConfig

__all__ = ["ByteGPT", "DataSpec", "build_model", "loss_and_correct"]


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: sample shape and number of classes.

    For text, ``input_shape`` is ``(context,)`` of byte ids and ``num_classes`` is 256.
    """

    kind: str  # "classification" | "text"
    input_shape: tuple[int, ...]
    num_classes: int


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


def _user_factory(path: str, spec: DataSpec) -> nn.Module:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {path!r}: expected mlp, cnn, gpt or package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {path!r}: cannot load factory: {exc}") from exc
    offered = {"input_shape": spec.input_shape, "num_classes": spec.num_classes}
    params = inspect.signature(factory).parameters
    model = factory(**{k: v for k, v in offered.items() if k in params})
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {path!r}: factory returned {type(model).__name__}, not nn.Module")
    return model


def build_model(cfg: ModelConfig, spec: DataSpec, seed: int) -> nn.Module:
    """Build the model with parameters initialised from ``seed`` (same seed, same start)."""
    torch.manual_seed(seed)
    if cfg.model == "mlp":
        model = MLP(spec, cfg.hidden)
    elif cfg.model == "cnn":
        model = CNN(spec)
    elif cfg.model == "gpt":
        if spec.kind != "text":
            raise ValueError("--model gpt needs a text dataset (e.g. --dataset pytext)")
        model = ByteGPT(spec.input_shape[0], cfg.gpt_layers, cfg.gpt_width, cfg.gpt_heads)
    else:
        model = _user_factory(cfg.model, spec)
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise ValueError(f"mpips trains float32 parameters; these are not: {', '.join(bad)}")
    return model


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy and the number of correct predictions (per token for text)."""
    logits = logits.reshape(-1, logits.shape[-1])
    y = y.reshape(-1).long()
    return F.cross_entropy(logits, y), int((logits.argmax(-1) == y).sum())
