"""Saving and loading adapters in Hugging Face peft's format.

A fine-tuned PEFT model differs from its base model only in a few small tensors, so that is all
we store: a directory with

- `adapter_config.json`: peft's config (`"peft_type": "LORA"`, `"r"`, `"lora_alpha"`,
  `"target_modules"`, `"modules_to_save"`, ...), enough to rebuild the injection;
- `adapter_model.safetensors`: the tensors, under peft's key names, e.g.
  `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight` (r, in) and
  `...query.lora_B.weight` (out, r); a kept head as `base_model.model.classifier.weight`.

The same files are what `peft.PeftModel.save_pretrained` writes and `PeftModel.from_pretrained`
reads, so an adapter trained with course_lib loads into peft on the same base model and the
other way round (tests/test_peft_saving.py checks both, logits equal to 1e-5).

    report = inject_peft(model, "lora", r=8, alpha=16, target_modules=["query", "value"])
    ...train...
    save_adapter(model, "my-adapter")               # a few hundred kB
    fresh = AutoModelForSequenceClassification.from_pretrained(base)   # the same base model
    load_adapter(fresh, "my-adapter")              # injects LoRA and loads the tensors

LoRA, (IA)^3 and prompt tuning have a peft format and use it. Adapters, prefix tuning (as written
here, on BERT) and BitFit have none that matches: `save_adapter` writes them in course_lib's own
format instead (`course_lib_adapter.json`: the method, its `inject_peft` config and the modules
kept trainable; `course_lib_adapter.safetensors`: every trainable tensor under its name in the
model), and `load_adapter` reads both formats.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_lib.peft.ia3 import IA3Config, IA3Linear
from course_lib.peft.inject import InjectionReport, inject_peft
from course_lib.peft.lora import LoRAConfig, LoRALinear
from course_lib.peft.matching import name_matches
from course_lib.peft.prompt_tuning import PromptEmbedding, PromptTuningConfig
from course_lib.results import write_folder

__all__ = ["CONFIG_NAME", "OWN_CONFIG_NAME", "OWN_WEIGHTS_NAME", "WEIGHTS_NAME", "load_adapter", "save_adapter", "trainable_state_dict"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's prefix for the wrapped model's modules (LoRA, IA3)
_PROMPT_PREFIX = "base_model."  # prompt learning: peft keeps the model itself as base_model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with requires_grad, by its name in `model`: what training changed."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):  # fmt: skip
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


def _base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _kept_modules(model: nn.Module, wrapper_names: set[str]) -> list[str]:
    """Modules whose parameters are all trainable and that are not PEFT parameters themselves:
    peft's `modules_to_save` (the task head). Taken from the injection record when there is one."""
    reports: list[InjectionReport] = getattr(model, "course_lib_peft_reports", [])
    if reports:
        return list(dict.fromkeys(name for report in reports for name in report.trainable_modules))
    kept = []
    for name, module in model.named_modules():
        parameters = list(module.parameters())
        if (name and parameters and all(p.requires_grad for p in parameters)
                and not any(name == w or name.startswith(w + ".") or w.startswith(name + ".") for w in wrapper_names)
                and not any(name.startswith(k + ".") for k in kept)):  # fmt: skip
            kept.append(name)
    return kept


def _one_value(values: set, what: str) -> Any:
    if len(values) != 1:
        raise ValueError(f"save_adapter: the model's modules have different {what} ({sorted(values)}); peft's "
                         "format stores one value per adapter (rank_pattern is not written here)")  # fmt: skip
    return next(iter(values))


def _lora_files(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if any(m.merged for m in modules.values()):
        raise ValueError("save_adapter: some LoRA modules are merged into their weights; unmerge them first "
                         "(module.unmerge()) or save the merged model itself")  # fmt: skip
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in modules.values()}
    config = {
        "peft_type": "LORA",
        "r": _one_value({m.r for m in modules.values()}, "ranks"),
        "lora_alpha": _one_value({m.alpha for m in modules.values()}, "alphas"),
        "lora_dropout": _one_value(dropouts, "dropouts"),
        "target_modules": sorted(modules),  # full names: a peft list matches a name equal to an item
        "bias": "none",
        "fan_in_fan_out": _one_value({m.fan_in_fan_out for m in modules.values()}, "layer kinds (Linear / Conv1D)"),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    tensors = {}
    for name, module in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach()  # (r, in)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach()  # (out, r)
    return config, tensors


def _ia3_files(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}
    if any(m.merged for m in modules.values()):
        raise ValueError("save_adapter: some (IA)^3 modules are merged into their weights; unmerge them first")
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(modules),
        "feedforward_modules": sorted(name for name, m in modules.items() if m.feedforward),
        "fan_in_fan_out": _one_value({m.fan_in_fan_out for m in modules.values()}, "layer kinds (Linear / Conv1D)"),
        "init_ia3_weights": True,
    }
    tensors = {}
    for name, module in modules.items():
        # peft keeps l as (1, in) for feed-forward layers and (out, 1) otherwise
        vector = module.scale.detach()
        tensors[f"{_PREFIX}{name}.ia3_l"] = vector[None, :] if module.feedforward else vector[:, None]
    return config, tensors


def _prompt_files(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    prompts = [m for m in model.modules() if isinstance(m, PromptEmbedding)]
    if len(prompts) != 1:
        raise ValueError(f"save_adapter: expected one prompt embedding, found {len(prompts)}")
    weight = prompts[0].weight.detach()  # (P, C)
    model_config = getattr(model, "config", None)
    config = {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": weight.shape[0],
        "token_dim": weight.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
    }
    return config, {"prompt_embeddings": weight}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the PEFT part of `model` (and its kept task head) to `directory` in peft's format.

    LoRA, (IA)^3 and prompt tuning as `inject_peft` puts them (one method per model) in peft's
    format; adapters, prefix tuning and BitFit in course_lib's own (module docstring).
    The directory is written whole or not at all: the files go to a temporary sibling folder
    that then replaces `directory`. Returns the directory. Raises ValueError for a model with no
    such PEFT module, with several methods, or with merged LoRA.
    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    from safetensors.torch import save_file

    kinds = {
        "lora": any(isinstance(m, LoRALinear) for m in model.modules()),
        "ia3": any(isinstance(m, IA3Linear) for m in model.modules()),
        "prompt_tuning": any(isinstance(m, PromptEmbedding) for m in model.modules()),
    }
    found = [kind for kind, present in kinds.items() if present]
    if not found:
        return _save_own_format(model, directory)
    if len(found) > 1:
        raise ValueError(f"save_adapter: the model carries several PEFT methods ({found}); peft's format holds one")
    kind = found[0]
    config, tensors = {"lora": _lora_files, "ia3": _ia3_files, "prompt_tuning": _prompt_files}[kind](model)
    wrapper_names = {name for name, m in model.named_modules() if isinstance(m, (LoRALinear, IA3Linear, PromptEmbedding))}
    kept = _kept_modules(model, wrapper_names)
    prefix = _PROMPT_PREFIX if kind == "prompt_tuning" else _PREFIX
    for module_name in kept:
        for name, tensor in model.get_submodule(module_name).state_dict().items():
            tensors[f"{prefix}{module_name}.{name}"] = tensor.detach()
    config.update(
        task_type=_task_type(model), modules_to_save=kept or None, base_model_name_or_path=_base_model_name(model),
        inference_mode=True, revision=None,
    )  # fmt: skip

    def write(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_NAME),
                  metadata={"format": "pt"})  # fmt: skip

    return write_folder(directory, write)  # whole or not at all


#: course_lib's own format, for the methods peft has no matching format for (adapters as placed
#: here, prefix tuning on BERT, BitFit): the config of `inject_peft` and the trained tensors.
OWN_CONFIG_NAME = "course_lib_adapter.json"
OWN_WEIGHTS_NAME = "course_lib_adapter.safetensors"
_OWN_FORMAT, _OWN_VERSION = "course_lib.peft", 1


def _save_own_format(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Adapters, prefix tuning, BitFit: {"format", "format_version", "method", "config",
    "trainable_modules"} in course_lib_adapter.json, every trainable tensor (by its name in the
    model) in course_lib_adapter.safetensors. Needs the record `inject_peft` leaves on the model."""
    import dataclasses

    from safetensors.torch import save_file

    reports: list[InjectionReport] = getattr(model, "course_lib_peft_reports", [])
    if not reports:
        raise ValueError(f"save_adapter: {type(model).__name__} has no PEFT method that inject_peft put there "
                         "(nothing to save); inject one first")  # fmt: skip
    if len(reports) > 1:
        raise ValueError(f"save_adapter: the model carries several PEFT methods ({[r.method for r in reports]}); "
                         "one folder holds one")  # fmt: skip
    report = reports[0]
    values = dataclasses.asdict(report.config)
    payload = {"format": _OWN_FORMAT, "format_version": _OWN_VERSION, "method": report.config.method,
               "config": values, "trainable_modules": list(report.trainable_modules)}  # fmt: skip
    tensors = {name: t.contiguous().cpu() for name, t in trainable_state_dict(model).items()}

    def write(staging: Path) -> None:
        (staging / OWN_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        save_file(tensors, str(staging / OWN_WEIGHTS_NAME), metadata={"format": "pt"})

    return write_folder(directory, write)


def trained_state_problems(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `tensors` (name -> tensor) from being `model`'s trainable parameters: names
    missing or unexpected, shapes that differ. Empty when they fit exactly."""
    parameters = dict(model.named_parameters())
    trained = {name for name, p in parameters.items() if p.requires_grad}
    problems = []
    if set(tensors) != trained:
        problems.append(f"names differ: missing {sorted(trained - set(tensors))[:3]}, unexpected {sorted(set(tensors) - trained)[:3]}")
    problems += [f"{name}: file {tuple(t.shape)}, model {tuple(parameters[name].shape)}"
                 for name, t in tensors.items() if name in parameters and t.shape != parameters[name].shape]  # fmt: skip
    return problems


@torch.no_grad()
def copy_trained_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model`'s parameters of the same names (checked first with
    `trained_state_problems`)."""
    parameters = dict(model.named_parameters())
    for name, tensor in tensors.items():
        parameters[name].copy_(tensor)


def _undo_injection(model: nn.Module, flags: dict[str, bool]) -> None:
    """Leave `model` as it came to load_adapter: wrappers removed, requires_grad flags restored."""
    from course_lib.peft.inject import remove_peft

    remove_peft(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name, parameter.requires_grad))


def read_versioned_folder(directory: Path, config_name: str, weights_name: str, fmt: str, version: int,
                          who: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # fmt: skip
    """Read a folder written as `config_name` (JSON with "format" and "format_version") beside
    `weights_name` (safetensors): (the JSON payload, the tensors). Each way the folder can be
    wrong is a ValueError that names the file and what was expected; `who` starts each message.
    Used by `load_adapter`'s own format and by `course_lib.meft.load_meft`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        payload = json.loads((directory / config_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{who}: {directory / config_name} is not valid JSON ({error})") from None
    if payload.get("format") != fmt or payload.get("format_version") != version:
        raise ValueError(f"{who}: {directory} holds format {payload.get('format')!r} version "
                         f"{payload.get('format_version')!r}, not {fmt!r} version {version}")  # fmt: skip
    try:
        tensors = load_file(str(directory / weights_name))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{who}: {directory / weights_name} cannot be read ({error})") from None
    return payload, tensors


def _load_own_format(model: nn.Module, directory: Path) -> InjectionReport:
    from course_lib.peft.inject import METHODS

    payload, tensors = read_versioned_folder(directory, OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, _OWN_FORMAT, _OWN_VERSION,
                                             "load_adapter")  # fmt: skip
    method = payload.get("method")
    if method not in METHODS:
        raise ValueError(f"load_adapter: unknown method {method!r} in {directory}; known: {sorted(METHODS)}")
    config = METHODS[method](**payload["config"])
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    report = inject_peft(model, config, trainable_modules=payload.get("trainable_modules") or None)
    problems = trained_state_problems(model, tensors)
    if problems:
        _undo_injection(model, flags)
        raise ValueError(f"load_adapter: the adapter in {directory} does not fit {type(model).__name__}: "
                         + "; ".join(problems) + ". Load it into the base model it was trained on")  # fmt: skip
    copy_trained_state(model, tensors)
    return report


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"load_adapter: {directory} is not a directory; give the folder that save_adapter "
                                "(or peft's save_pretrained) wrote")  # fmt: skip
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        present = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"load_adapter: {directory} lacks {missing} (it holds {present}); an adapter folder "
                                f"has {CONFIG_NAME} and {WEIGHTS_NAME}")  # fmt: skip
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"load_adapter: {config_path} is not valid JSON ({error}); save the adapter again") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:  # a truncated or foreign file
        raise ValueError(f"load_adapter: {weights_path} cannot be read as safetensors ({error}); "
                         "save the adapter again") from None  # fmt: skip
    return config, tensors


def config_from_peft(config: dict[str, Any]) -> LoRAConfig | IA3Config | PromptTuningConfig:
    """course_lib's config for a Hugging Face peft config (its `to_dict()` or adapter_config.json).

    LORA (rsLoRA's alpha / sqrt(r) scaling becomes an equivalent alpha), IA3 and PROMPT_TUNING;
    ValueError names an option or a method course_lib does not implement (DoRA, rank patterns,
    LoRA on biases, other peft types)."""
    kind = config.get("peft_type")
    if kind == "LORA":
        unsupported = {key: config.get(key) for key in ("use_dora", "rank_pattern", "alpha_pattern",
                       "layers_to_transform") if config.get(key)}  # fmt: skip
        if config.get("bias", "none") != "none":
            unsupported["bias"] = config["bias"]
        if unsupported:
            raise ValueError(f"this peft LoRA config uses options course_lib does not implement: {unsupported}")
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
        return LoRAConfig(r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                          target_modules=config["target_modules"])  # fmt: skip
    if kind == "IA3":
        return IA3Config(target_modules=config["target_modules"], feedforward_modules=config.get("feedforward_modules") or [])
    if kind == "PROMPT_TUNING":
        if config.get("num_transformer_submodules", 1) != 1:
            raise ValueError("prompt tuning with num_transformer_submodules != 1 (encoder-decoder "
                             "models) is not supported")  # fmt: skip
        return PromptTuningConfig(num_virtual_tokens=int(config["num_virtual_tokens"]))
    raise ValueError(f"the peft config says peft_type={kind!r}; course_lib implements LORA, IA3 and "
                     "PROMPT_TUNING adapters")  # fmt: skip


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> InjectionReport:
    """Inject the adapter saved in `directory` (by `save_adapter` or by peft) into `model`, in
    place, and load its tensors. `model` must be the base model the adapter was trained on,
    without PEFT modules. Returns `inject_peft`'s report.

    Raises FileNotFoundError for a folder without the two files, ValueError for a method course_lib
    cannot load, tensors that do not fit the model (names or shapes) or a damaged file.
    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    directory = Path(directory)
    if (directory / OWN_CONFIG_NAME).is_file() and (directory / OWN_WEIGHTS_NAME).is_file():
        return _load_own_format(model, directory)  # adapters, prefix tuning, BitFit
    peft_config, tensors = _read(directory)
    config = config_from_peft(peft_config)
    kind = config.method
    prefix = _PROMPT_PREFIX if kind == "prompt_tuning" else _PREFIX
    # peft lists module-name endings and adds both "classifier" and "score" for SEQ_CLS: keep the
    # modules of this model that match (peft's own rule), ignore the names it does not have
    wanted = list(peft_config.get("modules_to_save") or [])
    kept = [name for name, _ in model.named_modules() if name and wanted and name_matches(name, wanted)]
    kept = [name for name in kept if not any(name.startswith(k + ".") for k in kept)]
    # check every tensor's home before the model is changed
    own = {}
    for key, tensor in tensors.items():
        if key == "prompt_embeddings":
            continue
        if not key.startswith(prefix):
            raise ValueError(f"load_adapter: tensor {key!r} does not start with peft's {prefix!r}; is {directory} "
                             "a peft adapter folder?")  # fmt: skip
        own[key.removeprefix(prefix)] = tensor
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    report = inject_peft(model, config, trainable_modules=kept or None)
    targets: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            targets[f"{name}.lora_A.weight"] = module.lora_A
            targets[f"{name}.lora_B.weight"] = module.lora_B
        elif isinstance(module, IA3Linear):
            targets[f"{name}.ia3_l"] = module.scale
        elif isinstance(module, PromptEmbedding):
            targets["prompt_embeddings"] = module.weight
    for module_name in kept:
        for name, parameter in model.get_submodule(module_name).named_parameters():
            targets[f"{module_name}.{name}"] = parameter
    if kind == "prompt_tuning":
        if "prompt_embeddings" not in tensors:
            raise ValueError(f"load_adapter: {directory / WEIGHTS_NAME} has no 'prompt_embeddings' tensor")
        own["prompt_embeddings"] = tensors["prompt_embeddings"]
    missing = sorted(set(targets) - set(own))
    unexpected = sorted(set(own) - set(targets))
    problems = []
    if missing:
        problems.append(f"missing from the file: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for key in sorted(set(targets) & set(own)):
        target, tensor = targets[key], own[key]
        if tensor.numel() != target.numel() or (tensor.dim() == target.dim() and tensor.shape != target.shape):
            problems.append(f"{key}: file {tuple(tensor.shape)}, model {tuple(target.shape)}")
    if problems:
        _undo_injection(model, flags)
        raise ValueError(f"load_adapter: the adapter in {directory} does not fit {type(model).__name__}: "
                         + "; ".join(problems) + ". Load it into the base model it was trained on")  # fmt: skip
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(own[key].reshape(target.shape))
    return report
