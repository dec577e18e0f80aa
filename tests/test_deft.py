"""Tests of course_lib.deft: the density meter, the density loss and the sparse second projection.

Expected values are counted or summed by hand (Python loops over the elements), or computed by
the dense matmul, never read back from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deft import (
    DEFTLoss,
    SparseSecondProjection,
    active_hidden_units,
    collect_activations,
    csr_second_projection,
    deft_training_step,
    density_loss,
    density_surrogate,
    gelu_zero_range,
    measure_density,
    relative_reduction,
    sparse_second_projection,
    union_density,
)
from course_lib.train import train


class TinyEncoder(nn.Module):
    """Embedding -> Linear -> GELU (named like BERT's activation) -> Linear -> mean -> logits."""

    def __init__(self, vocab: int = 11, dim: int = 6, hidden: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "act": nn.GELU(), "fc2": nn.Linear(hidden, dim)}) for _ in range(2))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        for layer in self.layers:
            x = x + layer["fc2"](layer["act"](layer["fc1"](x)))
        return self.classifier(x.mean(dim=1))  # (B, classes)


PATTERN = r"layers\.\d+\.act"


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    return {
        "input_ids": torch.randint(0, 11, (3, 5), generator=generator),
        "attention_mask": mask,
        "labels": torch.tensor([0, 2, 1]),
    }


# ----------------------------------------------------------------------------- the meter


def test_meter_counts_exactly_on_a_hand_made_tensor():
    # one "layer" whose output we set by hand: 2 examples x 3 tokens x 4 units
    values = torch.tensor(
        [
            [[0.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 3e-9], [5.0, 0.0, 0.0, 0.0]],
            [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [7.0, 7.0, 0.0, 0.0]],  # token 2 is padding
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Identity()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.act(values)  # the inputs do not matter

    model = Fixed()
    batch = torch.zeros(1)
    # all positions: 2 + 1 + 1 + 4 + 0 + 2 = 10 non-zeros of 24
    exact = measure_density(model, [batch], r"^act$")
    assert exact.per_layer == {"act": pytest.approx(10 / 24)} and exact.mean == pytest.approx(10 / 24)
    # |a| > 0.5: the 3e-9 goes away -> 9 of 24
    assert measure_density(model, [batch], r"^act$", threshold=0.5).mean == pytest.approx(9 / 24)
    # real tokens only (5 of 6 tokens, 20 entries): the two 7.0 go away -> 8 of 20
    masked = measure_density(model, [{"x": batch, "attention_mask": mask}], r"^act$", mask_padding=True)
    assert masked.mean == pytest.approx(8 / 20)
    assert "real tokens" in str(masked) and "exact non-zero" in str(masked)


def test_measure_density_matches_brute_force_on_a_model():
    torch.manual_seed(0)
    model = TinyEncoder()
    batch = make_batch()
    report = measure_density(model, [batch], PATTERN, threshold=0.05, mask_padding=True)
    x = model.embed(batch["input_ids"]).detach()
    keep = batch["attention_mask"].bool()
    for index, layer in enumerate(model.layers):
        hidden = layer["act"](layer["fc1"](x))
        expected = (hidden[keep].abs() > 0.05).float().mean().item()
        assert report.per_layer[f"layers.{index}.act"] == pytest.approx(expected)
        x = (x + layer["fc2"](hidden)).detach()


def test_collect_activations_drops_padding():
    torch.manual_seed(0)
    model = TinyEncoder()
    batch = make_batch()
    activations = collect_activations(model, batch, PATTERN)
    assert list(activations) == ["layers.0.act", "layers.1.act"]
    assert activations["layers.0.act"].shape == (5 + 3 + 2, 10)
    expected = F.gelu(model.layers[0]["fc1"](model.embed(batch["input_ids"])))[batch["attention_mask"].bool()]
    assert torch.allclose(activations["layers.0.act"], expected, atol=1e-6)
    assert collect_activations(model, batch, PATTERN, mask_padding=False)["layers.1.act"].shape == (15, 10)


def test_gelu_zero_range_in_float32():
    all_zero, last_zero = gelu_zero_range()
    # ragged edge (AVX-512 here once: zeros and non-zeros interleave, all_zero <= last_zero) or clean (AVX2:
    # neighbouring grid points, all_zero = last_zero + 1e-5); both lie in (-5.6, -5.45)
    assert -5.6 < min(all_zero, last_zero) and max(all_zero, last_zero) < -5.45
    assert all_zero <= last_zero + 1.5e-5
    below = torch.linspace(all_zero - 3, all_zero - 1e-4, 1000)
    assert (F.gelu(below) == 0).all()
    above = torch.linspace(last_zero + 1e-4, -1e-3, 1000)
    assert (F.gelu(above) != 0).all()
    assert F.gelu(torch.tensor(-5.5)).item() != 0.0 and F.gelu(torch.tensor(-6.0)).item() == 0.0


def test_relative_reduction():
    assert relative_reduction(0.998, 0.499) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be > 0"):
        relative_reduction(0.0, 0.1)


# ----------------------------------------------------------------------------- the loss


def brute_force_density_loss(activations, mask, eps):
    """Python loops over every element: mean over layers of mean over examples of mean over real entries."""
    per_layer = []
    for a in activations:
        B, T, H = a.shape
        per_example = []
        for b in range(B):
            total, count = 0.0, 0
            for t in range(T):
                if mask is not None and mask[b, t] == 0:
                    continue
                for h in range(H):
                    value = float(a[b, t, h])
                    total += value * value / (value * value + eps)
                    count += 1
            per_example.append(total / count)
        per_layer.append(sum(per_example) / B)
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("eps", [1e-7, 1e-2])
def test_density_loss_equals_brute_force(eps):
    generator = torch.Generator().manual_seed(1)
    activations = [torch.randn(3, 5, 4, generator=generator, dtype=torch.float64) * 1e-3 for _ in range(2)]
    activations[0][0, 0, :2] = 0.0  # some exact zeros
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    masked = density_loss(activations, mask, eps=eps)
    assert masked.item() == pytest.approx(brute_force_density_loss(activations, mask, eps), rel=1e-10)
    unmasked = density_loss({"a": activations[0], "b": activations[1]}, None, eps=eps)
    assert unmasked.item() == pytest.approx(brute_force_density_loss(activations, None, eps), rel=1e-10)
    assert not math.isclose(masked.item(), unmasked.item())


def test_density_surrogate_values_and_gradient():
    a = torch.tensor([0.0, 1e-4, -1e-2, 3.0, -5.0], dtype=torch.float64, requires_grad=True)
    s = density_surrogate(a, eps=1e-7)
    expected = [0.0, 1e-8 / (1e-8 + 1e-7), 1e-4 / (1e-4 + 1e-7), 9 / (9 + 1e-7), 25 / (25 + 1e-7)]
    assert s.tolist() == pytest.approx(expected, rel=1e-12)
    s.sum().backward()
    by_hand = [2 * x * 1e-7 / (x * x + 1e-7) ** 2 for x in a.detach().tolist()]  # ds/da
    assert a.grad.tolist() == pytest.approx(by_hand, rel=1e-7, abs=1e-30)
    assert torch.isfinite(a.grad).all()


def test_density_loss_gradient_is_finite_through_a_model():
    torch.manual_seed(0)
    model = TinyEncoder()
    with torch.no_grad():
        model.layers[0]["fc1"].bias.fill_(-30.0)  # GELU(-30) = 0 exactly: the surrogate's 0/0-free point
    batch = make_batch()
    loss_fn = DEFTLoss(weight=1.0, module_pattern=PATTERN)
    loss, logits = loss_fn(model, batch)
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    assert model.layers[1]["fc1"].weight.grad.abs().sum() > 0
    assert logits.shape == (3, 3)


def test_masking_changes_only_padding_positions():
    generator = torch.Generator().manual_seed(2)
    activation = torch.rand(3, 5, 4, generator=generator, dtype=torch.float64) * 1e-3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    padding = ~mask.bool()
    changed = activation.clone()
    changed[padding] = torch.rand(int(padding.sum()), 4, generator=generator, dtype=torch.float64)  # any values
    assert density_loss([changed], mask).item() == pytest.approx(density_loss([activation], mask).item(), rel=1e-12)
    assert density_loss([changed], None).item() != pytest.approx(density_loss([activation], None).item(), rel=1e-6)
    # the gradient is zero exactly at padding positions, and only there
    a = activation.clone().requires_grad_(True)
    density_loss([a], mask).backward()
    assert (a.grad[padding] == 0).all() and (a.grad[~padding] != 0).all()
    # without padding the mask changes nothing
    full = torch.ones(3, 5, dtype=torch.long)
    assert density_loss([activation], full).item() == pytest.approx(density_loss([activation], None).item(), rel=1e-12)


def test_deft_loss_plugs_into_train_and_lowers_density():
    torch.manual_seed(0)
    model = TinyEncoder()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in model.layers:  # train fc1's bias only: it can push pre-activations down
        layer["fc1"].bias.requires_grad_(True)
    batches = [make_batch(seed) for seed in range(4)]
    before = measure_density(model, batches, PATTERN, mask_padding=True).mean
    loss_fn = DEFTLoss(weight=1.0, module_pattern=PATTERN, eps=1e-2)
    history = train(model, batches, num_epochs=30, lr=1.0, loss_fn=loss_fn, progress=False, scheduler=None)
    after = measure_density(model, batches, PATTERN, mask_padding=True, threshold=1e-3).mean
    assert len(loss_fn.density_losses) == history.num_steps == 120
    assert loss_fn.density_losses[-1] < 0.5 * loss_fn.density_losses[0]
    assert after < 0.5 * before
    assert "weight=1" in repr(loss_fn)


def test_deft_loss_equals_task_plus_weighted_density():
    torch.manual_seed(0)
    model = TinyEncoder()
    batch = make_batch()
    loss, _ = DEFTLoss(weight=0.0, module_pattern=PATTERN)(model, batch)
    task = F.cross_entropy(model(batch["input_ids"]), batch["labels"])
    assert loss.item() == pytest.approx(task.item(), rel=1e-6)
    loss_fn = DEFTLoss(weight=2.5, module_pattern=PATTERN, mask_padding=False)
    loss, _ = loss_fn(model, batch)
    with torch.no_grad():
        x, hidden = model.embed(batch["input_ids"]), []
        for layer in model.layers:
            hidden.append(F.gelu(layer["fc1"](x)))
            x = x + layer["fc2"](hidden[-1])
    expected = task.item() + 2.5 * brute_force_density_loss(hidden, None, 1e-7)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.last_task_loss == pytest.approx(task.item(), rel=1e-6)


def test_deft_training_step_moves_the_trainable_parameters():
    torch.manual_seed(0)
    model = TinyEncoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.layers[0]["fc1"].weight.detach().clone()
    losses = deft_training_step(model, make_batch(), optimizer, DEFTLoss(module_pattern=PATTERN))
    assert set(losses) == {"loss", "task_loss", "density_loss"} and 0 < losses["density_loss"] <= 1
    assert not torch.equal(before, model.layers[0]["fc1"].weight)


def test_errors_for_bad_input():
    torch.manual_seed(0)
    model = TinyEncoder()
    with pytest.raises(ValueError, match="matches"):
        DEFTLoss(module_pattern=r"does_not_exist")(model, make_batch())
    with pytest.raises(ValueError, match="matches"):
        measure_density(model, [make_batch()], r"nothing\.here$")
    with pytest.raises(ValueError, match="no activations"):
        density_loss({})
    with pytest.raises(ValueError, match="eps must be > 0"):
        density_surrogate(torch.ones(2), eps=0.0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        DEFTLoss(weight=-1.0)
    with pytest.raises(ValueError, match="does not match"):
        density_loss([torch.ones(2, 4, 3)], torch.ones(2, 5))  # prompt tuning: more tokens than the mask
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        measure_density(model, [make_batch()], PATTERN, threshold=-1.0)


# ----------------------------------------------------------------------------- sparse MLP


def sparse_hidden(tokens: int, width: int, active_units: int, density_in_units: float, seed: int) -> torch.Tensor:
    """(tokens, width) GELU outputs where only `active_units` units are ever non-zero."""
    generator = torch.Generator().manual_seed(seed)
    hidden = F.gelu(torch.randn(tokens, width, generator=generator))
    keep = torch.zeros(width, dtype=torch.bool)
    keep[torch.randperm(width, generator=generator)[:active_units]] = True
    per_token = torch.rand(tokens, width, generator=generator) < density_in_units
    return hidden * (keep & per_token)


def test_sparse_projection_equals_dense():
    linear = nn.Linear(48, 12)
    hidden = sparse_hidden(30, 48, 15, 0.6, seed=0)
    dense = linear(hidden)
    units = active_hidden_units(hidden)
    assert units.tolist() == [j for j in range(48) if (hidden[:, j] != 0).any()]
    assert union_density(hidden) == pytest.approx(len(units) / 48)
    assert torch.allclose(sparse_second_projection(hidden, linear.weight, linear.bias), dense, atol=1e-5)
    assert torch.allclose(csr_second_projection(hidden, linear.weight, linear.bias), dense, atol=1e-5)
    for mode in ("rows", "csr"):
        module = SparseSecondProjection(linear, mode=mode)
        assert torch.allclose(module(hidden.reshape(5, 6, 48)), dense.reshape(5, 6, 12), atol=1e-5)
    # a threshold: the same as the dense projection of the thresholded activations
    tau = 0.3
    expected = linear(hidden * (hidden.abs() > tau))
    assert torch.allclose(sparse_second_projection(hidden, linear.weight, linear.bias, threshold=tau), expected, atol=1e-5)
    assert torch.allclose(csr_second_projection(hidden, linear.weight, linear.bias, threshold=tau), expected, atol=1e-5)
    # every unit active for some token: nothing to skip, still the dense result
    busy = torch.randn(30, 48)
    assert union_density(busy) == 1.0
    assert torch.allclose(sparse_second_projection(busy, linear.weight, linear.bias), linear(busy), atol=1e-5)
    # no active unit at all: only the bias
    zeros = torch.zeros(4, 48)
    assert torch.allclose(sparse_second_projection(zeros, linear.weight, linear.bias), linear.bias.expand(4, 12))


def test_sparse_projection_errors():
    linear = nn.Linear(8, 3)
    with pytest.raises(ValueError, match=r"hidden must be \(tokens, H\)"):
        sparse_second_projection(torch.ones(2, 3, 8), linear.weight, linear.bias)
    with pytest.raises(ValueError, match="hidden width"):
        sparse_second_projection(torch.ones(2, 9), linear.weight, linear.bias)
    with pytest.raises(ValueError, match="bias must be"):
        csr_second_projection(torch.ones(2, 8), linear.weight, torch.ones(4))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        SparseSecondProjection(nn.ReLU())
    with pytest.raises(ValueError, match="mode must be"):
        SparseSecondProjection(linear, mode="dense")


def test_memory_efficient_surrogate_matches_autograd_and_saves_only_the_activation():
    from course_lib.deft import DensitySurrogate
    from course_lib.meters import measure_activation_memory

    a64 = (torch.randn(2, 3, 4, dtype=torch.float64) * 1e-3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: DensitySurrogate.apply(t, 1e-7), (a64,))
    a = (torch.randn(3, 5, 8) * 1e-3).requires_grad_(True)
    plain, efficient = density_surrogate(a), density_surrogate(a, memory_efficient=True)
    assert torch.equal(plain, efficient)
    (g_plain,) = torch.autograd.grad(plain.sum(), a)
    (g_efficient,) = torch.autograd.grad(efficient.sum(), a)
    torch.testing.assert_close(g_efficient, g_plain, rtol=1e-5, atol=1e-6)  # float32: the same maths, other rounding
    # saved for backward: a, a^2 and a^2 + eps with plain autograd; a alone with the Function
    leaf = torch.randn(4, 6, 16).requires_grad_(True)
    one_tensor = leaf.numel() * 4
    for memory_efficient, tensors in ((False, 3), (True, 1)):
        report = measure_activation_memory(lambda: density_surrogate(leaf * 1.0, memory_efficient=memory_efficient).mean())
        assert report.activation_bytes == tensors * one_tensor, (memory_efficient, report.activation_bytes)
