"""A user model with one parameter of 2**29 + 16 float32 (2 GiB + 64 bytes), for ``--dry-run`` tests.

Loaded as ``--model bigmodels:over_2gib``. Its parameter is ``torch.empty``: a dry run never
touches the pages, so building it costs address space, not memory.
"""

import torch
from torch import nn

BIG = 2**29 + 16


class OverTwoGiB(nn.Module):
    def __init__(self, inputs: int, num_classes: int):
        super().__init__()
        self.table = nn.Parameter(torch.empty(BIG))
        self.head = nn.Linear(inputs, num_classes)

    def forward(self, x):
        return self.head(x.flatten(1)) + self.table[:1]


def over_2gib(input_shape, num_classes):
    n = 1
    for d in input_shape:
        n *= d
    return OverTwoGiB(n, num_classes)
