"""Server-side optimizers are torch.optim's; a sharded update equals the whole-model update."""

import pytest
import torch

from mpips.config import OptimConfig
from mpips.optim import build_optimizer, lr_factor


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_two_shards_update_like_one_vector(kind):
    """SGD variants bitwise; Adam/AdamW (fused) to float32 rounding, and bitwise for one layout."""
    cfg = OptimConfig(optimizer=kind, lr=0.1, weight_decay=0.01)
    torch.manual_seed(0)
    start = torch.randn(1003)
    whole = start.clone()
    halves = [start[:401].clone(), start[401:].clone()]
    again = [start[:401].clone(), start[401:].clone()]
    opt_whole = build_optimizer([whole], cfg)
    opts = [build_optimizer([h], cfg) for h in halves]
    opts_again = [build_optimizer([h], cfg) for h in again]
    for _ in range(5):
        g = torch.randn(1003)
        whole.grad = g.clone()
        opt_whole.step()
        for shards, optimizers in ((halves, opts), (again, opts_again)):
            for h, o, part in zip(shards, optimizers, (g[:401], g[401:]), strict=True):
                h.grad = part.clone()
                o.step()
    exact = kind not in ("adam", "adamw")
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
    assert torch.equal(torch.cat(halves), torch.cat(again))  # the same layout: bitwise repeatable
    assert not torch.equal(whole, start)


def test_adam_steps_allocate_no_shard_sized_temporaries():
    """A server's first Adam step adds its state (8 bytes per parameter) and nothing else: the
    single-tensor loop also allocated sqrt(v) and the quotient (8 more), in every step."""
    n = 4_000_000
    p = torch.zeros(n, requires_grad=True)
    p.grad = torch.full_like(p, 1e-3)
    opt = build_optimizer([p], OptimConfig(optimizer="adam", lr=1e-3))
    _reset_peak()
    before = _peak_rss()
    opt.step()
    assert (_peak_rss() - before) / n < 10


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the current resident size


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
