"""DEFT (Density-Efficient Fine-Tuning): fewer non-zero MLP activations while doing PEFT.

- `density`     `measure_density` -> DensityReport (exact or |a| > tau, padding masked or not),
                `collect_activations`, `gelu_zero_range`, `relative_reduction`
- `loss`        `density_surrogate` a^2 / (a^2 + eps), `density_loss`, `DEFTLoss` (a loss_fn for
                `course_lib.train.train`), `deft_training_step`
- `sparse_mlp`  the second MLP projection skipping unused rows of W2 (`sparse_second_projection`,
                `csr_second_projection`, `SparseSecondProjection`)

The hooks and counters underneath are `course_lib.meters.density`.
Derived in notebooks/part3_deft/{20_activation_sparsity,21_density_loss,22_deft_in_practice}.ipynb.
"""

from course_lib.deft.density import (
    DensityReport,
    collect_activations,
    gelu_zero_range,
    measure_density,
    relative_reduction,
)
from course_lib.deft.loss import DEFAULT_EPS, DEFTLoss, deft_training_step, density_loss, density_surrogate
from course_lib.deft.sparse_mlp import (
    SparseSecondProjection,
    active_hidden_units,
    csr_second_projection,
    sparse_second_projection,
    union_density,
)

__all__ = [
    "DensityReport",
    "measure_density",
    "collect_activations",
    "gelu_zero_range",
    "relative_reduction",
    "DEFAULT_EPS",
    "density_surrogate",
    "density_loss",
    "DEFTLoss",
    "deft_training_step",
    "active_hidden_units",
    "union_density",
    "sparse_second_projection",
    "csr_second_projection",
    "SparseSecondProjection",
]
