"""User-model factories for tests (loaded as ``--model toymodels:NAME``)."""

import os
import time

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


def raises_on_rank(input_shape, num_classes):
    """tiny_linear, except on the rank named by MPIPS_TEST_BAD_RANK: a bad input only one rank sees."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == int(os.environ.get("MPIPS_TEST_BAD_RANK", "-1")):
        raise ValueError("no weights file on this node")
    return tiny_linear(input_shape, num_classes)
