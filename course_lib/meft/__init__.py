"""MEFT (Liao et al., NeurIPS 2023): fine-tune a pre-trained model through reversible layers.

- `coupling`      ReversibleCoupling: y1 = lambda x1 + F(x2), y2 = beta x2 + G(y1), and its inverse
- `reversible`    reversible_stack: a custom autograd Function that keeps only the stack's output
                  and rebuilds each layer's input in backward (dropout replayed); run_couplings:
                  the same through plain autograd
- `rounding`      pack_parity, round_with_parity: one bit per element that makes the rebuilt
                  float32 layer inputs exact (float64 streams)
- `model`         meft_from_hf(model, "meft1" | "meft2" | "meft3"): MEFT on any Hugging Face BERT
- `point`         meft_from_point_mae(encoder, "meft3"): MEFT on the point transformer (Point-MAE)
- `methods`       build_method(name, pretrained): full FT, LoRA, adapter, LoRA + checkpointing, MEFT
- `memory_costs`  fit_activation_costs / fit_peak_costs: saved bytes and a step's peak as formulas in batch, length and depth
- `gradient_check` reversible_and_plain_gradients, gradient_errors: custom backward vs autograd

Derived in notebooks/part4_meft/{30_where_memory_goes,31_reversible_layers,32_meft}.ipynb.
"""

from course_lib.meft.coupling import ReversibleCoupling
from course_lib.meft.gradient_check import (
    gradient_errors,
    reversible_and_plain_gradients,
)
from course_lib.meft.memory_costs import (
    COST_TERMS,
    PEAK_PHASES,
    ActivationCostModel,
    PeakCostModel,
    fit_activation_costs,
    fit_peak_costs,
    measure_saved_bytes,
    measure_step_peaks,
)
from course_lib.meft.methods import (
    METHOD_LABELS,
    METHOD_NAMES,
    build_method,
    enable_checkpointing,
    with_num_layers,
)
from course_lib.meft.model import (
    MEFT_VARIANTS,
    AdapterOnly,
    BlockWithAdapter,
    MEFTConfig,
    MEFTEncoder,
    MEFTForSequenceClassification,
    MEFTVariant,
    make_meft_adapter,
    meft,
    meft_from_hf,
)
from course_lib.meft.point import (
    MEFTForPointClassification,
    PositionedBlock,
    meft_from_point_mae,
)
from course_lib.meft.reversible import (
    ReversibleStackFunction,
    reversible_stack,
    run_couplings,
)
from course_lib.meft.rounding import pack_parity, round_with_parity
from course_lib.meft.saving import load_meft, save_meft

__all__ = [
    "COST_TERMS",
    "PEAK_PHASES",
    "MEFT_VARIANTS",
    "METHOD_LABELS",
    "METHOD_NAMES",
    "ActivationCostModel",
    "PeakCostModel",
    "AdapterOnly",
    "BlockWithAdapter",
    "MEFTConfig",
    "MEFTEncoder",
    "MEFTForPointClassification",
    "MEFTForSequenceClassification",
    "MEFTVariant",
    "PositionedBlock",
    "ReversibleCoupling",
    "ReversibleStackFunction",
    "build_method",
    "enable_checkpointing",
    "fit_activation_costs",
    "fit_peak_costs",
    "gradient_errors",
    "load_meft",
    "make_meft_adapter",
    "measure_saved_bytes",
    "measure_step_peaks",
    "meft",
    "meft_from_hf",
    "meft_from_point_mae",
    "pack_parity",
    "reversible_and_plain_gradients",
    "reversible_stack",
    "round_with_parity",
    "run_couplings",
    "save_meft",
    "with_num_layers",
]
