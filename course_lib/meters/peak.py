"""The peak of live allocated bytes during one training step: what decides whether a batch fits.

`measure_activation_memory` counts the tensors saved for backward: the part of memory that
MEFT and checkpointing attack. What a user meets is the **peak** of everything alive at once
during a step: weights, gradients, optimizer state, the saved activations, and the temporaries of
whichever operation is running at that moment. The MEFT paper reports it on a GPU as
`torch.cuda.max_memory_allocated`; on a CPU we rebuild the same curve from torch's own allocation
events:

1. `torch.profiler` with `profile_memory=True` records every allocation and free of torch's CPU
   allocator during the step, with the op that made it;
2. torch's memory profiler (`torch.profiler._memory_profiler`, the engine behind
   `export_memory_timeline`) follows each allocation through the autograd graph and the
   optimizer and gives it a category: parameter, optimizer state, input, activation, gradient,
   temporary, autograd detail (or unknown); tensors that existed before the step (the weights)
   are counted from the start;
3. summing the live bytes of all categories at each event gives the curve; its maximum is the
   peak, and the split at that instant says what the peak is made of.

On CUDA the peak is `torch.cuda.max_memory_allocated` around the step (as the paper measures),
without a split. The bytes are the allocator's requested sizes (no rounding to allocator blocks
and no memory outside torch's allocator), so the peak is exact for a step whose tensors are
known: tests/test_peak_memory.py checks it against sums written by hand.

Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PEAK_CATEGORIES", "PeakMemoryReport", "measure_peak_memory", "measure_phase_peaks"]

MIB = 1024**2

#: The categories of the split, in the memory profiler's order (plus "unknown").
PEAK_CATEGORIES = ("parameters", "optimizer_state", "inputs", "temporaries", "activations", "gradients",
                   "autograd_detail", "unknown")  # fmt: skip


@dataclass
class PeakMemoryReport:
    """The peak of live allocated bytes during a step and, on a CPU, what they were at the peak.

    `peak_bytes` counts everything live at the peak, weights included; `by_category` splits it
    (bytes per `PEAK_CATEGORIES` entry); `timeline` is (seconds since the start, live bytes)."""

    peak_bytes: int
    by_category: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    timeline: list[tuple[float, int]] = field(default_factory=list, repr=False)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    @property
    def weights_bytes(self) -> int:
        return self.by_category.get("parameters", 0)

    @property
    def peak_minus_weights_bytes(self) -> int:
        """The peak without the weights: what training adds on top of holding the model."""
        return self.peak_bytes - self.weights_bytes

    @property
    def peak_minus_weights_mib(self) -> float:
        return self.peak_minus_weights_bytes / MIB

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {value / MIB:.2f}" for name, value in self.by_category.items() if value)
        return f"peak {self.peak_mib:.2f} MiB allocated ({parts or 'no split'}) on {self.device}"


def measure_peak_memory(step: Callable[[], Any], *, device: str | torch.device = "cpu") -> PeakMemoryReport:
    """Run `step()` once and return the peak of live allocated bytes during it.

    `step` is one whole training step as you run it (forward, backward, `optimizer.step()`,
    `zero_grad`): what it allocates and frees is what is measured, and what was alive before it
    (weights, an optimizer state from an earlier step) is counted as live from the start. Run one
    step first if the optimizer state should be there, as in steady-state training.
    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return PeakMemoryReport(peak_bytes=int(torch.cuda.max_memory_allocated(device)), device=str(device))
    if device.type != "cpu":
        raise ValueError(f"measure_peak_memory measures on 'cpu' or 'cuda', got {device}")
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # the engine of export_memory_timeline

    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
    with _profiled(prof):
        step()
    times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    if not sizes:
        return PeakMemoryReport(peak_bytes=0, by_category=dict.fromkeys(PEAK_CATEGORIES, 0))
    sizes = [row[1:] for row in sizes]  # column 0 is unused by the profiler's layout
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    start = times[0]
    return PeakMemoryReport(
        peak_bytes=int(totals[at]),
        by_category={name: int(value) for name, value in zip(PEAK_CATEGORIES, sizes[at])},
        device="cpu",
        timeline=[((t - start) / 1e6, int(total)) for t, total in zip(times, totals)],  # times are in us
    )


def measure_phase_peaks(phases: Sequence[tuple[str, Callable[[], Any]]], *, device: str | torch.device = "cpu") -> dict[str, int]:
    """Run the phases in order and return, per phase, the peak of live allocated bytes during it
    **above what was live when the first phase began** (no category split).

    `phases`: (name, callable) pairs, e.g. forward, backward and optimizer step of one training
    step (they share state through the caller's closures). Why per phase: the peak of a step is a
    maximum over time, and which phase holds it changes with the sizes (full fine-tuning's peak is
    in the optimizer step for a tiny batch and at the start of backward for a large one), so a
    formula in B, T and L fits each phase's peak, not the step's (`course_lib.meft.fit_peak_costs`).

    On a CPU the profiler's raw allocation events are summed in time order (4-5x faster than
    `measure_peak_memory`, which also categorises every tensor: the memory profiler's analysis is
    most of its time); on CUDA, `max_memory_allocated` is reset before each phase.
    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    device = torch.device(device)
    names = [name for name, _ in phases]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"phases need distinct names (and at least one), got {names}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        peaks = {}
        for name, run in phases:
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            peaks[name] = int(torch.cuda.max_memory_allocated(device)) - start
        return peaks
    if device.type != "cpu":
        raise ValueError(f"measure_phase_peaks measures on 'cpu' or 'cuda', got {device}")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "course_lib.phase:"
    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _profiled(prof):
        for name, run in phases:
            with record_function(marker + name):
                run()
    events = prof.profiler.kineto_results.events()
    windows = {e.name()[len(marker):]: (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name().startswith(marker)}
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    peaks = dict.fromkeys(names, 0)
    live = 0  # bytes allocated minus bytes freed since the profiler started
    for time_ns, nbytes in allocations:
        live += nbytes
        for name, (begin, end) in windows.items():
            if begin <= time_ns <= end and live > peaks[name]:
                peaks[name] = live
    return peaks


#: what marks a line the profiler writes to descriptor 2 at every measurement (torch 2.13)
_PROFILER_LINES = ("USDT:", "was allocated before the profiling started")


@contextlib.contextmanager
def _profiled(prof: Any) -> Iterator[Any]:
    """`with prof:` for a `torch.profiler.profile`, without the profiler's own lines on file
    descriptor 2: Kineto's "USDT:... profiler_start" and "... profiler_stop" (no setting of torch
    2.13 turns them off) and the allocator's warning that a tensor allocated before the profiler
    started was freed during it (expected: the weights and the step's inputs exist before). In a
    notebook they would appear as a red output under every measurement. Everything else written to
    descriptor 2 during the block is passed on when it ends."""
    with _without_profiler_lines(), prof:
        yield prof


@contextlib.contextmanager
def _without_profiler_lines() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the block, then pass on every line of it but
    the profiler's (`_PROFILER_LINES`; C++ writes to the descriptor, not to `sys.stderr`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(mark in line for mark in _PROFILER_LINES))
            if kept:
                sys.stderr.write(kept)
