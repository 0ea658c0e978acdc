"""Built-in models and user factories. No MPI."""

import pytest
import torch

from mpips.config import ModelConfig
from mpips.data import EpochPlan, load_builtin
from mpips.models import DataSpec, build_model, loss_and_correct

DIGITS = DataSpec("classification", (1, 8, 8), 10)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_image_models_give_class_logits(name):
    model = build_model(ModelConfig(model=name), DIGITS, seed=0)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_same_seed_same_start():
    a = build_model(ModelConfig(), DIGITS, seed=3).state_dict()
    b = build_model(ModelConfig(), DIGITS, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gpt_predicts_next_bytes():
    spec = DataSpec("text", (16,), 256)
    model = build_model(ModelConfig(model="gpt", gpt_layers=1, gpt_width=32, gpt_heads=2, gpt_context=16), spec, 0)
    ids = torch.randint(0, 256, (3, 16))
    logits = model(ids)
    assert logits.shape == (3, 16, 256)
    loss, correct = loss_and_correct(logits, ids)
    assert loss.item() > 0 and 0 <= correct <= 48
    # causal: changing a later byte does not change earlier logits
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 256
    torch.testing.assert_close(model(ids2)[:, :-1], logits[:, :-1])


def test_user_factory(monkeypatch):
    model = build_model(ModelConfig(model="toymodels:tiny_linear"), DIGITS, seed=0)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("bad, message", [("nomodule:f", "cannot load factory"), ("toymodels", "expected mlp")])
def test_bad_model_name(bad, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(model=bad), DIGITS, seed=0)


def test_builtin_digits_and_split():
    d = load_builtin("digits")
    assert d["x"].shape == (1797, 1, 8, 8) and set(d["y"]) == set(range(10))
    assert len(set(d["train_ids"]) & set(d["val_ids"])) == 0
    assert len(d["train_ids"]) + len(d["val_ids"]) == 1797


def test_epoch_plan_contract():
    plan = EpochPlan(samples=10, workers=2, batch_size=3, seed=1)
    assert plan.steps_per_epoch == 2
    epoch = [plan.worker_ids(0, s, w) for s in range(2) for w in range(2)]
    assert sorted(i for ids in epoch for i in ids) == list(range(10))  # exactly once
    assert [len(x) for x in epoch] == [3, 3, 2, 2]
    # the global batch of a step is the same whatever the number of workers
    one = EpochPlan(samples=10, workers=1, batch_size=6, seed=1)
    assert list(one.global_ids(0, 0)) == list(plan.global_ids(0, 0))
    assert list(plan.order(1)) != list(plan.order(0))
