"""A tiny Point-MAE: point patches as tokens, a pre-norm transformer, a classification head.

Derived in notebooks/part2_point_peft/12_point_mae.ipynb (pretrained by
`course_lib.points.pretrain`; the shipped checkpoint comes from data_scripts/pretrain_point_mae.py).

The pipeline, as in Point-MAE (Pang et al., ECCV 2022):

1. Patches. Farthest point sampling places G centres, each centre takes its k nearest points,
   and each patch is written relative to its centre: (B, N, 3) -> (B, G, k, 3) + centres (B, G, 3).
2. Patch embedding. A mini-PointNet embeds each patch on its own: a shared MLP per point,
   max-pool over the patch, the pooled vector concatenated back to every point, a second MLP,
   max-pool again: (B, G, k, 3) -> (B, G, C). Max-pooling makes it blind to the order of the
   points inside a patch.
3. Position. The centre xyz gets its own small MLP (3 -> 128 -> C). The patch vector says what
   the local shape is, the position embedding says where it is; the position embedding is added
   again at the input of *every* block: x <- block(x + pos).
4. A CLS token (with its own learned position) leads the G patch tokens, then `depth` pre-norm
   blocks (`course_lib.transformer.PreNormBlock`) and a final LayerNorm.
5. Head: concat(CLS token, max over the patch tokens) -> MLP -> class logits.

Sizes. The paper's backbone is C = 384, 12 blocks, 6 heads, MLP ratio 4 (22.1M parameters
with its head), with a mini-PointNet 3 -> 128 -> 256, concat 512 -> 512 -> C. The defaults
here have 1.24M pretrained parameters (1.38M with the head), so that pretraining takes minutes
on a laptop CPU: C = 128, 6 blocks, 4 heads of 32 dimensions, MLP ratio 4 (kept: DEFT measures
the 4C-wide MLP activations), and a mini-PointNet at a quarter of the paper's widths,
3 -> 32 -> 64, concat 128 -> 128 -> C. The PointNet runs on every point of every patch
(B x G x k = 2048 B points): at the paper's widths it would cost ten times the multiply-adds
per point and, on a CPU, several times as much as the whole transformer.
Tokens: 1024 points, 64 groups of 32, as the paper's ModelNet40 setting. No drop-path (the
paper uses 0.1): the blocks are the course's plain `PreNormBlock`.

What later parts rely on:

- `encoder.blocks` is an `nn.ModuleList` of `PreNormBlock`s (`attention_branch`, `mlp_branch`,
  `mlp.activation`): Point-PEFT hooks into them, DEFT hooks `block.mlp.activation`.
- `encoder.embed(points)` gives the block input (tokens with CLS, their positions, centres),
  `encoder.run_blocks(x, pos)` the loop, `encoder.classify(tokens)` the head: a method that
  inserts prompt tokens writes its own loop from these three pieces.
- `extract_features` gives one max-pooled feature per shape (Point-PEFT's memory bank).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from course_lib.points.neighbours import Groups, sample_and_group
from course_lib.points.sampling import check_point_batch
from course_lib.transformer import BlockConfig, PreNormBlock

__all__ = [
    "CentreEmbedding",
    "ClassificationHead",
    "MiniPointNet",
    "PatchEmbedding",
    "PointMAEConfig",
    "PointMAEEncoder",
    "extract_features",
]


@dataclass(frozen=True)
class PointMAEConfig:
    """Sizes of the tiny Point-MAE (defaults: the shipped checkpoint; see the module doc).

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.

    Attributes:
        num_points: N, the cloud size it is trained on (any N >= num_groups, group_size works).
        num_groups: G, patches (tokens) per cloud, placed by farthest point sampling.
        group_size: k, points per patch (the k nearest to the centre).
        dim: C, the token width.
        depth: number of transformer blocks.
        num_heads: attention heads (C / num_heads dimensions each).
        mlp_ratio: MLP hidden width as a multiple of C.
        pointnet_hidden_dim: hidden width of the mini-PointNet's first, per-point MLP (paper 128).
        pointnet_point_dim: per-point feature width after the first MLP (paper 256).
        pointnet_patch_hidden_dim: hidden width of the second MLP, after the concat (paper 512).
        position_hidden_dim: hidden width of the centre embedding 3 -> h -> C (paper 128).
        dropout: dropout inside the blocks (Point-MAE: 0).
        num_classes: outputs of the classification head (not pretrained; free to change).
        head_hidden_dim: hidden width of the head (paper 256).
        head_dropout: dropout in the head (paper 0.5).
    """

    num_points: int = 1024
    num_groups: int = 64
    group_size: int = 32
    dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pointnet_hidden_dim: int = 32
    pointnet_point_dim: int = 64
    pointnet_patch_hidden_dim: int = 128
    position_hidden_dim: int = 128
    dropout: float = 0.0
    num_classes: int = 15
    head_hidden_dim: int = 256
    head_dropout: float = 0.5

    #: Fields that only concern the classification head: a checkpoint's encoder fits any values.
    HEAD_FIELDS = ("num_classes", "head_hidden_dim", "head_dropout")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"PointMAEConfig.{field.name} must be a positive int, got {value!r}")
        if self.num_groups > self.num_points or self.group_size > self.num_points:
            raise ValueError(
                f"num_groups ({self.num_groups}) and group_size ({self.group_size}) cannot exceed "
                f"num_points ({self.num_points})"
            )
        for name in ("dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"PointMAEConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        self.block_config()  # checks dim % num_heads and the MLP width

    def block_config(self) -> BlockConfig:
        """The `BlockConfig` of every transformer block."""
        return BlockConfig(dim=self.dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PointMAEConfig:
        """The config written by `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PointMAEConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def encoder_differences(self, other: PointMAEConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, other's value)} for the fields that shape the encoder and differ."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name not in self.HEAD_FIELDS and getattr(self, f.name) != getattr(other, f.name)
        }


def _trunc_normal_init(module: nn.Module) -> None:
    """Point-MAE's initialisation: Linear weights ~ truncated N(0, 0.02), biases 0; norms 1 and 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MiniPointNet(nn.Module):
    """Embed each patch of k points into one C-vector, independent of the order of its points.

    first_mlp (per point):  3 -> h1 -> p          f_i = MLP1(x_i)                    (B*G, k, p)
    patch summary:          g = max_i f_i                                           (B*G, p)
    second_mlp (per point): [g, f_i] (2p) -> h2 -> C                                 (B*G, k, C)
    patch embedding:        max_i MLP2([g, f_i])                                     (B*G, C)

    The MLPs act on each point alone and max-pooling ignores order, so permuting the points of a
    patch changes nothing. BatchNorm normalises over all points of all patches in the batch,
    as the paper's Conv1d + BatchNorm1d do.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    def __init__(self, dim: int, hidden_dim: int = 32, point_dim: int = 64, patch_hidden_dim: int = 128) -> None:
        super().__init__()
        self.dim = dim
        self.first_mlp = nn.Sequential(
            nn.Linear(3, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, point_dim)
        )
        self.second_mlp = nn.Sequential(
            nn.Linear(2 * point_dim, patch_hidden_dim),
            nn.BatchNorm1d(patch_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(patch_hidden_dim, dim),
        )

    def forward(self, neighbourhoods: Tensor) -> Tensor:
        """neighbourhoods (B, G, k, 3), relative to their centres -> patch embeddings (B, G, C)."""
        if not isinstance(neighbourhoods, Tensor) or neighbourhoods.dim() != 4 or neighbourhoods.shape[-1] != 3:
            shape = tuple(neighbourhoods.shape) if isinstance(neighbourhoods, Tensor) else type(neighbourhoods).__name__
            raise ValueError(f"MiniPointNet expects neighbourhoods of shape (B, G, k, 3), got {shape}")
        B, G, k, _ = neighbourhoods.shape
        points = neighbourhoods.reshape(B * G * k, 3)  # every point of every patch       (B*G*k, 3)
        features = self.first_mlp(points).view(B * G, k, -1)  # f_i                      (B*G, k, p)
        summary = features.amax(dim=1, keepdim=True)  # g = max_i f_i                     (B*G, 1, p)
        features = torch.cat([summary.expand(-1, k, -1), features], dim=-1)  # [g, f_i]  (B*G, k, 2p)
        features = self.second_mlp(features.view(B * G * k, -1)).view(B * G, k, self.dim)  # (B*G, k, C)
        return features.amax(dim=1).view(B, G, self.dim)  # max over the patch           (B, G, C)


class PatchEmbedding(nn.Module):
    """Point-MAE's tokenizer: FPS + kNN grouping, then the mini-PointNet on each patch.

    `group(points)` gives the patches (`course_lib.points.sample_and_group`, FPS starting at
    point 0 as Point-MAE's CUDA kernel does, so the result is deterministic); `forward(points)`
    gives tokens (B, G, C) and centres (B, G, 3).

    `batch_chunks` (attribute, default 1): group and embed that many pieces of the batch one
    after another. With frozen weights (a PEFT setting) nothing is kept for backward, and the
    peak of the step falls by about that factor: the mini-PointNet's per-point tensors (B*G*k, 128)
    are the largest of the whole model. In training mode the BatchNorms then normalise each piece
    with its own statistics ("ghost batch norm", Hoffer et al. 2017), so the tokens differ
    slightly from one whole batch's; in eval mode they are the same.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    def __init__(self, config: PointMAEConfig) -> None:
        super().__init__()
        self.batch_chunks = 1
        self.num_groups = config.num_groups
        self.group_size = config.group_size
        self.pointnet = MiniPointNet(
            config.dim, config.pointnet_hidden_dim, config.pointnet_point_dim, config.pointnet_patch_hidden_dim
        )

    def group(self, points: Tensor) -> Groups:
        """(B, N, 3) -> Groups(neighbourhoods (B, G, k, 3), centres (B, G, 3), ...)."""
        check_point_batch(points)
        if points.shape[1] < max(self.num_groups, self.group_size):
            raise ValueError(
                f"a cloud of N = {points.shape[1]} points is too small for {self.num_groups} groups of "
                f"{self.group_size} points: give at least {max(self.num_groups, self.group_size)} points"
            )
        return sample_and_group(points, self.num_groups, self.group_size, start_index=0)

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, 3) -> tokens (B, G, C), centres (B, G, 3)."""
        chunks = getattr(self, "batch_chunks", 1)  # modules pickled before the attribute existed: 1
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(f"PatchEmbedding.batch_chunks must be an int >= 1, got {chunks!r}")
        count = min(chunks, points.shape[0]) if isinstance(points, Tensor) and points.dim() == 3 else 1
        if count > 1:  # one piece of the batch after another (a ghost batch for the BatchNorms)
            edges = [round(i * points.shape[0] / count) for i in range(count + 1)]
            pieces = [self._embed(points[a:b]) for a, b in itertools.pairwise(edges)]
            return torch.cat([t for t, _ in pieces]), torch.cat([c for _, c in pieces])
        return self._embed(points)

    def _embed(self, points: Tensor) -> tuple[Tensor, Tensor]:
        groups = self.group(points)
        return self.pointnet(groups.neighbourhoods), groups.centres


class CentreEmbedding(nn.Module):
    """Position embedding of the patch centres: Linear(3, h), GELU, Linear(h, C). (..., 3) -> (..., C).

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    def __init__(self, dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, centres: Tensor) -> Tensor:
        if centres.shape[-1] != 3:
            raise ValueError(f"CentreEmbedding expects centres (..., 3), got {tuple(centres.shape)}")
        return self.mlp(centres)


class ClassificationHead(nn.Module):
    """Point-MAE's fine-tuning head: [CLS, max over patch tokens] (2C) -> h -> h -> classes,
    with BatchNorm, ReLU and dropout between the Linear layers.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    def __init__(self, dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )  # fmt: skip

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, 1 + G, C), CLS first -> logits (B, num_classes)."""
        pooled = torch.cat([tokens[:, 0], tokens[:, 1:].amax(dim=1)], dim=-1)  # [CLS, max_g x_g]  (B, 2C)
        return self.mlp(pooled)


class PointMAEEncoder(nn.Module):
    """The tiny Point-MAE backbone with its classification head.

    Parts: `patch_embedding` (FPS + kNN + `pointnet`), `position_embedding` (centres -> C),
    `cls_token` and `cls_position` (1, 1, C), `blocks` (ModuleList of `PreNormBlock`), `norm`,
    `head`. The pretrained checkpoint fills everything except the CLS token and position and
    the head, which Point-MAE adds (freshly initialised) for fine-tuning.

        x, pos, centres = encoder.embed(points)      # (B, 1+G, C), (B, 1+G, C), (B, G, 3)
        tokens = encoder.run_blocks(x, pos)          # x <- block(x + pos) for each block; LayerNorm
        logits = encoder.classify(tokens)            # head([CLS, max over patch tokens])

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    def __init__(self, config: PointMAEConfig = PointMAEConfig()) -> None:
        super().__init__()
        if not isinstance(config, PointMAEConfig):
            raise TypeError(f"config must be a PointMAEConfig, got {type(config).__name__}")
        self.config = config
        C = config.dim
        self.patch_embedding = PatchEmbedding(config)
        self.position_embedding = CentreEmbedding(C, config.position_hidden_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.cls_position = nn.Parameter(torch.zeros(1, 1, C))
        block_config = config.block_config()
        self.blocks = nn.ModuleList(PreNormBlock(block_config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(C, eps=block_config.layer_norm_eps)
        self.head = ClassificationHead(C, config.num_classes, config.head_hidden_dim, config.head_dropout)
        self.apply(_trunc_normal_init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_position, std=0.02)

    def embed(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """points (B, N, 3) -> block input x (B, 1+G, C), positions pos (B, 1+G, C), centres (B, G, 3).

        x = [CLS, patch tokens], pos = [CLS position, embedded centres].
        """
        tokens, centres = self.patch_embedding(points)  # (B, G, C), (B, G, 3)
        B = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1+G, C)
        pos = torch.cat([self.cls_position.expand(B, -1, -1), self.position_embedding(centres)], dim=1)  # (B, 1+G, C)
        return x, pos, centres

    def run_blocks(self, x: Tensor, pos: Tensor) -> Tensor:
        """x <- block(x + pos) for every block, then the final LayerNorm: (B, T, C) -> (B, T, C).

        Works on any token set: Point-MAE's pretraining runs it on the visible patches only.
        """
        if x.shape != pos.shape:
            raise ValueError(f"tokens {tuple(x.shape)} and positions {tuple(pos.shape)} must have the same shape")
        for block in self.blocks:
            x = block(x + pos)  # the position is added again at every block input
        return self.norm(x)

    def forward_features(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (B, N, 3) -> final tokens (B, 1+G, C) (CLS first, after the LayerNorm), centres (B, G, 3)."""
        x, pos, centres = self.embed(points)
        return self.run_blocks(x, pos), centres

    def pooled_features(self, points: Tensor) -> Tensor:
        """One C-vector per cloud: the max over the final patch tokens (CLS left out). (B, N, 3) -> (B, C)."""
        tokens, _ = self.forward_features(points)
        return tokens[:, 1:].amax(dim=1)

    def classify(self, tokens: Tensor) -> Tensor:
        """Final tokens (B, 1+G, C), CLS first -> logits (B, num_classes)."""
        return self.head(tokens)

    def forward(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> class logits (B, num_classes)."""
        tokens, _ = self.forward_features(points)
        return self.classify(tokens)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: Dataset | Iterable[Any],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Max-pooled final features of every cloud, in eval mode: (features (S, C), labels (S,)).

    `data` is a Dataset of (points (N, 3), label) pairs (read in order, `batch_size` at a time)
    or an iterable of (points (B, N, 3), labels (B,)) batches. The features are what
    `encoder.pooled_features` gives; Point-PEFT's memory bank stores them for its training set.
    The encoder's train/eval mode is restored afterwards.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    if not isinstance(encoder, nn.Module) or not callable(getattr(encoder, "pooled_features", None)):
        raise TypeError(f"encoder must be a PointMAEEncoder (or a module with pooled_features()), got {type(encoder).__name__}")
    loader = DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    try:
        for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("extract_features expects (points, labels) batches")
            points, batch_labels = batch
            features.append(encoder.pooled_features(points.to(device)).cpu())
            labels.append(torch.as_tensor(batch_labels).cpu())
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("extract_features got no data: the dataset or loader is empty")
    return torch.cat(features), torch.cat(labels)
