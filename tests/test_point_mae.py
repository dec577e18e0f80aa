"""The tiny Point-MAE (course_lib.points.point_mae) and its pretraining and checkpoint (course_lib.points.pretrain)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from course_lib import config as course_config
from course_lib.points import sample_and_group
from course_lib.points import pretrain as pretrain_module
from course_lib.points.chamfer import chamfer_distance
from course_lib.points.point_mae import (
    MiniPointNet,
    PointMAEConfig,
    PointMAEEncoder,
    extract_features,
)
from course_lib.points.pretrain import (
    MaskedAutoencoder,
    PretrainConfig,
    file_sha256,
    linear_probe_accuracy,
    load_pretrained_masked_autoencoder,
    load_pretrained_point_mae,
    num_masked_patches,
    random_patch_mask,
    read_checkpoint,
    read_sha256sums,
    save_checkpoint,
    update_sha256sums,
)
from course_lib.transformer import PreNormBlock

TINY = PointMAEConfig(
    num_points=128, num_groups=16, group_size=8, dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
    pointnet_hidden_dim=16, pointnet_point_dim=16, pointnet_patch_hidden_dim=32, position_hidden_dim=16,
    num_classes=3, head_hidden_dim=16,
)  # fmt: skip
TINY_PRETRAIN = PretrainConfig(
    decoder_depth=1, decoder_num_heads=2, num_epochs=20, batch_size=8, warmup_epochs=0, lr=2e-3
)


def clouds(batch_size: int = 4, num_points: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, num_points, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def synthetic_shapes(count: int = 24, num_points: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spheres, cube surfaces and flat discs of random size: three easy classes."""
    generator = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for i in range(count):
        label = i % 3
        x = torch.randn(num_points, 3, generator=generator)
        if label == 0:
            x = x / x.norm(dim=1, keepdim=True)  # sphere
        elif label == 1:
            x = x / x.abs().amax(dim=1, keepdim=True)  # cube surface
        else:
            x[:, 1] = 0.05 * x[:, 1]  # flat disc
            x = x / x.norm(dim=1).amax()
        scale = 0.5 + 0.5 * torch.rand(1, generator=generator)
        points.append(x * scale)
        labels.append(label)
    return torch.stack(points), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_round_trip():
    config = PointMAEConfig()
    assert (config.num_points, config.num_groups, config.group_size, config.dim, config.depth) == (1024, 64, 32, 128, 6)
    assert PointMAEConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dim": 30, "num_heads": 4}, "divisible"),
        ({"num_groups": 2048}, "cannot exceed"),
        ({"depth": 0}, "positive int"),
        ({"head_dropout": 1.0}, r"\[0, 1\)"),
    ],
)
def test_config_refuses_bad_sizes(changes, match):
    with pytest.raises(ValueError, match=match):
        PointMAEConfig(**changes)


def test_config_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown PointMAEConfig fields"):
        PointMAEConfig.from_dict({**PointMAEConfig().to_dict(), "width": 3})


# ----------------------------------------------------------------------------------------------
# Patch embedding


def test_mini_pointnet_matches_point_mae_conv1d_layout():
    """Point-MAE writes the mini-PointNet with Conv1d(kernel 1) on (B*G, channels, k); ours uses
    Linear on (B*G*k, channels). Same weights must give the same embeddings (train-mode BN too)."""
    torch.manual_seed(0)
    pointnet = MiniPointNet(dim=24, hidden_dim=8, point_dim=12, patch_hidden_dim=16)
    neighbourhoods = torch.randn(2, 5, 7, 3)

    def conv(linear: nn.Linear) -> nn.Conv1d:
        layer = nn.Conv1d(linear.in_features, linear.out_features, 1)
        layer.weight.data.copy_(linear.weight.data[:, :, None])
        layer.bias.data.copy_(linear.bias.data)
        return layer

    first = nn.Sequential(conv(pointnet.first_mlp[0]), nn.BatchNorm1d(8), nn.ReLU(), conv(pointnet.first_mlp[3]))
    second = nn.Sequential(conv(pointnet.second_mlp[0]), nn.BatchNorm1d(16), nn.ReLU(), conv(pointnet.second_mlp[3]))
    # Point-MAE's Encoder.forward, written out
    bg, k = 2 * 5, 7
    x = neighbourhoods.reshape(bg, k, 3).transpose(2, 1)  # (BG, 3, k)
    feature = first(x)  # (BG, p, k)
    feature_global = feature.max(dim=2, keepdim=True)[0]  # (BG, p, 1)
    feature = torch.cat([feature_global.expand(-1, -1, k), feature], dim=1)  # (BG, 2p, k)
    expected = second(feature).max(dim=2)[0].reshape(2, 5, 24)
    torch.testing.assert_close(pointnet(neighbourhoods), expected, rtol=1e-5, atol=1e-5)


def test_mini_pointnet_ignores_the_order_inside_each_patch():
    torch.manual_seed(0)
    pointnet = MiniPointNet(dim=16, hidden_dim=8, point_dim=8, patch_hidden_dim=16)
    neighbourhoods = torch.randn(2, 4, 10, 3)
    shuffled = neighbourhoods[:, :, torch.randperm(10)]
    for mode in (True, False):
        pointnet.train(mode)
        torch.testing.assert_close(pointnet(shuffled), pointnet(neighbourhoods), rtol=1e-5, atol=1e-6)


def test_mini_pointnet_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, G, k, 3\)"):
        MiniPointNet(dim=8)(torch.zeros(2, 4, 3))


def test_patch_embedding_shapes_and_centres_come_from_the_cloud():
    torch.manual_seed(0)
    encoder = PointMAEEncoder(TINY).eval()
    points = clouds()
    tokens, centres = encoder.patch_embedding(points)
    assert tokens.shape == (4, TINY.num_groups, TINY.dim) and centres.shape == (4, TINY.num_groups, 3)
    groups = sample_and_group(points, TINY.num_groups, TINY.group_size, start_index=0)
    torch.testing.assert_close(centres, groups.centres)
    torch.testing.assert_close(tokens, encoder.patch_embedding.pointnet(groups.neighbourhoods))


def test_tokens_do_not_depend_on_the_order_of_the_points():
    """Permuting the cloud (keeping the FPS start, point 0, in place) picks the same centres and
    the same neighbourhoods: the tokens are the same."""
    torch.manual_seed(0)
    encoder = PointMAEEncoder(TINY).eval()
    points = clouds(2)
    permutation = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(127)])
    tokens, centres = encoder.forward_features(points)
    tokens_permuted, centres_permuted = encoder.forward_features(points[:, permutation])
    torch.testing.assert_close(centres_permuted, centres)
    torch.testing.assert_close(tokens_permuted, tokens, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Encoder


def test_encoder_parts_that_later_parts_rely_on():
    encoder = PointMAEEncoder(TINY)
    assert isinstance(encoder.blocks, nn.ModuleList) and len(encoder.blocks) == TINY.depth
    assert all(isinstance(block, PreNormBlock) for block in encoder.blocks)
    assert all(isinstance(block.mlp.activation, nn.GELU) for block in encoder.blocks)
    assert encoder.cls_token.shape == encoder.cls_position.shape == (1, 1, TINY.dim)


def test_encoder_shapes_and_wiring_against_a_manual_loop():
    torch.manual_seed(0)
    encoder = PointMAEEncoder(TINY).eval()
    points = clouds(3)
    tokens, centres = encoder.forward_features(points)
    assert tokens.shape == (3, 1 + TINY.num_groups, TINY.dim) and centres.shape == (3, TINY.num_groups, 3)
    logits = encoder(points)
    assert logits.shape == (3, TINY.num_classes)

    # the same computation written out: CLS first, position added before every block, LayerNorm
    patch_tokens, _ = encoder.patch_embedding(points)
    x = torch.cat([encoder.cls_token.expand(3, -1, -1), patch_tokens], dim=1)
    pos = torch.cat([encoder.cls_position.expand(3, -1, -1), encoder.position_embedding(centres)], dim=1)
    for block in encoder.blocks:
        x = x + pos
        x = x + block.attention(block.attention_norm(x))
        x = x + block.mlp(block.mlp_norm(x))
    x = encoder.norm(x)
    torch.testing.assert_close(tokens, x)
    pooled = torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)
    torch.testing.assert_close(logits, encoder.head.mlp(pooled))
    torch.testing.assert_close(encoder.pooled_features(points), x[:, 1:].max(dim=1).values)


def test_encoder_refuses_bad_clouds():
    encoder = PointMAEEncoder(TINY)
    with pytest.raises(ValueError, match="too small"):
        encoder(clouds(2, num_points=10))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        encoder(torch.zeros(2, 128, 2))
    with pytest.raises(TypeError, match="PointMAEConfig"):
        PointMAEEncoder({"dim": 8})


def test_extract_features_from_a_dataset_and_a_loader():
    torch.manual_seed(0)
    encoder = PointMAEEncoder(TINY).train()
    points, labels = synthetic_shapes(10)
    dataset = TensorDataset(points, labels)
    features, feature_labels = extract_features(encoder, dataset, batch_size=4)
    assert features.shape == (10, TINY.dim) and torch.equal(feature_labels, labels)
    assert encoder.training, "the mode must be restored"
    with torch.no_grad():
        expected = encoder.eval().pooled_features(points)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    from_loader, _ = extract_features(encoder, DataLoader(dataset, batch_size=3))
    torch.testing.assert_close(from_loader, features, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        extract_features(encoder, [])
    with pytest.raises(TypeError, match="PointMAEEncoder"):
        extract_features(nn.Linear(3, 3), dataset)


# ----------------------------------------------------------------------------------------------
# Masking and the masked autoencoder


def test_masking_hides_exactly_the_requested_count():
    mask = random_patch_mask(5, 64, 0.6, generator=torch.Generator().manual_seed(0))
    assert num_masked_patches(64, 0.6) == 38  # int(0.6 * 64), as Point-MAE
    assert mask.masked.shape == (5, 38) and mask.visible.shape == (5, 26)
    assert torch.equal(mask.is_masked.sum(dim=1), torch.full((5,), 38))
    for row in range(5):
        together = torch.cat([mask.masked[row], mask.visible[row]]).sort().values
        assert torch.equal(together, torch.arange(64)), "masked and visible must split the patches"
        assert mask.is_masked[row, mask.masked[row]].all() and not mask.is_masked[row, mask.visible[row]].any()
    assert not torch.equal(mask.masked[0].sort().values, mask.masked[1].sort().values), "each cloud gets its own mask"
    again = random_patch_mask(5, 64, 0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.masked, mask.masked)


@pytest.mark.parametrize("ratio, groups", [(0.0, 64), (1.0, 64), (0.01, 64), (0.05, 16)])
def test_masking_refuses_ratios_that_leave_a_side_empty(ratio, groups):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(2, groups, ratio)


def test_masked_autoencoder_shapes_targets_and_loss():
    torch.manual_seed(0)
    model = MaskedAutoencoder(PointMAEEncoder(TINY), mask_ratio=0.6, decoder_depth=1, decoder_num_heads=2).eval()
    points = clouds(3)
    output = model(points, generator=torch.Generator().manual_seed(0))
    M, k = num_masked_patches(TINY.num_groups, 0.6), TINY.group_size
    assert output.reconstruction.shape == output.target.shape == (3, M, k, 3)
    groups = sample_and_group(points, TINY.num_groups, k, start_index=0)
    for b in range(3):
        torch.testing.assert_close(output.target[b], groups.neighbourhoods[b, output.mask.masked[b]])
    expected = chamfer_distance(output.reconstruction.reshape(-1, k, 3), output.target.reshape(-1, k, 3)).mean()
    torch.testing.assert_close(output.loss, expected)


def test_hidden_patches_never_reach_the_encoder():
    """Moving the points of the hidden patches (their centres kept) must not change the
    reconstruction: only their centres enter, through the decoder's position embedding."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(PointMAEEncoder(TINY), decoder_depth=1, decoder_num_heads=2).eval()
    points = clouds(1)
    output = model(points, generator=torch.Generator().manual_seed(1))
    groups = sample_and_group(points, TINY.num_groups, TINY.group_size, start_index=0)
    visible_points = groups.neighbour_indices[0, output.mask.visible[0]].unique()
    centre_points = groups.centre_indices[0]
    keep = torch.zeros(128, dtype=torch.bool)
    keep[visible_points] = True
    keep[centre_points] = True
    # shrink every other point towards the origin a little: the hidden patches change
    moved = points.clone()
    moved[0, ~keep] *= 0.999
    again = model(moved, generator=torch.Generator().manual_seed(1))
    if not torch.equal(again.mask.masked, output.mask.masked):
        pytest.skip("grouping changed (moved points crossed a neighbourhood boundary)")
    again_groups = sample_and_group(moved, TINY.num_groups, TINY.group_size, start_index=0)
    if not torch.equal(again_groups.neighbour_indices, groups.neighbour_indices):
        pytest.skip("grouping changed")
    torch.testing.assert_close(again.reconstruction, output.reconstruction)
    assert not torch.equal(again.target, output.target)


def test_pretraining_a_few_steps_lowers_the_loss(monkeypatch):
    """The reconstruction loss on a fixed batch and a fixed mask, before and after 20 steps."""
    monkeypatch.setenv("COURSE_FAST", "1")
    points, _ = synthetic_shapes(24)

    def fixed_loss(model: MaskedAutoencoder) -> float:
        with torch.no_grad():
            return model.eval()(points, generator=torch.Generator().manual_seed(123)).loss.item()

    result = pretrain_module.pretrain(points, config=TINY, pretrain_config=TINY_PRETRAIN, max_steps=20, progress=False)
    assert result.num_steps == 20 and len(result.step_losses) == 20 and result.num_shapes == 24
    assert not result.model.training
    torch.manual_seed(TINY_PRETRAIN.seed)  # pretrain() seeds the initialisation the same way
    start = MaskedAutoencoder(PointMAEEncoder(TINY), TINY_PRETRAIN.mask_ratio, 1, 2)
    before, after = fixed_loss(start), fixed_loss(result.model)
    assert after < 0.85 * before, f"the loss did not fall: {before:.4f} -> {after:.4f}"


def test_pretrain_refuses_bad_data():
    with pytest.raises(ValueError, match=r"\(S, N, 3\)"):
        pretrain_module.pretrain(torch.zeros(4, 128, 2), config=TINY, pretrain_config=TINY_PRETRAIN, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        pretrain_module.pretrain(clouds(1), config=TINY, pretrain_config=TINY_PRETRAIN, progress=False)


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def tiny_model() -> MaskedAutoencoder:
    points, _ = synthetic_shapes(16)
    result = pretrain_module.pretrain(points, config=TINY, pretrain_config=TINY_PRETRAIN, max_steps=4, progress=False)
    return result.model


def test_checkpoint_round_trip_and_hash(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    digest = save_checkpoint(tiny_model, path, record={"note": "test"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_sha256sums(tmp_path / "SHA256SUMS") == {"tiny.pt": digest}
    assert re.fullmatch(r"[0-9a-f]{64}  tiny\.pt\n", (tmp_path / "SHA256SUMS").read_text())
    assert not list(tmp_path.glob("*.tmp")), "no temporary file may be left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "the file must get the usual mode, not mkstemp's 0600"

    encoder = load_pretrained_point_mae(path)
    assert not encoder.training and encoder.config == TINY
    original = tiny_model.encoder.state_dict()
    loaded = encoder.state_dict()
    for name, value in loaded.items():
        if name.startswith("head.") or name.startswith("cls_"):
            continue  # not pretrained: freshly initialised
        expected = original[name].half().to(value.dtype) if value.is_floating_point() else original[name]
        assert torch.equal(value, expected), name  # stored as float16, loaded as float32
    assert read_checkpoint(path)["record"] == {"note": "test"}

    # the whole autoencoder comes back too
    model = load_pretrained_masked_autoencoder(path)
    for name, value in model.decoder_state_dict().items():
        assert torch.equal(value, tiny_model.decoder_state_dict()[name].half().to(value.dtype)), name

    # a new head size
    assert load_pretrained_point_mae(path, num_classes=7)(clouds(2)).shape == (2, 7)


def test_a_tampered_checkpoint_is_refused(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_pretrained_point_mae(path)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        read_checkpoint(path, sha256=hashlib.sha256(b"something else").hexdigest())


def test_an_unlisted_or_unreadable_checkpoint_is_refused(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path, update_sums=False)
    with pytest.raises(ValueError, match="not listed"):
        load_pretrained_point_mae(path)
    assert isinstance(load_pretrained_point_mae(path, verify=False), PointMAEEncoder)
    assert isinstance(load_pretrained_point_mae(path, sha256=file_sha256(path)), PointMAEEncoder)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable"):
        load_pretrained_point_mae(path, verify=False)


def test_a_config_mismatch_is_refused(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    with pytest.raises(ValueError, match=r"another encoder config \(dim: checkpoint 32, asked 64"):
        load_pretrained_point_mae(path, config=dataclasses.replace(TINY, dim=64))
    # the head's fields may differ: they are not pretrained
    encoder = load_pretrained_point_mae(path, config=dataclasses.replace(TINY, num_classes=5, head_hidden_dim=8))
    assert encoder(clouds(2)).shape == (2, 5)

    # weights that do not fit the config stored with them
    payload = torch.load(path, weights_only=True)
    payload["config"]["depth"] = 3
    torch.save(payload, path)
    update_sha256sums(path)
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained_point_mae(path)


def test_a_missing_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="pretrain_point_mae.*pretrain_if_missing=True"):
        load_pretrained_point_mae(path)  # loading never starts a pretraining unless asked
    with pytest.raises(FileNotFoundError, match="pretrain_point_mae"):
        read_checkpoint(path)

    # fast mode: a few steps of pretraining, kept in memory, with a warning (tiny data here)
    points, _ = synthetic_shapes(16)
    real_pretrain = pretrain_module.pretrain

    def tiny_pretrain(data=None, **kwargs):
        assert data is None and kwargs["max_steps"] == 5
        return real_pretrain(points, config=TINY, pretrain_config=TINY_PRETRAIN, max_steps=5, progress=False)

    monkeypatch.setattr(pretrain_module, "pretrain", tiny_pretrain)
    monkeypatch.setenv("COURSE_FAST", "1")
    with pytest.warns(UserWarning, match="pretrained 5 steps"):
        encoder = load_pretrained_point_mae(path, pretrain_if_missing=True, progress=False)
    assert isinstance(encoder, PointMAEEncoder) and encoder.config == TINY
    assert not path.exists(), "a fast-mode checkpoint must not be saved"


def test_update_sha256sums_keeps_other_entries(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "b.bin").write_bytes(b"b")
    update_sha256sums(tmp_path / "b.bin")
    update_sha256sums(tmp_path / "a.bin")
    (tmp_path / "b.bin").write_bytes(b"bb")
    update_sha256sums(tmp_path / "b.bin")
    assert read_sha256sums(tmp_path / "SHA256SUMS") == {
        "a.bin": hashlib.sha256(b"a").hexdigest(),
        "b.bin": hashlib.sha256(b"bb").hexdigest(),
    }
    (tmp_path / "SHA256SUMS").write_text("not a hash line\n")
    with pytest.raises(ValueError, match="64 hex digits"):
        read_sha256sums(tmp_path / "SHA256SUMS")


# ----------------------------------------------------------------------------------------------
# Linear probe and the shipped checkpoint


def test_linear_probe_separable_and_random():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    features = torch.randn(90, 8, generator=generator) + 6.0 * nn.functional.one_hot(labels, 8).float()
    assert linear_probe_accuracy(features[:60], labels[:60], features[60:], labels[60:]) == 1.0
    noise = torch.randn(300, 8, generator=generator)
    random_labels = torch.randint(0, 3, (300,), generator=generator)
    assert linear_probe_accuracy(noise[:200], random_labels[:200], noise[200:], random_labels[200:]) < 0.55
    with pytest.raises(ValueError, match="features must be"):
        linear_probe_accuracy(features, labels[:10], features, labels)


SHIPPED = course_config.CHECKPOINT_DIR / pretrain_module.CHECKPOINT_NAME


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped checkpoint is not there")
def test_the_shipped_checkpoint():
    sums = read_sha256sums(SHIPPED.parent / "SHA256SUMS")
    assert sums.get(SHIPPED.name) == file_sha256(SHIPPED)
    assert SHIPPED.stat().st_size < 5_000_000
    payload = read_checkpoint(SHIPPED)
    assert PointMAEConfig.from_dict(payload["config"]) == PointMAEConfig()
    record = payload["record"]
    assert record["epoch_losses"][-1] < 0.5 * record["step_losses"][0]
    probe = record["linear_probe"]
    for variant in ("clean", "pb_t50_rs"):
        assert probe["pretrained"][variant] > probe["random_init"][variant], variant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = load_pretrained_point_mae()
    assert encoder(clouds(2, num_points=1024)).shape == (2, 15)


def test_the_checkpoint_file_is_read_once_while_it_stays_the_same(tmp_path, monkeypatch):
    import shutil

    from course_lib.points import checkpoint as checkpoint_module

    shipped = checkpoint_module.default_checkpoint_path()
    if not shipped.exists():
        pytest.skip("no shipped checkpoint")
    copy_path = tmp_path / shipped.name
    shutil.copy(shipped, copy_path)
    shutil.copy(shipped.parent / "SHA256SUMS", tmp_path / "SHA256SUMS")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    first = checkpoint_module.load_pretrained_point_mae(copy_path, progress=False)
    second = checkpoint_module.load_pretrained_point_mae(copy_path, progress=False)
    assert len(loads) == 1  # read and hash-checked once
    fresh = ("head.", "cls_token", "cls_position")  # not in the checkpoint: initialised anew each time
    pretrained_parts = [n for n in first.state_dict() if not n.startswith(fresh)]
    assert all(torch.equal(first.state_dict()[n], second.state_dict()[n]) for n in pretrained_parts)
    payload = checkpoint_module.read_checkpoint(copy_path)
    payload["encoder"].clear()  # a caller's changes to the returned dicts do not reach the cache
    assert checkpoint_module.read_checkpoint(copy_path)["encoder"]
    os.utime(copy_path, ns=(1, 1))  # another modification time: the file is read again
    checkpoint_module.read_checkpoint(copy_path)
    assert len(loads) == 2
