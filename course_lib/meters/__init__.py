"""Meters that every part of the course uses: trainable parameters, activation memory, density.

- `count_parameters`            trainable / total parameters (parameters.py)
- `measure_activation_memory`   bytes saved for backward by one step, optionally per module (memory.py)
- `measure_peak_memory`         peak of live allocated bytes of a step, split by category (peak.py)
- `measure_phase_peaks`         peak above the start in each phase of a step (peak.py)
- `measure_peak_process_memory` peak resident memory of a step (memory.py)
- `activation_density`          per-layer non-zero fraction of MLP activations (density.py)
- `interleaved_median_seconds`  median times of contenders timed in alternation (timing.py)

Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb (parameters, activation memory)
and notebooks/part1_foundations/04_measuring_density.ipynb (activation density).
"""

from course_lib.meters.density import (
    DEFAULT_ACTIVATION_PATTERNS,
    ActivationCollector,
    DensityCounter,
    activation_density,
    count_active,
    density_over_batches,
    find_activation_modules,
)
from course_lib.meters.memory import (
    MIB,
    NO_MODULE,
    MemoryReport,
    ProcessMemoryReport,
    SavedStorage,
    SavedTensorRecorder,
    measure_activation_memory,
    measure_peak_process_memory,
)
from course_lib.meters.parameters import ParameterReport, count_parameters
from course_lib.meters.peak import PEAK_CATEGORIES, PeakMemoryReport, measure_peak_memory, measure_phase_peaks
from course_lib.meters.timing import interleaved_median_seconds, median_seconds

__all__ = [
    "PEAK_CATEGORIES",
    "PeakMemoryReport",
    "measure_peak_memory",
    "measure_phase_peaks",
    "ParameterReport",
    "count_parameters",
    "MIB",
    "NO_MODULE",
    "SavedStorage",
    "MemoryReport",
    "SavedTensorRecorder",
    "measure_activation_memory",
    "ProcessMemoryReport",
    "measure_peak_process_memory",
    "DEFAULT_ACTIVATION_PATTERNS",
    "find_activation_modules",
    "count_active",
    "ActivationCollector",
    "DensityCounter",
    "activation_density",
    "density_over_batches",
    "median_seconds",
    "interleaved_median_seconds",
]
