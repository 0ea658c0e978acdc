"""Delay compensation (``mpips.delay``, DC-ASGD-a): the math against its formula, no MPI."""

import numpy as np
import pytest
import torch

from mpips.delay import DelayCompensation


def test_a_fresh_gradient_is_left_alone_and_a_stale_one_moves_by_the_taylor_term():
    dc = DelayCompensation(3, lam=2.0, keep=4, momentum=0.5, eps=0.0)
    w0, w1 = np.array([1.0, 2.0, 3.0], np.float32), np.array([1.5, 2.0, 2.0], np.float32)
    dc.record(0, w0)
    g = torch.tensor([1.0, -2.0, 0.5])
    fresh = g.clone()
    dc.compensate(fresh, applied_seen=0, applied=0)  # computed at the newest version: nothing to correct
    assert torch.equal(fresh, g) and dc.compensated == 1
    dc.record(1, w1)
    stale = g.clone()
    dc.compensate(stale, applied_seen=0, applied=1)
    ms = 0.5 * g * g + 0.5 * g * g  # the running mean square after two gradients
    expected = g + 2.0 / ms.sqrt() * g * g * torch.from_numpy(w1 - w0)
    torch.testing.assert_close(stale, expected)
    assert stale[1] == g[1]  # no change in that coordinate, no correction


def test_a_push_older_than_the_ring_uses_the_oldest_version_kept():
    dc = DelayCompensation(1, lam=1.0, keep=2, eps=0.0)
    for applied, value in enumerate([0.0, 1.0, 3.0]):
        dc.record(applied, np.array([value], np.float32))
    g = torch.tensor([1.0])
    dc.compensate(g, applied_seen=0, applied=2)  # version 0 is gone: version 1 (w = 1) stands in
    assert dc.beyond == 1
    torch.testing.assert_close(g, torch.tensor([1.0 + 1.0 * 1.0 * (3.0 - 1.0)]))


def test_keep_must_hold_a_version():
    with pytest.raises(ValueError, match="keep"):
        DelayCompensation(4, lam=1.0, keep=0)


def test_implicit_momentum_comes_off_adams_beta1_and_sgds_momentum_only_when_asked():
    from mpips.config import parse_args
    from mpips.optim import build_optimizer

    p = [torch.zeros(2, requires_grad=True)]
    adam = parse_args(["--sync", "asp", "--implicit-momentum"]).optim
    assert build_optimizer(p, adam).defaults["betas"] == (0.9, 0.999)  # the default path: torch's own
    beta1 = build_optimizer(p, adam, implicit=1 - 1 / 3).defaults["betas"][0]
    assert beta1 == pytest.approx(0.9 - 2 / 3)
    assert build_optimizer(p, adam, implicit=0.95).defaults["betas"][0] == 0.0
    sgd = parse_args(["--sync", "ssp", "--optimizer", "momentum", "--momentum", "0.9"]).optim
    assert build_optimizer(p, sgd, implicit=0.5).defaults["momentum"] == pytest.approx(0.4)
    # off by default: the look-ahead (--lookahead) pays more with Adam's own beta1 (bench straggler)
    assert not parse_args([]).optim.implicit_momentum and parse_args(["--implicit-momentum"]).optim.implicit_momentum
