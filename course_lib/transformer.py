"""The transformer block, written out: attention, multi-head self-attention, the MLP, and the two
ways of wiring them with residuals and LayerNorm (post-norm as BERT, pre-norm as ViT / Point-MAE).

Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb, where each piece is
checked against PyTorch and against the Hugging Face `BertLayer` of all-MiniLM-L6-v2.

What later parts reuse:

- `BertBlock.from_hf_bert_layer(layer)` copies a pre-trained BERT layer into a block whose parts
  have plain names (`attention.query`, `attention.value`, `mlp.fc1`, ...), so PEFT name
  patterns read naturally (Part 1).
- `PreNormBlock` is the block of the tiny Point-MAE (Part 2).
- `block.mlp.activation` is an `nn.Module`: a forward hook on it sees the post-GELU activations
  whose density DEFT lowers (Part 3).
- `block.attention_block(x)` and `block.mlp_block(x)` are the two halves of a layer that MEFT
  turns into the F and G of a reversible coupling (Part 4).

Masks. `attention_mask` given to a module is either the tokenizer's padding mask of shape
(B, T), 1 for a real token and 0 for padding (any dtype), or a 4-D mask broadcastable to
(B, H, T, T): boolean (True = may attend, as in `torch.nn.functional.scaled_dot_product_attention`)
or floating (added to the scores, 0 or a large negative number, as Hugging Face's eager path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockConfig",
    "attention_weights",
    "scaled_dot_product_attention",
    "MultiHeadSelfAttention",
    "FeedForward",
    "BertBlock",
    "PreNormBlock",
    "bert_blocks_from_hf",
    "ACTIVATIONS",
]

#: Activation names accepted by `FeedForward` (and `BlockConfig.activation`).
ACTIVATIONS: dict[str, tuple[type[nn.Module], dict]] = {
    "gelu": (nn.GELU, {}),  # exact GELU, x * Phi(x): BERT's "gelu"
    "gelu_tanh": (nn.GELU, {"approximate": "tanh"}),  # GPT-2's tanh approximation
    "relu": (nn.ReLU, {}),
    "silu": (nn.SiLU, {}),
}

# Hugging Face `hidden_act` names -> ours.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclass
class BlockConfig:
    """Sizes of one transformer block.

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.

    Attributes:
        dim: width C of the token vectors.
        num_heads: attention heads H; each head has `dim // num_heads` dimensions.
        mlp_ratio: MLP hidden width as a multiple of `dim` (4 in BERT and ViT).
        hidden_dim: MLP hidden width; overrides `mlp_ratio` when given (MiniLM: 1536).
        dropout: dropout on the attention output and on the MLP output (before each residual).
        attention_dropout: dropout on the attention probabilities; None means `dropout`.
        layer_norm_eps: epsilon of the LayerNorms (BERT 1e-12, PyTorch's default 1e-5).
        activation: the MLP's activation, a key of `ACTIVATIONS`.
        bias: whether the Linear layers have biases.
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    hidden_dim: int | None = None
    dropout: float = 0.0
    attention_dropout: float | None = None
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True

    def __post_init__(self) -> None:
        _check_heads(self.dim, self.num_heads)
        for name in ("dropout", "attention_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.mlp_hidden_dim <= 0:
            raise ValueError(f"the MLP hidden width must be positive, got {self.mlp_hidden_dim}")

    @property
    def mlp_hidden_dim(self) -> int:
        """The MLP's hidden width: `hidden_dim` if given, else `int(dim * mlp_ratio)`."""
        return self.hidden_dim if self.hidden_dim is not None else int(self.dim * self.mlp_ratio)


# ----------------------------------------------------------------------------------------------
# Attention as a function


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask): how much each query looks at each key.

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.

    Args:
        q: queries (..., T, d).
        k: keys (..., S, d).
        mask: None, a boolean mask (True = may attend) or an additive float mask, broadcastable
            to (..., T, S). A query whose keys are all masked gets NaN weights, as in PyTorch.

    Returns:
        Attention probabilities (..., T, S); each row sums to 1 over the keys.
    """
    _check_qkv(q, k, None)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T, S): scaled dot products
    if mask is not None:
        _check_mask_broadcasts(mask, scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: masked keys get no weight
        else:
            scores = scores + mask  # additive mask: 0 keeps, a large negative number removes
    return scores.softmax(dim=-1)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, written out.

    Computes what `torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)`
    computes, with the same mask convention (boolean: True = may attend; float: added).

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.

    Args:
        q: queries (..., T, d).
        k: keys (..., S, d).
        v: values (..., S, d_v).
        mask: None, boolean or additive float, broadcastable to (..., T, S).
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation).

    Returns:
        (..., T, d_v): for each query, the weighted average of the values.
    """
    _check_qkv(q, k, v)
    weights = attention_weights(q, k, mask)  # (..., T, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ v  # (..., T, d_v)


# ----------------------------------------------------------------------------------------------
# The two sub-layers


class MultiHeadSelfAttention(nn.Module):
    """H attention heads side by side, each on its own `dim // H`-wide slice of projected tokens.

    query/key/value project the tokens (C -> C, read as H heads of C/H), each head attends on its
    own, the heads are concatenated back to C and `output` mixes them (C -> C).

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.

    Args:
        dim: token width C.
        num_heads: number of heads H (must divide `dim`).
        dropout: dropout on the output projection (BERT's hidden dropout).
        bias: whether the four Linear layers have biases.
        attention_dropout: dropout on the attention probabilities; None means `dropout`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)
        self.output = nn.Linear(dim, dim, bias=bias)
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, C/H)

    def attention_map(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention probabilities of every head, (B, H, T, T) (for pictures; no dropout)."""
        _check_tokens(x, self.dim, type(self).__name__)
        mask = _prepare_attention_mask(attention_mask, x.shape[0], x.shape[1], self.num_heads)
        return attention_weights(self._split_heads(self.query(x)), self._split_heads(self.key(x)), mask)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). `attention_mask`: (B, T) padding mask or 4-D (see module doc)."""
        _check_tokens(x, self.dim, type(self).__name__)
        B, T, C = x.shape
        mask = _prepare_attention_mask(attention_mask, B, T, self.num_heads)
        q = self._split_heads(self.query(x))  # (B, H, T, C/H)
        k = self._split_heads(self.key(x))  # (B, H, T, C/H)
        v = self._split_heads(self.value(x))  # (B, H, T, C/H)
        p = self.attention_dropout if self.training else 0.0
        y = scaled_dot_product_attention(q, k, v, mask, dropout_p=p)  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads: (B, T, C)
        return self.dropout(self.output(y))  # mix the heads: (B, T, C)


class FeedForward(nn.Module):
    """The MLP applied to every token on its own: fc2(activation(fc1(x))), C -> hidden -> C.

    `activation` is an `nn.Module` attribute, so `mlp.activation.register_forward_hook(...)`
    sees the post-activation outputs (B, T, hidden) that Part 3 (DEFT) measures and sparsifies.

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.

    Args:
        dim: token width C.
        hidden_dim: hidden width (4 C in BERT; 1536 in MiniLM).
        activation: a key of `ACTIVATIONS` ("gelu", "gelu_tanh", "relu", "silu") or a module.
        dropout: dropout on the output.
        bias: whether the two Linear layers have biases.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str | nn.Module = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.activation = _make_activation(activation)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C)."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"FeedForward expects tokens (..., C) with C = {self.dim}, got a tensor of shape {tuple(x.shape)}"
            )
        h = self.activation(self.fc1(x))  # (..., hidden): GELU(x W1 + b1)
        return self.dropout(self.fc2(h))  # (..., C)


# ----------------------------------------------------------------------------------------------
# Blocks: the same two sub-layers, wired two ways


class _Block(nn.Module):
    """What both blocks share: the four parts and the config."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.config = config
        C = config.dim
        self.attention = MultiHeadSelfAttention(
            C, config.num_heads, dropout=config.dropout, bias=config.bias, attention_dropout=config.attention_dropout
        )
        self.attention_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.mlp = FeedForward(C, config.mlp_hidden_dim, config.activation, dropout=config.dropout, bias=config.bias)
        self.mlp_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def attention_block(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C): the attention block, then the MLP block."""
        return self.mlp_block(self.attention_block(x, attention_mask))


class BertBlock(_Block):
    """Post-LayerNorm block, as in BERT: x = LN(x + Attn(x)); x = LN(x + MLP(x)).

    Parts: `attention` (query/key/value/output), `attention_norm`, `mlp` (fc1/activation/fc2),
    `mlp_norm`. `attention_block` and `mlp_block` are the two halves (MEFT's F and G).

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.
    """

    def attention_block(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """LN(x + Attn(x)): (B, T, C) -> (B, T, C). Hugging Face's `BertAttention`."""
        _check_tokens(x, self.config.dim, type(self).__name__)
        return self.attention_norm(x + self.attention(x, attention_mask))

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """LN(x + MLP(x)): (B, T, C) -> (B, T, C). Hugging Face's `BertIntermediate` + `BertOutput`."""
        _check_tokens(x, self.config.dim, type(self).__name__)
        return self.mlp_norm(x + self.mlp(x))

    @classmethod
    def from_hf_bert_layer(cls, layer: nn.Module) -> BertBlock:
        """A `BertBlock` holding a copy of the weights of a Hugging Face `BertLayer`.

        The block computes what the layer computes (same output in eval mode, up to float
        rounding); its weights are copies, so training one leaves the other unchanged.

        Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.
        """
        try:
            self_attention = layer.attention.self
            attention_output = layer.attention.output
            intermediate, output = layer.intermediate, layer.output
        except AttributeError:
            raise TypeError(
                f"from_hf_bert_layer expects a transformers BertLayer (model.encoder.layer[i]), "
                f"got {type(layer).__name__}"
            ) from None
        if getattr(layer, "add_cross_attention", False):
            raise ValueError("this BertLayer has cross-attention (a decoder layer); BertBlock covers encoder layers only")
        hf_act = getattr(getattr(self_attention, "config", None), "hidden_act", "gelu")
        if not isinstance(hf_act, str) or hf_act not in _HF_ACTIVATIONS:
            raise ValueError(
                f"this BertLayer uses the activation {hf_act!r}; BertBlock knows {sorted(_HF_ACTIVATIONS)}"
            )
        config = BlockConfig(
            dim=self_attention.query.in_features,
            num_heads=self_attention.num_attention_heads,
            hidden_dim=intermediate.dense.out_features,
            dropout=attention_output.dropout.p,
            attention_dropout=self_attention.dropout.p,
            layer_norm_eps=attention_output.LayerNorm.eps,
            activation=_HF_ACTIVATIONS[hf_act],
            bias=self_attention.query.bias is not None,
        )
        block = cls(config)
        pairs = [
            (block.attention.query, self_attention.query),
            (block.attention.key, self_attention.key),
            (block.attention.value, self_attention.value),
            (block.attention.output, attention_output.dense),
            (block.attention_norm, attention_output.LayerNorm),
            (block.mlp.fc1, intermediate.dense),
            (block.mlp.fc2, output.dense),
            (block.mlp_norm, output.LayerNorm),
        ]
        reference = self_attention.query.weight
        block.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for ours, theirs in pairs:
                ours.weight.copy_(theirs.weight)
                if ours.bias is not None:
                    ours.bias.copy_(theirs.bias)
        block.train(layer.training)
        return block


class PreNormBlock(_Block):
    """Pre-LayerNorm block, as in ViT and Point-MAE: x = x + Attn(LN(x)); x = x + MLP(LN(x)).

    Same parts and names as `BertBlock`; only the wiring differs. The residual-free branches
    `attention_branch(x) = Attn(LN(x))` and `mlp_branch(x) = MLP(LN(x))` are exposed too.

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.
    """

    def attention_branch(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attn(LN(x)): (B, T, C) -> (B, T, C)."""
        _check_tokens(x, self.config.dim, type(self).__name__)
        return self.attention(self.attention_norm(x), attention_mask)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """MLP(LN(x)): (B, T, C) -> (B, T, C)."""
        _check_tokens(x, self.config.dim, type(self).__name__)
        return self.mlp(self.mlp_norm(x))

    def attention_block(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x + Attn(LN(x)): (B, T, C) -> (B, T, C)."""
        return x + self.attention_branch(x, attention_mask)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(LN(x)): (B, T, C) -> (B, T, C)."""
        return x + self.mlp_branch(x)


def bert_blocks_from_hf(model: nn.Module) -> nn.ModuleList:
    """Copies of all the layers of a Hugging Face BERT model as `BertBlock`s, in order.

    `model` is a `BertModel` (or a model holding one as `.bert`, e.g. BertForSequenceClassification).
    Applied in turn to `model.embeddings(...)`, the blocks give `last_hidden_state`.

    Derived in notebooks/part1_foundations/01_transformer_from_scratch.ipynb.
    """
    base = getattr(model, "bert", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise TypeError(
            f"bert_blocks_from_hf expects a transformers BertModel (with .encoder.layer), got {type(model).__name__}"
        )
    return nn.ModuleList(BertBlock.from_hf_bert_layer(layer) for layer in layers)


# ----------------------------------------------------------------------------------------------
# Checks with messages that say what was wrong


def _check_heads(dim: int, num_heads: int) -> None:
    if dim <= 0 or num_heads <= 0:
        raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
    if dim % num_heads != 0:
        raise ValueError(
            f"dim ({dim}) must be divisible by num_heads ({num_heads}): each head takes dim // num_heads "
            f"dimensions; choose e.g. num_heads in {[h for h in range(1, min(dim, 16) + 1) if dim % h == 0]}"
        )


def _check_tokens(x: torch.Tensor, dim: int, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(
            f"{who} expects tokens of shape (B, T, C) with C = {dim}, got a tensor of shape {tuple(x.shape)}"
        )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    if q.dim() < 2 or k.dim() < 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q (..., T, d) and k (..., S, d) must share their last dimension d, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if v is not None and (v.dim() < 2 or v.shape[-2] != k.shape[-2]):
        raise ValueError(
            f"k (..., S, d) and v (..., S, d_v) must have the same number of keys S, got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}"
        )


def _check_mask_broadcasts(mask: torch.Tensor, scores_shape: torch.Size) -> None:
    try:
        ok = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"the attention mask of shape {tuple(mask.shape)} does not broadcast to the scores "
            f"(..., T, S) = {tuple(scores_shape)}"
        )


def _prepare_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, num_heads: int
) -> torch.Tensor | None:
    """(B, T) padding mask -> (B, 1, 1, T) boolean; 4-D masks are checked and passed on."""
    if attention_mask is None:
        return None
    expected = (
        f"a padding mask (B, T) = ({batch}, {length}) with 1 for tokens and 0 for padding, or a 4-D mask "
        f"broadcastable to (B, H, T, T) = ({batch}, {num_heads}, {length}, {length})"
    )
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"expected {expected}; got a mask of shape {tuple(attention_mask.shape)}")
        return (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, T): every query sees the same keys
    if attention_mask.dim() == 4:
        _check_mask_broadcasts(attention_mask, torch.Size((batch, num_heads, length, length)))
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            raise TypeError(
                "a 4-D attention mask must be boolean (True = may attend) or floating (added to the scores), "
                f"got dtype {attention_mask.dtype}"
            )
        return attention_mask
    raise ValueError(f"expected {expected}; got a mask of shape {tuple(attention_mask.shape)}")


def _make_activation(activation: str | nn.Module) -> nn.Module:
    if isinstance(activation, nn.Module):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} or pass an nn.Module")
    module_class, kwargs = ACTIVATIONS[activation]
    return module_class(**kwargs)
