"""Tests of the sparse forward of a sparsified model: every W2 kernel, and the gather kernel alone.

The model is a tiny random BERT (2 layers, 32 wide, 128 hidden units), sparsified with the
library's thresholds; the expected values are the dense forward of the same model, or plain
F.linear on the same hidden activations, never read back from the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from course_lib.deft import (
    SPARSE_PROJECTION_MODES,
    SparseActivation,
    SparseSecondProjection,
    SparsityConfig,
    gather_second_projection,
    second_projection_names,
    sparsify_activations,
    with_sparse_second_projections,
)

MODES = tuple(SPARSE_PROJECTION_MODES)
VOCAB = 50


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def padded_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": input_ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def sparsified() -> nn.Module:
    model = tiny_bert()
    calibration = [padded_batch([12, 9, 7, 12], seed) for seed in range(3)]
    sparsify_activations(model, calibration, SparsityConfig(kind="threshold", target_density=0.15))
    return model


def test_sparsified_model_has_exact_zeros_before_each_second_projection(sparsified):
    names = second_projection_names(sparsified)
    assert names == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert all(isinstance(m, SparseActivation) for n, m in sparsified.named_modules() if n.endswith("intermediate_act_fn"))
    seen = []
    handle = sparsified.get_submodule(names[0]).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        sparsified(**padded_batch([10], seed=7))
    handle.remove()
    density = (seen[0] != 0).float().mean().item()
    assert 0.0 < density < 0.5  # thresholded: most units are exact zeros


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "inputs",
    [padded_batch([11, 6, 3], seed=11), padded_batch([9], seed=12), padded_batch([1], seed=13), padded_batch([1, 1], seed=14)],
    ids=["padded-batch", "one-sentence", "one-token", "two-one-token"],
)
def test_sparse_forward_equals_dense_forward_of_the_same_model(sparsified, mode, inputs):
    sparse = with_sparse_second_projections(sparsified, mode)
    for name in second_projection_names(sparse):
        assert isinstance(sparse.get_submodule(name), SparseSecondProjection)
        assert sparse.get_submodule(name).mode == mode
    with torch.no_grad():
        expected = sparsified(**inputs).logits
        actual = sparse(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(sparsified.get_submodule(second_projection_names(sparsified)[0]), nn.Linear)  # the original kept


def hidden_with_zeros(tokens: int, width: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator)
    return hidden * (torch.rand(tokens, width, generator=generator) < density)


@pytest.mark.parametrize("tokens", [1, 5, 27])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gather_kernel_equals_linear_on_hidden_with_zeros(tokens, with_bias):
    linear = nn.Linear(64, 24, bias=with_bias)
    weight, bias = linear.weight.detach(), (linear.bias.detach() if with_bias else None)
    hidden = hidden_with_zeros(tokens, 64, 0.15, seed=tokens)
    hidden[0] = 0.0  # a token with no active unit: its output is the bias alone
    expected = F.linear(hidden, weight, bias)
    torch.testing.assert_close(gather_second_projection(hidden, weight, bias), expected, atol=1e-6, rtol=1e-5)
    by_unit = weight.t().contiguous()
    torch.testing.assert_close(
        gather_second_projection(hidden, weight, bias, weight_by_unit=by_unit), expected, atol=1e-6, rtol=1e-5
    )
    assert torch.equal(gather_second_projection(hidden, weight, bias)[0], bias if with_bias else torch.zeros(24))


def test_gather_kernel_on_all_zero_and_dense_hidden():
    linear = nn.Linear(16, 8)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    zeros = torch.zeros(3, 16)
    assert torch.equal(gather_second_projection(zeros, weight, bias), bias.expand(3, 8))
    dense = torch.randn(4, 16)
    torch.testing.assert_close(gather_second_projection(dense, weight, bias), F.linear(dense, weight, bias))


def test_gather_kernel_threshold_zeroes_small_entries():
    linear = nn.Linear(32, 8)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    kept = hidden * (hidden.abs() > 0.7)
    torch.testing.assert_close(
        gather_second_projection(hidden, weight, bias, threshold=0.7), F.linear(kept, weight, bias), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("mode", MODES)
def test_module_keeps_the_input_shape(mode):
    linear = nn.Linear(40, 12)
    hidden = hidden_with_zeros(2 * 7, 40, 0.2, seed=5).reshape(2, 7, 40)
    output = SparseSecondProjection(copy.deepcopy(linear), mode=mode)(hidden)
    assert output.shape == (2, 7, 12)
    torch.testing.assert_close(output, linear(hidden), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_every_kernel_bad_input_errors(mode):
    kernel = SPARSE_PROJECTION_MODES[mode]
    linear = nn.Linear(16, 8)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    with pytest.raises(ValueError, match=r"\(tokens, H\)"):
        kernel(torch.zeros(2, 3, 16), weight, bias)
    with pytest.raises(ValueError, match="hidden width"):
        kernel(torch.zeros(3, 15), weight, bias)
    with pytest.raises(ValueError, match="bias must be"):
        kernel(torch.zeros(3, 16), weight, torch.zeros(7))
    with pytest.raises(ValueError, match="weight_by_unit"):
        kernel(torch.zeros(3, 16), weight, bias, weight_by_unit=weight)  # (C, H), not (H, C)
    with pytest.raises(ValueError, match="dtype"):
        kernel(torch.zeros(3, 16, dtype=torch.float64), weight, bias)
    with pytest.raises(ValueError, match="threshold"):
        kernel(torch.zeros(3, 16), weight, bias, threshold=-1.0)


def test_module_bad_mode_and_type_errors():
    with pytest.raises(ValueError, match="gather"):
        SparseSecondProjection(nn.Linear(4, 2), mode="dense")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseSecondProjection(nn.Conv1d(4, 2, 1), mode="gather")
    assert set(MODES) == {"rows", "csr", "gather"}


def test_with_sparse_second_projections_needs_a_sparsified_merged_model():
    with pytest.raises(ValueError, match="sparsify it first"):
        with_sparse_second_projections(tiny_bert(), "gather")
    model = tiny_bert()
    sparsify_activations(model, [padded_batch([5, 3], 0)], SparsityConfig(kind="relu", target_density=None, correct_bias=False))
    with pytest.raises(ValueError, match="mode must be"):
        with_sparse_second_projections(model, "dense")
    from course_lib.peft import inject_peft

    inject_peft(model, "lora", r=2, alpha=4, target_modules=["output.dense"])
    with pytest.raises(ValueError, match="merge LoRA first"):
        with_sparse_second_projections(model, "gather")
