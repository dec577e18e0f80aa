"""DEFT (Density-Efficient Fine-Tuning): fewer non-zero MLP activations while doing PEFT.

- `density`     `measure_density` -> DensityReport (exact or |a| > tau, padding masked or not),
                `measure_density_by_position` -> DensityByPosition (all positions, real tokens,
                padding: the three measures side by side), `collect_activations`,
                `gelu_zero_range`, `relative_reduction`
- `recipe`      `DEFTRecipe`, `PAPER_PROTOCOL` (the official GLUE scripts: pad to 128, unmasked),
                `COURSE_RECIPE` (masked), `paper_protocol(...)`, `course_recipe(...)`
- `experiments` one run of notebook 22: `build_deft_model`, `train_deft_run` -> (row, model), `deft_run_key`
- `sparsify`    exact zeros made in the forward pass: `SparseActivation` (threshold, CATS-style,
                or shifted ReLU), `SparsityConfig`, `sparsify_activations` (per-layer
                calibration + bias correction) -> SparsificationReport, `calibrate_thresholds`
- `loss`        `density_surrogate` a^2 / (a^2 + eps) (`DensitySurrogate`: saves only a),
                `density_loss`, `DEFTLoss` (a loss_fn for `course_lib.train.train`),
                `deft_training_step`, `deft_compute_loss` (any loop that calls a HF model; Trainer)
- `sparse_mlp`  the second MLP projection skipping unused rows of W2 (`sparse_second_projection`,
                `csr_second_projection`, `gather_second_projection`, `SparseSecondProjection`
                with its `SPARSE_PROJECTION_MODES`; `with_sparse_second_projections` puts them
                into a sparsified model)
- `quantise`    QLoRA-style frozen weights for the "quantised" rows: NF4 (`NF4_CODEBOOK`,
                `quantise_nf4`, `dequantise_nf4`, `NF4Tensor`, `pack_4bit`, `unpack_4bit`), per-row
                int8 (`quantise_int8`, `dequantise_int8`, `Int8Tensor`), `QuantisedLinear` (an
                nn.Linear that LoRA can wrap), `quantise_linears` -> QuantisationReport

The hooks and counters underneath are `course_lib.meters.density`.
Derived in notebooks/part3_deft/{20_activation_sparsity,21_density_loss,22_deft_in_practice,
23_sparse_inference}.ipynb.
"""

from course_lib.deft.density import (
    DensityByPosition,
    DensityReport,
    collect_activations,
    gelu_zero_range,
    measure_density,
    measure_density_by_position,
    relative_reduction,
)
from course_lib.deft.experiments import build_deft_model, deft_run_key, train_deft_run
from course_lib.deft.loss import (
    DEFAULT_EPS,
    DEFTConfig,
    DEFTLoss,
    DensitySurrogate,
    deft_compute_loss,
    deft_training_step,
    density_loss,
    density_surrogate,
)
from course_lib.deft.quantise import (
    NF4_CODEBOOK,
    SCHEMES,
    Int8Tensor,
    NF4Tensor,
    QuantisationReport,
    QuantisedLinear,
    dequantise_int8,
    dequantise_nf4,
    pack_4bit,
    quantise_int8,
    quantise_linears,
    quantise_nf4,
    unpack_4bit,
)
from course_lib.deft.recipe import (
    COURSE_RECIPE,
    PAPER_PROTOCOL,
    DEFTRecipe,
    course_recipe,
    paper_protocol,
)
from course_lib.deft.sparse_mlp import (
    SPARSE_PROJECTION_MODES,
    SparseSecondProjection,
    active_hidden_units,
    csr_second_projection,
    gather_second_projection,
    second_projection_names,
    sparse_second_projection,
    union_density,
    with_sparse_second_projections,
)
from course_lib.deft.sparsify import (
    SPARSITY_KINDS,
    SparseActivation,
    SparsificationReport,
    SparsityConfig,
    calibrate_thresholds,
    second_projection_name,
    sparsify_activations,
)

__all__ = [
    "COURSE_RECIPE",
    "DEFAULT_EPS",
    "NF4_CODEBOOK",
    "PAPER_PROTOCOL",
    "SCHEMES",
    "SPARSE_PROJECTION_MODES",
    "SPARSITY_KINDS",
    "DEFTConfig",
    "DEFTLoss",
    "DEFTRecipe",
    "DensityByPosition",
    "DensityReport",
    "DensitySurrogate",
    "Int8Tensor",
    "NF4Tensor",
    "QuantisationReport",
    "QuantisedLinear",
    "SparseActivation",
    "SparseSecondProjection",
    "SparsificationReport",
    "SparsityConfig",
    "active_hidden_units",
    "build_deft_model",
    "calibrate_thresholds",
    "collect_activations",
    "course_recipe",
    "csr_second_projection",
    "deft_compute_loss",
    "deft_run_key",
    "deft_training_step",
    "density_loss",
    "density_surrogate",
    "dequantise_int8",
    "dequantise_nf4",
    "gather_second_projection",
    "gelu_zero_range",
    "measure_density",
    "measure_density_by_position",
    "pack_4bit",
    "paper_protocol",
    "quantise_int8",
    "quantise_linears",
    "quantise_nf4",
    "relative_reduction",
    "second_projection_name",
    "second_projection_names",
    "sparse_second_projection",
    "sparsify_activations",
    "train_deft_run",
    "union_density",
    "unpack_4bit",
    "with_sparse_second_projections",
]
