"""Point-PEFT on a backbone that is not the course's PointMAEEncoder: a small point transformer
written here, following `course_lib.point_peft.backbone.PointBackbone`, gets prompts, adapters and
a memory bank; with the identity start (zero-initialised adapters, no anchor term) and no prompts
it computes exactly what the backbone computes; a module lacking the pieces gets a clear error."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from course_lib.point_peft import PointPEFTConfig, build_memory_bank, point_peft
from course_lib.point_peft.backbone import PointBackbone
from course_lib.points import sample_and_group


@dataclass
class TinyConfig:
    dim: int = 24
    depth: int = 3
    num_groups: int = 16
    group_size: int = 8
    num_classes: int = 5


class TinyBlock(nn.Module):
    """Pre-norm block: h + attention_branch(h), then + mlp_branch(h)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attention_branch(self, h: torch.Tensor) -> torch.Tensor:
        z = self.attention_norm(h)
        return self.attention(z, z, z, need_weights=False)[0]

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention_branch(h)
        return h + self.mlp_branch(h)


class TinyPointTransformer(nn.Module):
    """Patches by FPS + kNN, a per-point MLP max-pooled per patch, pre-norm blocks, a linear head."""

    trained_block_biases = ("mlp.0.bias", "mlp.2.bias", "attention_norm.bias", "mlp_norm.bias")

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        C = config.dim
        self.point_mlp = nn.Sequential(nn.Linear(3, C), nn.GELU(), nn.Linear(C, C))
        self.position = nn.Sequential(nn.Linear(3, C), nn.GELU(), nn.Linear(C, C))
        self.cls_token, self.cls_position = nn.Parameter(torch.randn(1, 1, C) * 0.02), nn.Parameter(torch.zeros(1, 1, C))
        self.blocks = nn.ModuleList(TinyBlock(C) for _ in range(config.depth))
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(2 * C, config.num_classes)

    def embed(self, points: torch.Tensor):
        groups = sample_and_group(points, self.config.num_groups, self.config.group_size)  # (B, G, k, 3), (B, G, 3)
        tokens = self.point_mlp(groups.neighbourhoods).amax(dim=2)  # (B, G, C)
        B = points.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_position.expand(B, -1, -1), self.position(groups.centres)], dim=1)
        return x, pos, groups.centres

    def features(self, points: torch.Tensor) -> torch.Tensor:
        x, pos, _ = self.embed(points)
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x)

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].amax(dim=1)], dim=-1))

    def pooled_features(self, points: torch.Tensor) -> torch.Tensor:
        return self.features(points)[:, 1:].amax(dim=1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(points))


@pytest.fixture()
def backbone() -> TinyPointTransformer:
    torch.manual_seed(0)
    return TinyPointTransformer(TinyConfig()).eval()


def test_a_hand_written_backbone_follows_the_protocol(backbone):
    assert isinstance(backbone, PointBackbone)


def test_identity_start_computes_what_the_backbone_computes(backbone):
    points = torch.randn(4, 128, 3)
    expected = backbone(points)
    config = PointPEFTConfig(use_prompt=False, zero_init=True, anchor_scale=0.0, anchor_neighbours=4)
    model, report = point_peft(backbone, config)
    assert torch.allclose(model.eval()(points), expected, atol=1e-6)
    assert report.parts["adapters"] > 0 and report.trainable < report.total
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.blocks.0.mlp.0.bias" in trained and "encoder.blocks.0.mlp.0.weight" not in trained


def test_prompts_and_memory_bank_on_the_hand_written_backbone(backbone):
    clouds, labels = torch.randn(12, 128, 3), torch.randint(0, 5, (12,))
    bank = build_memory_bank(backbone, TensorDataset(clouds, labels))
    model, report = point_peft(backbone, PointPEFTConfig(top_k=3, anchor_neighbours=4, prompt_blocks=2), bank)
    logits = model.train()(clouds[:4], indices=torch.arange(4))
    assert logits.shape == (4, 5)
    logits.sum().backward()
    prompt_grads = [p.grad for p in model.prompts[0].parameters() if p.requires_grad]
    assert prompt_grads and any(g is not None and g.abs().sum() > 0 for g in prompt_grads)  # gradients reach block 0's prompts
    assert report.parts["prompts"] > 0


def test_a_module_without_the_pieces_is_refused():
    with pytest.raises(TypeError, match=r"lacks \['embed\(\)', 'classify\(\)', 'pooled_features\(\)'.*PointBackbone"):
        point_peft(nn.Linear(3, 3), PointPEFTConfig(use_memory_bank=False))
