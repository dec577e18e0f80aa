"""Tests of DEFT's three density measures, its recipes and the sparsified activations.

Expected values are counted by hand on hand-made tensors, or computed with plain torch
operations written out in the test, never read back from the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deft import (
    COURSE_RECIPE,
    PAPER_PROTOCOL,
    DEFTLoss,
    SparseActivation,
    SparsityConfig,
    calibrate_thresholds,
    measure_density,
    measure_density_by_position,
    paper_protocol,
    second_projection_name,
    sparsify_activations,
)
from course_lib.train import train


class Passthrough(nn.Module):
    """Feeds a fixed (B, T, H) tensor through a module named like BERT's activation."""

    def __init__(self, activation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("activation", activation)
        self.intermediate = nn.Module()
        self.intermediate.intermediate_act_fn = nn.Identity()
        self.anchor = nn.Linear(1, 1)  # a parameter, so the meter can find the device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.intermediate.intermediate_act_fn(self.activation)


def test_three_measures_on_a_hand_made_padded_batch():
    # 2 sentences x 4 positions x 2 units; sentence 0 has 3 real tokens, sentence 1 has 2
    activation = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.0], [2.0, 3.0], [0.0, 5.0]],  # real: 3 non-zeros of 6; padding: 1 of 2
            [[0.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # real: 1 of 4; padding: 0 of 4
        ]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    measures = measure_density_by_position(Passthrough(activation), [batch])
    assert measures.real == pytest.approx(4 / 10)
    assert measures.padding == pytest.approx(1 / 6)
    assert measures.all == pytest.approx(5 / 16)
    assert measures.padding_share == pytest.approx(3 / 8)
    assert measures.as_dict() == {"all": measures.all, "real": measures.real, "padding": measures.padding}
    # the same figures as the single-measure meter gives with and without the mask
    assert measure_density(Passthrough(activation), [batch], mask_padding=True).mean == pytest.approx(measures.real)
    assert measure_density(Passthrough(activation), [batch], mask_padding=False).mean == pytest.approx(measures.all)
    # a threshold counts |a| > tau
    assert measure_density_by_position(Passthrough(activation), [batch], threshold=2.5).real == pytest.approx(2 / 10)


def test_three_measures_without_padding_and_errors():
    activation = torch.ones(1, 3, 2)
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    measures = measure_density_by_position(Passthrough(activation), [batch])
    assert measures.padding is None and measures.real == 1.0 == measures.all
    with pytest.raises(ValueError, match="no batches"):
        measure_density_by_position(Passthrough(activation), [])
    with pytest.raises(ValueError, match="threshold"):
        measure_density_by_position(Passthrough(activation), [batch], threshold=-1.0)
    with pytest.raises(ValueError, match="matches"):
        measure_density_by_position(Passthrough(activation), [batch], module_pattern=r"nothing_here$")


def test_sparse_activation_really_zeroes_in_forward():
    z = torch.linspace(-3, 3, 61, requires_grad=True)
    thresholded = SparseActivation(nn.GELU(), "threshold", 0.5)
    a = thresholded(z)
    gelu = F.gelu(z)
    expected = torch.where(gelu.abs() > 0.5, gelu, torch.zeros_like(gelu))
    assert torch.equal(a, expected)
    assert (a == 0).sum() > 0
    a.sum().backward()  # the kept units get GELU's gradient, the zeroed ones none
    kept = gelu.abs() > 0.5
    assert torch.all(z.grad[~kept] == 0) and torch.all(z.grad[kept] != 0)
    shifted = SparseActivation(nn.GELU(), "relu", 1.0)
    assert torch.equal(shifted(z.detach()), torch.clamp(z.detach() - 1.0, min=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        SparseActivation(nn.GELU(), "threshold", -0.1)
    with pytest.raises(ValueError, match="kind"):
        SparseActivation(nn.GELU(), "topk", 0.1)


class TinyMLPModel(nn.Module):
    """Embedding -> [fc1 -> GELU -> fc2] x 2 (BERT-like names) -> mean -> logits."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 32, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.intermediate = nn.Module()
            block.intermediate.dense = nn.Linear(dim, hidden)
            block.intermediate.intermediate_act_fn = nn.GELU()
            block.output = nn.Module()
            block.output.dense = nn.Linear(hidden, dim)
            self.layer.append(block)
        self.classifier = nn.Linear(dim, classes)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        for block in self.layer:
            x = x + block.output.dense(block.intermediate.intermediate_act_fn(block.intermediate.dense(x)))
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.hidden(input_ids).mean(dim=1))


def batches(num: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, 20, (8, 6), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones(8, 6, dtype=torch.long),
                    "labels": ids[:, 0] % 3})
    return out


def test_second_projection_names():
    assert second_projection_name("bert.encoder.layer.3.intermediate.intermediate_act_fn") == "bert.encoder.layer.3.output.dense"
    assert second_projection_name("blocks.0.mlp.activation") == "blocks.0.mlp.fc2"
    with pytest.raises(ValueError, match="second_projection="):
        second_projection_name("layers.0.act")


def test_threshold_calibration_hits_the_target_density_and_bias_correction_keeps_the_mean():
    data = batches()
    model = TinyMLPModel()
    reference = copy.deepcopy(model)
    # layer 0 calibrated on the unchanged model: tau is the 80th percentile of |GELU(z)|, written out here
    with torch.no_grad():
        z0 = torch.cat([model.layer[0].intermediate.dense(model.embed(b["input_ids"])).reshape(-1, 32) for b in data])
    expected_tau0 = torch.quantile(F.gelu(z0).abs().flatten(), 0.8).item()
    taus = calibrate_thresholds(model, data, 80.0)
    assert taus["layer.0.intermediate.intermediate_act_fn"] == pytest.approx(expected_tau0, rel=1e-6)

    report = sparsify_activations(model, data, SparsityConfig("threshold", target_density=0.2))
    assert report.thresholds["layer.0.intermediate.intermediate_act_fn"] == pytest.approx(expected_tau0, rel=1e-6)
    assert isinstance(model.layer[0].intermediate.intermediate_act_fn, SparseActivation)
    for value in report.calibration_density.values():
        assert value == pytest.approx(0.2, abs=0.01)
    # bias correction, layer 0: b2' = b2 + W2 mean(GELU(z) - sparse(z)), so the mean output is unchanged
    sparse0 = model.layer[0].intermediate.intermediate_act_fn
    with torch.no_grad():
        dense_out = reference.layer[0].output.dense(F.gelu(z0)).mean(0)
        sparse_out = model.layer[0].output.dense(sparse0(z0)).mean(0)
    assert torch.allclose(dense_out, sparse_out, atol=1e-5)
    # the forward really has exact zeros: measured density near the target
    density = measure_density(model, data, mask_padding=True).mean
    assert 0.1 < density < 0.3
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify_activations(model, data, SparsityConfig("threshold", target_density=0.2))


def test_bias_correction_brings_the_sparse_model_closer_to_the_dense_one():
    data = batches()
    dense = TinyMLPModel()
    corrected, uncorrected = copy.deepcopy(dense), copy.deepcopy(dense)
    sparsify_activations(corrected, data, SparsityConfig("relu", target_density=None))
    sparsify_activations(uncorrected, data, SparsityConfig("relu", target_density=None, correct_bias=False))
    with torch.no_grad():
        ids = torch.cat([b["input_ids"] for b in data])
        reference = dense.hidden(ids)
        error = lambda m: (m.hidden(ids) - reference).norm() / reference.norm()  # noqa: E731
        assert error(corrected) < error(uncorrected)


def test_relu_fied_model_trains_with_and_without_the_density_loss():
    data = batches(num=6)
    for loss_fn in (None, DEFTLoss(weight=0.1)):
        model = TinyMLPModel()
        report = sparsify_activations(model, data, SparsityConfig("relu", target_density=None))
        assert all(tau == 0.0 for tau in report.thresholds.values())  # plain ReLU
        before = [p.detach().clone() for p in model.parameters()]
        history = train(model, data, num_epochs=10, lr=1e-2, loss_fn=loss_fn, progress=False)
        assert history.train_loss[-1] < history.train_loss[0]  # mean loss of the last epoch vs the first
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert measure_density(model, data, mask_padding=True).mean < 1.0  # exact zeros exist


def test_sparsify_errors():
    data = batches()
    with pytest.raises(ValueError, match="empty"):
        sparsify_activations(TinyMLPModel(), [], SparsityConfig())
    with pytest.raises(ValueError, match="matches"):
        sparsify_activations(TinyMLPModel(), data, SparsityConfig(module_pattern=r"no_such_module$"))
    with pytest.raises(ValueError, match="percentile"):
        calibrate_thresholds(TinyMLPModel(), data, 100.0)
    with pytest.raises(ValueError, match="percentile"):
        calibrate_thresholds(TinyMLPModel(), data, 0.0)
    with pytest.raises(ValueError, match="empty"):
        calibrate_thresholds(TinyMLPModel(), [], 50.0)
    with pytest.raises(ValueError, match="target_density"):
        SparsityConfig("threshold", target_density=None)
    with pytest.raises(ValueError, match="target_density"):
        SparsityConfig("threshold", target_density=1.5)
    with pytest.raises(ValueError, match="kind"):
        SparsityConfig("topk")


def test_recipes_are_the_official_and_course_settings():
    assert PAPER_PROTOCOL.pad_to_max_length and PAPER_PROTOCOL.max_length == 128 and not PAPER_PROTOCOL.mask_padding
    assert PAPER_PROTOCOL.eps == 1e-7 and PAPER_PROTOCOL.weight == 1.0 and PAPER_PROTOCOL.warmup_ratio == 0.06
    assert set(PAPER_PROTOCOL.lr.values()) == {3e-4}
    assert dict(PAPER_PROTOCOL.methods["lora"]) == {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}
    assert PAPER_PROTOCOL.methods["adapter"]["reduction_factor"] == 16
    assert PAPER_PROTOCOL.methods["prefix"]["num_virtual_tokens"] == 60
    assert COURSE_RECIPE.mask_padding and not COURSE_RECIPE.pad_to_max_length
    assert paper_protocol(num_epochs=3).num_epochs == 3 and PAPER_PROTOCOL.num_epochs == 2
    assert PAPER_PROTOCOL.loss(0.0) is None
    loss = PAPER_PROTOCOL.loss()
    assert isinstance(loss, DEFTLoss) and not loss.mask_padding and loss.weight == 1.0
    with pytest.raises(ValueError, match="same methods"):
        paper_protocol(lr={"lora": 1e-3})
    with pytest.raises(TypeError):
        PAPER_PROTOCOL.methods["lora"]["r"] = 4  # frozen


def test_paper_protocol_loader_pads_every_batch_to_128():
    from course_lib.text import load_tokenizer, make_sentiment_task

    task = make_sentiment_task(8, 4, 4, seed=0)
    tokenizer = load_tokenizer()
    padded = next(iter(PAPER_PROTOCOL.loader(task.train, tokenizer)))
    assert padded["input_ids"].shape[1] == 128
    assert padded["attention_mask"].sum() < padded["attention_mask"].numel()
    unpadded = next(iter(COURSE_RECIPE.loader(task.train, tokenizer)))
    assert unpadded["input_ids"].shape[1] == int(unpadded["attention_mask"].sum(dim=1).max())
