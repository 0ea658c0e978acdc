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
