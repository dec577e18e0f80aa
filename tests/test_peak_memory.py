"""course_lib.meters.measure_peak_memory: the peak of live allocated bytes of a step, checked
against sums written by hand (exact bytes), and its split at the peak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.meters import PEAK_CATEGORIES, measure_peak_memory, measure_phase_peaks


def test_peak_of_a_step_whose_tensors_are_known():
    def step():
        a = torch.ones(1000)  # 4,000 bytes live
        b = torch.ones(1000)  # 8,000
        c = torch.cat([a, b])  # 16,000: a, b and c alive together
        del a, b  # 8,000
        d = c * c  # 16,000 again
        del c, d

    report = measure_peak_memory(step)
    assert report.peak_bytes == 16_000
    assert sum(report.by_category.values()) == report.peak_bytes and set(report.by_category) == set(PEAK_CATEGORIES)


def test_a_bigger_temporary_moves_the_peak():
    def step():
        a = torch.ones(1000)  # 4,000
        big = torch.ones(5000, dtype=torch.float64)  # 44,000
        del big
        b = torch.ones(2000)  # 12,000
        del a, b

    assert measure_peak_memory(step).peak_bytes == 4_000 + 40_000


def test_training_step_split_weights_optimizer_state_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 128), torch.randint(0, 8, (32,))

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from now on, as in steady-state training
    report = measure_peak_memory(step)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert report.by_category["parameters"] == weights == report.weights_bytes
    assert report.by_category["optimizer_state"] == state  # exp_avg, exp_avg_sq and the step counters
    assert report.peak_bytes >= weights + state + report.by_category["gradients"]
    assert report.peak_minus_weights_bytes == report.peak_bytes - weights
    assert report.timeline and max(total for _, total in report.timeline) == report.peak_bytes


def test_bad_device():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        measure_peak_memory(lambda: None, device="meta")


def test_phase_peaks_of_steps_whose_tensors_are_known():
    kept = {}

    def first():
        kept["a"] = torch.ones(1000)  # 4,000 live, kept into the second phase
        temporary = torch.ones(2000)  # 12,000
        del temporary

    def second():
        b = torch.ones(500, dtype=torch.float64)  # 4,000 + 4,000
        del b
        kept.clear()  # 0

    def third():
        c = torch.ones(250)  # 1,000
        del c

    assert measure_phase_peaks([("first", first), ("second", second), ("third", third)]) == {
        "first": 12_000, "second": 8_000, "third": 1_000}  # fmt: skip


def test_phase_peaks_equal_the_categorised_peak_of_a_training_step():
    """Above what was live at the start (weights, optimizer state, inputs): the same peak as
    measure_peak_memory's, whose categories count everything."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 128), torch.randint(0, 8, (32,))
    state = {}

    def forward():
        state["loss"] = nn.functional.cross_entropy(model(x), y)

    def backward():
        state.pop("loss").backward()

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for run in (forward, backward, update):  # one step first: the optimizer state exists
        run()
    phases = measure_phase_peaks([("forward", forward), ("backward", backward), ("optimizer", update)])
    report = measure_peak_memory(lambda: [run() for run in (forward, backward, update)])
    live_before = sum(t.numel() * t.element_size() for t in [*model.parameters(), x, y])
    live_before += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert max(phases.values()) + live_before == report.peak_bytes
    assert phases["backward"] >= phases["forward"] > 0 and phases["optimizer"] > 0


def test_phase_peaks_refuse_bad_input():
    with pytest.raises(ValueError, match="distinct names"):
        measure_phase_peaks([("a", lambda: None), ("a", lambda: None)])
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        measure_phase_peaks([("a", lambda: None)], device="meta")


def test_no_profiler_lines_on_stderr_and_nothing_else_lost(capfd):
    """Kineto writes "USDT:... profiler_start/stop" to descriptor 2 (torch 2.13), and the allocator
    warns when a tensor from before the profiler is freed; in a notebook that is a red output under
    every measurement. The meters drop those lines and nothing else."""
    import os
    import sys

    before = torch.ones(1000)   # allocated before the profiler starts, freed during the step

    def step():
        nonlocal before
        torch.ones(10).sum()
        before = None
        os.write(2, b"written by the step\n")      # descriptor 2 during the step: passed on
        print("python stderr", file=sys.stderr)

    measure_peak_memory(step)
    before = torch.ones(1000)
    measure_phase_peaks([("step", step)])
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_start" not in err and "allocated before the profiling" not in err
    assert err.count("written by the step") == 2 and err.count("python stderr") == 2
