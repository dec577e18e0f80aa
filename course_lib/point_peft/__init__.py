"""Point-PEFT (Tang et al., AAAI 2024): parameter-efficient fine-tuning of a pretrained point transformer.

Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb (memory bank, parameter-free
attention, Point-prior Prompt), 15_geometry_aware_adapter.ipynb (Geometry-aware Adapter) and
16_point_peft_results.ipynb (the wrapped model, its trainable share and the ablations).

    bank = build_memory_bank(encoder, train_set)                 # or load_memory_bank(path, encoder=...)
    model, report = point_peft(encoder, PointPEFTConfig(), bank)
    logits = model(points, indices=batch_indices)                # indices: the shapes' bank rows

Defaults follow the official code; where it differs from the paper, the paper's choice is an
option and the module docs say so.
"""

from course_lib.point_peft.adapter import (
    GeometryAwareAdapter,
    LocalGroupAttention,
    PointBottleneckAdapter,
    QuickGELU,
    TokenGrouping,
    group_tokens,
    inverse_distance_weights,
)
from course_lib.point_peft.backbone import PointBackbone, check_point_backbone
from course_lib.point_peft.memory_bank import (
    IndexedDataset,
    MemoryBank,
    StaleMemoryBankError,
    build_memory_bank,
    default_memory_bank_path,
    encoder_sha256,
    load_memory_bank,
    save_memory_bank,
)
from course_lib.point_peft.model import (
    ABLATIONS,
    PointPEFTConfig,
    PointPEFTModel,
    PointPEFTReport,
    point_peft,
)
from course_lib.point_peft.prompt import (
    PointPriorPrompt,
    Retrieval,
    insert_prompts,
    parameter_free_attention,
    remove_prompts,
    retrieval_precision,
)

__all__ = [
    "ABLATIONS",
    "GeometryAwareAdapter",
    "IndexedDataset",
    "LocalGroupAttention",
    "MemoryBank",
    "PointBackbone",
    "PointBottleneckAdapter",
    "PointPEFTConfig",
    "PointPEFTModel",
    "PointPEFTReport",
    "PointPriorPrompt",
    "QuickGELU",
    "Retrieval",
    "StaleMemoryBankError",
    "TokenGrouping",
    "build_memory_bank",
    "check_point_backbone",
    "default_memory_bank_path",
    "encoder_sha256",
    "group_tokens",
    "insert_prompts",
    "inverse_distance_weights",
    "load_memory_bank",
    "parameter_free_attention",
    "point_peft",
    "remove_prompts",
    "retrieval_precision",
    "save_memory_bank",
]
