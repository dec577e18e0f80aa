"""Prefix tuning: learned keys and values that every token can attend to (Li & Liang, 2021,
arXiv:2101.00190).

In each attention layer, P learned "virtual tokens" are put in front of the real keys and values:

    K' = [P_K; K],  V' = [P_V; V],   P_K, P_V: (P, C)
    attention(Q, K', V') = softmax(Q K'^T / sqrt(d) + mask') V'

Queries come only from the real tokens, so the sequence length and every other module are
unchanged; the mask is extended so that every real token may attend to all P prefix positions.
Li & Liang found training P_K, P_V directly unstable and produced them with an MLP from a smaller
matrix (the "reparametrisation", dropped after training); `projection_dim` turns it on. They share
one MLP across layers; here each layer has its own small one, so parameter counts with
`projection_dim` differ from theirs (without it, the default and Hugging Face peft's default,
they are the same: 2 P C per layer).

On Hugging Face BERT-family models (BertModel, BertFor*, RoBERTa...) the self-attention module
is replaced by `PrefixSelfAttention`, which re-uses its query/key/value layers (LoRA-wrapped ones
too) and computes attention itself: the version notebook 02 derives. It accepts the masks
transformers 5.x passes to self-attention: None (no padding), a boolean (B, 1, T, T) mask (True =
may attend, "sdpa") or an additive float mask (0 or -inf-like, "eager"). The installed peft
refuses prefix tuning on BERT ("Model does not support past key values"); this version does not
need a key/value cache.

On any other transformers 5.x model whose attention modules compute attention through
transformers' `AttentionInterface` (DistilBERT, GPT-2, Llama, ...; fused or grouped key/value
projections included), the keys and values are extended where they meet: each attention module
gets a child `course_prefix` (`PrefixKeyValues`, the P_K and P_V), and the model's attention
implementation becomes `PREFIX_ATTENTION`, an attention function registered with transformers
that puts a module's prefix in front of its keys and values and extends the mask (a causal model
gets its causal mask made explicit, the prefix visible to every query), then runs transformers'
own "sdpa" function. Positions are those of the real tokens (0..T-1): unlike peft's prefix tuning
through `past_key_values`, which shifts a GPT-2's positions by P. `remove_peft` puts the previous
implementation back.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.peft.matching import ModulePattern

__all__ = [
    "PREFIX_ATTENTION",
    "PrefixKeyValues",
    "PrefixSelfAttention",
    "PrefixTuningConfig",
    "attach_prefix",
    "detach_prefix",
    "extend_attention_mask",
    "looks_like_bert_self_attention",
    "looks_like_interface_attention",
    "prefix_attention_forward",
]

#: The name of course_lib's prefix attention in transformers' AttentionInterface (and mask interface).
PREFIX_ATTENTION = "course_prefix_tuning"
#: The child an attention module gets for its prefix (`PrefixKeyValues`).
PREFIX_CHILD = "course_prefix"


@dataclass
class PrefixTuningConfig:
    """Settings of prefix tuning. DEFT uses 60 virtual tokens.

    `target_modules=None` means every BERT-style self-attention module of the model.
    `init_std` is the std of the normal init of P_K, P_V (or of the MLP's input), 1.0 like an
    nn.Embedding (peft's choice).
    """

    num_virtual_tokens: int = 20
    projection_dim: int | None = None
    init_std: float = 1.0
    target_modules: ModulePattern | None = None

    method = "prefix_tuning"

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 0:
            raise ValueError(f"num_virtual_tokens must be >= 0, got {self.num_virtual_tokens}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive or None, got {self.projection_dim}")


def looks_like_bert_self_attention(module: nn.Module) -> bool:
    """True for a BERT-style self-attention module: query/key/value layers and head sizes."""
    return (
        all(hasattr(module, name) for name in ("query", "key", "value", "num_attention_heads", "attention_head_size"))
        and "Cross" not in type(module).__name__
        and not isinstance(module, PrefixSelfAttention)
    )


def extend_attention_mask(attention_mask: torch.Tensor | None, num_prefix: int) -> torch.Tensor | None:
    """Prepend `num_prefix` key positions that every query may attend to.

    (B or 1, 1, T_q, T_k) -> (B or 1, 1, T_q, P + T_k); boolean masks get True (may attend),
    additive float masks get 0 (no penalty). None stays None (no position is masked).
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise TypeError(
            "prefix tuning needs the 4-D attention mask of the 'sdpa' or 'eager' attention of "
            f"transformers, got {type(attention_mask).__name__}"
            f"{'' if not isinstance(attention_mask, torch.Tensor) else ' of shape ' + str(tuple(attention_mask.shape))}"
            "; load the model with attn_implementation='sdpa' (the default) or 'eager'"
        )
    prefix_shape = (*attention_mask.shape[:-1], num_prefix)
    if attention_mask.dtype == torch.bool:
        prefix = attention_mask.new_ones(prefix_shape)  # True: real tokens may attend to the prefix
    else:
        prefix = attention_mask.new_zeros(prefix_shape)  # additive mask: 0 means no penalty
    return torch.cat([prefix, attention_mask], dim=-1)


class _PrefixParameters(nn.Module):
    """P_K and P_V of one attention layer, trained directly or through Li & Liang's MLP."""

    def _init_prefix(self, num_virtual_tokens: int, width: int, projection_dim: int | None, init_std: float,
                     factory: dict) -> None:  # fmt: skip
        self.num_virtual_tokens = num_virtual_tokens
        self.projection_dim = projection_dim
        if projection_dim is None:
            # P_K, P_V trained directly: 2 P C parameters per layer
            self.prefix_keys = nn.Parameter(torch.randn(num_virtual_tokens, width, **factory) * init_std)  # (P, C)
            self.prefix_values = nn.Parameter(torch.randn(num_virtual_tokens, width, **factory) * init_std)  # (P, C)
        else:
            # Li & Liang's reparametrisation: [P_K, P_V] = MLP(P'), P': (P, C)
            self.prefix_inputs = nn.Parameter(torch.randn(num_virtual_tokens, width, **factory) * init_std)
            self.prefix_mlp = nn.Sequential(
                nn.Linear(width, projection_dim, **factory),
                nn.Tanh(),
                nn.Linear(projection_dim, 2 * width, **factory),
            )

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P_K, P_V, each (P, C)."""
        if self.projection_dim is None:
            return self.prefix_keys, self.prefix_values
        keys_and_values = self.prefix_mlp(self.prefix_inputs)  # (P, 2C)
        return keys_and_values.chunk(2, dim=-1)


class PrefixSelfAttention(_PrefixParameters):
    """BERT-style self-attention with P learned key/value positions in front of the real ones.

    `base` is the model's self-attention module (its query/key/value layers are used as they are,
    frozen or wrapped). Returns (context, None) like the module it replaces. Derived in
    notebooks/part1_foundations/02_peft_zoo.ipynb.
    """

    def __init__(
        self,
        base: nn.Module,
        num_virtual_tokens: int,
        projection_dim: int | None = None,
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if not looks_like_bert_self_attention(base):
            raise TypeError(
                f"PrefixSelfAttention replaces a BERT-style self-attention module (query, key, value, "
                f"num_attention_heads, attention_head_size), got {type(base).__name__}"
            )
        self.base = base
        self.num_heads = base.num_attention_heads
        self.head_dim = base.attention_head_size
        self.scaling = getattr(base, "scaling", self.head_dim**-0.5)  # 1 / sqrt(d)
        width = self.num_heads * self.head_dim  # C
        weight = base.query.weight if isinstance(base.query, nn.Linear) else next(base.query.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self._init_prefix(num_virtual_tokens, width, projection_dim, init_std, factory)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (..., L, C) -> (..., h, L, d)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: object | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if encoder_hidden_states is not None or cache is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("PrefixSelfAttention supports encoder self-attention only (no cross-attention, no cache)")
        batch, length, _ = hidden_states.shape  # (B, T, C)
        query = self._split_heads(self.base.query(hidden_states))  # (B, h, T, d)
        key = self._split_heads(self.base.key(hidden_states))  # (B, h, T, d)
        value = self._split_heads(self.base.value(hidden_states))  # (B, h, T, d)

        prefix_keys, prefix_values = self.prefix()  # (P, C) each
        prefix_keys = self._split_heads(prefix_keys).expand(batch, -1, -1, -1)  # (B, h, P, d)
        prefix_values = self._split_heads(prefix_values).expand(batch, -1, -1, -1)  # (B, h, P, d)
        key = torch.cat([prefix_keys.to(key.dtype), key], dim=2)  # K' = [P_K; K], (B, h, P+T, d)
        value = torch.cat([prefix_values.to(value.dtype), value], dim=2)  # V' = [P_V; V], (B, h, P+T, d)

        mask = extend_attention_mask(attention_mask, self.num_virtual_tokens)  # (B, 1, T, P+T) or None
        dropout = self.base.dropout.p if self.training and hasattr(self.base, "dropout") else 0.0
        # softmax(Q K'^T / sqrt(d) + mask') V', with dropout on the attention weights while training
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=self.scaling
        )  # (B, h, T, d)
        context = context.transpose(1, 2).reshape(batch, length, -1)  # (B, T, C)
        return context, None

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, projection_dim={self.projection_dim}"


# --- any model whose attention goes through transformers' AttentionInterface -------------------


def looks_like_interface_attention(module: nn.Module) -> bool:
    """True for a self-attention module of transformers 5.x that calls the attention interface:
    it carries the model config (`_attn_implementation`), a `scaling` and an `is_causal` flag, and
    is not a cross-attention (DistilBertSelfAttention, GPT2Attention, LlamaAttention, ...)."""
    config = getattr(module, "config", None)
    return (
        config is not None
        and hasattr(config, "_attn_implementation")
        and hasattr(module, "scaling")
        and hasattr(module, "is_causal")
        and not getattr(module, "is_cross_attention", False)
        and "Cross" not in type(module).__name__
    )


class PrefixKeyValues(_PrefixParameters):
    """The P learned keys and values of one attention module (`looks_like_interface_attention`),
    stored as its child `course_prefix`; `prefix_attention_forward` uses them. Keys and values are
    (P, H_kv d): a model with grouped key/value heads gets prefixes for its key/value heads.
    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb (on BERT, as `PrefixSelfAttention`).
    """

    def __init__(self, attention: nn.Module, num_virtual_tokens: int, projection_dim: int | None = None,
                 init_std: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        if not looks_like_interface_attention(attention):
            raise TypeError(f"PrefixKeyValues needs a transformers self-attention module that uses the attention "
                            f"interface (config, scaling, is_causal), got {type(attention).__name__}")  # fmt: skip
        config = attention.config
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        weight = next(attention.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self._init_prefix(num_virtual_tokens, self.num_key_value_heads * self.head_dim, projection_dim, init_std, factory)

    def head_prefix(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """P_K, P_V split into heads for a batch: (B, H_kv, P, d) each."""
        keys, values = self.prefix()  # (P, H_kv d) each

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_key_value_heads, self.head_dim)).transpose(0, 1).expand(batch, -1, -1, -1)

        return split(keys).to(dtype), split(values).to(dtype)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, projection_dim={self.projection_dim}"


def prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as `PREFIX_ATTENTION`: K' = [P_K; K], V' = [P_V; V] with the
    module's `course_prefix`, the mask extended so that every query sees the prefix, then
    transformers' sdpa attention. A module without a prefix gets plain sdpa attention.

    query (B, H, T_q, d); key, value (B, H_kv, T_k, d); attention_mask None, boolean or additive
    (B or 1, 1, T_q, T_k).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix: PrefixKeyValues | None = getattr(module, PREFIX_CHILD, None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    q_length, k_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and q_length > 1:
        # what sdpa's is_causal would do, made explicit: query i (position T_k - T_q + i) sees keys up to its own
        attention_mask = torch.ones(q_length, k_length, dtype=torch.bool, device=query.device).tril(k_length - q_length)
        attention_mask = attention_mask[None, None]  # (1, 1, T_q, T_k)
    prefix_keys, prefix_values = prefix.head_prefix(query.shape[0], key.dtype)  # (B, H_kv, P, d) each
    key = torch.cat([prefix_keys, key], dim=2)  # (B, H_kv, P + T_k, d)
    value = torch.cat([prefix_values, value], dim=2)
    mask = extend_attention_mask(attention_mask, prefix.num_virtual_tokens)  # (., 1, T_q, P + T_k) or None
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False,
                                  **kwargs)  # fmt: skip


def _register_prefix_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)  # the masks sdpa gets


def attach_prefix(attention: nn.Module, num_virtual_tokens: int, projection_dim: int | None = None,
                  init_std: float = 1.0) -> PrefixKeyValues:  # fmt: skip
    """Give `attention` (`looks_like_interface_attention`) a learned prefix and switch its config to
    `PREFIX_ATTENTION`, remembering the implementation it had. Returns the new `PrefixKeyValues`."""
    if hasattr(attention, PREFIX_CHILD):
        raise ValueError(f"{type(attention).__name__} already has a prefix: remove_peft(model) first")
    prefix = PrefixKeyValues(attention, num_virtual_tokens, projection_dim, init_std)
    _register_prefix_attention()
    config = attention.config
    if config._attn_implementation != PREFIX_ATTENTION:
        prefix.previous_attn_implementation = config._attn_implementation
        config._attn_implementation = PREFIX_ATTENTION
    else:  # another layer of the same model switched the shared config already
        prefix.previous_attn_implementation = None
    attention.add_module(PREFIX_CHILD, prefix)
    return prefix


def detach_prefix(attention: nn.Module) -> None:
    """Undo `attach_prefix`: drop the prefix and put the previous attention implementation back."""
    prefix = getattr(attention, PREFIX_CHILD, None)
    if prefix is None:
        return
    delattr(attention, PREFIX_CHILD)
    # the prefix that switched the shared config puts it back (remove_peft removes it last: it is the first layer's)
    if prefix.previous_attn_implementation is not None and attention.config._attn_implementation == PREFIX_ATTENTION:
        attention.config._attn_implementation = prefix.previous_attn_implementation
