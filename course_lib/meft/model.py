"""MEFT1, MEFT2, MEFT3: a pre-trained BERT made reversible with adapters, keeping its starting point.

Every layer of the pre-trained model becomes a `ReversibleCoupling` on two streams, both
starting as the embedding output h; the encoder returns their average (x1 + x2) / 2:

| variant | F                          | G                    | lambda | beta | outputs   |
| ------- | -------------------------- | -------------------- | ------ | ---- | --------- |
| MEFT1   | PLM layer + adapter        | adapter              | 0.1    | 1    | (y2, y1)  |
| MEFT2   | adapter                    | PLM layer + adapter  | 1      | 0.1  | (y2, y1)  |
| MEFT3   | attention block + adapter  | MLP block + adapter  | 0.1    | 0.1  | (y1, y2)  |

The adapters are C -> 8 -> C bottlenecks (ReLU) beside the block: "block + adapter" is
block(x) + adapter(x), the adapter reading the block's input. All their weights start
N(0, 0.02), biases 0: small, so each coupling starts close to the layer it replaces. Take MEFT1:
with G = adapter ~ 0 and beta = 1, y2 ~ x2, and y1 = 0.1 x1 + layer(x2) ~ layer(x2); swapped,
one stream carries the pre-trained hidden state h_n (plus a tenth of an older one) while the
other carries h_{n-1}. That closeness to the pre-trained model (the *starting point*) is the
paper's key point: with lambda = beta = 1 (a RevNet-style coupling) the same layers add up
their inputs and the pre-trained computation is lost (measured in
notebooks/part4_meft/32_meft.ipynb).

Precision: by default the two streams are kept in float64 around float32 layers
(`stream_dtype`), and every F and G input keeps one parity bit per element (`exact_inputs`,
`course_lib.meft.rounding`). The float64 streams make the stream arithmetic exact to float64
rounding; the parity bits make the recomputed float32 layer inputs equal the forward's, so F and
G recompute exactly what they computed, and the parameter gradients equal plain autograd's. On
MiniLM (six layers, batch 32 x 128) the largest relative gradient error against plain autograd
is then 0 for MEFT1/2/3; without the bits it was about 0.009 (MEFT1), 0.09 (MEFT2) and 4 (MEFT3,
two divisions per layer), and with float32 streams (the official code) 0.08, 0.3 and more
(benchmarks/activation_memory.py records them, notebooks/part4_meft/31_reversible_layers.ipynb
derives the fix). Exactness needs the float64 reconstruction error, multiplied by 1/lambda and
1/beta at every layer, to stay below half a float32 step: measured, that holds for MEFT1 up to
12 layers and for MEFT3 (two divisions per layer) up to 6, not beyond. The streams cost 2
(B, T, C) tensors of 8 bytes instead of 4; the bits 2 bits per element per layer.

Everything of the pre-trained model is frozen (copied, the original is left alone); adapters
and the task head train. `reversible=False` runs the same model through plain autograd (for
checking gradients), `num_reversible_layers=n` makes only the lower n layers reversible.

Derived in notebooks/part4_meft/32_meft.ipynb.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.meft.coupling import ReversibleCoupling
from course_lib.meft.reversible import reversible_stack, run_couplings
from course_lib.meters.parameters import count_parameters
from course_lib.peft.adapters import BottleneckAdapter
from course_lib.report import PEFTReport, trainable_parts
from course_lib.transformer import BertBlock

__all__ = [
    "MEFT_VARIANTS",
    "AdapterOnly",
    "BlockWithAdapter",
    "MEFTEncoder",
    "MEFTForSequenceClassification",
    "MEFTVariant",
    "make_meft_adapter",
    "meft_from_hf",
]


@dataclass(frozen=True)
class MEFTVariant:
    """What F and G are ("layer", "attention", "mlp": that part + an adapter; "adapter": the adapter alone),
    the scales, and whether the outputs are swapped.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    name: str
    F: str
    G: str
    lambda_: float
    beta: float
    swap_outputs: bool


#: The three variants with the official BERT values (PAPERS.md section 3).
MEFT_VARIANTS: dict[str, MEFTVariant] = {
    "meft1": MEFTVariant("meft1", F="layer", G="adapter", lambda_=0.1, beta=1.0, swap_outputs=True),
    "meft2": MEFTVariant("meft2", F="adapter", G="layer", lambda_=1.0, beta=0.1, swap_outputs=True),
    "meft3": MEFTVariant("meft3", F="attention", G="mlp", lambda_=0.1, beta=0.1, swap_outputs=False),
}

_PARTS = ("layer", "attention", "mlp")


def resolve_variant(variant: str | MEFTVariant) -> MEFTVariant:
    """A `MEFTVariant` from its name ("meft1", "meft2", "meft3", any case) or as given.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """
    if isinstance(variant, str):
        if variant.lower() not in MEFT_VARIANTS:
            raise ValueError(f"unknown MEFT variant {variant!r}; choose one of {list(MEFT_VARIANTS)} or pass a MEFTVariant")
        variant = MEFT_VARIANTS[variant.lower()]
    if not isinstance(variant, MEFTVariant):
        raise TypeError(f"variant must be a name or a MEFTVariant, got {type(variant).__name__}")
    return variant


def make_meft_adapter(dim: int, bottleneck: int = 8, std: float = 0.02) -> BottleneckAdapter:
    """A dim -> bottleneck -> dim ReLU adapter with all weights N(0, std) and zero biases (MEFT's init).

    Unlike the zero-up-projection adapters of Part 1, its output is small but not zero.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """
    adapter = BottleneckAdapter(dim, bottleneck, activation="relu")
    for layer in (adapter.down, adapter.up):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    return adapter


class BlockWithAdapter(nn.Module):
    """part(x) + adapter(x), part one of "layer" (the whole BertBlock), "attention", "mlp".

    MEFT3's F and G share one BertBlock (F uses its attention half, G its MLP half).

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(self, block: BertBlock, part: str, adapter: BottleneckAdapter) -> None:
        super().__init__()
        if part not in _PARTS:
            raise ValueError(f"part must be one of {_PARTS}, got {part!r}")
        self.block = block
        self.part = part
        self.adapter = adapter

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.part == "layer":
            out = self.block(x, attention_mask)  # LN(h + MLP(h)), h = LN(x + Attn(x))
        elif self.part == "attention":
            out = self.block.attention_block(x, attention_mask)  # LN(x + Attn(x))
        else:
            out = self.block.mlp_block(x)  # LN(x + MLP(x))
        return out + self.adapter(x)  # adapter beside the block: (B, T, C)

    def extra_repr(self) -> str:
        return f"part={self.part!r}"


class AdapterOnly(nn.Module):
    """adapter(x): MEFT1's G and MEFT2's F.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(self, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapter(x)


def _padding_mask(attention_mask: torch.Tensor | None, input_shape: tuple[int, int]) -> torch.Tensor | None:
    """Tokenizer mask (B, T) of 1/0 -> boolean (B, 1, 1, T), True = may attend.

    None when there is no padding (no mask to apply: saves a pass over every (B, H, T, T) score).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(input_shape):
        raise ValueError(
            f"attention_mask must be the tokenizer's (B, T) = {tuple(input_shape)} mask, got shape {tuple(attention_mask.shape)}"
        )
    keep = attention_mask != 0
    return None if bool(keep.all()) else keep[:, None, None, :]


class ReversibleStack(nn.Module):
    """What every MEFT model shares: `couplings` run on two streams that both start as one input.

    `reversible` (attribute, default True): the lower `num_reversible_layers` couplings run
    through `reversible_stack` (activations not kept); the rest, and all of them when
    `reversible=False`, through plain autograd. `stream_dtype`: the streams' dtype (float64 for
    an exact inverse, module docstring); `exact_inputs`: keep the parity bits that make the
    recomputed layer inputs exact (`reversible_stack`).

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(
        self,
        couplings: nn.ModuleList,
        num_reversible_layers: int | None = None,
        reversible: bool = True,
        stream_dtype: torch.dtype | None = None,
        exact_inputs: bool = True,
    ) -> None:
        super().__init__()
        if len(couplings) == 0:
            raise ValueError(f"{type(self).__name__} needs at least one coupling")
        self.couplings = couplings
        self.stream_dtype = stream_dtype
        self.exact_inputs = exact_inputs
        self.reversible = reversible
        self.num_reversible_layers = num_reversible_layers

    @property
    def num_reversible_layers(self) -> int:
        return self._num_reversible_layers

    @num_reversible_layers.setter
    def num_reversible_layers(self, value: int | None) -> None:
        count = len(self.couplings)
        value = count if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= count:
            raise ValueError(f"num_reversible_layers must be an int in [0, {count}] (or None for all), got {value!r}")
        self._num_reversible_layers = value

    def run_stack(
        self, h: torch.Tensor, context: torch.Tensor | None, *, overwrite_outputs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams start as h (B, T, C); the two output streams of the last coupling.

        `context` goes to every F and G (a padding mask, or positions); `overwrite_outputs`: the
        custom backward may rebuild the top layer's inputs in the output streams' buffers
        (`reversible_stack`), only for callers that drop the streams.
        """
        if self.stream_dtype is not None and h.dtype != self.stream_dtype:
            h = h.to(self.stream_dtype)  # streams in float64: an exact inverse (module docstring)
        x1, x2 = h, h
        n = self.num_reversible_layers if self.reversible else 0
        if n > 0:
            x1, x2 = reversible_stack(self.couplings[:n], x1, x2, context, exact_inputs=self.exact_inputs,
                                      overwrite_outputs=overwrite_outputs)  # fmt: skip
        if n < len(self.couplings):
            x1, x2 = run_couplings(self.couplings[n:], x1, x2, context)
        return x1, x2


class MEFTEncoder(ReversibleStack):
    """Embeddings, then a stack of reversible couplings on (h, h); returns (x1 + x2) / 2, (B, T, C).

    `reversible` (attribute, default True): the lower `num_reversible_layers` couplings run
    through `reversible_stack` (activations not kept); the rest, and all of them when
    `reversible=False`, through plain autograd. `exact_inputs` (attribute, default True): keep
    the parity bits that make the recomputed layer inputs exact (`reversible_stack`).

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(
        self,
        embeddings: nn.Module,
        couplings: nn.ModuleList,
        num_reversible_layers: int | None = None,
        reversible: bool = True,
        stream_dtype: torch.dtype | None = None,
        exact_inputs: bool = True,
    ) -> None:
        super().__init__(couplings, num_reversible_layers, reversible, stream_dtype, exact_inputs)
        self.embeddings = embeddings

    def streams(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two output streams (x1, x2) of the last coupling, each (B, T, C)."""
        return self._streams(input_ids, attention_mask, token_type_ids, inputs_embeds, overwrite_outputs=False)

    def _streams(self, input_ids, attention_mask, token_type_ids, inputs_embeds, *, overwrite_outputs: bool):
        # overwrite_outputs: the custom backward may rebuild the top layer's inputs in the output
        # streams' buffers (reversible_stack); only for callers that drop the streams
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, C)")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T) token ids, got shape {tuple(input_ids.shape)}")
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)  # (B, T, C)
        mask = _padding_mask(attention_mask, tuple(h.shape[:2]))
        return self.run_stack(h, mask, overwrite_outputs=overwrite_outputs)  # both streams start as h

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C): the average of the two streams."""
        x1, x2 = self._streams(input_ids, attention_mask, token_type_ids, inputs_embeds, overwrite_outputs=True)
        dtype = self.embeddings.word_embeddings.weight.dtype if hasattr(self.embeddings, "word_embeddings") else x1.dtype
        return ((x1 + x2) / 2).to(dtype)  # (B, T, C) in the model's dtype


class _TaskModel(nn.Module):
    """A MEFTEncoder under a task head: `reversible` switches the encoder's custom backward."""

    encoder: MEFTEncoder

    @property
    def reversible(self) -> bool:
        return self.encoder.reversible

    @reversible.setter
    def reversible(self, value: bool) -> None:
        self.encoder.reversible = bool(value)


class MEFTForSequenceClassification(_TaskModel):
    """MEFTEncoder + the Hugging Face model's head: BERT's pooler (frozen), dropout and classifier
    (trained), or RoBERTa's classification head (dense, tanh, out_proj on the first token; trained).

    Called like `BertForSequenceClassification`; returns a `SequenceClassifierOutput` with
    `.logits` (B, num_labels) and `.loss` (cross-entropy) when `labels` are given.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(self, encoder: MEFTEncoder, pooler: nn.Module | None, dropout: float, classifier: nn.Module,
                 *, head_reads_sequence: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier
        # RoBERTa's head takes the whole sequence (B, T, C) and picks the first token itself
        self.head_reads_sequence = head_reads_sequence
        last = classifier.out_proj if head_reads_sequence else classifier
        self.num_labels = last.out_features

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, inputs_embeds=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids, attention_mask, token_type_ids, inputs_embeds)  # (B, T, C)
        if self.head_reads_sequence:
            logits = self.classifier(hidden)  # (B, num_labels): dropout, dense, tanh, dropout, out_proj on token 0
        else:
            pooled = self.pooler(hidden) if self.pooler is not None else hidden[:, 0]  # (B, C): the [CLS] token
            logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PreNormDecoderBlock(nn.Module):
    """A Hugging Face GPT-2 block (a copy) seen as MEFT's parts, as `BertBlock` is for BERT.

    GPT-2 is pre-norm and causal: attention half x + Attn(LN1(x)) with a causal mask (and the
    padding mask, when there is one), MLP half h + MLP(LN2(h)), the layer the second after the
    first (what `GPT2Block` computes). Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = copy.deepcopy(block)

    @staticmethod
    def _additive_mask(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # causal: token t attends to tokens <= t; keep (B, 1, 1, T): False for padding keys
        T = x.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]  # (1, 1, T, T)
        if keep is not None:
            allowed = allowed & keep
        return torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)

    def attention_block(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.block.attn(self.block.ln_1(x), attention_mask=self._additive_mask(x, attention_mask))
        return x + (out[0] if isinstance(out, tuple) else out)  # (B, T, C)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block.mlp(self.block.ln_2(x))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp_block(self.attention_block(x, attention_mask))


class DecoderEmbeddings(nn.Module):
    """GPT-2's input: token embedding + learned position embedding, then dropout (copies)."""

    def __init__(self, word_embeddings: nn.Embedding, position_embeddings: nn.Embedding, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = copy.deepcopy(word_embeddings)
        self.position_embeddings = copy.deepcopy(position_embeddings)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(x + self.position_embeddings(positions)[None])


class MEFTForCausalLM(_TaskModel):
    """MEFTEncoder over a decoder's blocks + its final LayerNorm and LM head (frozen, tied to the
    token embedding as in GPT-2). Called like `GPT2LMHeadModel`: `.logits` (B, T, V) and, with
    `labels`, the next-token cross-entropy `.loss` (labels -100 ignored), as the paper's OPT runs.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """

    def __init__(self, encoder: MEFTEncoder, final_norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.final_norm = final_norm
        self.lm_head = lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, token_type_ids=None):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.encoder(input_ids, attention_mask, None, inputs_embeds)  # (B, T, C)
        logits = self.lm_head(self.final_norm(hidden))  # (B, T, V)
        loss = None
        if labels is not None:  # token t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def _decoder_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """(transformer, blocks) of a GPT-2-style causal LM (`.transformer.h[i]` with ln_1, attn, ln_2, mlp), else None."""
    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "h", None)
    if blocks is None or len(blocks) == 0:
        return None
    if not all(hasattr(blocks[0], name) for name in ("ln_1", "attn", "ln_2", "mlp")):
        return None
    return transformer, list(blocks)


def _make_part(kind: str, block: nn.Module, dim: int, bottleneck: int, std: float) -> nn.Module:
    adapter = make_meft_adapter(dim, bottleneck, std)
    return AdapterOnly(adapter) if kind == "adapter" else BlockWithAdapter(block, kind, adapter)


@dataclass(frozen=True)
class MEFTConfig:
    """Settings of MEFT, the config form of `meft_from_hf`'s keywords (see there for each).

    `variant`: "meft1", "meft2" or "meft3" (a `MEFTVariant` for a custom one)."""

    variant: str | MEFTVariant = "meft1"
    adapter_bottleneck: int = 8
    adapter_std: float = 0.02
    lambda_: float | None = None
    beta: float | None = None
    num_reversible_layers: int | None = None
    reversible: bool = True
    train_layer_norms: bool = False
    stream_dtype: torch.dtype | None = torch.float64
    exact_inputs: bool = True
    batch_chunks: int = 1

    method = "meft"

    def __post_init__(self) -> None:
        if isinstance(self.variant, str) and self.variant.lower() not in MEFT_VARIANTS:
            raise ValueError(f"unknown MEFT variant {self.variant!r}; choose one of {list(MEFT_VARIANTS)} or pass a MEFTVariant")
        if self.adapter_bottleneck < 1:
            raise ValueError(f"adapter_bottleneck must be a positive int, got {self.adapter_bottleneck}")

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        variant = values["variant"]
        values["variant"] = variant if isinstance(variant, str) else dataclasses.asdict(variant)
        values["stream_dtype"] = None if self.stream_dtype is None else str(self.stream_dtype).removeprefix("torch.")
        return values


def meft(model: nn.Module, config: MEFTConfig | None = None) -> tuple[nn.Module, PEFTReport]:
    """MEFT from a Hugging Face BERT-family or GPT-2 model (`meft_from_hf`) or a Point-MAE encoder
    (`meft_from_point_mae`): (the new reversible model, its report).

    Not in place: the model passed in is left unchanged and `report.in_place` is False (MEFT
    rebuilds every layer as a reversible coupling). The new model keeps `config` as `.meft_config`.
    Derived in notebooks/part4_meft/32_meft.ipynb.
    """
    from course_lib.meft.point import meft_from_point_mae  # imports this module
    from course_lib.points.point_mae import PointMAEEncoder

    config = config or MEFTConfig()
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "variant"}
    build = meft_from_point_mae if isinstance(model, PointMAEEncoder) else meft_from_hf
    result = build(model, config.variant, **options)
    result.meft_config = config
    counts = count_parameters(result)
    variant = config.variant if isinstance(config.variant, str) else config.variant.name
    encoder = getattr(result, "encoder", result)
    prefix = "encoder.couplings" if encoder is not result else "couplings"
    changed = [f"{prefix}.{i}" for i in range(len(encoder.couplings))]
    report = PEFTReport(method=variant, trainable=counts.trainable, total=counts.total, changed=changed,
                        parts=trainable_parts(result, _meft_part), in_place=False, config=config)  # fmt: skip
    return result, report


def _meft_part(name: str) -> str:
    if ".adapter." in name or (name.count(".") >= 1 and name.split(".")[-2].startswith("adapter")):
        return "adapters"
    if "classifier" in name:
        return "classifier"
    return "layer norms" if "norm" in name else name.split(".")[0]


def meft_from_hf(
    model: nn.Module,
    variant: str | MEFTVariant = "meft1",
    *,
    adapter_bottleneck: int = 8,
    adapter_std: float = 0.02,
    lambda_: float | None = None,
    beta: float | None = None,
    num_reversible_layers: int | None = None,
    reversible: bool = True,
    train_layer_norms: bool = False,
    stream_dtype: torch.dtype | None = torch.float64,
    exact_inputs: bool = True,
    batch_chunks: int = 1,
) -> MEFTEncoder | MEFTForSequenceClassification:
    """MEFT built from a Hugging Face BERT-family model; the model passed in is left unchanged.

    `model`: a `BertModel` or `RobertaModel` (-> `MEFTEncoder`, returns hidden states) or a task
    model around one, `BertForSequenceClassification` or `RobertaForSequenceClassification`
    (-> `MEFTForSequenceClassification` with that model's head), or a GPT-2-style causal LM,
    `GPT2LMHeadModel` (-> `MEFTForCausalLM`: pre-norm causal blocks, the same couplings).
    `variant`: "meft1", "meft2", "meft3" or a `MEFTVariant`; `lambda_` / `beta` override its
    scales (e.g. 1 and 1 for a RevNet-style coupling that breaks the starting point).
    `stream_dtype`: dtype of the two streams (default float64, the layers stay in the model's
    dtype; None: the model's dtype, as the official code). `exact_inputs` (with float64
    streams): keep 1 parity bit per element of every layer input so that the backward recomputes
    exactly the forward's layers (`course_lib.meft.rounding`). `batch_chunks`: every coupling runs
    its F and G on that many pieces of the batch, forward and backward, so the backward holds one
    piece's recomputation graph at a time (`ReversibleCoupling`): a lower peak for a slightly
    slower step (measured in `benchmarks/activation_memory.py`). Adapters use torch's global RNG:
    call `course_lib.train.set_seed` first.
    Frozen: everything pre-trained (embeddings, layers, pooler); trainable: adapters, the
    classifier, and the blocks' LayerNorms if `train_layer_norms`.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """
    variant = resolve_variant(variant)
    if adapter_bottleneck < 1:
        raise ValueError(f"adapter_bottleneck must be a positive int, got {adapter_bottleneck}")
    if not isinstance(batch_chunks, int) or isinstance(batch_chunks, bool) or batch_chunks < 1:
        raise ValueError(f"batch_chunks must be an int >= 1, got {batch_chunks!r}")
    decoder = _decoder_parts(model)
    if decoder is not None:
        result = _meft_decoder(model, decoder, variant, adapter_bottleneck, adapter_std, lambda_, beta,
                               num_reversible_layers, reversible, train_layer_norms, stream_dtype, exact_inputs)  # fmt: skip
        return _with_batch_chunks(result, batch_chunks)
    # the encoder inside a task model: .bert, .roberta, ... (Hugging Face's base_model_prefix)
    prefix = getattr(model, "base_model_prefix", "bert")
    base = getattr(model, prefix, None) or getattr(model, "bert", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    embeddings = getattr(base, "embeddings", None)
    if layers is None or embeddings is None:
        raise TypeError(
            f"meft_from_hf expects a Hugging Face BERT-family encoder (BertModel, RobertaModel, or a "
            f"*ForSequenceClassification around one: .embeddings and .encoder.layer) or a GPT-2-style causal LM "
            f"(GPT2LMHeadModel: .transformer.h and .lm_head), got {type(model).__name__}"
        )
    reference = next(model.parameters())
    if stream_dtype == reference.dtype:
        stream_dtype = None
    compute_dtype = reference.dtype if stream_dtype is not None else None
    couplings = nn.ModuleList()
    for layer in layers:
        block = BertBlock.from_hf_bert_layer(layer)  # built before its adapters: the same RNG order as before
        couplings.append(_coupling(variant, block, block.config.dim, adapter_bottleneck, adapter_std, lambda_, beta,
                                   compute_dtype))  # fmt: skip
    couplings.to(device=reference.device, dtype=reference.dtype)
    encoder = MEFTEncoder(
        copy.deepcopy(embeddings), couplings, num_reversible_layers, reversible, stream_dtype, exact_inputs
    )
    result: MEFTEncoder | MEFTForSequenceClassification = encoder
    classifier = getattr(model, "classifier", None)
    if model is not base and isinstance(classifier, nn.Linear):
        config = getattr(model, "config", None)
        p = getattr(config, "classifier_dropout", None)
        p = p if p is not None else getattr(config, "hidden_dropout_prob", 0.1)
        pooler = copy.deepcopy(base.pooler) if getattr(base, "pooler", None) is not None else None
        result = MEFTForSequenceClassification(encoder, pooler, p, copy.deepcopy(classifier))
    elif model is not base and isinstance(getattr(classifier, "out_proj", None), nn.Linear):
        # RoBERTa: its head reads the sequence (dense + tanh on the first token, then out_proj)
        result = MEFTForSequenceClassification(encoder, None, 0.0, copy.deepcopy(classifier), head_reads_sequence=True)
    elif model is not base:
        raise TypeError(f"{type(model).__name__} has .{prefix} but no classification head MEFT knows (an nn.Linear "
                        f".classifier, or RoBERTa's with .out_proj); pass its .{prefix} for an encoder")  # fmt: skip
    blocks = [m for m in result.modules() if isinstance(m, BertBlock)] if train_layer_norms else []
    _train_adapters_only(result, [norm for block in blocks for norm in (block.attention_norm, block.mlp_norm)])
    if isinstance(result, MEFTForSequenceClassification):
        result.classifier.requires_grad_(True)  # the task head (BERT's classifier, RoBERTa's whole head)
    result.train(model.training)
    return _with_batch_chunks(result, batch_chunks)


def _with_batch_chunks(result: nn.Module, batch_chunks: int) -> nn.Module:
    for module in result.modules():
        if isinstance(module, ReversibleCoupling):
            module.batch_chunks = batch_chunks
    return result


def _train_adapters_only(result: nn.Module, layer_norms: list[nn.Module]) -> None:
    """Freeze everything pre-trained, then switch on what MEFT trains: the adapters, and the given
    LayerNorms (empty unless `train_layer_norms`)."""
    result.requires_grad_(False)
    for module in result.modules():
        if isinstance(module, BottleneckAdapter):
            module.requires_grad_(True)
    for norm in layer_norms:
        norm.requires_grad_(True)


def _coupling(variant: MEFTVariant, block: nn.Module, dim: int, bottleneck: int, std: float, lambda_, beta,
              compute_dtype) -> ReversibleCoupling:  # fmt: skip
    return ReversibleCoupling(
        _make_part(variant.F, block, dim, bottleneck, std),
        _make_part(variant.G, block, dim, bottleneck, std),
        lambda_=variant.lambda_ if lambda_ is None else lambda_,
        beta=variant.beta if beta is None else beta,
        swap_outputs=variant.swap_outputs,
        compute_dtype=compute_dtype,
    )


def _meft_decoder(model, parts, variant, adapter_bottleneck, adapter_std, lambda_, beta, num_reversible_layers,
                  reversible, train_layer_norms, stream_dtype, exact_inputs) -> MEFTForCausalLM:  # fmt: skip
    """meft_from_hf for a GPT-2-style causal LM: the same couplings on pre-norm causal blocks."""
    transformer, blocks = parts
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"{type(model).__name__}: MEFT on a decoder needs the causal LM with its .lm_head "
                        "(GPT2LMHeadModel), not the bare GPT2Model")  # fmt: skip
    reference = next(model.parameters())
    if stream_dtype == reference.dtype:
        stream_dtype = None
    config = getattr(model, "config", None)
    dim = transformer.wte.embedding_dim
    compute_dtype = reference.dtype if stream_dtype is not None else None
    couplings = nn.ModuleList(
        _coupling(variant, PreNormDecoderBlock(block), dim, adapter_bottleneck, adapter_std, lambda_, beta, compute_dtype)
        for block in blocks
    )  # fmt: skip
    couplings.to(device=reference.device, dtype=reference.dtype)
    embeddings = DecoderEmbeddings(transformer.wte, transformer.wpe, getattr(config, "embd_pdrop", 0.0))
    encoder = MEFTEncoder(embeddings, couplings, num_reversible_layers, reversible, stream_dtype, exact_inputs)
    head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=lm_head.bias is not None)
    head = head.to(device=reference.device, dtype=reference.dtype)
    if getattr(config, "tie_word_embeddings", True) and lm_head.weight is transformer.wte.weight:
        head.weight = embeddings.word_embeddings.weight  # tied, as in the model it comes from
    else:
        head.load_state_dict(lm_head.state_dict())
    result = MEFTForCausalLM(encoder, copy.deepcopy(transformer.ln_f), head)
    blocks = [m.block for m in result.modules() if isinstance(m, PreNormDecoderBlock)] if train_layer_norms else []
    _train_adapters_only(result, [norm for block in blocks for norm in (block.ln_1, block.ln_2)])
    result.train(model.training)
    return result
