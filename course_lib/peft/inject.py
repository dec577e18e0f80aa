"""Putting a PEFT method onto a model: one function for all methods, and a report of what changed.

    report = inject_peft(model, "lora", target_modules=["query", "value"], r=8, alpha=16)
    report = inject_peft(model, LoRAConfig(r=8, alpha=16))          # the same, with a config
    print(report)   # lora: 12 modules replaced, 148,994 / 22,862,594 parameters trainable (0.65%)

`inject_peft` changes the model in place: it finds the modules whose dotted names match the
method's `target_modules` (see `course_lib.peft.matching`), replaces each by the method's wrapper
(LoRALinear, SerialAdapter, IA3Linear...), freezes every other parameter and keeps the task head
(`trainable_modules`, like peft's `modules_to_save`) trainable. It works on any nn.Module for
LoRA, adapters, BitFit and (IA)^3 given `target_modules`; prefix tuning a Hugging Face
transformer (the BERT family through `PrefixSelfAttention`, other transformers 5.x models such as
DistilBERT, GPT-2 or Llama through `PREFIX_ATTENTION`, see prefix_tuning.py), prompt tuning any Hugging Face
model that takes `inputs_embeds` (BERT, RoBERTa, DistilBERT, GPT-2, ...). With `target_modules=None` each method uses
Hugging Face peft's BERT defaults.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Union

from torch import nn

from course_lib.meters.parameters import count_parameters
from course_lib.peft.adapters import (
    BERT_ADAPTER_TARGETS,
    AdapterConfig,
    BottleneckAdapter,
    ParallelAdapter,
    SerialAdapter,
)
from course_lib.peft.bitfit import BitFitConfig, bias_parameters
from course_lib.peft.ia3 import IA3Config, IA3Linear
from course_lib.peft.layers import is_linear_like, linear_layout
from course_lib.peft.lora import LoRAConfig, LoRALinear
from course_lib.peft.matching import ModulePattern, matching_module_names, name_matches
from course_lib.peft.prefix_tuning import (
    PrefixKeyValues,
    PrefixSelfAttention,
    PrefixTuningConfig,
    attach_prefix,
    detach_prefix,
    looks_like_bert_self_attention,
    looks_like_interface_attention,
)
from course_lib.peft.prompt_tuning import (
    PromptEmbedding,
    PromptTuningConfig,
    looks_like_bert_model,
    takes_inputs_embeds,
)
from course_lib.report import PEFTReport, trainable_parts

__all__ = [
    "METHODS",
    "PEFT_METHODS",
    "InjectionReport",
    "PEFTConfig",
    "inject_peft",
    "merge_and_unload",
    "peft_module_names",
    "register_peft_method",
    "remove_peft",
    "unload",
]

PEFTConfig = Union[LoRAConfig, AdapterConfig, PrefixTuningConfig, PromptTuningConfig, BitFitConfig, IA3Config]

#: Method names `inject_peft` accepts, and their config classes.
METHODS: dict[str, type] = {
    "lora": LoRAConfig,
    "adapter": AdapterConfig,
    "prefix_tuning": PrefixTuningConfig,
    "prompt_tuning": PromptTuningConfig,
    "bitfit": BitFitConfig,
    "ia3": IA3Config,
}
# shorthands: an adapter placement used as a method name
_ADAPTER_ALIASES = {"houlsby": "houlsby", "pfeiffer": "pfeiffer", "parallel_adapter": "parallel"}

#: Hugging Face peft's option names that mean the same as course_lib's (LoraConfig(lora_alpha=...)).
_PEFT_OPTION_NAMES = {"lora": {"lora_alpha": "alpha", "lora_dropout": "dropout"}}

# Hugging Face peft's defaults for BERT-family models (peft.utils.constants)
_BERT_LORA_TARGETS = ["query", "value"]
_BERT_IA3_TARGETS = ["key", "value", "output.dense"]
_BERT_IA3_FEEDFORWARD = ["output.dense"]
#: The task heads kept trainable by default when the model has them (peft's SEQ_CLS modules_to_save).
DEFAULT_TRAINABLE_MODULES = ("classifier", "score")
_DEFAULT = object()


@dataclass
class InjectionReport(PEFTReport):
    """What `inject_peft` did: a `course_lib.report.PEFTReport` (in place: the model passed in is
    the one to train) plus the modules kept trainable beside the method's own parameters.

    `replaced`, `trainable_params` and `total_params` are the earlier names of `changed`,
    `trainable` and `total`."""

    trainable_modules: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> list[str]:
        return self.changed

    @property
    def trainable_params(self) -> int:
        return self.trainable

    @property
    def total_params(self) -> int:
        return self.total

    def to_markdown(self) -> str:
        """A small Markdown table, for notebooks and result pages."""
        rows = [
            ("method", self.method),
            ("modules changed", f"{len(self.changed)}"),
            ("trainable parameters", f"{self.trainable:,}"),
            ("total parameters", f"{self.total:,}"),
            ("trainable %", f"{self.trainable_pct:.3f}"),
            ("also trainable", ", ".join(self.trainable_modules) or "-"),
        ]
        return "| | |\n| --- | --- |\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _make_config(method: str | PEFTConfig, options: dict[str, Any]) -> PEFTConfig:
    if not isinstance(method, str):
        if type(method) not in PEFT_METHODS:
            raise TypeError(f"method must be a method name or a config object, got {type(method).__name__}")
        if options:
            raise TypeError(f"give options either in the config or as keywords, not both: {sorted(options)}")
        return method
    name = method.lower()
    if name in _ADAPTER_ALIASES:
        options = {"placement": _ADAPTER_ALIASES[name], **options}
        name = "adapter"
    if name not in METHODS:
        known = sorted(METHODS) + sorted(_ADAPTER_ALIASES)
        raise ValueError(f"unknown PEFT method {method!r}; known methods: {known}")
    config_class = METHODS[name]
    allowed = {f.name for f in fields(config_class)}
    for peft_name, ours in _PEFT_OPTION_NAMES.get(name, {}).items():  # peft's spelling of an option
        if peft_name in options:
            if ours in options:
                raise TypeError(f"give {ours!r} or peft's {peft_name!r}, not both")
            options = {**options, ours: options[peft_name]}
            del options[peft_name]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{name} has no option(s) {unknown}; its options are {sorted(allowed)}")
    return config_class(**options)


def _is_bert_family(model: nn.Module) -> bool:
    return any(looks_like_bert_model(module) for module in model.modules())


def _default_targets(model: nn.Module, method: str, bert_default: Any) -> Any:
    if not _is_bert_family(model):
        raise ValueError(
            f"target_modules=None means the BERT default {bert_default!r}, but {type(model).__name__} is not a "
            f"BERT-family model; pass target_modules (a regex or a list of module names) for {method}"
        )
    return bert_default


def _replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new_module.train(parent.training)  # a new wrapper takes the train/eval mode of the model it joins
    setattr(parent, child_name, new_module)


def _output_width(module: nn.Module, name: str) -> int:
    """The width an adapter must have after `module`: its (last) Linear's (or Conv1D's) out_features."""
    if is_linear_like(module):
        return linear_layout(module).out_features
    if isinstance(getattr(module, "dense", None), nn.Linear):  # BERT-style output blocks
        return module.dense.out_features
    linears = [m for m in module.modules() if is_linear_like(m)]
    if not linears:
        raise TypeError(f"cannot tell the width of {name!r} ({type(module).__name__}) for an adapter; "
                        "target nn.Linear (or Conv1D) layers or blocks that contain one")
    return linear_layout(linears[-1]).out_features


def _apply_lora(model: nn.Module, config: LoRAConfig) -> tuple[list[str], list[nn.Parameter]]:
    modules = dict(model.named_modules())
    new_parameters: list[nn.Parameter] = []
    pattern = config.target_modules
    if pattern is None:
        pattern = _default_targets(model, "lora", _BERT_LORA_TARGETS)
    names = matching_module_names(model, pattern, module_type=is_linear_like)
    for name in names:
        wrapper = LoRALinear(modules[name], r=config.r, alpha=config.alpha, dropout=config.dropout)
        _replace_module(model, name, wrapper)
        new_parameters += [wrapper.lora_A, wrapper.lora_B]
    return names, new_parameters


def _apply_ia3(model: nn.Module, config: IA3Config) -> tuple[list[str], list[nn.Parameter]]:
    modules = dict(model.named_modules())
    new_parameters: list[nn.Parameter] = []
    pattern = config.target_modules
    if pattern is None:
        pattern = _default_targets(model, "ia3", _BERT_IA3_TARGETS)
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = _BERT_IA3_FEEDFORWARD if config.target_modules is None else []
    names = matching_module_names(model, pattern, module_type=is_linear_like)
    for name in names:
        # peft: a name is feed-forward when it ends with a feedforward_modules entry
        is_feedforward = (
            name_matches(name, feedforward)
            if isinstance(feedforward, str)
            else any(name.endswith(item) for item in feedforward)
        )
        wrapper = IA3Linear(modules[name], feedforward=is_feedforward)
        _replace_module(model, name, wrapper)
        new_parameters.append(wrapper.scale)
    return names, new_parameters


def _apply_adapter(model: nn.Module, config: AdapterConfig) -> tuple[list[str], list[nn.Parameter]]:
    modules = dict(model.named_modules())
    new_parameters: list[nn.Parameter] = []
    pattern = config.target_modules
    if pattern is None:
        pattern = _default_targets(model, f"{config.placement} adapters", BERT_ADAPTER_TARGETS[config.placement])
    names = matching_module_names(model, pattern)
    for name in names:
        base = modules[name]
        width = _output_width(base, name)
        adapter = BottleneckAdapter(
            width, config.bottleneck_for(width), activation=config.activation, scale=config.scale_or_default()
        )
        reference = next(base.parameters(), None)
        if reference is not None:
            adapter.to(device=reference.device, dtype=reference.dtype)
        wrapper = ParallelAdapter(base, adapter) if config.placement == "parallel" else SerialAdapter(base, adapter)
        _replace_module(model, name, wrapper)
        new_parameters += list(adapter.parameters())
    return names, new_parameters


def _apply_bitfit(model: nn.Module, config: BitFitConfig) -> tuple[list[str], list[nn.Parameter]]:
    if config.target_modules is not None:
        matching_module_names(model, config.target_modules)  # a clear error if nothing matches
    biases = bias_parameters(model, config.target_modules)
    if not biases:
        raise ValueError(f"BitFit found no bias parameter in the modules of {type(model).__name__} "
                         f"matching {config.target_modules!r}")
    return list(biases), list(biases.values())


def _apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> tuple[list[str], list[nn.Parameter]]:
    modules = dict(model.named_modules())
    new_parameters: list[nn.Parameter] = []
    # BERT family: the self-attention notebook 02 derives; any other model whose attention goes
    # through transformers' AttentionInterface: a prefix where keys and values meet (prefix_tuning.py)
    attentions = [name for name, module in modules.items() if looks_like_bert_self_attention(module)]
    bert_family = bool(attentions)
    if not bert_family:
        attentions = [name for name, module in modules.items() if looks_like_interface_attention(module)]
    if not attentions:
        raise ValueError(
            f"prefix tuning needs a Hugging Face transformer: {type(model).__name__} has neither a BERT-style "
            "self-attention (query/key/value layers) nor attention modules that use transformers' attention "
            "interface (transformers 5.x models: DistilBERT, GPT-2, Llama, ...)"
        )
    names = attentions
    if config.target_modules is not None:
        matched = set(matching_module_names(model, config.target_modules))
        names = [name for name in attentions if name in matched]
        if not names:
            raise ValueError(f"target_modules={config.target_modules!r} matches none of the self-attention "
                             f"modules {attentions[:4]}...")
    for name in names:
        if not bert_family:
            prefix = attach_prefix(modules[name], config.num_virtual_tokens, config.projection_dim, config.init_std)
            new_parameters += list(prefix.parameters())
            continue
        wrapper = PrefixSelfAttention(
            modules[name], config.num_virtual_tokens, projection_dim=config.projection_dim, init_std=config.init_std
        )
        _replace_module(model, name, wrapper)
        new_parameters += [p for n, p in wrapper.named_parameters() if not n.startswith("base.")]
    return names, new_parameters


def _apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> tuple[list[str], list[nn.Parameter]]:
    modules = dict(model.named_modules())
    # a BERT-family model: its BERT model (as before, and peft's numerics); otherwise the outermost
    # model that takes inputs_embeds (a causal LM's labels are then at hand to shift, as peft does)
    candidates = [name for name, module in modules.items() if looks_like_bert_model(module)]
    candidates = candidates or [name for name, module in modules.items() if takes_inputs_embeds(module)]
    if not candidates:
        raise ValueError(
            f"prompt tuning needs a Hugging Face model that takes inputs_embeds and has an input embedding table "
            f"(BERT, RoBERTa, DistilBERT, GPT-2, ...): {type(model).__name__} has no such module"
        )
    name = candidates[0]  # the outermost one
    if config.target_modules is not None:
        matching = set(matching_module_names(model, config.target_modules))
        matched = [n for n in candidates if n in matching]
        if not matched:
            raise ValueError(f"target_modules={config.target_modules!r} matches no model prompts can be put on; "
                             f"candidates: {candidates}")
        name = matched[0]
    bert = modules[name]
    word_embeddings = bert.get_input_embeddings() if takes_inputs_embeds(bert) else bert.embeddings.word_embeddings
    prompts = PromptEmbedding(
        config.num_virtual_tokens, word_embeddings.embedding_dim, word_embeddings=word_embeddings, init=config.init
    )
    prompts.train(bert.training)
    prompts.attach(bert)
    return [name or type(model).__name__], [prompts.weight]


#: How each method is put on a model: config class -> function(model, config) returning the
#: names of the modules it changed and the new (trainable) parameters, as peft's tuners own their
#: layers. `register_peft_method` adds one; `inject_peft` dispatches on the config's type.
PEFT_METHODS: dict[type, Callable[[nn.Module, Any], tuple[list[str], list[nn.Parameter]]]] = {
    LoRAConfig: _apply_lora,
    IA3Config: _apply_ia3,
    AdapterConfig: _apply_adapter,
    BitFitConfig: _apply_bitfit,
    PrefixTuningConfig: _apply_prefix_tuning,
    PromptTuningConfig: _apply_prompt_tuning,
}


def register_peft_method(
    config_class: type, apply: Callable[[nn.Module, Any], tuple[list[str], list[nn.Parameter]]], name: str | None = None
) -> None:
    """Teach `inject_peft` a method of your own: `apply(model, config)` changes `model` in place and
    returns (names of the modules it changed, its new trainable parameters); `config_class` needs
    a `method` attribute (its name). `name` (default `config_class.method`) becomes a method
    name `inject_peft(model, name, **options)` accepts."""
    if not isinstance(config_class, type) or not hasattr(config_class, "method"):
        raise TypeError("config_class must be a class with a `method` attribute (the method's name)")
    PEFT_METHODS[config_class] = apply
    METHODS[name or config_class.method] = config_class


def _apply(model: nn.Module, config: Any) -> tuple[list[str], list[nn.Parameter]]:
    """Replace the targeted modules; return their names and the new (trainable) parameters."""
    apply = PEFT_METHODS.get(type(config))
    if apply is None:
        raise TypeError(f"no PEFT method is registered for {type(config).__name__}; known: "
                        f"{sorted(c.__name__ for c in PEFT_METHODS)}")  # fmt: skip
    return apply(model, config)


def inject_peft(
    model: nn.Module,
    method: str | PEFTConfig,
    *,
    trainable_modules: ModulePattern | None | object = _DEFAULT,
    freeze: bool = True,
    **options: Any,
) -> InjectionReport:
    """Apply a PEFT method to `model` in place and report what changed.

    Args:
        model: any nn.Module (prefix tuning: a Hugging Face transformer; prompt tuning: a
            Hugging Face model that takes inputs_embeds).
        method: a name in `METHODS` ("lora", "adapter", "prefix_tuning", "prompt_tuning",
            "bitfit", "ia3"; also "houlsby", "pfeiffer", "parallel_adapter") with the method's
            options as keywords (`r=8`, `target_modules=...`; peft's `lora_alpha`, `lora_dropout`
            and `modules_to_save` are accepted too), or a config object: course_lib's
            (`LoRAConfig`, ...) or Hugging Face peft's (`peft.LoraConfig`, `IA3Config`,
            `PromptTuningConfig`, translated by `course_lib.peft.saving.config_from_peft`).
        trainable_modules: modules kept trainable besides the method's own parameters (a regex
            or list of names, see `course_lib.peft.matching`); by default the classification
            head ("classifier" or "score") if the model has one, like peft's SEQ_CLS models.
        freeze: freeze every other parameter first (False: leave requires_grad as it is, e.g. to
            stack a second method on top of a first).

    Raises ValueError for an unknown method, an option out of range (r <= 0) or a pattern that
    matches nothing, TypeError for an unknown option or a target of the wrong kind.
    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    if "modules_to_save" in options:  # peft's name for trainable_modules
        if trainable_modules is not _DEFAULT:
            raise TypeError("give trainable_modules or peft's modules_to_save, not both")
        trainable_modules = options.pop("modules_to_save")
    if hasattr(method, "peft_type"):  # a Hugging Face peft config object (peft.LoraConfig, ...)
        from course_lib.peft.saving import config_from_peft

        peft_dict = method.to_dict()
        method = config_from_peft(peft_dict)
        if peft_dict.get("modules_to_save") and trainable_modules is _DEFAULT:
            trainable_modules = list(peft_dict["modules_to_save"])
    config = _make_config(method, options)
    if trainable_modules is _DEFAULT:
        head_names = [name for name, _ in model.named_modules() if name and name_matches(name, DEFAULT_TRAINABLE_MODULES)]
        keep = head_names
    elif trainable_modules is None:
        keep = []
    else:
        keep = matching_module_names(model, trainable_modules, what="trainable_modules")

    replaced, new_parameters = _apply(model, config)

    if freeze:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in keep:
        for parameter in modules[name].parameters():
            parameter.requires_grad_(True)
    for parameter in new_parameters:
        parameter.requires_grad_(True)

    counts = count_parameters(model)  # the course's parameter meter (notebook 03)
    report = InjectionReport(
        method=config.method, trainable=counts.trainable, total=counts.total, changed=replaced,
        parts=trainable_parts(model), in_place=True, config=config, trainable_modules=keep,
    )
    # remembered on the model for save_adapter; an object attribute, not a module or a parameter
    model.__dict__.setdefault(_REPORTS, []).append(report)
    if config.method != "bitfit":  # BitFit changes no module: save_pretrained stays exact
        _refuse_save_pretrained(model)
    return report


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRALinear and IA3Linear into its base layer and put the plain layer back.

    Returns `model` itself (changed in place), as peft's `merge_and_unload` returns the base model.
    Adapters, prefixes and prompts cannot be merged into weights and are left in place (use
    `remove_peft` to drop them). Once nothing of course_lib is left in it, the model can be saved
    with `save_pretrained` again.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (LoRALinear, IA3Linear))]
    for name in names:
        _replace_module(model, name, model.get_submodule(name).merged_linear())
    _forget_injection(model)
    return model


def remove_peft(model: nn.Module) -> nn.Module:
    """Undo `inject_peft`: put every original module back (unmerged) and drop the PEFT parameters.

    requires_grad flags are left as they are. Returns `model` itself (changed in place); `unload`
    is the same function under peft's name.
    """
    wrappers = (LoRALinear, IA3Linear, SerialAdapter, ParallelAdapter, PrefixSelfAttention)
    # innermost first, so that a wrapper inside another one's base (LoRA under prefix tuning)
    # is restored while its name is still valid
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, PrefixKeyValues):  # a child of its attention module, not a wrapper
            detach_prefix(model.get_submodule(name.rpartition(".")[0]) if "." in name else model)
        elif isinstance(module, PromptEmbedding):
            parent_name = name.rpartition(".")[0]
            module.detach_from(model.get_submodule(parent_name) if parent_name else model)
        elif isinstance(module, wrappers):
            if getattr(module, "merged", False):
                module.unmerge()
            _replace_module(model, name, module.base)
    model.__dict__.pop(_REPORTS, None)
    _forget_injection(model, everything=True)
    return model


#: Hugging Face peft's name for `remove_peft`.
unload = remove_peft


def peft_module_names(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that course_lib's PEFT methods put there (wrappers, prompts)."""
    wrappers = (LoRALinear, IA3Linear, SerialAdapter, ParallelAdapter, PrefixSelfAttention, PrefixKeyValues, PromptEmbedding)
    return [name for name, module in model.named_modules() if isinstance(module, wrappers)]


# --- what inject_peft remembers on the model ------------------------------------------------

_REPORTS = "course_lib_peft_reports"  # list[InjectionReport], read by course_lib.peft.saving


class _SavePretrainedRefusal:
    """Stands in for `save_pretrained` on a Hugging Face model that carries course_lib's wrappers.

    Such a model would save renamed keys (`query.base.weight` for `query.weight`), and
    `from_pretrained` would then re-initialise those weights with only a warning: wrong logits, no
    error. A plain object (not a closure), so that the model still pickles."""

    def __init__(self, model_class: str) -> None:
        self.model_class = model_class

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"save_pretrained on this {self.model_class} would write course_lib's wrapped layers under renamed keys "
            "(e.g. 'query.base.weight' for 'query.weight') that from_pretrained silently re-initialises. Save the "
            "adapter with course_lib.peft.save_adapter(model, directory) (Hugging Face peft's format), or fold LoRA / "
            "(IA)^3 into the weights with merge_and_unload(model) (or drop the method with remove_peft(model)) and "
            "then call save_pretrained"
        )


def _refuse_save_pretrained(model: nn.Module) -> None:
    """Shadow a Hugging Face model's `save_pretrained` with a clear refusal until the wrappers are
    gone (`merge_and_unload`, `remove_peft`)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _SavePretrainedRefusal(type(model).__name__)


def _forget_injection(model: nn.Module, *, everything: bool = False) -> None:
    """After merging or removing: give `save_pretrained` back once no wrapper is left."""
    if everything or not peft_module_names(model):
        model.__dict__.pop("save_pretrained", None)
        model.__dict__.pop(_REPORTS, None)
