"""course_lib.peft on small hand-made models: each method against the formula computed by hand,
the injection (patterns, freezing, report, undo) and the errors on bad input.

The comparisons against Hugging Face peft on all-MiniLM-L6-v2 are in test_peft_vs_hf.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.peft import (
    AdapterConfig,
    BottleneckAdapter,
    IA3Linear,
    LoRAConfig,
    LoRALinear,
    ParallelAdapter,
    SerialAdapter,
    extend_attention_mask,
    inject_peft,
    matching_module_names,
    merge_and_unload,
    name_matches,
    remove_peft,
)


class TinyNet(nn.Module):
    """Two residual MLP blocks and a head, with names like a transformer's."""

    def __init__(self, dim: int = 6, hidden: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(dim, hidden), "down": nn.Linear(hidden, dim), "norm": nn.LayerNorm(dim)})
            for _ in range(2)
        )
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["norm"](x + block["down"](torch.relu(block["up"](x))))
        return self.classifier(x.mean(dim=1))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 5, 6)


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# --- patterns -------------------------------------------------------------------------------


def test_name_patterns_regex_is_full_match_and_list_matches_endings():
    assert name_matches("encoder.layer.0.attention.self.query", r".*\.query")
    assert not name_matches("encoder.layer.0.attention.self.query", r"query")  # full match, not search
    assert name_matches("encoder.layer.0.attention.self.query", ["query"])
    assert name_matches("query", ["query"])
    assert not name_matches("encoder.layer.0.attention.self.query_proj", ["query"])
    assert name_matches("layer.0.output.dense", ["output.dense"])


def test_matching_module_names_in_model_order(net):
    assert matching_module_names(net, ["up"]) == ["blocks.0.up", "blocks.1.up"]
    assert matching_module_names(net, r"blocks\.1\.(up|down)") == ["blocks.1.up", "blocks.1.down"]


# --- LoRA -----------------------------------------------------------------------------------


def test_lora_linear_matches_the_formula_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    lora = LoRALinear(base, r=2, alpha=8.0)
    assert torch.count_nonzero(lora.lora_B) == 0  # B = 0: starts as the base layer
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    expected = x @ base.weight.T + base.bias + (8.0 / 2) * (x @ A.T @ B.T)
    torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=1e-5)


def test_lora_init_follows_kaiming_uniform_bound():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(400, 300), r=16)
    bound = 1 / 400**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 400
    assert lora.lora_A.abs().max() <= bound
    assert lora.lora_A.abs().max() > 0.9 * bound


def test_lora_merge_unmerge_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    original = base.weight.detach().clone()
    lora = LoRALinear(base, r=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 6)
    before = lora(x)
    lora.merge()
    expected_weight = original + 2.0 * lora.lora_B.detach() @ lora.lora_A.detach()
    torch.testing.assert_close(base.weight.detach(), expected_weight)
    torch.testing.assert_close(lora(x), before, atol=1e-6, rtol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(base.weight.detach(), original, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), before, atol=1e-6, rtol=1e-5)


def test_inject_lora_on_a_plain_module(net, x):
    report = inject_peft(net, "lora", target_modules=r"blocks\.\d+\.(up|down)", r=2, alpha=4)
    assert report.method == "lora"
    assert report.replaced == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    expected_lora = 2 * (2 * 6 + 10 * 2) + 2 * (2 * 10 + 6 * 2)  # A (r, in) + B (out, r) per layer
    assert report.trainable_params == expected_lora + (6 * 3 + 3)  # plus the classifier (default head)
    assert report.total_params == sum(p.numel() for p in net.parameters())
    names = _trainable(net)
    assert {n for n in names if "lora" in n} == {
        f"blocks.{i}.{layer}.lora_{m}" for i in (0, 1) for layer in ("up", "down") for m in "AB"
    }
    assert {"classifier.weight", "classifier.bias"} <= names
    assert len(names) == 10
    assert str(report).startswith("lora: 4 modules changed")
    assert "| trainable parameters |" in report.to_markdown()


def test_inject_takes_the_mode_of_the_model(net, x):
    # a wrapper created inside an eval-mode model must be in eval mode too (dropout off)
    inject_peft(net, LoRAConfig(r=2, dropout=0.5, target_modules=["up"]))
    for module in net.modules():
        assert not module.training
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
    assert torch.equal(net(x), net(x))


def test_merge_and_unload_puts_plain_linears_back(net, x):
    inject_peft(net, "lora", target_modules=["up", "down"], r=2)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
    before = net(x)
    assert merge_and_unload(net) is net  # peft's convention: the model comes back
    assert all(type(net.blocks[i][n]) is nn.Linear for i in (0, 1) for n in ("up", "down"))
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)


def test_remove_peft_restores_the_model(net, x):
    before = net(x)
    inject_peft(net, "lora", target_modules=["up"], r=2)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
    assert not torch.allclose(net(x), before)
    assert remove_peft(net) is net
    assert all(type(m) in (nn.Linear, nn.LayerNorm, nn.ModuleDict, nn.ModuleList, TinyNet) for m in net.modules())
    torch.testing.assert_close(net(x), before)


def test_only_lora_and_head_get_gradients(net, x):
    inject_peft(net, "lora", target_modules=["up"], r=2)
    net(x).sum().backward()
    for name, parameter in net.named_parameters():
        has_grad = parameter.grad is not None
        assert has_grad == parameter.requires_grad, name


# --- adapters -------------------------------------------------------------------------------


def test_bottleneck_adapter_formula_and_identity_at_init():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 2, activation="relu", scale=0.5)
    z = torch.randn(3, 6)
    assert torch.count_nonzero(adapter(z)) == 0  # up = 0: adds nothing
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
    d, u = adapter.down, adapter.up
    expected = 0.5 * (torch.relu(z @ d.weight.T + d.bias) @ u.weight.T + u.bias)
    torch.testing.assert_close(adapter(z), expected)


def test_serial_and_parallel_placements_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(6, 6)
    adapter = BottleneckAdapter(6, 3)
    with torch.no_grad():
        adapter.up.weight.normal_()
    x = torch.randn(2, 6)
    y = base(x)
    torch.testing.assert_close(SerialAdapter(base, adapter)(x), y + adapter(y))  # after the sublayer
    torch.testing.assert_close(ParallelAdapter(base, adapter)(x), y + adapter(x))  # beside it, reading x

    # BERT-style output block f(h, x) = LayerNorm(dense(h) + x): the adapter reads the FFN input x
    class OutputBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(10, 6)
            self.LayerNorm = nn.LayerNorm(6)

        def forward(self, h, residual):
            return self.LayerNorm(self.dense(h) + residual)

    block = OutputBlock()
    h = torch.randn(2, 10)
    expected = block.LayerNorm(block.dense(h) + adapter(x) + x)
    torch.testing.assert_close(ParallelAdapter(block, adapter)(h, x), expected)


def test_inject_adapters_on_a_plain_module(net, x):
    before = net(x)
    report = inject_peft(net, AdapterConfig(placement="pfeiffer", bottleneck=2, target_modules=["down"]))
    assert report.replaced == ["blocks.0.down", "blocks.1.down"]
    per_adapter = 6 * 2 + 2 + 2 * 6 + 6
    assert report.trainable_params == 2 * per_adapter + 21
    torch.testing.assert_close(net(x), before)  # identity at init
    assert isinstance(net.blocks[0]["down"], SerialAdapter)


def test_adapter_placement_as_method_name(net, x):
    report = inject_peft(net, "parallel_adapter", target_modules=["down"], bottleneck=2)
    assert isinstance(net.blocks[1]["down"], ParallelAdapter) and net.blocks[1]["down"].adapter.scale == 4.0
    assert report.method == "adapter"


def test_adapter_config_defaults():
    assert AdapterConfig(placement="parallel").scale_or_default() == 4.0
    assert AdapterConfig(placement="houlsby").scale_or_default() == 1.0
    assert AdapterConfig().bottleneck_for(384) == 24  # reduction factor 16 (DEFT's Pfeiffer adapter)


# --- BitFit and (IA)^3 ----------------------------------------------------------------------


def test_bitfit_trains_only_biases(net, x):
    report = inject_peft(net, "bitfit", trainable_modules=None)
    expected = {name for name, _ in net.named_parameters() if name.endswith("bias")}
    assert _trainable(net) == expected
    assert report.trainable_params == sum(p.numel() for n, p in net.named_parameters() if n.endswith("bias"))
    net(x).sum().backward()
    assert all((p.grad is not None) == n.endswith("bias") for n, p in net.named_parameters())


def test_bitfit_with_a_pattern(net):
    report = inject_peft(net, "bitfit", target_modules=["up"])
    assert _trainable(net) == {"blocks.0.up.bias", "blocks.1.up.bias", "classifier.weight", "classifier.bias"}
    assert report.replaced == ["blocks.0.up", "blocks.1.up"]


def test_ia3_linear_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    output_scaled = IA3Linear(base)
    input_scaled = IA3Linear(base, feedforward=True)
    assert torch.equal(output_scaled(x), base(x)) and torch.equal(input_scaled(x), base(x))  # l = 1 at init
    with torch.no_grad():
        output_scaled.scale.normal_()
        input_scaled.scale.normal_()
    l_out, l_in = output_scaled.scale.detach(), input_scaled.scale.detach()
    torch.testing.assert_close(output_scaled(x), l_out * (x @ base.weight.T + base.bias))
    torch.testing.assert_close(input_scaled(x), (l_in * x) @ base.weight.T + base.bias)
    before = output_scaled(x)
    output_scaled.merge()
    torch.testing.assert_close(output_scaled(x), before, atol=1e-6, rtol=1e-5)


def test_inject_ia3_feedforward_pattern(net):
    report = inject_peft(net, "ia3", target_modules=["up", "down"], feedforward_modules=["down"])
    assert [net.blocks[0]["up"].feedforward, net.blocks[0]["down"].feedforward] == [False, True]
    assert report.trainable_params == 2 * (10 + 10) + 21  # up: out 10; down: in 10


# --- prefix tuning: the mask extension ------------------------------------------------------


def test_extend_attention_mask_bool_and_additive():
    boolean = torch.tensor([[True, True, False]]).expand(1, 1, 3, 3)  # (1, 1, T, T)
    extended = extend_attention_mask(boolean, 2)
    assert extended.shape == (1, 1, 3, 5)
    assert extended[..., :2].all() and torch.equal(extended[..., 2:], boolean)
    additive = torch.zeros(2, 1, 3, 3)
    additive[..., -1] = torch.finfo(torch.float32).min
    extended = extend_attention_mask(additive, 4)
    assert extended.shape == (2, 1, 3, 7) and torch.count_nonzero(extended[..., :4]) == 0
    assert extend_attention_mask(None, 4) is None
    with pytest.raises(TypeError, match="attn_implementation"):
        extend_attention_mask(torch.ones(2, 3), 4)


# --- errors ---------------------------------------------------------------------------------


def test_pattern_matching_nothing_is_a_clear_error(net):
    with pytest.raises(ValueError, match=r"matches no module.*blocks\.0\.up"):
        inject_peft(net, "lora", target_modules=["query"])
    with pytest.raises(ValueError, match="'nothing_here'"):
        inject_peft(net, "lora", target_modules="nothing_here")
    with pytest.raises(ValueError, match="trainable_modules"):
        inject_peft(net, "lora", target_modules=["up"], trainable_modules=["head"])


def test_rank_must_be_positive(net):
    for r in (0, -3):
        with pytest.raises(ValueError, match="rank"):
            inject_peft(net, "lora", target_modules=["up"], r=r)
        with pytest.raises(ValueError, match="rank"):
            LoRAConfig(r=r)
        with pytest.raises(ValueError, match="rank"):
            LoRALinear(nn.Linear(3, 3), r=r)


def test_unknown_method_lists_known_ones(net):
    with pytest.raises(ValueError, match=r"unknown PEFT method 'qlora'.*lora.*prefix_tuning"):
        inject_peft(net, "qlora", target_modules=["up"])


def test_unknown_option_is_a_type_error(net):
    with pytest.raises(TypeError, match=r"lora has no option\(s\) \['rank'\]"):
        inject_peft(net, "lora", target_modules=["up"], rank=4)


def test_wrong_module_type_names_the_module(net):
    with pytest.raises(TypeError, match=r"blocks\.0\.norm.*LayerNorm"):
        inject_peft(net, "lora", target_modules=["norm"])
    with pytest.raises(TypeError, match="nn.Linear|Linear"):
        LoRALinear(nn.LayerNorm(4))


def test_methods_that_need_a_transformer_and_bert_defaults_say_so(net):
    with pytest.raises(ValueError, match="needs a Hugging Face transformer"):
        inject_peft(net, "prefix_tuning")
    with pytest.raises(ValueError, match="takes inputs_embeds"):  # prompt tuning: any HF model with inputs_embeds
        inject_peft(net, "prompt_tuning")
    with pytest.raises(ValueError, match="pass target_modules"):
        inject_peft(net, "lora")  # no BERT default on a non-BERT model


def test_bad_adapter_placement():
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="sideways")


def test_nothing_changes_when_injection_fails(net):
    # the errors are raised before the model is touched
    with pytest.raises(ValueError):
        inject_peft(net, "lora", target_modules=["query"])
    assert all(p.requires_grad for p in net.parameters())
    assert not any(isinstance(m, LoRALinear) for m in net.modules())


def test_lora_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(8, 8), r=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(16, 8)
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    lora.train()
    assert not torch.equal(lora(x), lora(x))
    assert torch.equal(lora.base(x), lora.base(x))  # the frozen path has no dropout
