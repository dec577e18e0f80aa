"""Parameter-efficient fine-tuning, written out by hand: one concept per module.

- `lora`           LoRALinear: W x + (alpha / r) B A x, with merge / unmerge
- `adapters`       BottleneckAdapter and its placements: Houlsby, Pfeiffer (serial), parallel (He et al.)
- `prefix_tuning`  PrefixSelfAttention: learned keys/values in front of the real ones (BERT family);
                   PrefixKeyValues + PREFIX_ATTENTION: the same on DistilBERT, GPT-2, Llama, ...
- `prompt_tuning`  PromptEmbedding: learned virtual tokens in front of the input (BERT family, DistilBERT, GPT-2, ...)
- `bitfit`         train only the biases
- `ia3`            IA3Linear: learned rescaling vectors
- `matching`       choosing modules by name pattern
- `layers`         the layers LoRA and (IA)^3 wrap: nn.Linear and GPT-2's Conv1D (fan_in_fan_out)
- `inject`         inject_peft(model, method, ...) -> InjectionReport, merge_and_unload, remove_peft (= unload)
- `saving`         save_adapter / load_adapter in Hugging Face peft's format (LoRA, (IA)^3, prompt tuning)

Each method follows Hugging Face peft's numerics where peft has the method, and the tests check the
logits against peft on all-MiniLM-L6-v2. Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from course_lib.peft.adapters import (
    ADAPTER_PLACEMENTS,
    AdapterConfig,
    BottleneckAdapter,
    ParallelAdapter,
    SerialAdapter,
)
from course_lib.peft.bitfit import BitFitConfig, bias_parameters
from course_lib.peft.ia3 import IA3Config, IA3Linear
from course_lib.peft.inject import (
    METHODS,
    PEFT_METHODS,
    InjectionReport,
    PEFTConfig,
    inject_peft,
    merge_and_unload,
    peft_module_names,
    register_peft_method,
    remove_peft,
    unload,
)
from course_lib.peft.layers import is_linear_like, linear_layout
from course_lib.peft.lora import LoRAConfig, LoRALinear
from course_lib.peft.matching import ModulePattern, matching_module_names, name_matches
from course_lib.peft.prefix_tuning import (
    PREFIX_ATTENTION,
    PrefixKeyValues,
    PrefixSelfAttention,
    PrefixTuningConfig,
    extend_attention_mask,
)
from course_lib.peft.prompt_tuning import PromptEmbedding, PromptTuningConfig
from course_lib.peft.saving import load_adapter, save_adapter, trainable_state_dict

__all__ = [
    "ADAPTER_PLACEMENTS",
    "METHODS",
    "PEFT_METHODS",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckAdapter",
    "IA3Config",
    "IA3Linear",
    "InjectionReport",
    "LoRAConfig",
    "LoRALinear",
    "ModulePattern",
    "PEFTConfig",
    "ParallelAdapter",
    "PREFIX_ATTENTION",
    "PrefixKeyValues",
    "PrefixSelfAttention",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptTuningConfig",
    "SerialAdapter",
    "bias_parameters",
    "extend_attention_mask",
    "inject_peft",
    "is_linear_like",
    "linear_layout",
    "load_adapter",
    "matching_module_names",
    "merge_and_unload",
    "name_matches",
    "peft_module_names",
    "register_peft_method",
    "remove_peft",
    "save_adapter",
    "trainable_state_dict",
    "unload",
]
