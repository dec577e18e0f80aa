"""Masked-autoencoder pretraining of the tiny Point-MAE, its checkpoint, and a linear probe.

Derived in notebooks/part2_point_peft/12_point_mae.ipynb.

Point-MAE pretraining, step by step:

1. Cut each cloud into G patches (FPS + kNN) as the encoder's tokenizer does.
2. Hide a random 60% of the patches (`random_patch_mask`): int(0.6 G) per cloud, drawn anew
   for every cloud and every step.
3. Encode the *visible* patches only: mini-PointNet, centre position embedding, the transformer
   blocks (no CLS token in pretraining). The hidden patches never reach the encoder, so it
   cannot copy them. Their centres do reach the decoder (it must know where to rebuild), and
   centres alone outline the shape; a high mask ratio keeps the task hard all the same.
4. A light decoder gets the encoded visible tokens plus one shared, learned mask token per
   hidden patch, every token with the embedding of its centre (added at each block), and
   predicts the k points of each hidden patch (relative to its centre): (B, M, k, 3).
5. Loss: the L2 Chamfer distance between predicted and true hidden patches
   (`course_lib.points.chamfer`), averaged over patches. Only the encoder is kept for later.

The checkpoint (`save_checkpoint` / `load_pretrained_point_mae`: the encoder's pretrained
weights, the decoder's, the configs and a record of the run, listed with its SHA-256) is
written and read by `course_lib.points.checkpoint`; its functions are re-exported here.

The shipped `checkpoints/point_mae_tiny.pt` is written by `python -m data_scripts.pretrain_point_mae`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from course_lib.points.chamfer import chamfer_distance
from course_lib.points.checkpoint import (  # the checkpoint code lives there; re-exported for existing imports
    CHECKPOINT_NAME,
    default_checkpoint_path,
    file_sha256,
    load_pretrained_masked_autoencoder,
    load_pretrained_point_mae,
    read_checkpoint,
    read_sha256sums,
    save_checkpoint,
    update_sha256sums,
)
from course_lib.points.neighbours import gather_points
from course_lib.points.point_mae import CentreEmbedding, PointMAEConfig, PointMAEEncoder, _trunc_normal_init
from course_lib.points.transforms import random_scale_translate, rotate_about_up_axis
from course_lib.transformer import PreNormBlock

__all__ = [
    "PretrainConfig",
    "PatchMask",
    "num_masked_patches",
    "random_patch_mask",
    "MaskedAutoencoderOutput",
    "MaskedAutoencoder",
    "PretrainResult",
    "pretrain",
    "CHECKPOINT_NAME",
    "default_checkpoint_path",
    "file_sha256",
    "read_sha256sums",
    "update_sha256sums",
    "save_checkpoint",
    "read_checkpoint",
    "load_pretrained_point_mae",
    "load_pretrained_masked_autoencoder",
    "linear_probe_accuracy",
]


@dataclass(frozen=True)
class PretrainConfig:
    """How the tiny Point-MAE is pretrained (defaults: the shipped checkpoint).

    Point-MAE's own recipe: mask ratio 0.6 (random), decoder of 4 blocks as wide as the encoder,
    AdamW lr 1e-3, weight decay 0.05, cosine schedule with 10 warm-up epochs, 300 epochs, batch
    128, scale 2/3-3/2 per axis and translation +-0.2 as augmentation. Here: 2 decoder blocks and
    10 epochs of batch 32, so that it runs in minutes on a CPU, and one addition: each cloud is
    also turned about the up axis by a random angle (`rotate_about_up_axis`). The clean shapes
    all stand in one orientation, while the scan-like sets (like ScanObjectNN) come turned; with
    the turn, the linear probe on pb_t50_rs rose from 0.31 to 0.36 (clean: 0.98 -> 0.97).

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    mask_ratio: float = 0.6
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    num_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    scale_range: tuple[float, float] = (2.0 / 3.0, 3.0 / 2.0)
    translate_range: float = 0.2
    rotate_about_up_axis: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for name in ("decoder_depth", "decoder_num_heads", "num_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_epochs >= 0")
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["scale_range"] = list(self.scale_range)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PretrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Masking


class PatchMask(NamedTuple):
    """Which patches are hidden: exactly M per cloud."""

    masked: Tensor  # (B, M) indices of the hidden patches
    visible: Tensor  # (B, G - M) indices of the visible patches
    is_masked: Tensor  # (B, G) bool, True = hidden


def num_masked_patches(num_groups: int, mask_ratio: float) -> int:
    """M = int(mask_ratio * G), as Point-MAE; at least one patch is hidden and one is kept."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    num_masked = int(mask_ratio * num_groups)
    if not 1 <= num_masked <= num_groups - 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} of G = {num_groups} patches hides {num_masked}: it must hide at least one "
            "patch and keep at least one visible"
        )
    return num_masked


def random_patch_mask(
    batch_size: int,
    num_groups: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> PatchMask:
    """Hide M = int(mask_ratio * G) patches of each cloud, chosen uniformly at random.

    Sorting B rows of uniform noise gives B independent random permutations of the G patches;
    the first M of each are hidden, the rest visible.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    if batch_size < 1 or num_groups < 2:
        raise ValueError(f"need batch_size >= 1 and num_groups >= 2, got {batch_size} and {num_groups}")
    num_masked = num_masked_patches(num_groups, mask_ratio)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch_size, num_groups, generator=generator, device=gen_device)  # (B, G)
    order = noise.argsort(dim=1).to(device if device is not None else gen_device)  # a random permutation per row
    masked, visible = order[:, :num_masked], order[:, num_masked:]  # (B, M), (B, G - M)
    is_masked = torch.zeros(batch_size, num_groups, dtype=torch.bool, device=order.device)
    is_masked.scatter_(1, masked, True)  # (B, G)
    return PatchMask(masked, visible, is_masked)


# ----------------------------------------------------------------------------------------------
# The masked autoencoder


class MaskedAutoencoderOutput(NamedTuple):
    loss: Tensor  # () mean L2 Chamfer distance over the hidden patches
    reconstruction: Tensor  # (B, M, k, 3) predicted hidden patches, relative to their centres
    target: Tensor  # (B, M, k, 3) true hidden patches, relative to their centres
    mask: PatchMask
    centres: Tensor  # (B, G, 3) all patch centres


class MaskedAutoencoder(nn.Module):
    """Point-MAE: a `PointMAEEncoder` on the visible patches and a light decoder for the hidden ones.

    Decoder parts: `mask_token` (1, 1, C), `decoder_position_embedding` (its own centre MLP),
    `decoder_blocks` (PreNormBlocks as wide as the encoder), `decoder_norm`, and
    `reconstruction_head` (C -> 3 k: the k points of a patch).

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    def __init__(
        self, encoder: PointMAEEncoder, mask_ratio: float = 0.6, decoder_depth: int = 2, decoder_num_heads: int = 4
    ) -> None:
        super().__init__()
        if not isinstance(encoder, PointMAEEncoder):
            raise TypeError(f"encoder must be a PointMAEEncoder, got {type(encoder).__name__}")
        config = encoder.config
        num_masked_patches(config.num_groups, mask_ratio)  # checks the ratio leaves both parts non-empty
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        C, k = config.dim, config.group_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, C))
        self.decoder_position_embedding = CentreEmbedding(C, config.position_hidden_dim)
        decoder_block = dataclasses.replace(config.block_config(), num_heads=decoder_num_heads)
        self.decoder_blocks = nn.ModuleList(PreNormBlock(decoder_block) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(C, eps=decoder_block.layer_norm_eps)
        self.reconstruction_head = nn.Linear(C, 3 * k)  # one token -> the k points of its patch
        for part in (self.decoder_position_embedding, self.decoder_blocks, self.decoder_norm, self.reconstruction_head):
            part.apply(_trunc_normal_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def decoder_state_dict(self) -> dict[str, Tensor]:
        """The decoder's weights (everything but the encoder)."""
        return {name: value for name, value in self.state_dict().items() if not name.startswith("encoder.")}

    def forward(self, points: Tensor, generator: torch.Generator | None = None) -> MaskedAutoencoderOutput:
        """points (B, N, 3) -> loss and reconstructions of a random 60% of the patches."""
        encoder, config = self.encoder, self.encoder.config
        groups = encoder.patch_embedding.group(points)  # neighbourhoods (B, G, k, 3), centres (B, G, 3)
        B, G, k, _ = groups.neighbourhoods.shape
        mask = random_patch_mask(B, G, self.mask_ratio, generator, device=points.device)
        flat = groups.neighbourhoods.reshape(B, G, k * 3)  # one row per patch, to gather patches  (B, G, 3k)
        visible_patches = gather_points(flat, mask.visible).view(B, -1, k, 3)  # (B, V, k, 3)
        target = gather_points(flat, mask.masked).view(B, -1, k, 3)  # (B, M, k, 3)
        visible_centres = gather_points(groups.centres, mask.visible)  # (B, V, 3)
        masked_centres = gather_points(groups.centres, mask.masked)  # (B, M, 3)
        M = target.shape[1]

        # encoder: only the visible patches (the PointNet is per patch, so embedding just these
        # gives the same tokens as embedding all and dropping the hidden ones, at 40% of the cost)
        tokens = encoder.patch_embedding.pointnet(visible_patches)  # (B, V, C)
        encoded = encoder.run_blocks(tokens, encoder.position_embedding(visible_centres))  # (B, V, C)

        # decoder: [encoded visible, mask token x M], each with its centre's embedding
        x = torch.cat([encoded, self.mask_token.expand(B, M, -1)], dim=1)  # (B, G, C)
        pos = self.decoder_position_embedding(torch.cat([visible_centres, masked_centres], dim=1))  # (B, G, C)
        for block in self.decoder_blocks:
            x = block(x + pos)
        x = self.decoder_norm(x[:, -M:])  # the hidden patches' tokens  (B, M, C)
        reconstruction = self.reconstruction_head(x).view(B, M, k, 3)  # (B, M, k, 3)

        # Point-MAE's loss: L2 Chamfer per hidden patch, averaged over all of them
        loss = chamfer_distance(reconstruction.reshape(B * M, k, 3), target.reshape(B * M, k, 3)).mean()
        return MaskedAutoencoderOutput(loss, reconstruction, target, mask, groups.centres)


# ----------------------------------------------------------------------------------------------
# Pretraining


@dataclass
class PretrainResult:
    """What `pretrain` returns: the model and a record of the run."""

    model: MaskedAutoencoder
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step
    epoch_losses: list[float] = field(default_factory=list)  # mean per epoch
    seconds: float = 0.0  # wall-clock time
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): the cost on a shared machine
    num_steps: int = 0
    num_shapes: int = 0


def _as_point_tensor(data: Dataset | Tensor) -> Tensor:
    """(S, N, 3) float tensor from a tensor or a Dataset of (points, label) / points items."""
    if isinstance(data, Tensor):
        points = data
    elif hasattr(data, "points") and isinstance(data.points, Tensor) and getattr(data, "transform", None) is None:
        points = data.points  # a PointCloudDataset without transform: take the array directly
    elif isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        points = torch.stack([torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item) for item in items])
    else:
        raise TypeError(f"pretraining data must be a tensor (S, N, 3) or a Dataset, got {type(data).__name__}")
    if points.dim() != 3 or points.shape[-1] != 3 or not points.is_floating_point():
        raise ValueError(f"pretraining data must be float clouds (S, N, 3), got {tuple(points.shape)} {points.dtype}")
    if points.shape[0] < 2:
        raise ValueError(f"pretraining needs at least 2 clouds (BatchNorm needs batches of 2), got {points.shape[0]}")
    return points.float()


def pretrain(
    data: Dataset | Tensor | None = None,
    *,
    config: PointMAEConfig = PointMAEConfig(),
    pretrain_config: PretrainConfig = PretrainConfig(),
    max_steps: int | None = None,
    model: MaskedAutoencoder | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a tiny Point-MAE as a masked autoencoder; returns the model and its loss curve.

    Args:
        data: clouds (S, N, 3) or a Dataset of (points, label); default: the clean shape set's
            training split, `load_shapes("clean", "train", num_points=config.num_points)`.
        config: the encoder's sizes (ignored when `model` is given).
        pretrain_config: mask ratio, decoder, optimizer, schedule, augmentation, seed.
        max_steps: stop after this many optimizer steps (a quick run); the schedule still
            spans them, so the learning rate decays to 0 at the last step.
        model: continue training this MaskedAutoencoder instead of a fresh one.
        progress: show a tqdm progress bar.

    Each epoch visits the clouds in a fresh random order in batches of `batch_size` (the last,
    incomplete batch is dropped), scales each cloud by a random factor per axis and shifts it
    (Point-MAE's augmentation), turns it about the up axis (`rotate_about_up_axis`), and hides
    a fresh random set of patches. AdamW with a linear warm-up and cosine decay; biases and
    norm weights get no weight decay. The initialisation comes from torch's global generator,
    seeded here with `pretrain_config.seed`; order, augmentation and masks from one generator
    seeded with the same number. With one CPU thread two runs give bit-identical weights.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    pc = pretrain_config
    if data is None:
        from course_lib.points.datasets import load_shapes

        data = load_shapes("clean", "train", num_points=config.num_points)
    points = _as_point_tensor(data)  # (S, N, 3)
    num_shapes = points.shape[0]
    batch_size = min(pc.batch_size, num_shapes)
    steps_per_epoch = num_shapes // batch_size
    num_steps = steps_per_epoch * pc.num_epochs
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        num_steps = min(num_steps, max_steps)
    warmup_steps = min(pc.warmup_epochs * steps_per_epoch, num_steps // 2)

    torch.manual_seed(pc.seed)  # the initialisation
    if model is None:
        model = MaskedAutoencoder(PointMAEEncoder(config), pc.mask_ratio, pc.decoder_depth, pc.decoder_num_heads)
    generator = torch.Generator().manual_seed(pc.seed)  # order, augmentation, masks
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": pc.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=pc.lr,
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, num_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    result = PretrainResult(model=model, num_shapes=num_shapes)
    device = next(model.parameters()).device
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=num_steps, desc="pretraining Point-MAE", disable=not progress, leave=False)
    try:
        step = 0
        while step < num_steps:
            order = torch.randperm(num_shapes, generator=generator)
            epoch_losses = []
            for first in range(0, steps_per_epoch * batch_size, batch_size):
                if step >= num_steps:
                    break
                batch = points[order[first : first + batch_size]]  # (B, N, 3)
                batch = random_scale_translate(batch, pc.scale_range, pc.translate_range, generator=generator)
                if pc.rotate_about_up_axis:  # a random turn about y per cloud
                    batch = rotate_about_up_axis(batch, generator=generator)
                output = model(batch.to(device), generator=generator)
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                epoch_losses.append(output.loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_losses[-1]:.5f}")
            result.step_losses.extend(epoch_losses)
            result.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
    finally:
        bar.close()
    model.eval()
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    result.num_steps = num_steps
    return result


# ----------------------------------------------------------------------------------------------
# Are the features useful? A linear probe


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float = 1e-3,
    max_iterations: int = 300,
) -> float:
    """Test accuracy of a logistic regression trained on frozen features.

    The features are standardised with the training set's mean and std, then a linear layer
    (C -> classes) is fitted to the whole training set by L-BFGS on cross-entropy
    + l2 * ||W||^2. Deterministic (zero start, full batch). A probe measures how linearly
    separable the classes are in the feature space: the better the pretraining, the higher.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name} features must be (S, C) with labels (S,), "
                f"got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
    if train_features.shape[1] != test_features.shape[1]:
        widths = (train_features.shape[1], test_features.shape[1])
        raise ValueError(f"train and test features differ in width: {widths[0]} vs {widths[1]}")
    x_train, x_test = train_features.double(), test_features.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = train_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(x_train.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (x_test @ weight + bias).argmax(dim=1)
    return float((predictions == test_labels.long()).double().mean())
