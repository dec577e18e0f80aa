"""Tests of course_lib.train: the loop learns, is reproducible, and leaves frozen weights alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.modeling_outputs import SequenceClassifierOutput

from course_lib.results import read_json
from course_lib.train import History, _schedule, evaluate, set_seed, split_batch, train


def _blobs(n: int = 128, seed: int = 0) -> TensorDataset:
    """Two well separated Gaussian blobs in 2-D: a linearly separable problem."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    points = centres[labels] + 0.5 * torch.randn(n, 2, generator=generator)
    return TensorDataset(points, labels)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


def test_loss_falls_and_accuracy_is_high_on_a_separable_problem():
    set_seed(0)
    model = _model()
    loader = DataLoader(_blobs(), batch_size=16, shuffle=True)
    history = train(model, loader, eval_loader=DataLoader(_blobs(seed=1), batch_size=64), num_epochs=5, lr=1e-2, progress=False)
    assert history.train_loss[-1] < history.train_loss[0] / 3
    assert history.eval_accuracy[-1] > 0.97
    assert len(history.train_loss) == len(history.eval_loss) == len(history.epoch_seconds) == 5
    assert history.num_steps == 5 * 8 == len(history.step_losses)
    assert history.seconds_per_step > 0


def _run(seed: int) -> tuple[History, dict[str, torch.Tensor]]:
    set_seed(123)  # same initial weights
    model = _model()
    loader = DataLoader(_blobs(), batch_size=16, shuffle=True)  # order from the global RNG
    history = train(model, loader, num_epochs=2, lr=1e-2, seed=seed, progress=False)
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def test_seeded_runs_are_identical_and_other_seeds_differ():
    first, weights = _run(seed=5)
    second, weights_again = _run(seed=5)
    assert first.step_losses == second.step_losses  # dropout and shuffling replayed exactly
    for name in weights:
        assert torch.equal(weights[name], weights_again[name]), name
    third, _ = _run(seed=6)
    assert third.step_losses != first.step_losses


def test_only_trainable_parameters_change():
    set_seed(0)
    model = _model()
    model[0].requires_grad_(False)
    frozen_before = {k: v.clone() for k, v in model[0].state_dict().items()}
    trained_before = model[3].weight.clone()
    history = train(model, DataLoader(_blobs(), batch_size=16), num_epochs=1, lr=1e-2, weight_decay=0.1, progress=False)
    for name, value in model[0].state_dict().items():
        assert torch.equal(value, frozen_before[name]), name  # weight decay did not touch it either
    assert not torch.equal(model[3].weight, trained_before)
    assert history.trainable_parameters == 16 * 2 + 2 and history.total_parameters == 2 * 16 + 16 + 34


class _DictModel(nn.Module):
    """A Hugging Face-style model: keyword inputs, returns an output object with .logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.linear(features))


def _dict_batches(dataset: TensorDataset, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    return [{"features": x, "labels": y} for x, y in DataLoader(dataset, batch_size=batch_size)]


def test_dict_batches_and_hf_outputs(tmp_path):
    set_seed(0)
    model = _DictModel()
    path = tmp_path / "results" / "run.json"
    history = train(
        model, _dict_batches(_blobs()), eval_loader=_dict_batches(_blobs(seed=2)), num_epochs=6, lr=1e-1,
        scheduler="cosine", warmup_ratio=0.2, max_grad_norm=1.0, progress=False, results_path=path,
    )
    assert history.eval_accuracy[-1] > 0.95
    saved = read_json(path)
    assert saved == history.to_dict()
    assert saved["config"]["scheduler"] == "cosine" and len(saved["train_loss"]) == 6


def test_custom_loss_fn_is_used_for_training_and_evaluation():
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        inputs, labels = split_batch(batch)
        logits = model(inputs)
        # an extra penalty, as DEFT adds its density loss
        return nn.functional.cross_entropy(logits, labels) + 10.0 * logits.pow(2).mean(), logits

    set_seed(0)
    model = _model()
    loader = DataLoader(_blobs(32), batch_size=16)
    history = train(model, loader, eval_loader=loader, num_epochs=1, lr=1e-2, loss_fn=loss_fn, progress=False)
    assert calls["n"] == 2 + 2  # two training steps, two evaluation batches
    plain = evaluate(model, loader)
    assert history.eval_loss[-1] > plain["loss"]  # the penalty is in the evaluation loss


def test_evaluate_by_hand_and_restores_mode():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0], -x[:, 0]], dim=1)  # predicts class 0 when x0 > 0

    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    y = torch.tensor([0, 1, 1, 0])  # right on 0, 2, 3
    model = Fixed().train()
    metrics = evaluate(model, [(x, y)])
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    expected_loss = nn.functional.cross_entropy(model(x), y).item()
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert model.training


def test_learning_rate_schedules():
    linear = _schedule("linear", num_steps=10, warmup_steps=2)
    assert [linear(s) for s in (0, 1)] == [0.5, 1.0]
    assert linear(2) == 1.0 and linear(6) == pytest.approx(0.5) and linear(10) == 0.0
    cosine = _schedule("cosine", num_steps=10, warmup_steps=0)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert _schedule(None, 10, 0)(7) == 1.0
    with pytest.raises(ValueError, match="scheduler"):
        _schedule("step", 10, 0)


def test_bad_input_is_a_clear_error():
    model = _model()
    loader = DataLoader(_blobs(16), batch_size=8)
    with pytest.raises(ValueError, match="num_epochs"):
        train(model, loader, num_epochs=0, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(model, loader, num_epochs=1, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="'labels'"):
        split_batch({"input_ids": torch.zeros(2)})
    with pytest.raises(TypeError, match="inputs, labels"):
        split_batch((torch.zeros(2),))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, loader, num_epochs=1, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(_model(), [])


def test_set_seed_replays_all_generators():
    import random

    import numpy as np

    set_seed(42)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(42)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert not math.isnan(a[2])


def test_recalibrate_batch_norm_sets_the_plain_average_over_the_data():
    from course_lib.train import recalibrate_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    data = [(torch.randn(3) * 5 + 2, 0) for _ in range(8)]
    recalibrate_batch_norm(model, data, batch_size=4)  # two equal batches: average of batch means
    with torch.no_grad():
        hidden = model[0](torch.stack([x for x, _ in data]))  # (8, 4), brute force
    norm = model[1]
    assert torch.allclose(norm.running_mean, hidden.mean(dim=0), atol=1e-5)
    batch_vars = [hidden[i:i + 4].var(dim=0, unbiased=True) for i in (0, 4)]
    assert torch.allclose(norm.running_var, (batch_vars[0] + batch_vars[1]) / 2, atol=1e-4)
    assert not model.training and norm.momentum == 0.1
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batch_norm(torch.nn.Linear(3, 4), data)


def test_recalibrate_batch_norm_with_a_custom_forward():
    from course_lib.train import recalibrate_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    data = [{"x": torch.randn(3), "labels": 0} for _ in range(8)]
    seen = []

    def forward(m, batch):  # a model that needs its inputs by name
        seen.append(batch["x"].shape[0])
        return m(batch["x"])

    recalibrate_batch_norm(model, data, batch_size=8, forward=forward)
    with torch.no_grad():
        hidden = model[0](torch.stack([item["x"] for item in data]))
    assert seen == [8] and torch.allclose(model[1].running_mean, hidden.mean(dim=0), atol=1e-5)


def test_recalibrate_batch_norm_leaves_eval_mode_submodules_alone():
    from course_lib.train import recalibrate_batch_norm

    class WithFrozenCopy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trained = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            self.frozen = torch.nn.BatchNorm1d(3)  # kept in eval mode, like a frozen query encoder

        def train(self, mode=True):
            super().train(mode)
            self.frozen.eval()
            return self

        def forward(self, x):
            return self.trained(x) + self.frozen(x).sum()

    torch.manual_seed(0)
    model = WithFrozenCopy()
    model.frozen.running_mean.fill_(3.0)
    data = [(torch.randn(3), 0) for _ in range(8)]
    recalibrate_batch_norm(model, data, batch_size=4)
    assert torch.all(model.frozen.running_mean == 3.0)  # untouched
    assert not torch.allclose(model.trained[1].running_mean, torch.zeros(4))  # recomputed
