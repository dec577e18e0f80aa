"""A training step's peak as a formula (course_lib.meft.fit_peak_costs): the per-phase meter equals
the categorised peak meter, each phase's formula is exact on its grid, and the largest phase
predicts the step's peak at sizes the grid did not contain."""

from __future__ import annotations

import pytest
import torch

from course_lib.meft import (
    PEAK_PHASES,
    PeakCostModel,
    build_method,
    fit_peak_costs,
    measure_step_peaks,
)
from course_lib.meters import measure_peak_memory

GRID = {"batch_sizes": (2, 4), "seq_lens": (16, 32, 48), "layer_counts": (2, 3)}


@pytest.fixture(scope="module")
def pretrained():
    from course_lib.text import load_classifier

    torch.manual_seed(0)
    return load_classifier(num_labels=4).eval()


@pytest.fixture(scope="module")
def peak_costs(pretrained):
    return fit_peak_costs(pretrained, ("lora", "meft1"), progress=False, **GRID)


@pytest.mark.parametrize("method", ["full_finetune", "meft1"])
def test_step_peaks_equal_the_categorised_peak(pretrained, method):
    """The largest phase peak is measure_peak_memory's peak minus weights of the same step (the
    frozen weights count as weights too), to the byte."""
    torch.manual_seed(0)
    model = build_method(method, pretrained, num_layers=1)
    peaks = measure_step_peaks(model, batch_size=2, seq_len=16)
    assert set(peaks) == set(PEAK_PHASES)
    if method == "full_finetune":  # a tiny batch: the optimizer step (a gradient and AdamW's temporaries per weight)
        assert max(peaks, key=peaks.get) == "optimizer"  # holds the peak, as memory_costs' docstring says

    torch.manual_seed(0)
    again = build_method(method, pretrained, num_layers=1)
    optimizer = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30522, (2, 16), generator=generator),
             "attention_mask": torch.ones(2, 16, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}  # fmt: skip

    def step():
        again(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    report = measure_peak_memory(step)
    assert report.weights_bytes == sum(p.numel() * p.element_size() for p in again.parameters())
    assert max(peaks.values()) == report.peak_minus_weights_bytes


def test_each_phase_is_exact_on_its_grid_and_the_largest_predicts_off_it(pretrained, peak_costs):
    for method, cost in peak_costs.items():
        assert isinstance(cost, PeakCostModel) and set(cost.phases) == set(PEAK_PHASES)
        assert cost.max_relative_residual < 1e-3, method
        torch.manual_seed(0)
        measured = measure_step_peaks(build_method(method, pretrained, num_layers=4), batch_size=6, seq_len=64)  # off the grid
        predicted = cost.predict_by_phase(6, 64, 4)
        assert cost.predict_bytes(6, 64, 4) == max(predicted.values())
        assert cost.predict_bytes(6, 64, 4) == pytest.approx(max(measured.values()), rel=0.02), method
        assert cost.predict_mib(6, 64, 4) == pytest.approx(cost.predict_bytes(6, 64, 4) / 2**20)
    # MEFT's peak grows far slower than LoRA's with depth: it keeps no layer's activations
    lora, meft = peak_costs["lora"], peak_costs["meft1"]
    assert meft.predict_bytes(8, 128, 24) - meft.predict_bytes(8, 128, 6) < 0.2 * (
        lora.predict_bytes(8, 128, 24) - lora.predict_bytes(8, 128, 6))  # fmt: skip


def test_bad_grid_and_methods(pretrained):
    with pytest.raises(ValueError, match="unknown methods"):
        fit_peak_costs(pretrained, ["qlora"], progress=False)
    with pytest.raises(ValueError, match="the grid needs"):
        fit_peak_costs(pretrained, ["lora"], batch_sizes=(2,), progress=False)
