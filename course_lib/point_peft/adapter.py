"""Point-PEFT's Geometry-aware Adapter: bottlenecks, a shared local attention, and propagation.

Derived in notebooks/part2_point_peft/15_geometry_aware_adapter.ipynb.

In every block of the frozen backbone (see `course_lib.point_peft.model`) three small pieces act:

1. A parallel bottleneck on the MLP branch, scaled by 0.7:
       m = MLP(LN(x));   x <- x + m + 0.7 * Adapter(m)          Adapter: C -> 16 -> C
2. Local geometry. The token centres (patch centres, plus the prompt tokens' learnable
   coordinates) are grouped: farthest point sampling picks A = G/2 anchors, each anchor takes
   its k = 16 nearest tokens by centre xyz. One tiny attention, *shared by all blocks*, mixes
   the tokens inside each group (6 heads x 3 dims, with projections C -> 54 and 18 -> C), then

       g_a = GELU(BN(max_{j in N(a)} h_j)) + 0.3 * x_a                 (one vector per anchor)
       x_t <- x_t + 0.3 * sum_a w_ta g_a,  w_ta = (1/d_ta^2) / sum_a' (1/d_ta'^2)

   (inverse-squared-distance interpolation of the anchor vectors back to every patch token).
3. A final residual bottleneck on all tokens: x <- x + Adapter(x), C -> 16 -> C.

Official code vs paper (the official code's choice is the default, the other is an option):

- Propagation weights use *all* anchors (`propagation_neighbours=None`); PointNet++'s feature
  propagation, which the paper cites, uses the 3 nearest (`propagation_neighbours=3`).
- The local attention scales scores by 1/sqrt(heads * head_dim) = 1/sqrt(18), not the usual
  1/sqrt(head_dim) (`scale=head_dim ** -0.5` gives the usual one).
- The bottlenecks use QuickGELU (x * sigmoid(1.702 x)), Xavier-uniform weights and biases
  ~ N(0, 1e-6): they do *not* start at zero, and neither does the local-geometry term
  0.3 * sum_a w_ta (GELU(BN(max)) + 0.3 x_a), so the wrapped model does not start where the
  pretrained one is. `zero_init=True` zeroes the up-projections and the BatchNorm's scale (so
  GELU(BN(.)) starts at GELU(0) = 0, and the BatchNorm still learns: GELU'(0) = 1/2); with
  `anchor_scale=0` as well, every adapter starts as the identity (notebook 15 measures the start,
  notebook 16 what it is worth on a short budget).
- Only the patch tokens receive the propagated vectors; prompt tokens join the groups (through
  their coordinates) but are changed only by the final bottleneck, as in the official code.
  `prompts_grouped=False` (`PointPEFTConfig.group_prompts=False`) groups the patch tokens alone.
- The official code groups the prompt coordinates by re-running its point tokenizer on
  [prompt coordinates, points], so its group indices do not line up exactly with the tokens;
  here the grouping runs on the token centres themselves, [prompt coordinates, patch centres].
- The local attention's width, 6 heads x 3 dims = 18, is the official value for C = 384; it is
  kept for any C because the projections C -> 3 * 18 and 18 -> C adapt it (for C = 128 it costs
  9.4k parameters, once for the whole model).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from course_lib.points.neighbours import gather_points, knn, pairwise_squared_distances
from course_lib.points.sampling import farthest_point_sample

__all__ = [
    "GeometryAwareAdapter",
    "LocalGroupAttention",
    "PointBottleneckAdapter",
    "QuickGELU",
    "TokenGrouping",
    "group_tokens",
    "inverse_distance_weights",
]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's cheap GELU approximation, used by the official adapters."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class PointBottleneckAdapter(nn.Module):
    """up(dropout(act(down(x)))), C -> r -> C, plus x when `residual`. (..., C) -> (..., C).

    Point-PEFT's adapter, as the official code writes it: QuickGELU, dropout, an optional
    residual and Xavier initialisation. It differs from `course_lib.peft.BottleneckAdapter` (Part 1's
    and MEFT's: a chosen activation, a scale, no dropout, `up` zero-initialised), hence the name.

    Initialised as the official code does (Xavier-uniform weights, biases ~ N(0, 1e-6)), or with
    a zero up-projection (`zero_init=True`) so that it starts as 0 (or as the identity).

    Derived in notebooks/part2_point_peft/15_geometry_aware_adapter.ipynb.
    """

    def __init__(
        self, dim: int, bottleneck: int, *, dropout: float = 0.0, residual: bool = False, zero_init: bool = False
    ) -> None:
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"dim and bottleneck must be positive, got dim={dim}, bottleneck={bottleneck}")
        self.residual = residual
        self.down = nn.Linear(dim, bottleneck)
        self.activation = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        delta = self.up(self.dropout(self.activation(self.down(x))))  # (..., C) through an r-wide neck
        return x + delta if self.residual else delta


class LocalGroupAttention(nn.Module):
    """Self-attention inside each group of k tokens, in a small space of heads x head_dim dims.

    h <- h + proj(softmax(q k^T * scale) v),  q, k, v = LN(h) W_qkv  (C -> 3 * H * d, no bias)
    (N, k, C) -> (N, k, C), one group per row. Shared by all blocks of the model.

    Derived in notebooks/part2_point_peft/15_geometry_aware_adapter.ipynb.
    """

    def __init__(self, dim: int, num_heads: int = 6, head_dim: int = 3, scale: float | None = None) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be positive, got {num_heads} and {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.scale = scale if scale is not None else inner**-0.5  # official: 1/sqrt(18), not 1/sqrt(3)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)  # C -> 3 * H * d
        self.proj = nn.Linear(inner, dim)  # H * d -> C

    def forward(self, groups: Tensor) -> Tensor:
        if groups.dim() != 3 or groups.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(
                f"LocalGroupAttention expects groups (N, k, C) with C = {self.norm.normalized_shape[0]}, "
                f"got {tuple(groups.shape)}"
            )
        N, k, _ = groups.shape
        qkv = self.qkv(self.norm(groups)).view(N, k, 3, self.num_heads, self.head_dim)
        q, key, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, k, d)
        weights = (q @ key.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (N, H, k, k)
        mixed = (weights @ v).transpose(1, 2).reshape(N, k, -1)  # concat heads: (N, k, H*d)
        return groups + self.proj(mixed)  # residual: (N, k, C)


class TokenGrouping(NamedTuple):
    """Where the local-geometry step looks: computed once per forward pass from token centres."""

    anchor_indices: Tensor  # (B, A) anchors, indices into the grouped tokens
    neighbour_indices: Tensor  # (B, A, k) the k tokens nearest to each anchor
    propagation_indices: Tensor  # (B, G, n) anchors each patch token reads from
    propagation_weights: Tensor  # (B, G, n) inverse-squared-distance weights, rows sum to 1


def inverse_distance_weights(sq_distances: Tensor, eps: float = 1e-8) -> Tensor:
    """w_i = (1 / (d_i^2 + eps)) / sum_j (1 / (d_j^2 + eps)) along the last dimension.

    Derived in notebooks/part2_point_peft/15_geometry_aware_adapter.ipynb.
    """
    reciprocal = 1.0 / (sq_distances + eps)
    return reciprocal / reciprocal.sum(dim=-1, keepdim=True)


def group_tokens(
    token_xyz: Tensor,
    num_anchors: int,
    num_neighbours: int,
    num_leading: int = 0,
    propagation_neighbours: int | None = None,
) -> TokenGrouping:
    """FPS anchors over token centres, kNN groups around them, and propagation weights.

    Args:
        token_xyz: (B, T, 3) centres of the grouped tokens: `num_leading` prompt coordinates,
            then the G patch centres (T = num_leading + G).
        num_anchors: A, anchors picked by farthest point sampling (starting at token 0).
        num_neighbours: k tokens per anchor, nearest first (k <= T).
        propagation_neighbours: n anchors each patch token interpolates from; None = all A
            (official code), 3 = PointNet++ feature propagation.

    The indices are discrete (no gradient); the propagation weights are differentiable in
    `token_xyz`, which is how learnable prompt coordinates receive a gradient (through the
    anchors that are prompt tokens: FPS starts at token 0, the first prompt).

    Derived in notebooks/part2_point_peft/15_geometry_aware_adapter.ipynb.
    """
    anchors = farthest_point_sample(token_xyz, num_anchors, start_index=0)  # (B, A)
    anchor_xyz = gather_points(token_xyz, anchors)  # (B, A, 3)
    _, neighbours = knn(anchor_xyz, token_xyz, num_neighbours)  # (B, A, k)
    patch_xyz = token_xyz[:, num_leading:].contiguous()  # (B, G, 3)
    sq_dist = pairwise_squared_distances(patch_xyz, anchor_xyz)  # (B, G, A)
    n = num_anchors if propagation_neighbours is None else propagation_neighbours
    if not 1 <= n <= num_anchors:
        raise ValueError(f"propagation_neighbours must be in [1, {num_anchors}] (the anchors), got {n}")
    nearest_sq, nearest = sq_dist.topk(n, dim=-1, largest=False)  # (B, G, n)
    return TokenGrouping(anchors, neighbours, nearest, inverse_distance_weights(nearest_sq))


class GeometryAwareAdapter(nn.Module):
    """The per-block part of the Geometry-aware Adapter (see the module doc for the maths).

    `mlp_delta(m)` is the parallel MLP-branch term 0.7 * Adapter(m); `forward(x, grouping, ...)`
    applies local geometry, propagation and the final residual bottleneck to the block output
    x = [CLS, P prompt tokens, G patch tokens] (B, 1+P+G, C). The `LocalGroupAttention` is
    passed in, since all blocks share one.

    Derived in notebooks/part2_point_peft/15_geometry_aware_adapter.ipynb.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 16,
        *,
        dropout: float = 0.1,
        mlp_scale: float = 0.7,
        anchor_scale: float = 0.3,
        propagation_scale: float = 0.3,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.mlp_scale, self.anchor_scale, self.propagation_scale = mlp_scale, anchor_scale, propagation_scale
        self.mlp_adapter = PointBottleneckAdapter(dim, bottleneck, dropout=dropout, zero_init=zero_init)
        self.pool_norm = nn.BatchNorm1d(dim)  # BN + GELU after the max-pool (official "out_transform")
        self.pool_activation = nn.GELU()
        self.final_adapter = PointBottleneckAdapter(dim, bottleneck, dropout=dropout, residual=True, zero_init=zero_init)
        if zero_init:
            nn.init.zeros_(self.pool_norm.weight)  # GELU(BN(.)) starts at GELU(0) = 0 (BN's gamma = 0)

    def mlp_delta(self, mlp_output: Tensor) -> Tensor:
        """0.7 * Adapter(m) for the MLP branch output m (B, T, C): x <- x + m + this."""
        return self.mlp_scale * self.mlp_adapter(mlp_output)

    def forward(
        self,
        x: Tensor,
        grouping: TokenGrouping,
        local_attention: LocalGroupAttention,
        num_prompts: int = 0,
        prompts_grouped: bool = True,
    ) -> Tensor:
        """x (B, 1+P+G, C) -> (B, 1+P+G, C); `grouping` groups the P+G tokens after CLS, or only the
        G patch tokens when `prompts_grouped` is False (the prompts then skip the local geometry).
        The grouping's indices must point into that same token set: `group_tokens` on
        [prompt coordinates, patch centres] with `num_leading=P`, or on the patch centres alone."""
        B, T, C = x.shape
        cls, tokens = x[:, :1], x[:, 1:]  # (B, 1, C), (B, P+G, C)
        grouped = tokens if prompts_grouped else tokens[:, num_prompts:]  # the tokens the indices point into
        A, k = grouping.neighbour_indices.shape[1:]
        groups = gather_points(grouped, grouping.neighbour_indices)  # (B, A, k, C)
        groups = local_attention(groups.reshape(B * A, k, C)).view(B, A, k, C)  # mix inside each group
        pooled = groups.amax(dim=2)  # max over the group                           (B, A, C)
        pooled = self.pool_activation(self.pool_norm(pooled.reshape(B * A, C))).view(B, A, C)  # BN + GELU
        pooled = pooled + self.anchor_scale * gather_points(grouped, grouping.anchor_indices)  # + 0.3 x_a
        G, n = grouping.propagation_indices.shape[1:]
        if G != T - 1 - num_prompts:
            raise ValueError(f"the grouping propagates to {G} patch tokens, but x has {T - 1 - num_prompts}")
        # sum_a w_ta g_a as one batched matrix product: scatter the n weights of each token into a
        # dense (B, G, A) matrix (zeros elsewhere), then (B, G, A) @ (B, A, C). The same sum as
        # gathering (B, G, n, C) anchor vectors, without materialising them (n = A by default).
        weights = pooled.new_zeros(B, G, pooled.shape[1])  # (B, G, A)
        weights = weights.scatter(2, grouping.propagation_indices, grouping.propagation_weights.to(pooled.dtype))
        interpolated = torch.bmm(weights, pooled)  # (B, G, C)
        patches = tokens[:, num_prompts:] + self.propagation_scale * interpolated  # (B, G, C)
        x = torch.cat([cls, tokens[:, :num_prompts], patches], dim=1)  # (B, 1+P+G, C)
        return self.final_adapter(x)  # x + Adapter(x)
