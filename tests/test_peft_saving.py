"""course_lib.peft.saving against Hugging Face peft: an adapter saved by course_lib loads into
peft on the same base model and the other way round, with the same logits (max abs diff <= 1e-5);
LoRA, (IA)^3 and adapters on GPT-2's Conv1D equal peft's; `save_pretrained` of an injected model
refuses instead of writing renamed keys; bad adapter folders get clear errors and a failed save
leaves nothing behind."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from course_lib.peft import (
    IA3Linear,
    LoRALinear,
    PromptEmbedding,
    inject_peft,
    load_adapter,
    merge_and_unload,
    remove_peft,
    save_adapter,
    unload,
)
from course_lib.peft.saving import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOLERANCE = 1e-5


def _tiny_bert() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _tiny_gpt2() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return _tiny_bert()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 120, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor, as training would (LoRA's B starts at 0, (IA)^3's l at 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.2)


# --- course_lib -> peft and peft -> course_lib -----------------------------------------------

OURS_AND_PEFTS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}, None),
    "ia3": ({"method": "ia3"}, None),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 5}, None),
}


@pytest.mark.parametrize("method", sorted(OURS_AND_PEFTS))
def test_course_lib_adapter_loads_into_peft(bert, batch, tmp_path, method):
    ours = copy.deepcopy(bert)
    options = dict(OURS_AND_PEFTS[method][0])
    inject_peft(ours, options.pop("method"), **options)
    _perturb(ours)
    expected = _logits(ours, batch)
    assert (expected - _logits(bert, batch)).abs().max() > 1e-3  # the adapter really changes the model
    save_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path / "adapter").eval()
    assert (_logits(theirs, batch) - expected).abs().max() <= TOLERANCE


PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    "lora_rslora_regex": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True,
                                                 target_modules=r".*\.(key|dense)"),
    "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=6),
}


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_peft_adapter_loads_into_course_lib(bert, batch, tmp_path, name):
    theirs = peft.get_peft_model(copy.deepcopy(bert), PEFT_CONFIGS[name]()).eval()
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    expected = _logits(theirs, batch)
    ours = copy.deepcopy(bert)
    report = load_adapter(ours, tmp_path / "adapter")
    assert report.trainable_params == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert (_logits(ours, batch) - expected).abs().max() <= TOLERANCE
    # and back again: course_lib's save of what it loaded reads into course_lib unchanged
    save_adapter(ours, tmp_path / "again")
    again = copy.deepcopy(bert)
    load_adapter(again, tmp_path / "again")
    assert torch.equal(_logits(again, batch), _logits(ours, batch))


def test_a_saved_adapter_trains_on_after_loading(bert, batch, tmp_path):
    """What load_adapter leaves trainable is what inject_peft left: LoRA and the kept head."""
    ours = copy.deepcopy(bert)
    inject_peft(ours, "lora", r=4, target_modules=["query", "value"])
    save_adapter(ours, tmp_path / "a")
    loaded = copy.deepcopy(bert)
    load_adapter(loaded, tmp_path / "a")
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.") for n in trainable)


def test_peft_names_and_peft_config_objects_are_accepted(bert, batch):
    theirs = peft.get_peft_model(copy.deepcopy(bert), PEFT_CONFIGS["lora"]()).eval()
    _perturb(theirs)
    by_config = copy.deepcopy(bert)
    inject_peft(by_config, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    by_names = copy.deepcopy(bert)
    report = inject_peft(by_names, "lora", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                         modules_to_save=["classifier"])  # fmt: skip
    assert report.config.alpha == 8 and report.trainable_modules == ["classifier"]
    their_state = {k.replace("base_model.model.", "").replace(".default", "").replace("modules_to_save.", ""): v
                   for k, v in theirs.state_dict().items() if "lora_" in k or "modules_to_save" in k}  # fmt: skip
    for model in (by_config, by_names):
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LoRALinear):
                    module.lora_A.copy_(their_state[f"{name}.lora_A.weight"])
                    module.lora_B.copy_(their_state[f"{name}.lora_B.weight"])
            model.classifier.weight.copy_(their_state["classifier.weight"])
            model.classifier.bias.copy_(their_state["classifier.bias"])
        assert (_logits(model, batch) - _logits(theirs, batch)).abs().max() <= TOLERANCE
    with pytest.raises(TypeError, match="'alpha' or peft's 'lora_alpha'"):
        inject_peft(copy.deepcopy(bert), "lora", alpha=8, lora_alpha=8)
    with pytest.raises(ValueError, match="use_dora"):
        inject_peft(copy.deepcopy(bert), peft.LoraConfig(r=4, use_dora=True, target_modules=["query"]))


# --- save_pretrained of an injected model ----------------------------------------------------


def test_save_pretrained_of_an_injected_model_refuses_then_works_after_merging(bert, batch, tmp_path):
    ours = copy.deepcopy(bert)
    inject_peft(ours, "lora", r=4, target_modules=["query", "value"])
    _perturb(ours)
    with pytest.raises(RuntimeError, match="save_adapter.*merge_and_unload"):
        ours.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    expected = _logits(ours, batch)
    assert merge_and_unload(ours) is ours
    ours.save_pretrained(tmp_path / "hf")  # a plain BERT again: the standard format round-trips
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert (_logits(reloaded, batch) - expected).abs().max() <= TOLERANCE


def test_an_injected_model_still_pickles_and_unload_gives_save_pretrained_back(bert, tmp_path):
    ours = copy.deepcopy(bert)
    inject_peft(ours, "ia3")
    torch.save(ours, tmp_path / "whole.pt")  # the refusal is a plain object, not a closure
    assert unload(ours) is ours and not any(isinstance(m, IA3Linear) for m in ours.modules())
    ours.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists()


# --- GPT-2: Conv1D layers --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gpt2_conv1d_matches_peft_and_merges(batch, method, tmp_path):
    gpt2 = _tiny_gpt2()
    inputs = {"input_ids": batch["input_ids"] % 100}
    if method == "lora":
        their_config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                       fan_in_fan_out=True)  # fmt: skip
        options = {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}
    else:
        their_config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                                      feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)  # fmt: skip
        options = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}
    ours = copy.deepcopy(gpt2)
    report = inject_peft(ours, method, trainable_modules=None, **options)
    _perturb(ours)
    save_adapter(ours, tmp_path / "gpt2")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "gpt2", is_trainable=True).eval()
    expected = _logits(ours, inputs)
    assert (expected - _logits(gpt2, inputs)).abs().max() > 1e-3
    assert (_logits(theirs, inputs) - expected).abs().max() <= TOLERANCE
    assert report.trainable_params == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    merge_and_unload(ours)  # (B A)^T added to the (in, out) weight; l on the right axis
    assert type(ours.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert (_logits(ours, inputs) - expected).abs().max() <= TOLERANCE
    # the other way: peft's own GPT-2 adapter (fan_in_fan_out=True) read into course_lib
    trained = peft.get_peft_model(copy.deepcopy(gpt2), their_config).eval()
    _perturb(trained, seed=5)
    trained.save_pretrained(tmp_path / "theirs")
    loaded = copy.deepcopy(gpt2)
    load_adapter(loaded, tmp_path / "theirs")
    assert (_logits(loaded, inputs) - _logits(trained, inputs)).abs().max() <= TOLERANCE


def test_adapters_wrap_gpt2_blocks(batch):
    gpt2 = _tiny_gpt2()
    inputs = {"input_ids": batch["input_ids"] % 100}
    report = inject_peft(gpt2, "pfeiffer", target_modules=["mlp"], trainable_modules=None)
    assert len(report.replaced) == 2
    logits = _logits(gpt2, inputs)
    remove_peft(gpt2)
    assert torch.equal(logits, _logits(gpt2, inputs))  # zero-initialised up-projection: the start is kept


# --- bad input --------------------------------------------------------------------------------


def test_bad_adapter_folders_get_clear_errors(bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_adapter(copy.deepcopy(bert), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks.*adapter_config.json"):
        load_adapter(copy.deepcopy(bert), tmp_path / "empty")

    ours = copy.deepcopy(bert)
    inject_peft(ours, "lora", r=4, target_modules=["query", "value"])
    save_adapter(ours, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())

    other = tmp_path / "prefix"
    other.mkdir()
    (other / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    (other / WEIGHTS_NAME).write_bytes((tmp_path / "lora" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="peft_type='PREFIX_TUNING'.*LORA, IA3 and PROMPT_TUNING"):
        load_adapter(copy.deepcopy(bert), other)

    (other / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(copy.deepcopy(bert), other)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / CONFIG_NAME).write_text(json.dumps(config))
    (damaged / WEIGHTS_NAME).write_bytes((tmp_path / "lora" / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load_adapter(copy.deepcopy(bert), damaged)

    # an adapter for a wider model: shapes that do not fit, and the model is left as it came
    wide = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))  # fmt: skip
    base = copy.deepcopy(bert)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=r"does not fit BertForSequenceClassification.*lora_A.weight: file \(4, 32\), model \(4, 48\)"):
        load_adapter(wide, tmp_path / "lora")
    inject_peft(wide, "lora", r=4, target_modules=["query", "value"])
    save_adapter(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"file \(4, 48\), model \(4, 32\)"):
        load_adapter(base, tmp_path / "wide")
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags


def test_save_adapter_refuses_a_model_without_a_method_or_with_merged_lora(bert, tmp_path):
    plain = copy.deepcopy(bert)
    with pytest.raises(ValueError, match="no PEFT method that inject_peft put there"):
        save_adapter(plain, tmp_path / "x")
    merged = copy.deepcopy(bert)
    inject_peft(merged, "lora", r=4, target_modules=["query"])
    next(m for m in merged.modules() if isinstance(m, LoRALinear)).merge()
    with pytest.raises(ValueError, match="merged"):
        save_adapter(merged, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method, options", [("pfeiffer", {}), ("houlsby", {"bottleneck": 4}),
                                             ("prefix_tuning", {"num_virtual_tokens": 3}), ("bitfit", {})])  # fmt: skip
def test_methods_without_a_peft_format_round_trip_in_course_libs_own(bert, batch, tmp_path, method, options):
    from course_lib.peft.saving import OWN_CONFIG_NAME, OWN_WEIGHTS_NAME

    ours = copy.deepcopy(bert)
    report = inject_peft(ours, method, **options)
    _perturb(ours)
    expected = _logits(ours, batch)
    save_adapter(ours, tmp_path / method)
    assert sorted(p.name for p in (tmp_path / method).iterdir()) == [OWN_CONFIG_NAME, OWN_WEIGHTS_NAME]
    loaded = copy.deepcopy(bert)
    again = load_adapter(loaded, tmp_path / method)
    assert again.trainable == report.trainable and again.config == report.config
    assert torch.equal(_logits(loaded, batch), expected)
    wide = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(wide, tmp_path / method)


def test_a_failed_save_leaves_the_old_adapter_and_no_half_written_folder(bert, tmp_path, monkeypatch):
    import safetensors.torch

    ours = copy.deepcopy(bert)
    inject_peft(ours, "prompt_tuning", num_virtual_tokens=3)
    assert any(isinstance(m, PromptEmbedding) for m in ours.modules())
    save_adapter(ours, tmp_path / "adapter")
    before = (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    _perturb(ours)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(ours, tmp_path / "adapter")
    assert (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left


# --- prompt and prefix tuning across families ----------------------------------------------


def test_prompt_tuning_on_roberta_equals_peft_and_prefix_tuning_runs_on_it(batch):
    from course_lib.peft import PromptEmbedding

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, num_labels=3, max_position_embeddings=64, pad_token_id=1)  # fmt: skip
    roberta = transformers.RobertaForSequenceClassification(config).eval()
    inputs = {"input_ids": batch["input_ids"].clamp(min=3), "attention_mask": batch["attention_mask"]}
    theirs = peft.get_peft_model(copy.deepcopy(roberta), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    theirs.eval()
    _perturb(theirs)
    ours = copy.deepcopy(roberta)
    inject_peft(ours, "prompt_tuning", num_virtual_tokens=5)
    with torch.no_grad():
        next(m for m in ours.modules() if isinstance(m, PromptEmbedding)).weight.copy_(
            theirs.prompt_encoder.default.embedding.weight)
        ours.classifier.load_state_dict(theirs.base_model.classifier.modules_to_save.default.state_dict())
    assert (_logits(ours, inputs) - _logits(theirs, inputs)).abs().max() <= TOLERANCE
    prefixed = copy.deepcopy(roberta)
    inject_peft(prefixed, "prefix_tuning", num_virtual_tokens=4)  # checked against attention by hand on BERT
    assert _logits(prefixed, inputs).isfinite().all()
    with pytest.raises(ValueError, match="prefix tuning needs a Hugging Face transformer"):
        inject_peft(torch.nn.Sequential(torch.nn.Linear(4, 4)), "prefix_tuning")


def _prefix_cache(model: torch.nn.Module, layers: list[torch.nn.Module], batch_size: int):
    """The prefixes of `layers` (their course_prefix children) as a transformers cache of P past positions."""
    cache = transformers.DynamicCache(config=model.config)
    for index, attention in enumerate(layers):
        keys, values = attention.course_prefix.head_prefix(batch_size, torch.float32)
        cache.update(keys.detach().clone(), values.detach().clone(), index)
    return cache


def _with_prefix_positions(mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], num_prefix, dtype=mask.dtype), mask], dim=1)


def test_prefix_tuning_on_gpt2_equals_the_prefix_as_transformers_past_keys_and_values(batch):
    """GPT-2 (fused Conv1D projections, a causal mask): the prefix where keys and values meet gives
    exactly the logits transformers computes with the same prefix as a past of P positions (real
    tokens at positions 0..T-1, padding on the left); peft's prefix tuning is that same past with
    the real tokens' positions shifted by P, and differs by exactly that."""
    from course_lib.peft import PREFIX_ATTENTION, PrefixKeyValues

    gpt2 = _tiny_gpt2()
    ids, mask = batch["input_ids"] % 100, batch["attention_mask"].flip(1)  # left padding in row 1
    ours = copy.deepcopy(gpt2)
    report = inject_peft(ours, "prefix_tuning", num_virtual_tokens=3)
    assert report.trainable_params == 2 * 2 * 3 * 32 and ours.config._attn_implementation == PREFIX_ATTENTION
    assert gpt2.config._attn_implementation == "sdpa"  # the copy's config, not the original's
    _perturb(ours)
    layers = [block.attn for block in ours.transformer.h]
    positions = torch.arange(ids.shape[1]).expand(len(ids), -1)
    with torch.no_grad():
        reference = gpt2(input_ids=ids, attention_mask=_with_prefix_positions(mask, 3), position_ids=positions,
                         past_key_values=_prefix_cache(gpt2, layers, len(ids))).logits  # fmt: skip
    real = mask.bool()
    assert (_logits(ours, {"input_ids": ids, "attention_mask": mask}) - reference)[real].abs().max() <= TOLERANCE

    theirs = peft.get_peft_model(copy.deepcopy(gpt2), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    theirs.eval()
    with torch.no_grad():  # peft's one embedding holds every layer's keys and values: (P, layers x 2 x C)
        table = theirs.prompt_encoder.default.embedding.weight.view(3, 2 * 2, 32)
        for index, attention in enumerate(layers):
            attention.course_prefix.prefix_keys.copy_(table[:, 2 * index])
            attention.course_prefix.prefix_values.copy_(table[:, 2 * index + 1])
        shifted = gpt2(input_ids=ids, past_key_values=_prefix_cache(gpt2, layers, len(ids))).logits  # positions P..P+T-1
        unshifted = gpt2(input_ids=ids, position_ids=positions, past_key_values=_prefix_cache(gpt2, layers, len(ids))).logits
    assert (_logits(theirs, {"input_ids": ids}) - shifted).abs().max() <= TOLERANCE
    assert (_logits(ours, {"input_ids": ids}) - unshifted).abs().max() <= TOLERANCE
    assert (shifted - unshifted).abs().max() > 1e-3  # the one difference from peft: GPT-2's absolute positions

    # trains the prefix only; remove_peft puts the model and its attention implementation back
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all((p.grad is not None) == isinstance(m, PrefixKeyValues) for m in ours.modules()
               for p in m.parameters(recurse=False))  # fmt: skip
    remove_peft(ours)
    assert ours.config._attn_implementation == "sdpa" and not any(isinstance(m, PrefixKeyValues) for m in ours.modules())
    ours.load_state_dict(gpt2.state_dict())
    assert (_logits(ours, {"input_ids": ids}) - _logits(gpt2, {"input_ids": ids})).abs().max() == 0


def test_prefix_tuning_on_llama_with_grouped_key_value_heads(batch):
    """Llama (rotary positions, 2 key/value heads for 4 query heads): a prefix per key/value head, the
    same logits as transformers with the prefix as a past of P positions."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    llama = transformers.LlamaForCausalLM(config).eval()
    ours = copy.deepcopy(llama)
    report = inject_peft(ours, "prefix_tuning", num_virtual_tokens=4)
    assert report.trainable_params == 2 * 2 * 4 * (2 * 8)  # layers x (keys, values) x P x (2 heads x d 8)
    _perturb(ours)
    ids, mask = batch["input_ids"] % 100, batch["attention_mask"]
    layers = [layer.self_attn for layer in ours.model.layers]
    with torch.no_grad():
        reference = llama(input_ids=ids, attention_mask=_with_prefix_positions(mask, 4),
                          position_ids=torch.arange(ids.shape[1]).expand(len(ids), -1),
                          past_key_values=_prefix_cache(llama, layers, len(ids))).logits  # fmt: skip
    real = mask.bool()
    assert (_logits(ours, {"input_ids": ids, "attention_mask": mask}) - reference)[real].abs().max() <= TOLERANCE


def test_prefix_tuning_on_distilbert_equals_attention_by_hand(batch, tmp_path):
    """DistilBERT (no key/value cache to compare with): one attention module against
    softmax(Q [P_K; K]^T / sqrt(d) + mask) [P_V; V] written out; the adapter saves and loads."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64, num_labels=3)  # fmt: skip
    distilbert = transformers.DistilBertForSequenceClassification(config).eval()
    ours = copy.deepcopy(distilbert)
    inject_peft(ours, "prefix_tuning", num_virtual_tokens=5)
    _perturb(ours)
    attention = ours.distilbert.transformer.layer[0].attention
    hidden = torch.randn(3, 10, 32)
    mask = batch["attention_mask"].bool()[:, None, None, :]  # (B, 1, 1, T): True = may attend
    with torch.no_grad():
        output = attention(hidden, attention_mask=mask.expand(-1, 1, 10, -1))[0]

        def heads(x):  # (B, L, C) -> (B, 4, L, 8)
            return x.unflatten(-1, (4, 8)).transpose(1, 2)

        prefix_keys, prefix_values = attention.course_prefix.prefix()
        keys = torch.cat([heads(prefix_keys[None].expand(3, -1, -1)), heads(attention.k_lin(hidden))], dim=2)
        values = torch.cat([heads(prefix_values[None].expand(3, -1, -1)), heads(attention.v_lin(hidden))], dim=2)
        scores = heads(attention.q_lin(hidden)) @ keys.transpose(-1, -2) / 8**0.5  # (B, 4, T, P + T)
        scores = scores.masked_fill(~torch.cat([torch.ones(3, 1, 1, 5, dtype=torch.bool), mask], dim=-1), float("-inf"))
        by_hand = attention.out_lin((scores.softmax(-1) @ values).transpose(1, 2).reshape(3, 10, 32))
    assert (output - by_hand).abs().max() <= TOLERANCE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    save_adapter(ours, tmp_path / "prefix")
    again = copy.deepcopy(distilbert)
    load_adapter(again, tmp_path / "prefix")
    again.classifier.load_state_dict(ours.classifier.state_dict())
    again.pre_classifier.load_state_dict(ours.pre_classifier.state_dict())
    assert (_logits(again, inputs) - _logits(ours, inputs)).abs().max() == 0


def _prompts_of(model: torch.nn.Module) -> torch.Tensor:
    from course_lib.peft import PromptEmbedding

    return next(m for m in model.modules() if isinstance(m, PromptEmbedding)).weight


def test_prompt_tuning_on_gpt2_equals_peft_causal_lm_logits_and_loss(batch):
    """A causal LM: prompts in front of the token embeddings, labels shifted by P ignored positions."""
    gpt2 = _tiny_gpt2()
    inputs = {"input_ids": batch["input_ids"] % 100, "attention_mask": batch["attention_mask"]}
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    theirs = peft.get_peft_model(copy.deepcopy(gpt2), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs.eval()
    _perturb(theirs)
    ours = copy.deepcopy(gpt2)
    report = inject_peft(ours, "prompt_tuning", num_virtual_tokens=4)
    assert report.trainable == 4 * 32 and [p.shape for p in ours.parameters() if p.requires_grad] == [(4, 32)]
    with torch.no_grad():
        _prompts_of(ours).copy_(theirs.prompt_encoder.default.embedding.weight)
        ours_out, theirs_out = ours(**inputs), theirs(**inputs)
    assert ours_out.logits.shape == (3, 4 + 10, 100) == theirs_out.logits.shape  # P + T positions, as peft
    assert (ours_out.logits - theirs_out.logits).abs().max() <= TOLERANCE
    assert abs(ours_out.loss.item() - theirs_out.loss.item()) <= TOLERANCE
    ours_out = ours(**inputs)
    ours_out.loss.backward()  # only the prompts get a gradient
    assert _prompts_of(ours).grad is not None and _prompts_of(ours).grad.abs().sum() > 0


def test_prompt_tuning_on_gpt2_saves_in_peft_format(batch, tmp_path):
    gpt2 = _tiny_gpt2()
    ours = copy.deepcopy(gpt2)
    inject_peft(ours, "prompt_tuning", num_virtual_tokens=4)
    _perturb(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].task_type == "CAUSAL_LM"
    inputs = {"input_ids": batch["input_ids"] % 100}
    assert (_logits(ours, inputs) - _logits(theirs, inputs)).abs().max() <= TOLERANCE


def test_prompt_tuning_on_distilbert_equals_peft(batch):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64, num_labels=3)  # fmt: skip
    distilbert = transformers.DistilBertForSequenceClassification(config).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    theirs = peft.get_peft_model(copy.deepcopy(distilbert), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=32, num_layers=2, num_attention_heads=4))  # DistilBERT names them apart
    theirs.eval()
    _perturb(theirs)
    ours = copy.deepcopy(distilbert)
    inject_peft(ours, "prompt_tuning", num_virtual_tokens=5)
    with torch.no_grad():
        _prompts_of(ours).copy_(theirs.prompt_encoder.default.embedding.weight)
        head = theirs.base_model
        for name in ("pre_classifier", "classifier"):
            getattr(ours, name).load_state_dict(getattr(head, name).modules_to_save.default.state_dict())
    assert (_logits(ours, inputs) - _logits(theirs, inputs)).abs().max() <= TOLERANCE
