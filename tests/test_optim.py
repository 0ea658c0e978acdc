"""Server-side optimizers are torch.optim's; a sharded update equals the whole-model update."""

import pytest
import torch

from mpips.config import OptimConfig
from mpips.optim import build_optimizer, lr_factor


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_two_shards_update_like_one_vector(kind):
    cfg = OptimConfig(optimizer=kind, lr=0.1, weight_decay=0.01)
    torch.manual_seed(0)
    whole = torch.randn(10)
    halves = [whole[:4].clone(), whole[4:].clone()]
    opt_whole = build_optimizer([whole], cfg)
    opts = [build_optimizer([h], cfg) for h in halves]
    for _ in range(5):
        g = torch.randn(10)
        whole.grad = g.clone()
        opt_whole.step()
        for h, o, part in zip(halves, opts, (g[:4], g[4:]), strict=True):
            h.grad = part.clone()
            o.step()
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)


def test_schedules():
    cfg = OptimConfig(warmup_steps=4, lr_schedule="cosine")
    assert [lr_factor(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg, 104) == 1.0
    assert lr_factor(54, cfg, 104) == pytest.approx(0.5)
    assert lr_factor(104, cfg, 104) == pytest.approx(0.0)
    step = OptimConfig(lr_schedule="step", step_size=10, gamma=0.5)
    assert [lr_factor(s, step, 100) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


def test_sum_of_squares_is_the_float64_sum_whatever_the_block():
    import numpy as np

    from mpips.optim import sum_of_squares

    x = np.random.default_rng(0).standard_normal(10_007).astype(np.float32) * 1e3
    want = float(np.sum(x.astype(np.float64) ** 2))
    for block in (1, 1000, 1 << 20):
        assert sum_of_squares(x, block) == pytest.approx(want, rel=1e-12)
    assert sum_of_squares(np.zeros(0, np.float32)) == 0.0
