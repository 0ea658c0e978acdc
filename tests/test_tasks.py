"""Losses and held-out metrics by task (mpips.tasks): pure torch, checked against numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpips.tasks import LOSSES, LossError, TaskMetrics, default_loss, resolve_loss


def test_builtin_losses_are_torchs_and_fit_a_single_output_to_scalar_targets():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(8, 1, generator=g), torch.randn(8, generator=g)
    assert torch.equal(LOSSES["mse"](out, y), F.mse_loss(out[:, 0], y))
    assert torch.equal(LOSSES["huber"](out, y), F.smooth_l1_loss(out[:, 0], y))  # delta 1 = beta 1
    logits, labels = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.5).float()
    assert torch.equal(LOSSES["bce"](logits, labels), F.binary_cross_entropy_with_logits(logits, labels))
    tok = torch.randn(2, 3, 7, generator=g)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    assert torch.allclose(LOSSES["next_token"](tok, ids), F.cross_entropy(tok.transpose(1, 2), ids))
    with pytest.raises(ValueError, match=r"mse: output of shape \(8, 2\) does not match targets of shape \(8,\)"):
        LOSSES["mse"](torch.zeros(8, 2), y)


def test_loss_names_resolve_by_task_and_from_a_module():
    assert [default_loss(t) for t in ("classification", "regression", "multilabel", "tokens")] == [
        "cross_entropy", "mse", "bce", "next_token"]
    assert resolve_loss("auto", "regression") is LOSSES["mse"]
    fn = resolve_loss("toymodels:half_squared_error", "regression")
    assert float(fn(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(1.25)
    mine = lambda out, y: out.sum()  # noqa: E731 - a callable is taken as it is
    assert resolve_loss(mine, "classification") is mine
    with pytest.raises(LossError, match=r"--loss 'l1': expected one of auto, cross_entropy, mse, huber, bce"):
        resolve_loss("l1", "regression")
    with pytest.raises(LossError, match=r"cannot import nosuch_pkg.mod: ModuleNotFoundError"):
        resolve_loss("nosuch_pkg.mod:fn", "regression")
    with pytest.raises(LossError, match=r"module toymodels \(.*toymodels.py\) has no 'nope'"):
        resolve_loss("toymodels:nope", "regression")


def _batches(n, size):
    return [slice(i, i + size) for i in range(0, n, size)]


def test_regression_metrics_over_batches_equal_numpy_over_all_samples():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((50, 2)) * [1.0, 10.0] + [0.0, 5.0]
    pred = y + rng.standard_normal((50, 2)) * 0.3
    m = TaskMetrics("regression")
    for s in _batches(50, 16):  # 16, 16, 16, 2
        out, t = torch.from_numpy(pred[s]).float(), torch.from_numpy(y[s]).float()
        m.update(out, t, F.mse_loss(out, t))
    r = m.result()
    sse = ((pred - y) ** 2).sum()
    assert r["mse"] == pytest.approx(sse / y.size, rel=1e-5)
    assert r["mae"] == pytest.approx(np.abs(pred - y).mean(), rel=1e-5)
    assert r["r2"] == pytest.approx(1 - sse / ((y - y.mean(0)) ** 2).sum(), rel=1e-5)
    assert r["loss"] == pytest.approx(r["mse"], rel=1e-5)
    assert TaskMetrics("regression").result() is None


def test_classification_multilabel_and_token_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    m = TaskMetrics("classification")
    m.update(logits, torch.tensor([0, 0, 0]), torch.tensor(0.7))
    assert m.result() == pytest.approx({"loss": 0.7, "accuracy": 2 / 3})
    m = TaskMetrics("multilabel")  # tp 2, fp 1, fn 1 -> micro-F1 = 4 / 6
    m.update(torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, -0.1]]), torch.tensor([[1, 1, 1], [0, 0, 0]]), 0.0)
    assert m.result()["f1"] == pytest.approx(4 / 6)
    g = torch.Generator().manual_seed(0)
    tok, ids = torch.randn(3, 4, 9, generator=g), torch.randint(0, 9, (3, 4), generator=g)
    m = TaskMetrics("tokens")
    m.update(tok[:2], ids[:2], LOSSES["next_token"](tok[:2], ids[:2]))
    m.update(tok[2:], ids[2:], LOSSES["next_token"](tok[2:], ids[2:]))
    ce = float(F.cross_entropy(tok.reshape(-1, 9), ids.reshape(-1)))
    r = m.result()
    assert r["perplexity"] == pytest.approx(math.exp(ce), rel=1e-6) and r["loss"] == pytest.approx(ce, rel=1e-6)
    assert TaskMetrics.names("tokens") == tuple(r)
