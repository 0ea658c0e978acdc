"""Built-in models and user factories. No MPI."""

import pytest
import torch

from mpips.config import ModelConfig
from mpips.data import EpochPlan, load_builtin
from mpips.models import DataSpec, ModelError, build_model, check_model, loss_and_correct

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


def test_user_factory():
    model = build_model(ModelConfig(model="toymodels:tiny_linear"), DIGITS, seed=0)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("nomodule:f", r"^--model 'nomodule:f': cannot import nomodule: ModuleNotFoundError: No module named"
                       r" 'nomodule' \(is its folder on PYTHONPATH on every node\?\)$"),
        ("toymodels", r"^--model 'toymodels': expected mlp, cnn, gpt or package.module:factory$"),
        ("toymodels:nothing", r"^--model 'toymodels:nothing': module toymodels \(.*toymodels.py\) has no 'nothing'$"),
        ("toymodels:raises", r"^--model 'toymodels:raises': raises\(input_shape=\(1, 8, 8\), num_classes=10\)"
                             r" raised RuntimeError: out of ideas$"),
        ("toymodels:returns_int", r"^--model 'toymodels:returns_int': returns_int\(num_classes=10\) returned int,"
                                  r" not a torch.nn.Module$"),
        ("toymodels:float64", r"^--model 'toymodels:float64': mpips trains float32, bfloat16 or float16"
                              r" parameters, all trainable ones of one dtype \(servers keep a float32 master\);"
                              r" these are: 1.weight \(float64\), 1.bias \(float64\) \(call .float\(\)"),
        ("toymodels:mixed_dtypes", r"^--model 'toymodels:mixed_dtypes': mpips trains float32, bfloat16 or float16"
                                   r" parameters, all trainable ones of one dtype .*: 1.weight \(bfloat16\),"
                                   r" 1.bias \(float32\)"),
        ("gpt", r"^--model gpt needs a text dataset"),
    ],
)
def test_bad_model_is_one_model_error(bad, message):
    """Each mistake a user makes with --model is a ModelError whose one line says which and why."""
    with pytest.raises(ModelError, match=message) as info:
        build_model(ModelConfig(model=bad), DIGITS, seed=0)
    assert "\n" not in str(info.value)


def test_factory_gets_only_the_keywords_it_names(monkeypatch):
    import toymodels

    seen = []

    def factory(num_classes, hidden=5):
        seen.append((num_classes, hidden))
        return toymodels.tiny_linear((1, 8, 8), num_classes)

    monkeypatch.setattr(toymodels, "only_classes", factory, raising=False)
    build_model(ModelConfig(model="toymodels:only_classes"), DIGITS, seed=0)
    assert seen == [(10, 5)]


def _model(name, spec=DIGITS):
    return build_model(ModelConfig(model=name), spec, seed=0)


def test_check_model_accepts_models_that_fit():
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    for name in ("mlp", "cnn", "toymodels:tiny_linear"):
        check_model(_model(name), x, y, DIGITS, name, "digits.h5")
    text = DataSpec("text", (16,), 256)
    gpt = build_model(ModelConfig(model="gpt", gpt_layers=1, gpt_width=32, gpt_heads=2, gpt_context=16), text, 0)
    ids = torch.randint(0, 256, (2, 16))
    check_model(gpt, ids, ids, text, "gpt", "pytext.h5")


@pytest.mark.parametrize(
    "name, message",
    [
        ("toymodels:wrong_width", r"^--model 'toymodels:wrong_width' returned shape \(2, 7\) for 2 samples of shape"
                                  r" \(1, 8, 8\) \(torch.float32\) from digits.h5; cross-entropy over 10 classes"
                                  r" needs \(2, 10\): the last layer must have 10 outputs$"),
        ("toymodels:wrong_input", r"^--model 'toymodels:wrong_input' rejects 2 samples of shape \(1, 8, 8\)"
                                  r" \(torch.float32\) from digits.h5: RuntimeError: mat1 and mat2 shapes"),
    ],
)
def test_check_model_names_what_does_not_fit(name, message):
    model = _model(name)
    with pytest.raises(ModelError, match=message):
        check_model(model, torch.randn(2, 1, 8, 8), torch.tensor([3, 9]), DIGITS, name, "digits.h5")
    assert model.training  # the check leaves the model in training mode


def test_check_model_refuses_non_finite_parameters_and_keeps_buffers():
    model = _model("mlp")
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"parameter 1.weight holds NaN or Inf before training"):
        check_model(model, torch.randn(2, 1, 8, 8), torch.tensor([3, 9]), DIGITS, "mlp", "digits.h5")
    bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 10))
    check_model(bn, torch.randn(2, 1, 8, 8), torch.tensor([3, 9]), DIGITS, "bn", "digits.h5")
    assert int(bn[1].num_batches_tracked) == 0 and torch.equal(bn[1].running_mean, torch.zeros(64))


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


def test_check_model_follows_the_task_and_the_loss():
    from mpips.tasks import LOSSES

    reg = DataSpec("regression", (3,), 1)
    x, y = torch.zeros(2, 3), torch.zeros(2)
    check_model(torch.nn.Linear(3, 1), x, y, reg, "lin", "f.h5", LOSSES["mse"])  # (2, 1) output for (2,) targets
    with pytest.raises(ModelError, match=r"returned shape \(2, 2\) for 2 samples .* the regression targets have"
                       r" shape \(2,\): the last layer must have 1 output"):
        check_model(torch.nn.Linear(3, 2), x, y, reg, "lin", "f.h5", LOSSES["mse"])
    with pytest.raises(ModelError, match=r"the loss returned shape \(2, 1\) .* it must return a scalar tensor"):
        check_model(torch.nn.Linear(3, 1), x, y, reg, "lin", "f.h5", lambda out, t: out)
    tokens = DataSpec("tokens", (5,), 11, (5,))
    gpt = build_model(ModelConfig(model="gpt", gpt_width=16, gpt_heads=2, gpt_layers=1, gpt_context=5), tokens, 0)
    ids = torch.randint(0, 11, (2, 5))
    check_model(gpt, ids, ids, tokens, "gpt", "t.h5", LOSSES["next_token"])  # a vocabulary of 11
    assert gpt(ids).shape == (2, 5, 11)
