"""MEFT on the point transformer: the tiny Point-MAE made reversible with adapters.

Point-MAE's blocks are pre-norm transformer blocks that read the tokens plus their positions,
x <- block(x + pos) (`course_lib.points.point_mae`). The couplings are MEFT's
(`course_lib.meft.model`), with the position embedding added where the pre-trained encoder adds
it, at the input of the attention half:

| variant | F                                   | G                             | lambda | beta | outputs  |
| ------- | ----------------------------------- | ----------------------------- | ------ | ---- | -------- |
| MEFT1   | block(x + pos) + adapter(x)         | adapter                       | 0.1    | 1    | (y2, y1) |
| MEFT2   | adapter                             | block(x + pos) + adapter(x)   | 1      | 0.1  | (y2, y1) |
| MEFT3   | attention_block(x + pos) + adapter  | mlp_block(x) + adapter        | 0.1    | 0.1  | (y1, y2) |

Both streams start as the embedded tokens [CLS, patches]; the classification head reads the
final LayerNorm of the streams' average, as `MEFTEncoder` does for text. The positions reach F
and G through the coupling's context argument (where text passes its padding mask): the custom
backward of `course_lib.meft.reversible` hands F and G the same positions again and computes
no gradient for them.

What can be reversible, and what cannot:

- the six blocks: yes, with their adapters (the adapters are the only trained weights inside);
- the CLS token: trains (it is part of the streams' input, whose gradient the backward returns);
- the CLS position: frozen at its seeded initial value. It enters every coupling through the
  context, which the custom backward does not differentiate (to train it, its gradient would
  have to be accumulated over every layer's recomputation as a third stream). The other
  positions come from the frozen centre embedding and need no gradient anyway. The patch
  embedding (mini-PointNet) is frozen too and runs before the stack.
- Point-PEFT's prompt tokens would fit (extra tokens at the streams' input, as the CLS token);
  its Geometry-aware Adapter would have to take each cloud's centres and neighbour indices as
  context and rebuild its groups in the recomputation: possible, not built here.

Everything pre-trained is copied and frozen (the encoder passed in is left alone); trained:
the adapters, the CLS token, the final LayerNorm and the head (the parts the course's point
LoRA trains besides its own weights).

Derived in notebooks/part4_meft/33_reversible_point_transformer.ipynb (MEFT itself in
notebooks/part4_meft/32_meft.ipynb).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from course_lib.meft.coupling import ReversibleCoupling
from course_lib.meft.model import (
    AdapterOnly,
    BlockWithAdapter,
    MEFTVariant,
    ReversibleStack,
    _train_adapters_only,
    make_meft_adapter,
    resolve_variant,
)
from course_lib.points.point_mae import PointMAEEncoder
from course_lib.transformer import PreNormBlock

__all__ = ["MEFTForPointClassification", "PositionedBlock", "meft_from_point_mae"]


class PositionedBlock(nn.Module):
    """A Point-MAE block that takes its positions as the second argument, seen as MEFT's parts.

    attention_block(x, pos) = (x + pos) + Attn(LN(x + pos)); mlp_block(x) = x + MLP(LN(x));
    forward(x, pos) = mlp_block(attention_block(x, pos)) = block(x + pos), what the
    pre-trained encoder computes.

    Derived in notebooks/part4_meft/33_reversible_point_transformer.ipynb.
    """

    def __init__(self, block: PreNormBlock) -> None:
        super().__init__()
        if not isinstance(block, PreNormBlock):
            raise TypeError(f"PositionedBlock wraps a PreNormBlock (Point-MAE's), got {type(block).__name__}")
        self.block = block

    def attention_block(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        return self.block.attention_block(x if pos is None else x + pos)  # (B, T, C)

    def mlp_block(self, x: Tensor) -> Tensor:
        return self.block.mlp_block(x)  # (B, T, C)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        return self.mlp_block(self.attention_block(x, pos))


class MEFTForPointClassification(ReversibleStack):
    """A Point-MAE classifier whose blocks are MEFT couplings: points (B, N, 3) -> logits (B, classes).

    Parts: `patch_embedding`, `position_embedding`, `cls_token`, `cls_position` (copied from the
    encoder), `couplings`, `norm`, `head`. `reversible` (default True): the lower
    `num_reversible_layers` couplings run through `reversible_stack` (no activations kept);
    False runs them all through plain autograd (the reference for gradients). Streams in
    `stream_dtype` (float64 by default) with parity bits (`exact_inputs`), as `MEFTEncoder`.

    Derived in notebooks/part4_meft/33_reversible_point_transformer.ipynb.
    """

    def __init__(
        self,
        encoder: PointMAEEncoder,
        couplings: nn.ModuleList,
        *,
        num_reversible_layers: int | None = None,
        reversible: bool = True,
        stream_dtype: torch.dtype | None = torch.float64,
        exact_inputs: bool = True,
    ) -> None:
        super().__init__(couplings, num_reversible_layers, reversible, stream_dtype, exact_inputs)
        self.config = encoder.config
        self.patch_embedding = encoder.patch_embedding
        self.position_embedding = encoder.position_embedding
        self.cls_token = encoder.cls_token
        self.cls_position = encoder.cls_position
        self.norm = encoder.norm
        self.head = encoder.head

    def embed(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (B, N, 3) -> tokens [CLS, patches] (B, 1+G, C) and their positions (B, 1+G, C)."""
        if not isinstance(points, Tensor) or points.dim() != 3 or points.shape[-1] != 3:
            shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
            raise ValueError(f"points must be a (B, N, 3) tensor, got {shape}")
        tokens, centres = self.patch_embedding(points)  # (B, G, C), (B, G, 3)
        B = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1+G, C)
        pos = torch.cat([self.cls_position.expand(B, -1, -1), self.position_embedding(centres)], dim=1)
        if pos.requires_grad:
            raise ValueError(
                "the positions (cls_position, position_embedding) must stay frozen in a reversible point model: they "
                "reach every coupling as context, which the custom backward does not differentiate"
            )
        return x, pos

    def streams(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """The two output streams of the last coupling, each (B, 1+G, C) in the stream dtype."""
        return self._streams(points, overwrite_outputs=False)

    def _streams(self, points: Tensor, *, overwrite_outputs: bool) -> tuple[Tensor, Tensor]:
        x, pos = self.embed(points)
        return self.run_stack(x, pos, overwrite_outputs=overwrite_outputs)  # both streams start as the tokens

    def forward_features(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> final tokens (B, 1+G, C): LayerNorm of the streams' average."""
        x1, x2 = self._streams(points, overwrite_outputs=True)
        return self.norm(((x1 + x2) / 2).to(self.cls_token.dtype))

    def forward(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> class logits (B, num_classes)."""
        return self.head(self.forward_features(points))


def meft_from_point_mae(
    encoder: PointMAEEncoder,
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
) -> MEFTForPointClassification:
    """MEFT on a (pre-trained) `PointMAEEncoder`; the encoder passed in is left unchanged.

    The keywords are `meft_from_hf`'s; `batch_chunks` also runs the frozen patch embedding in
    that many pieces (`PatchEmbedding.batch_chunks`): its per-point tensors are the largest of a
    step once the blocks keep nothing (in training mode its BatchNorms then see each piece's
    statistics, a ghost batch norm; the couplings' pieces change nothing). Trainable: the adapters, the CLS token, the final
    LayerNorm and the head (and the blocks' LayerNorms if `train_layer_norms`); frozen: the rest,
    the CLS position included (see the module docstring). Adapters use torch's global RNG: call
    `course_lib.train.set_seed` first.

    Derived in notebooks/part4_meft/33_reversible_point_transformer.ipynb.
    """
    if not isinstance(encoder, PointMAEEncoder):
        raise TypeError(f"meft_from_point_mae expects a PointMAEEncoder, got {type(encoder).__name__}")
    variant = resolve_variant(variant)
    if not isinstance(adapter_bottleneck, int) or adapter_bottleneck < 1:
        raise ValueError(f"adapter_bottleneck must be a positive int, got {adapter_bottleneck!r}")
    copied = copy.deepcopy(encoder)
    reference = next(copied.parameters())
    if stream_dtype == reference.dtype:
        stream_dtype = None
    compute_dtype = reference.dtype if stream_dtype is not None else None
    dim = copied.config.dim

    def part(kind: str, block: PositionedBlock) -> nn.Module:
        adapter = make_meft_adapter(dim, adapter_bottleneck, adapter_std).to(device=reference.device, dtype=reference.dtype)
        return AdapterOnly(adapter) if kind == "adapter" else BlockWithAdapter(block, kind, adapter)

    couplings = nn.ModuleList()
    for block in copied.blocks:
        positioned = PositionedBlock(block)
        couplings.append(ReversibleCoupling(
            part(variant.F, positioned), part(variant.G, positioned),
            lambda_=variant.lambda_ if lambda_ is None else lambda_, beta=variant.beta if beta is None else beta,
            swap_outputs=variant.swap_outputs, compute_dtype=compute_dtype, batch_chunks=batch_chunks,
        ))  # fmt: skip
    model = MEFTForPointClassification(copied, couplings, num_reversible_layers=num_reversible_layers,
                                       reversible=reversible, stream_dtype=stream_dtype, exact_inputs=exact_inputs)  # fmt: skip
    model.patch_embedding.batch_chunks = batch_chunks
    norms = [norm for block in copied.blocks for norm in (block.attention_norm, block.mlp_norm)] if train_layer_norms else []
    _train_adapters_only(model, norms)  # MEFT's trained set, as for text; then the point model's own new parts
    model.cls_token.requires_grad_(True)
    model.norm.requires_grad_(True)
    model.head.requires_grad_(True)
    model.train(encoder.training)
    return model
