"""Tests of course_lib.deft.quantise: NF4 and int8 frozen weights, QuantisedLinear, quantise_linears.

The NF4 expectations are computed by brute force (argmin over the 16 code values for every weight),
the int8 ones from the definition, and gradients against an nn.Linear holding the dequantised
weight; bitsandbytes is compared with when it is installed (it is not a dependency).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deft import (
    NF4_CODEBOOK,
    SCHEMES,
    Int8Tensor,
    NF4Tensor,
    QuantisationReport,
    QuantisedLinear,
    dequantise_int8,
    dequantise_nf4,
    pack_4bit,
    quantise_int8,
    quantise_linears,
    quantise_nf4,
    unpack_4bit,
)
from course_lib.peft import inject_peft
from course_lib.peft.lora import LoRALinear

torch.set_num_threads(1)

QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # bitsandbytes' get_4bit_type("nf4"), as printed in QLoRA's appendix
MAX_HALF_GAP = max(b - a for a, b in zip(QLORA_NF4, QLORA_NF4[1:])) / 2  # (1 - 0.7229568) / 2


def random_weights(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Normal weights with a few outliers and one all-zero block of 64 at the start."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.05
    flat = weight.view(-1)
    flat[torch.randint(0, flat.numel(), (5,), generator=generator)] *= 20  # outliers
    flat[:64] = 0
    return weight


def brute_force_nf4(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, dequantised values, distance margin to the second-nearest code) per weight, flat."""
    codebook = torch.tensor(QLORA_NF4)
    blocks = weight.reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    distances = (scaled[..., None] - codebook).abs()  # (n_blocks, B, 16): every code value tried
    indices = distances.argmin(dim=-1)
    two = distances.topk(2, dim=-1, largest=False).values
    return indices.reshape(-1), (codebook[indices] * absmax).reshape(-1), (two[..., 1] - two[..., 0]).reshape(-1)


# ----------------------------------------------------------------------------- NF4


def test_codebook_is_qlora_nf4():
    assert NF4_CODEBOOK.dtype == torch.float32 and NF4_CODEBOOK.shape == (16,)
    assert torch.equal(NF4_CODEBOOK, torch.tensor(QLORA_NF4, dtype=torch.float32))
    assert bool((NF4_CODEBOOK[1:] > NF4_CODEBOOK[:-1]).all())  # sorted, distinct
    assert NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[-1] == 1 and NF4_CODEBOOK[7] == 0
    assert SCHEMES == ("nf4", "int8")


@pytest.mark.parametrize(("shape", "block_size"), [((16, 64), 64), ((6, 128), 64), ((12, 40), 32), ((8, 24), 2)])
def test_nf4_equals_brute_force_nearest_code(shape, block_size):
    weight = random_weights(sum(shape) + block_size, shape)
    q = quantise_nf4(weight, block_size=block_size)
    assert isinstance(q, NF4Tensor)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (weight.numel() // 2,)
    assert q.absmax.dtype == torch.float32 and q.absmax.shape == (weight.numel() // block_size,)
    assert q.shape == weight.shape and q.block_size == block_size
    assert torch.equal(q.absmax, weight.reshape(-1, block_size).abs().amax(dim=1))

    expected_indices, expected_values, margin = brute_force_nf4(weight, block_size)
    indices = unpack_4bit(q.codes).long()
    deq = dequantise_nf4(q)
    assert deq.shape == weight.shape and deq.dtype == weight.dtype
    clear = margin > 1e-6  # a value (numerically) halfway between two codes may round either way
    assert clear.float().mean() > 0.999
    assert torch.equal(indices[clear], expected_indices[clear])
    assert torch.equal(deq.reshape(-1)[clear], expected_values[clear])
    assert bool(((indices - expected_indices).abs() <= 1).all())
    assert torch.equal(deq.reshape(-1)[:64], torch.zeros(64))  # the all-zero block: absmax 0, exact zeros


def test_pack_unpack_round_trip_and_layout():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (1000,), generator=generator, dtype=torch.uint8)
    packed = pack_4bit(values)
    assert packed.dtype == torch.uint8 and packed.shape == (500,)
    assert torch.equal(unpack_4bit(packed), values)
    assert torch.equal(pack_4bit(torch.tensor([1, 2, 15, 0])), torch.tensor([0x12, 0xF0], dtype=torch.uint8))
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_4bit(unpack_4bit(every_byte)), every_byte)
    with pytest.raises(ValueError, match="even number"):
        pack_4bit(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_4bit(torch.tensor([1, 16]))


def test_nf4_matches_bitsandbytes_when_available():
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (optional)")
    weight = random_weights(3, (32, 128))
    try:
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        reference = bnb_functional.dequantize_4bit(packed, state, quant_type="nf4")
    except Exception as error:  # noqa: BLE001 - any failure of bitsandbytes' CPU path means: cannot compare here
        pytest.skip(f"bitsandbytes' CPU 4-bit path does not work here: {type(error).__name__}: {error}")
    ours = dequantise_nf4(quantise_nf4(weight, block_size=64))
    torch.testing.assert_close(ours, reference.to(ours.dtype).reshape(ours.shape), rtol=0, atol=1e-6)


def test_nf4_round_trip_error_bound_and_dtypes():
    weight = random_weights(5, (24, 256))
    for block_size in (64, 128):
        deq = dequantise_nf4(quantise_nf4(weight, block_size))
        error = (weight - deq).abs().reshape(-1, block_size).amax(dim=1)
        bound = weight.reshape(-1, block_size).abs().amax(dim=1) * MAX_HALF_GAP
        assert bool((error <= bound * (1 + 1e-6)).all())
    for dtype in (torch.float16, torch.bfloat16):
        q = quantise_nf4(weight.to(dtype))
        assert dequantise_nf4(q).dtype == dtype and dequantise_nf4(q, torch.float32).dtype == torch.float32


# ----------------------------------------------------------------------------- int8


def test_int8_definition_and_error_bound():
    weight = random_weights(7, (20, 48))
    weight[3] = 0  # a zero row: scale 0, exact zeros back
    q = quantise_int8(weight)
    assert isinstance(q, Int8Tensor) and q.codes.dtype == torch.int8 and q.codes.shape == (20, 48)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (20,)
    assert torch.equal(q.scale, weight.abs().amax(dim=1) / 127)
    assert int(q.codes.abs().max()) == 127 and q.shape == weight.shape
    deq = dequantise_int8(q)
    error = (weight - deq).abs().amax(dim=1)
    assert bool((error <= q.scale / 2 * (1 + 1e-4)).all())  # <= s/2 up to the float rounding of w / s
    assert torch.equal(deq[3], torch.zeros(48))
    assert dequantise_int8(quantise_int8(weight.half())).dtype == torch.float16


# ----------------------------------------------------------------------------- QuantisedLinear


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_linear_gradient_goes_to_the_input_only(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = QuantisedLinear.from_linear(linear, scheme=scheme)
    assert isinstance(layer, nn.Linear)  # so that LoRA (inject_peft) accepts it
    assert [p for p in layer.parameters() if p.requires_grad] == []
    assert set(dict(layer.named_buffers())) == {"weight_codes", "weight_scales"}
    assert layer.weight_codes.dtype == (torch.uint8 if scheme == "nf4" else torch.int8)

    reference = nn.Linear(64, 32)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantised_weight())
        reference.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    upstream = torch.randn(3, 5, 32)
    output = layer(x)
    torch.testing.assert_close(output, reference(x), rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad((output * upstream).sum(), x)
    (expected,) = torch.autograd.grad((reference(x) * upstream).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert torch.equal(layer.weight, layer.dequantised_weight())

    lora = LoRALinear(layer, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_()  # B = 0 at init would leave A without gradient
    lora(x).pow(2).sum().backward()
    assert lora.lora_A.grad is not None and lora.lora_A.grad.abs().sum() > 0
    assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0
    assert layer.bias.grad is None and layer.weight_codes.grad is None
    with pytest.raises(AttributeError, match="to_linear"):
        lora.merge()  # merging into 4-bit codes would need re-quantising
    assert not lora.merged


def test_weight_bytes_and_to_linear():
    linear = nn.Linear(64, 32)
    nf4 = QuantisedLinear.from_linear(linear, "nf4", block_size=64)
    assert nf4.weight_bytes() == 32 * 64 // 2 + (32 * 64 // 64) * 4 + 32 * 4  # codes + absmax + bias
    int8 = QuantisedLinear.from_linear(linear, "int8")
    assert int8.weight_bytes() == 32 * 64 + 32 * 4 + 32 * 4  # codes + scales + bias
    no_bias = QuantisedLinear.from_linear(nn.Linear(64, 32, bias=False), "nf4", block_size=32)
    assert no_bias.bias is None and no_bias.weight_bytes() == 32 * 64 // 2 + 64 * 4
    plain = nf4.to_linear()
    assert type(plain) is nn.Linear and torch.equal(plain.weight, nf4.dequantised_weight())
    x = torch.randn(4, 64)
    torch.testing.assert_close(plain(x), nf4(x))
    assert "scheme=nf4, block_size=64" in repr(nf4)


# ----------------------------------------------------------------------------- a tiny BERT


def tiny_bert(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 100, (4, 12), generator=generator),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 1]),
    }


# relative error ||logits_q - logits|| / ||logits|| of the tiny random BERT, measured over seeds
# 0-11: nf4 0.043-0.172 (seed 0: 0.084), int8 0.0025-0.015 (seed 0: 0.0078); bounds with margin
LOGIT_BOUND = {"nf4": 0.25, "int8": 0.03}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_bert_quantised_logits_and_report(scheme):
    model = tiny_bert()
    batch = tiny_batch()
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    report = quantise_linears(model, scheme=scheme)
    assert isinstance(report, QuantisationReport)
    assert report.replaced == [name for name in linears if name != "classifier"]  # 2 x 6 + the pooler
    assert len(report.replaced) == 13
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], QuantisedLinear) for name in report.replaced)
    assert type(model.classifier) is nn.Linear  # the head stays float
    float_bytes = sum(4 * (linears[n].weight.numel() + linears[n].bias.numel()) for n in report.replaced)
    assert report.bytes_before == float_bytes
    assert report.bytes_after == sum(modules[name].weight_bytes() for name in report.replaced)
    assert report.ratio > (6 if scheme == "nf4" else 3.5)
    assert scheme in str(report) and "| scheme |" in report.to_markdown()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    relative = ((logits - reference).norm() / reference.norm()).item()
    assert relative < LOGIT_BOUND[scheme]
    with pytest.raises(ValueError, match="no float nn.Linear"):
        quantise_linears(model, scheme=scheme)  # everything is quantised already


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_on_a_quantised_bert_trains_only_lora_and_head(scheme):
    model = tiny_bert()
    quantise_linears(model, scheme=scheme)
    report = inject_peft(model, method="lora", r=8, alpha=16, target_modules=["query", "value"])
    assert len(report.replaced) == 4
    assert isinstance(model.bert.encoder.layer[0].attention.self.query.base, QuantisedLinear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or name.startswith("classifier.") for name in trainable)
    assert {"classifier.weight", "classifier.bias"} <= trainable

    model.train()
    batch = tiny_batch()
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) == 1:  # after one step: only LoRA and head parameters moved, no code or scale
            state = dict([*model.named_parameters(), *model.named_buffers()])
            changed = {name for name, t in before.items() if not torch.equal(t, state[name])}
            assert changed and changed <= trainable
            assert any(".lora_B" in name for name in changed) and "classifier.weight" in changed
    assert losses[-1] < losses[0] - 0.05


def test_quantising_under_an_existing_lora():
    model = tiny_bert()
    inject_peft(model, method="lora", r=4, alpha=8, target_modules=["query", "value"])
    report = quantise_linears(model, target_modules=r".*attention\.self\..*", scheme="nf4")
    assert report.replaced == [
        f"bert.encoder.layer.{i}.attention.self.{name}"
        for i in range(2)
        for name in ("query.base", "key", "value.base")
    ]
    assert isinstance(model.bert.encoder.layer[1].attention.self.value, LoRALinear)
    model(**tiny_batch()).loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.lora_A.grad is not None


def test_default_targets_skip_heads_at_any_depth():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
            self.score = nn.Linear(64, 2)
            self.classifier = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))

    model = Model()
    report = quantise_linears(model, scheme="int8")
    assert report.replaced == ["body.0"] and report.block_size is None
    assert type(model.score) is nn.Linear and type(model.classifier[0]) is nn.Linear


# ----------------------------------------------------------------------------- errors


def test_errors_say_what_to_do():
    model = tiny_bert()
    untouched = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"unknown quantisation scheme 'fp4'.*'nf4', 'int8'"):
        quantise_linears(model, scheme="fp4")
    with pytest.raises(ValueError, match="unknown quantisation scheme"):
        QuantisedLinear.from_linear(nn.Linear(4, 4), scheme="int4")
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match="block_size must be a positive integer"):
            quantise_linears(model, block_size=bad)
    with pytest.raises(ValueError, match="must be even"):
        quantise_linears(model, block_size=63)
    with pytest.raises(ValueError, match="must be even"):
        quantise_nf4(torch.randn(9, 9), block_size=9)
    first_linear = r"bert\.encoder\.layer\.0\.attention\.self\.query"
    with pytest.raises(ValueError, match=r"matches no float nn.Linear.*" + first_linear):
        quantise_linears(model, target_modules=["querry"])
    with pytest.raises(ValueError, match="matches no float nn.Linear"):
        quantise_linears(model, target_modules=r".*LayerNorm")  # matches modules, but none is a Linear
    with pytest.raises(ValueError, match="not a valid regular expression"):
        quantise_linears(model, target_modules="(")
    # query is 64 x 64 = 4096 values: block 96 does not divide them; the layer is named, nothing is replaced
    with pytest.raises(ValueError, match=f"'{first_linear}' has 4096 values.*block_size=96"):
        quantise_linears(model, block_size=96)
    assert not any(isinstance(m, QuantisedLinear) for m in model.modules())
    assert all(torch.equal(t, untouched[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="not a multiple of block_size=64"):
        quantise_nf4(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"\(out, in\) matrix"):
        quantise_int8(torch.randn(8))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantise_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating-point"):
        quantise_nf4(torch.ones(64, dtype=torch.long))
    with pytest.raises(TypeError, match="already a QuantisedLinear"):
        QuantisedLinear.from_linear(QuantisedLinear.from_linear(nn.Linear(64, 2)))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantisedLinear.from_linear(nn.Conv1d(2, 2, 1))
