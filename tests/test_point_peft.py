"""Tests of course_lib.point_peft: memory bank, parameter-free attention, prompts, adapters, wrapper.

References are brute-force loops and PyTorch's own attention, never the code under test.
A tiny randomly initialised Point-MAE keeps every test under a second or two.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from course_lib.point_peft import (
    ABLATIONS,
    GeometryAwareAdapter,
    IndexedDataset,
    LocalGroupAttention,
    MemoryBank,
    PointBottleneckAdapter,
    PointPEFTConfig,
    PointPriorPrompt,
    StaleMemoryBankError,
    build_memory_bank,
    encoder_sha256,
    group_tokens,
    insert_prompts,
    load_memory_bank,
    parameter_free_attention,
    point_peft,
    remove_prompts,
    retrieval_precision,
    save_memory_bank,
)
from course_lib.points.point_mae import PointMAEConfig, PointMAEEncoder
from course_lib.points.sampling import farthest_point_sample

TINY = PointMAEConfig(
    num_points=96, num_groups=16, group_size=8, dim=32, depth=3, num_heads=2, pointnet_hidden_dim=8,
    pointnet_point_dim=8, pointnet_patch_hidden_dim=16, position_hidden_dim=16, num_classes=4, head_hidden_dim=16,
)  # fmt: skip
# small enough for the tiny model: 16 patch tokens, so k = 8 neighbours and K = 4 retrieved
PEFT = PointPEFTConfig(top_k=4, anchor_neighbours=8, prompt_blocks=2)


class Clouds(Dataset):
    def __init__(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        self.points, self.labels = points, labels

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int):
        return self.points[index], int(self.labels[index])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    encoder = PointMAEEncoder(TINY)
    points = torch.randn(12, TINY.num_points, 3)
    data = Clouds(points, torch.arange(12) % 4)
    bank = build_memory_bank(encoder, data, batch_size=5)
    return encoder, data, bank


# ---------------------------------------------------------------------------------------------
# Parameter-free attention


def brute_force_retrieval(query, bank, k, exclude=None):
    """One query at a time, in float64: cosine, sort, softmax, weighted sum."""
    out = []
    for b in range(query.shape[0]):
        q = query[b].double()
        scored = []
        for i in range(bank.shape[0]):
            if exclude is not None and int(exclude[b]) == i:
                continue
            f = bank[i].double()
            scored.append((float(q @ f / (q.norm() * f.norm())), i))
        scored.sort(key=lambda t: -t[0])
        top = scored[:k]
        exps = [math.exp(s) for s, _ in top]
        weights = [e / sum(exps) for e in exps]
        weighted = sum(w * bank[i].double() for w, (_, i) in zip(weights, top))
        rows = [query[b].double(), weighted] + [bank[i].double() for _, i in top]
        out.append((torch.stack(rows), [i for _, i in top], weights))
    return out


@pytest.mark.parametrize("exclude", [None, torch.tensor([3, -1, 0, 9, 5])])
def test_parameter_free_attention_matches_brute_force(exclude):
    torch.manual_seed(1)
    bank, query = torch.randn(10, 6), torch.randn(5, 6)
    result = parameter_free_attention(query, bank, 4, exclude)
    assert result.prompts.shape == (5, 6, 6) and result.weights.shape == (5, 4)
    for b, (prompts, indices, weights) in enumerate(brute_force_retrieval(query, bank, 4, exclude)):
        assert result.indices[b].tolist() == indices
        torch.testing.assert_close(result.weights[b].double(), torch.tensor(weights, dtype=torch.float64))
        torch.testing.assert_close(result.prompts[b].double(), prompts, atol=1e-5, rtol=1e-5)


def test_a_shape_never_retrieves_itself():
    bank = torch.randn(6, 4)
    query = bank.clone()  # every query is in the bank
    assert parameter_free_attention(query, bank, 3).indices[:, 0].tolist() == list(range(6))  # itself first
    own = torch.arange(6)
    indices = parameter_free_attention(query, bank, 5, own).indices
    assert not (indices == own[:, None]).any()


def test_parameter_free_attention_errors():
    bank = torch.randn(5, 4)
    with pytest.raises(ValueError, match="top_k"):
        parameter_free_attention(torch.randn(2, 4), bank, 6)
    with pytest.raises(ValueError, match="top_k"):
        parameter_free_attention(torch.randn(2, 4), bank, 5, torch.tensor([0, 1]))  # only 4 left
    with pytest.raises(ValueError, match="same C"):
        parameter_free_attention(torch.randn(2, 3), bank, 2)
    with pytest.raises(ValueError, match="exclude_indices"):
        parameter_free_attention(torch.randn(2, 4), bank, 2, torch.tensor([0, 7]))


def test_retrieval_precision_counts_same_class_retrievals():
    # two tight clusters on orthogonal directions: class 0 around e1, class 1 around e2
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    offsets = torch.tensor([[0.0, 0.0, 0.01], [0.0, 0.0, -0.01], [0.0, 0.0, 0.02]])
    features = torch.cat([e1 + offsets, e2 + offsets])  # (6, 3)
    bank = MemoryBank(features, torch.tensor([0, 0, 0, 1, 1, 1]), "0" * 64)
    assert retrieval_precision(bank, top_k=2) == 1.0  # leave-one-out: both others of the own cluster
    assert retrieval_precision(bank, top_k=3) == pytest.approx(2 / 3)  # the third is from the other cluster
    queries = torch.stack([e1, e2, e1])
    assert retrieval_precision(bank, queries, torch.tensor([0, 1, 1]), top_k=3) == pytest.approx(2 / 3)
    assert retrieval_precision(bank, queries, torch.tensor([1, 0, 1]), top_k=1) == 0.0
    with pytest.raises(ValueError, match="both"):
        retrieval_precision(bank, queries)
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_precision(bank, queries, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# Prompts and adapters


def test_prompt_shapes_gradients_and_insertion():
    prompt = PointPriorPrompt(8, 5, retrieval_bottleneck=2)
    retrieved = torch.randn(3, 5, 8)
    out = prompt(3, retrieved)
    assert out.shape == (3, 5, 8)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt.parameters())
    assert PointPriorPrompt(8, 5, retrieval_bottleneck=None)(3).shape == (3, 5, 8)
    x = torch.randn(3, 7, 8)
    with_prompts = insert_prompts(x, out)
    assert with_prompts.shape == (3, 12, 8)
    assert torch.equal(with_prompts[:, 1:6], out) and torch.equal(with_prompts[:, 0], x[:, 0])
    assert torch.equal(remove_prompts(with_prompts, 5), x)


def test_bottleneck_adapter():
    adapter = PointBottleneckAdapter(8, 2)
    x = torch.randn(4, 8, requires_grad=True)
    out = adapter(x)
    assert out.shape == (4, 8)
    out.sum().backward()
    assert x.grad is not None and adapter.down.weight.grad.abs().sum() > 0
    zero = PointBottleneckAdapter(8, 2, zero_init=True, residual=True)
    assert torch.equal(zero(x), x)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_local_attention_matches_torch_sdpa(scale):
    torch.manual_seed(2)
    attention = LocalGroupAttention(16, num_heads=6, head_dim=3, scale=scale)
    groups = torch.randn(5, 4, 16)
    q, k, v = attention.qkv(attention.norm(groups)).view(5, 4, 3, 6, 3).permute(2, 0, 3, 1, 4)
    expected_scale = 18**-0.5 if scale is None else scale
    mixed = F.scaled_dot_product_attention(q, k, v, scale=expected_scale).transpose(1, 2).reshape(5, 4, 18)
    torch.testing.assert_close(attention(groups), groups + attention.proj(mixed))


def test_group_tokens_matches_brute_force():
    torch.manual_seed(3)
    xyz = torch.randn(2, 20, 3, dtype=torch.float64)
    grouping = group_tokens(xyz, num_anchors=6, num_neighbours=4, num_leading=5, propagation_neighbours=3)
    assert torch.equal(grouping.anchor_indices, farthest_point_sample(xyz, 6, start_index=0))
    for b in range(2):
        anchors = xyz[b, grouping.anchor_indices[b]]  # (6, 3)
        for a in range(6):
            d = ((xyz[b] - anchors[a]) ** 2).sum(-1)
            assert grouping.neighbour_indices[b, a].tolist() == d.argsort()[:4].tolist()
        for t in range(15):  # patch tokens only
            d = ((anchors - xyz[b, 5 + t]) ** 2).sum(-1)
            nearest = d.argsort()[:3]
            w = 1 / (d[nearest] + 1e-8)
            assert grouping.propagation_indices[b, t].tolist() == nearest.tolist()
            torch.testing.assert_close(grouping.propagation_weights[b, t], w / w.sum())
    everything = group_tokens(xyz, 6, 4, 5)  # official: all anchors
    assert everything.propagation_weights.shape == (2, 15, 6)
    torch.testing.assert_close(everything.propagation_weights.sum(-1), torch.ones(2, 15, dtype=torch.float64))


def test_geometry_aware_adapter_shape_and_gradients():
    torch.manual_seed(4)
    C, P, G = 16, 3, 12
    adapter, local = GeometryAwareAdapter(C, 4), LocalGroupAttention(C)
    x = torch.randn(2, 1 + P + G, C, requires_grad=True)
    xyz = torch.randn(2, P + G, 3, requires_grad=True)
    grouping = group_tokens(xyz, 6, 5, P)
    out = adapter(x, grouping, local, P)
    assert out.shape == x.shape
    (out.square().sum() + adapter.mlp_delta(x).sum()).backward()
    for name, p in list(adapter.named_parameters()) + list(local.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert xyz.grad is not None and xyz.grad[:, 0].abs().sum() > 0  # the first anchor is token 0


# ---------------------------------------------------------------------------------------------
# Memory bank


def test_memory_bank_rows_are_the_frozen_features(setup):
    encoder, data, bank = setup
    encoder.eval()
    with torch.no_grad():
        reference = torch.stack([encoder.pooled_features(data[i][0][None])[0] for i in range(len(data))])
    torch.testing.assert_close(bank.features, reference, atol=1e-5, rtol=1e-5)
    assert bank.labels.tolist() == (torch.arange(12) % 4).tolist()
    assert bank.encoder_sha256 == encoder_sha256(encoder)


def test_memory_bank_round_trip_and_refusals(setup, tmp_path):
    encoder, _, bank = setup
    path = save_memory_bank(bank, tmp_path / "bank.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"]  # no temporary file left
    loaded = load_memory_bank(path, encoder=encoder)
    assert torch.equal(loaded.features, bank.features) and loaded.encoder_sha256 == bank.encoder_sha256
    other = PointMAEEncoder(TINY)
    with pytest.raises(StaleMemoryBankError, match="rebuild"):
        load_memory_bank(path, encoder=other)
    with torch.no_grad():
        encoder.blocks[0].mlp.fc1.weight[0, 0] += 1e-3  # the encoder changed: the bank is stale
    with pytest.raises(StaleMemoryBankError):
        load_memory_bank(path, encoder_sha256=encoder_sha256(encoder))
    with pytest.raises(FileNotFoundError, match="build_memory_bank"):
        load_memory_bank(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a bank")
    with pytest.raises(ValueError, match="not a readable memory bank"):
        load_memory_bank(tmp_path / "broken.pt")


def test_point_peft_refuses_a_stale_or_mismatched_bank(setup):
    encoder, _, bank = setup
    with pytest.raises(StaleMemoryBankError):
        point_peft(PointMAEEncoder(TINY), PEFT, bank)
    wrong_width = MemoryBank(torch.randn(12, 8), torch.zeros(12), bank.encoder_sha256)
    with pytest.raises(ValueError, match="C = 8"):
        point_peft(encoder, PEFT, wrong_width)
    with pytest.raises(ValueError, match="memory bank"):
        point_peft(encoder, PEFT, None)


# ---------------------------------------------------------------------------------------------
# The wrapped model


def expected_trainable(config: PointMAEConfig, peft: PointPEFTConfig, prompts: bool = True, adapters: bool = True) -> int:
    """The official trained set, counted by hand."""
    C, P, L, D, r = config.dim, peft.prompt_tokens, peft.prompt_blocks, config.depth, peft.adapter_bottleneck
    bottleneck = lambda width: C * width + width + width * C + C
    head = sum(p.numel() for p in PointMAEEncoder(config).head.parameters())
    count = 2 * C + 2 * C + head  # CLS token and position, final norm, head
    count += D * (C + 4 * C + C + C + C)  # biases: attention output, fc1 (4C), fc2, two LayerNorms
    if prompts:
        count += L * (P * C + (bottleneck(peft.retrieval_bottleneck) if peft.uses_bank else 0))
        count += 3 * P if adapters and peft.group_prompts else 0  # prompt coordinates, for the grouping only
    if adapters:
        count += D * (2 * bottleneck(r) + 2 * C)  # MLP-branch and final bottlenecks, BatchNorm
        inner = peft.local_heads * peft.local_head_dim
        count += 2 * C + C * 3 * inner + inner * C + C  # shared local attention
    return count


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_point_peft_trains_exactly_the_official_set(setup, ablation):
    encoder, data, bank = setup
    peft = PointPEFTConfig.ablation(ablation, top_k=4, anchor_neighbours=8, prompt_blocks=2)
    model, report = point_peft(encoder, peft, bank)
    assert report.trainable == expected_trainable(TINY, peft, peft.use_prompt, peft.use_adapter)
    assert report.total == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("query_encoder."))
    assert (model.query_encoder is not None) == peft.uses_bank
    model.train()
    logits = model(data.points[:4], indices=torch.arange(4))
    assert logits.shape == (4, TINY.num_classes)
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_frozen_wiring_reproduces_the_backbone(setup):
    """No prompts, adapters that add nothing: the wrapper's block loop must give the encoder's logits."""
    encoder, data, _ = setup
    encoder.eval()
    with torch.no_grad():
        expected = encoder(data.points[:3])
    peft = PointPEFTConfig(
        use_prompt=False, anchor_neighbours=8, zero_init=True, mlp_adapter_scale=0.0, propagation_scale=0.0
    )
    model, _ = point_peft(encoder, peft)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(data.points[:3]), expected)


@pytest.mark.parametrize("train_mode", [False, True])
def test_zero_init_without_the_anchor_term_starts_at_the_pretrained_encoder(setup, train_mode):
    """zero_init + anchor_scale 0, official MLP and propagation scales: the adapters start as the
    identity, in eval and in train mode (BatchNorm with scale 0 gives 0 whatever its statistics)."""
    encoder, data, _ = setup
    encoder.train(train_mode)
    with torch.no_grad():
        expected, _ = encoder.forward_features(data.points[:4])  # (B, 1+G, C)
    peft = PointPEFTConfig.ablation("adapter_only", anchor_neighbours=8, zero_init=True, anchor_scale=0.0)
    model, _ = point_peft(encoder, peft)
    model.train(train_mode)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(data.points[:4]), expected)
    # the official anchor term 0.3 x_a alone already moves the start
    moved, _ = point_peft(encoder, dataclasses.replace(peft, anchor_scale=0.3))
    with torch.no_grad():
        assert not torch.allclose(moved.train(train_mode).forward_features(data.points[:4]), expected, atol=1e-4)
    # the zeroed parts still learn: the BatchNorm scale and the up-projections get a gradient at step 0
    model.train()
    model(data.points[:4]).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("adapters.") and (name.endswith("pool_norm.weight") or ".up." in name):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_prompts_outside_the_groups_leave_the_patch_tokens_as_without_prompts(setup, monkeypatch):
    """group_prompts=False: the local geometry sees the patch tokens only, so the adapter's patch
    outputs do not depend on the prompts, and the model has no prompt coordinates."""
    encoder, data, bank = setup
    peft = dataclasses.replace(PEFT, group_prompts=False)
    model, report = point_peft(encoder, peft, bank)
    assert model.prompt_coordinates is None
    assert not any("prompt_coordinates" in name for name, _ in model.named_parameters())
    assert report.trainable == expected_trainable(TINY, peft, True, True)
    adapter, attention = model.adapters[0].eval(), model.local_attention
    torch.manual_seed(5)
    P, G = model.num_prompts, TINY.num_groups
    x = torch.randn(2, 1 + P + G, TINY.dim)
    centres = torch.randn(2, G, 3)
    grouping = group_tokens(centres, model.num_anchors, 8)
    with torch.no_grad():
        with_prompts = adapter(x, grouping, attention, P, prompts_grouped=False)
        without = adapter(remove_prompts(x, P), grouping, attention, 0)
    torch.testing.assert_close(remove_prompts(with_prompts, P), without)

    # the model's wiring: prompted blocks call the adapter with patch-only groups
    calls = []
    forward = GeometryAwareAdapter.forward

    def recording(self, x, grouping, local_attention, num_prompts=0, prompts_grouped=True):
        calls.append((num_prompts, prompts_grouped, int(grouping.neighbour_indices.max()), x.shape[1]))
        return forward(self, x, grouping, local_attention, num_prompts, prompts_grouped)

    monkeypatch.setattr(GeometryAwareAdapter, "forward", recording)
    model.train()
    model(data.points[:4], indices=torch.arange(4)).logsumexp(-1).sum().backward()
    assert [c[0] for c in calls] == [P] * PEFT.prompt_blocks + [0] * (TINY.depth - PEFT.prompt_blocks)
    assert all(not grouped and max_index < G for _, grouped, max_index, _ in calls)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_training_needs_indices_and_excludes_the_shape_itself(setup):
    encoder, data, bank = setup
    points, labels, indices = next(iter(torch.utils.data.DataLoader(IndexedDataset(data), batch_size=5)))
    assert indices.tolist() == list(range(5)) and torch.equal(points, data.points[:5])
    model, _ = point_peft(encoder, PEFT, bank)
    model.train()
    assert not model.query_encoder.training
    with pytest.raises(ValueError, match="indices"):
        model(data.points[:2])
    own = torch.arange(4)
    retrieved = model.retrieve(data.points[:4], own)[:, 2:]  # the K retrieved features   (B, K, C)
    own_rows = bank.features[own][:, None]
    assert not torch.isclose(retrieved, own_rows, atol=1e-5).all(-1).any()
    model.eval()
    first = model.retrieve(data.points[:4])[:, 2]  # eval, no exclusion: a training shape finds itself first
    torch.testing.assert_close(first, bank.features[own], atol=1e-5, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="nothing"):
        PointPEFTConfig(use_prompt=False, use_adapter=False)
    with pytest.raises(ValueError, match="top_k \\+ 2"):
        PointPEFTConfig(num_prompt_tokens=5)
    with pytest.raises(ValueError, match="ablation"):
        PointPEFTConfig.ablation("everything")
    with pytest.raises(ValueError, match="anchor_neighbours"):
        point_peft(PointMAEEncoder(TINY), PointPEFTConfig(use_memory_bank=False, anchor_neighbours=17))  # > G = 16
    with pytest.raises(ValueError, match="depth"):
        point_peft(PointMAEEncoder(TINY), PointPEFTConfig(use_memory_bank=False, anchor_neighbours=8, prompt_blocks=4))


def test_shipped_checkpoint_trainable_share():
    from course_lib.points.checkpoint import (
        default_checkpoint_path,
        load_pretrained_point_mae,
    )

    path = default_checkpoint_path()
    assert path.exists(), f"the shipped checkpoint is missing: {path}"

    torch.manual_seed(0)
    encoder = load_pretrained_point_mae(path, num_classes=15, pretrain_if_missing=False, progress=False)
    bank = MemoryBank(torch.randn(20, 128), torch.zeros(20), encoder_sha256(encoder))  # contents do not matter here
    _, report = point_peft(encoder, PointPEFTConfig(), bank)
    assert report.trainable == expected_trainable(encoder.config, PointPEFTConfig(prompt_blocks=6))
    assert report.trainable_pct_without_head < 10.0  # the 136k-parameter head alone is 9% of the model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_same_code_on_a_gpu(setup):
    encoder, data, bank = setup
    model, _ = point_peft(encoder, PEFT, bank)
    model.eval()
    with torch.no_grad():
        expected = model(data.points[:3])
        model.cuda()
        got = model(data.points[:3].cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    model.train()
    model(data.points[:3].cuda(), indices=torch.arange(3)).sum().backward()  # indices may stay on the CPU
    assert model.prompts[0].embeddings.grad.is_cuda


def test_build_memory_bank_script_matches_a_seeded_encoder(tmp_path):
    """The script's bank is accepted by an encoder loaded the same way (same seed, same head size)."""
    from course_lib.points.checkpoint import (
        default_checkpoint_path,
        load_pretrained_point_mae,
    )
    from course_lib.points.datasets import shape_set_is_current, shapes_path

    if not default_checkpoint_path().exists() or not shape_set_is_current(shapes_path("obj_only")):
        pytest.skip("needs the shipped checkpoint and the generated obj_only shapes (make data)")
    from data_scripts.build_memory_bank import main

    output = main(["--variant", "obj_only", "--max-per-class", "1", "--output", str(tmp_path / "b.pt"), "--no-progress"])
    torch.manual_seed(0)
    encoder = load_pretrained_point_mae(num_classes=15, pretrain_if_missing=False, progress=False)
    bank = load_memory_bank(output, encoder=encoder)
    assert bank.num_shapes == 15 and bank.info["variant"] == "obj_only"
    assert sorted(bank.labels.tolist()) == list(range(15))
    torch.manual_seed(1)  # another seed draws another CLS token: another encoder
    other = load_pretrained_point_mae(num_classes=15, pretrain_if_missing=False, progress=False)
    with pytest.raises(StaleMemoryBankError):
        load_memory_bank(output, encoder=other)
