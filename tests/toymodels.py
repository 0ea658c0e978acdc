"""User-model factories for tests (loaded as ``--model toymodels:NAME``)."""

import math
import os
import time

import torch
from torch import nn


def tiny_linear(input_shape, num_classes):
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, num_classes))


class _Slow(nn.Sequential):
    def forward(self, x):
        time.sleep(float(os.environ.get("MPIPS_TEST_SLOW_SECONDS", "0.02")))
        return super().forward(x)


def slow_on_rank(input_shape, num_classes):
    """A linear model whose forward sleeps on the rank named by MPIPS_TEST_SLOW_RANK."""
    from mpi4py import MPI

    n = 1
    for d in input_shape:
        n *= d
    slow = MPI.COMM_WORLD.Get_rank() == int(os.environ.get("MPIPS_TEST_SLOW_RANK", "-1"))
    cls = _Slow if slow else nn.Sequential
    return cls(nn.Flatten(), nn.Linear(n, num_classes))


class _Awkward(nn.Module):
    """What real models do that a plain MLP does not: a frozen layer, a submodule the forward
    never calls (its parameters get no gradient), a tied weight and, optionally, BatchNorm buffers."""

    def __init__(self, n: int, num_classes: int, batchnorm: bool):
        super().__init__()
        self.frozen = nn.Linear(n, 24).requires_grad_(False)
        self.norm = nn.BatchNorm1d(24) if batchnorm else nn.Identity()
        self.unused = nn.Linear(24, 24)
        self.mid, self.tied = nn.Linear(24, 24), nn.Linear(24, 24)
        self.tied.weight = self.mid.weight  # one parameter used twice (weight tying)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        h = self.norm(self.frozen(x.flatten(1))).relu()
        return self.head(self.tied(self.mid(h).relu()).relu())


def frozen_and_unused(input_shape, num_classes):
    """A frozen first layer and a never-called submodule (no buffers)."""
    n = 1
    for d in input_shape:
        n *= d
    return _Awkward(n, num_classes, batchnorm=False)


def frozen_unused_batchnorm(input_shape, num_classes):
    """``frozen_and_unused`` with BatchNorm1d after the frozen layer (running stats as buffers)."""
    n = 1
    for d in input_shape:
        n *= d
    return _Awkward(n, num_classes, batchnorm=True)


# -- broken factories, for the start-up checks (each a mistake a user makes) ----------------------
def raises(input_shape, num_classes):
    raise RuntimeError("out of ideas")


def returns_int(num_classes):
    return num_classes


def wrong_width(input_shape):
    """A linear model with 7 outputs, whatever the number of classes."""
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 7))


def wrong_input(num_classes):
    """Expects 32 features; the digits have 64."""
    return nn.Sequential(nn.Flatten(), nn.Linear(32, num_classes))


def float64(input_shape, num_classes):
    return tiny_linear(input_shape, num_classes).double()


def mixed_dtypes(input_shape, num_classes):
    model = tiny_linear(input_shape, num_classes)
    model[1].weight.data = model[1].weight.data.bfloat16()
    return model


def bf16_mlp(input_shape, num_classes):
    """The default MLP's shape (hidden 128) with bfloat16 parameters."""
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, num_classes)).bfloat16()


def fp16_linear(input_shape, num_classes):
    return tiny_linear(input_shape, num_classes).half()


def raises_on_rank(input_shape, num_classes):
    """tiny_linear, except on the rank named by MPIPS_TEST_BAD_RANK: a bad input only one rank sees."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == int(os.environ.get("MPIPS_TEST_BAD_RANK", "-1")):
        raise ValueError("no weights file on this node")
    return tiny_linear(input_shape, num_classes)


class _Loud(nn.Sequential):
    """Inputs scaled by 30: under fp16 autocast the first few scaled gradients overflow."""

    def forward(self, x):
        return super().forward(x * 30.0)


def fp16_overflow(input_shape, num_classes):
    n = 1
    for d in input_shape:
        n *= d
    return _Loud(nn.Flatten(), nn.Linear(n, num_classes))


def half_squared_error(output, target):
    """A user's loss (``--loss toymodels:half_squared_error``): half the mean squared error."""
    return 0.5 * ((output.reshape(target.shape) - target) ** 2).mean()


class _ReadsAhead(nn.Module):
    """Reads ``head``'s parameters without calling ``head``: pull-ahead cannot see that use. With
    buckets of 4096 elements ``head`` is in a later bucket than anything forward waits for."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.body = nn.Linear(features, 64)
        self.spare = nn.Linear(64, 64)  # never used: only puts head two buckets further
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.body(x.flatten(1))), self.head.weight, self.head.bias)


def reads_ahead(input_shape, num_classes):
    return _ReadsAhead(math.prod(input_shape), num_classes)
