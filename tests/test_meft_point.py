"""MEFT on the point transformer (course_lib.meft.point): the custom backward equals plain
autograd, each coupling's inverse gives its inputs back, the starting point is kept (and broken
by RevNet scales), the right parts train, the positions are refused as trainable, and a
reversible setting runs end to end in the experiments of notebook 16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.meft import (
    MEFT_VARIANTS,
    MEFTConfig,
    gradient_errors,
    meft,
    meft_from_point_mae,
    reversible_and_plain_gradients,
)
from course_lib.meters import measure_activation_memory
from course_lib.points.checkpoint import (
    default_checkpoint_path,
    load_pretrained_point_mae,
)
from course_lib.points.datasets import load_shapes
from course_lib.train import set_seed

pytestmark = pytest.mark.skipif(not default_checkpoint_path().exists(), reason="no shipped checkpoint")


@pytest.fixture(scope="module")
def encoder():
    set_seed(0)
    return load_pretrained_point_mae(num_classes=15, progress=False)


@pytest.fixture(scope="module")
def batch():
    shapes = load_shapes("clean", "test", num_points=256, max_per_class=1)
    return {"points": torch.stack([shapes[i][0] for i in range(6)]), "labels": torch.tensor([shapes[i][1] for i in range(6)])}


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["points"]), batch["labels"])


@pytest.mark.parametrize("variant", sorted(MEFT_VARIANTS))
def test_custom_backward_equals_plain_autograd_bit_for_bit(encoder, batch, variant):
    set_seed(0)
    model = meft_from_point_mae(encoder, variant).train()  # float64 streams, parity bits (the default)
    reversible, plain = reversible_and_plain_gradients(model, batch, seed=3, loss_fn=_loss)
    assert model.reversible
    assert {n.split(".")[0] for n in reversible} == {"couplings", "cls_token", "norm", "head"}
    assert gradient_errors(reversible, plain)["max_rel_err"] == 0.0
    assert reversible["cls_token"].abs().sum() > 0  # the streams' input gradient reaches the CLS token


def test_pieces_of_the_batch_keep_the_gradients(encoder, batch):
    set_seed(0)
    model = meft_from_point_mae(encoder, "meft1", batch_chunks=3).train()
    reversible, plain = reversible_and_plain_gradients(model, batch, seed=3, loss_fn=_loss)
    assert gradient_errors(reversible, plain)["max_rel_err"] == 0.0


def test_each_coupling_inverts_its_forward(encoder, batch):
    # in float64 throughout: the inverse is exact up to float64 rounding, times 1/lambda and 1/beta
    # (with float32 layers it is exact only with the parity bits that the custom backward keeps)
    set_seed(0)
    model = meft_from_point_mae(copy.deepcopy(encoder).double(), "meft3").eval()
    with torch.no_grad():
        x, pos = model.embed(batch["points"].double())
        x1 = x2 = x
        for coupling in model.couplings:
            y1, y2 = coupling(x1, x2, pos)
            back1, back2 = coupling.inverse(y1, y2, pos)
            scale = max(x1.abs().max().item(), x2.abs().max().item())
            assert (back1 - x1).abs().max().item() <= 1e-13 * scale and (back2 - x2).abs().max().item() <= 1e-13 * scale
            x1, x2 = y1, y2


def test_starting_point_is_kept_and_revnet_scales_break_it(encoder, batch):
    encoder = encoder.eval()
    with torch.no_grad():
        reference = encoder.forward_features(batch["points"])[0]  # (B, 1+G, C)

    def cosine(model: nn.Module) -> float:
        with torch.no_grad():
            return F.cosine_similarity(model.eval().forward_features(batch["points"]), reference, dim=-1).mean().item()

    for variant in MEFT_VARIANTS:
        set_seed(0)
        assert cosine(meft_from_point_mae(encoder, variant)) > 0.93, variant
    set_seed(0)
    assert cosine(meft_from_point_mae(encoder, "meft1", lambda_=1.0, beta=1.0)) < 0.85


def test_what_trains_and_what_is_refused(encoder, batch):
    before = {n: p.clone() for n, p in encoder.state_dict().items()}
    set_seed(0)
    model, report = meft(encoder, MEFTConfig("meft1"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith(("head.", "norm.")) or n == "cls_token" for n in trained)
    assert not model.cls_position.requires_grad and not any("position_embedding" in n for n in trained)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.changed == [f"couplings.{i}" for i in range(6)] and not report.in_place
    assert all(torch.equal(before[n], p) for n, p in encoder.state_dict().items())  # the encoder is left alone
    assert model.couplings[0].F.block.block is not encoder.blocks[0]
    model.cls_position.requires_grad_(True)
    with pytest.raises(ValueError, match="positions .* must stay frozen"):
        model(batch["points"])
    with pytest.raises(TypeError, match="expects a PointMAEEncoder"):
        meft_from_point_mae(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown MEFT variant"):
        meft_from_point_mae(encoder, "meft4")
    with pytest.raises(ValueError, match=r"points must be a \(B, N, 3\) tensor"):
        model(batch["points"][..., :2])


def test_reversible_saves_less_than_plain_autograd(encoder, batch):
    set_seed(0)
    model = meft_from_point_mae(encoder, "meft1").train()
    saved = measure_activation_memory(lambda: _loss(model, batch), model, backward=False).activation_bytes
    model.reversible = False
    plain = measure_activation_memory(lambda: _loss(model, batch), model, backward=False).activation_bytes
    assert saved < 0.25 * plain


def test_the_frozen_patch_embedding_in_pieces(encoder, batch):
    stem = copy.deepcopy(encoder.patch_embedding)
    points = batch["points"]
    stem.eval()
    whole = stem(points)
    stem.batch_chunks = 4  # 6 clouds: pieces of 2, 1, 2, 1
    pieces = stem(points)
    assert torch.allclose(whole[0], pieces[0], atol=1e-5) and torch.equal(whole[1], pieces[1])  # eval: the same
    stem.train()  # training mode: each piece normalised with its own statistics (ghost batch norm)
    one_piece = copy.deepcopy(stem)
    one_piece.batch_chunks = 1
    by_hand = torch.cat([copy.deepcopy(one_piece)(points[:3])[0], copy.deepcopy(one_piece)(points[3:])[0]])
    stem.batch_chunks = 2
    assert torch.allclose(copy.deepcopy(stem)(points)[0], by_hand, atol=1e-5)
    assert not torch.allclose(copy.deepcopy(one_piece)(points)[0], by_hand, atol=1e-3)  # not the whole batch's
    stem.batch_chunks = 0
    with pytest.raises(ValueError, match="batch_chunks must be an int >= 1"):
        stem(points)
    set_seed(0)
    assert meft_from_point_mae(encoder, "meft1", batch_chunks=3).patch_embedding.batch_chunks == 3
