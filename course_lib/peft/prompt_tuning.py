"""Prompt tuning: learned "virtual token" embeddings put in front of the input (Lester et al., 2021,
arXiv:2104.08691).

The frozen model reads [p_1 ... p_P, e(x_1) ... e(x_T)]: P trainable vectors of the embedding
width, followed by the word embeddings of the real tokens. Only the P x C prompt matrix trains.

The prompts are prepended where the model reads its input, following Hugging Face peft's
PROMPT_TUNING numerics so that logits match:

- inputs_embeds = [prompts; word_embeddings(input_ids)]           (B, P + T, C)
- attention_mask gets P leading ones, token_type_ids P leading zeros (when given)
- position ids are left to the model, so prompts take positions 0..P-1 and real tokens P..P+T-1
- the output keeps all P + T positions; BERT's pooler (and so BertForSequenceClassification)
  reads position 0, which is now the first virtual token, as in peft;
- token-level labels (B, T), a causal LM's, get P leading -100s (ignored by the loss), as peft's
  CAUSAL_LM does; a sequence label (B,) is left alone.

Where: on a BERT-family model (BertModel, RobertaModel and their task models) the BERT model
inside; otherwise (DistilBERT, GPT-2, ...) the outermost Hugging Face model that takes
`inputs_embeds` and has `get_input_embeddings()`. It is done by a forward pre-hook that rewrites
that model's inputs; the prompts live in a `PromptEmbedding` sub-module registered on it as
`prompt_embedding`, so they show up in `print(model)`, `named_parameters()` and the state dict.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from course_lib.peft.matching import ModulePattern

__all__ = ["PromptEmbedding", "PromptTuningConfig", "looks_like_bert_model", "takes_inputs_embeds"]

_PROMPT_INITS = ("random", "vocab")


@dataclass
class PromptTuningConfig:
    """Settings of prompt tuning.

    init: "random" draws N(0, 1) like an nn.Embedding (peft's RANDOM); "vocab" copies the
    embeddings of randomly sampled vocabulary tokens (Lester et al.'s better start).
    `target_modules=None` means the outermost BERT-family model inside the given model, or for
    other families the outermost model that takes `inputs_embeds` (see the module docstring).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    target_modules: ModulePattern | None = None

    method = "prompt_tuning"

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in _PROMPT_INITS:
            raise ValueError(f"unknown prompt init {self.init!r}; choose one of {_PROMPT_INITS}")


def looks_like_bert_model(module: nn.Module) -> bool:
    """True for a BERT-family encoder model: `.embeddings.word_embeddings` and `.encoder`."""
    embeddings = getattr(module, "embeddings", None)
    return isinstance(getattr(embeddings, "word_embeddings", None), nn.Embedding) and hasattr(module, "encoder")


def takes_inputs_embeds(module: nn.Module) -> bool:
    """True for a Hugging Face model whose forward takes `inputs_embeds` and that has an input
    embedding table (`get_input_embeddings()` -> nn.Embedding): where prompts can be prepended."""
    get_embeddings = getattr(module, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return False
    try:
        embeddings = get_embeddings()
        parameters = inspect.signature(module.forward).parameters
    except (NotImplementedError, TypeError, ValueError, AttributeError):
        return False
    return isinstance(embeddings, nn.Embedding) and "inputs_embeds" in parameters


def _named_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward call's arguments by name (positional ones named from the signature)."""
    named = dict(kwargs)
    if args:
        parameters = [p for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        if len(args) > len(parameters):
            raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional inputs, it takes {len(parameters)}")
        named.update({parameter.name: value for parameter, value in zip(parameters, args)})
    return named


class PromptEmbedding(nn.Module):
    """P trainable prompt vectors (P, C) and the hook that prepends them to a model's input.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """

    def __init__(self, num_virtual_tokens: int, dim: int, word_embeddings: nn.Embedding | None = None,
                 init: str = "random") -> None:
        super().__init__()
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
        if init not in _PROMPT_INITS:
            raise ValueError(f"unknown prompt init {init!r}; choose one of {_PROMPT_INITS}")
        self.num_virtual_tokens = num_virtual_tokens
        self.weight = nn.Parameter(torch.randn(num_virtual_tokens, dim))  # (P, C), N(0, 1)
        if init == "vocab":
            if word_embeddings is None:
                raise ValueError("init='vocab' needs the model's word_embeddings")
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (num_virtual_tokens,))
            with torch.no_grad():
                self.weight.copy_(word_embeddings.weight[token_ids.to(word_embeddings.weight.device)])
        if word_embeddings is not None:
            self.to(device=word_embeddings.weight.device, dtype=word_embeddings.weight.dtype)
        self._hook_handle: Any = None

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, C)

    def prepend_to_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the model: rewrite its inputs as described in the module docstring."""
        kwargs = _named_inputs(model, args, kwargs)
        input_ids = kwargs.get("input_ids")
        inputs_embeds = kwargs.get("inputs_embeds")
        if kwargs.get("position_ids") is not None:
            raise ValueError("prompt tuning assigns positions itself (prompts first); do not pass position_ids")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, T, C)
        batch = inputs_embeds.shape[0]
        prompts = self(batch).to(inputs_embeds.dtype)  # (B, P, C)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompts, inputs_embeds], dim=1)  # (B, P+T, C)

        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("prompt tuning extends a 2-D (B, T) attention_mask; got shape "
                                 f"{tuple(attention_mask.shape)}")
            ones = attention_mask.new_ones(batch, self.num_virtual_tokens)  # the prompts are never padding
            kwargs["attention_mask"] = torch.cat([ones, attention_mask], dim=1)  # (B, P+T)
        token_type_ids = kwargs.get("token_type_ids")
        if token_type_ids is not None:
            zeros = token_type_ids.new_zeros(batch, self.num_virtual_tokens)  # prompts are segment A
            kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)  # (B, P+T)
        labels = kwargs.get("labels")
        tokens = inputs_embeds.shape[1]  # T, the real tokens
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == tokens:
            ignored = labels.new_full((batch, self.num_virtual_tokens), -100)  # no loss on the prompts
            kwargs["labels"] = torch.cat([ignored, labels], dim=1)  # (B, P+T)
        return (), kwargs

    def attach(self, model: nn.Module) -> None:
        """Register on `model` as `model.prompt_embedding` and hook its forward."""
        if not (looks_like_bert_model(model) or takes_inputs_embeds(model)):
            raise TypeError(f"prompt tuning needs a Hugging Face model that takes inputs_embeds and has an input "
                            f"embedding table (BERT, RoBERTa, DistilBERT, GPT-2, ...), got {type(model).__name__}")  # fmt: skip
        if hasattr(model, "prompt_embedding"):
            raise ValueError(f"{type(model).__name__} already has a prompt_embedding; prompt tuning was applied twice")
        model.prompt_embedding = self
        self._hook_handle = model.register_forward_pre_hook(self.prepend_to_inputs, with_kwargs=True)

    def detach_from(self, bert: nn.Module) -> None:
        """Undo `attach`: remove the hook and the sub-module."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if getattr(bert, "prompt_embedding", None) is self:
            del bert.prompt_embedding

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.weight.shape[1]}"
