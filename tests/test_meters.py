"""Tests of course_lib.meters: parameter counts, saved-tensor memory and activation density.

Every expected value is worked out by hand from what autograd must save, or recomputed by
brute force, never read back from the meter itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib.meters import (
    ActivationCollector,
    DensityCounter,
    activation_density,
    count_active,
    count_parameters,
    density_over_batches,
    find_activation_modules,
    measure_activation_memory,
    measure_peak_process_memory,
)

F32 = 4  # bytes per float32


@pytest.fixture(scope="module")
def minilm_encoder():
    from course_lib.text import load_encoder

    return load_encoder().eval()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from course_lib.text import load_tokenizer

    return load_tokenizer()




# ----------------------------------------------------------------------------- parameters


def test_count_parameters_by_hand():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 3*4+4 = 16, 4*2+2 = 10
    model[0].requires_grad_(False)
    report = count_parameters(model)
    assert (report.trainable, report.total, report.frozen) == (10, 26, 16)
    assert report.trainable_pct == pytest.approx(100 * 10 / 26)
    assert report.per_module == {"0": (0, 16), "1": (10, 10)}
    assert "10" in str(report) and "26" in str(report)


def test_count_parameters_counts_tied_weights_once():
    shared = nn.Linear(5, 5, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_parameters(model).total == 25


def test_count_parameters_matches_state_dict_for_minilm(minilm_encoder):
    # reference: the tensors of the checkpoint, minus buffers
    buffers = {name for name, _ in minilm_encoder.named_buffers()}
    expected = sum(t.numel() for name, t in minilm_encoder.state_dict().items() if name not in buffers)
    report = count_parameters(minilm_encoder)
    assert report.total == expected
    assert 22_000_000 < report.total < 23_000_000  # "22.7M parameters"


def test_count_parameters_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters([torch.zeros(3)])


# ----------------------------------------------------------------------------- activation memory


def test_linear_saves_its_input_only_when_input_needs_no_grad():
    layer = nn.Linear(6, 5)
    x = torch.randn(7, 6)  # data: no grad needed, so W^T is not needed either
    report = measure_activation_memory(lambda: layer(x).sum(), layer)
    assert report.activation_bytes == x.numel() * F32  # y = x W^T + b saves x for dL/dW
    assert report.parameter_bytes == 0
    assert layer.weight.grad is not None  # backward ran


def test_linear_saves_weight_when_input_needs_grad_and_reports_it_separately():
    layer = nn.Linear(6, 5)
    x = torch.randn(7, 6, requires_grad=True)
    report = measure_activation_memory(lambda: layer(x).sum(), layer)
    assert report.activation_bytes == x.numel() * F32
    assert report.parameter_bytes == layer.weight.numel() * F32  # W^T for dL/dx
    # without telling the meter which module: the view of an nn.Parameter is still recognised
    report = measure_activation_memory(lambda: layer(x).sum(), backward=False)
    assert report.parameter_bytes == layer.weight.numel() * F32


def test_views_of_one_storage_count_once():
    x = torch.randn(4, 8, requires_grad=True)

    def step():
        y = x * 2.0  # new storage (4 x 8); multiplying by a number saves no tensor
        return y[:, :4].sin().sum() + y[:, 4:].cos().sum()  # both save a view of y

    report = measure_activation_memory(step)
    assert report.num_saved_tensors == 2
    assert len(report.storages) == 1
    assert report.activation_bytes == 4 * 8 * F32  # the whole storage of y, once


def test_discarded_branches_are_not_counted():
    x = torch.randn(16, 16, requires_grad=True)

    def step():
        thrown_away = x.exp()  # saves its 16x16 result, then the graph drops it
        del thrown_away
        return x.sin().sum()  # saves x

    report = measure_activation_memory(step)
    assert report.activation_bytes == x.numel() * F32


def _mlp(width: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)])


def test_mlp_stack_and_checkpointing_known_answers():
    torch.manual_seed(0)
    batch, width, depth = 8, 16, 3
    model = _mlp(width, depth)
    x = torch.randn(batch, width)
    act = batch * width * F32
    # plain: every Linear saves its input, every GELU its input: x, l1, g1, l2, g2, l3 (distinct)
    report = measure_activation_memory(lambda: model(x).sum(), model)
    assert report.activation_bytes == 2 * depth * act
    # blocks 2 and 3 get inputs that need grad, so they also keep W^T
    assert report.parameter_bytes == (depth - 1) * width * width * F32

    def checkpointed():
        h = x
        for block in model:
            h = checkpoint(block, h, use_reentrant=False)
        return h.sum()

    # checkpointing keeps only each block's input (x, g1, g2) and recomputes the rest
    report = measure_activation_memory(checkpointed, model)
    assert report.activation_bytes == depth * act
    assert report.parameter_bytes == 0


class _SaveOnlyOutput(torch.autograd.Function):
    """y = exp(x), saving only y (dy/dx = y): the pattern of MEFT's reversible Function."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return grad_y * y


def test_custom_function_that_saves_only_its_output():
    x = torch.randn(32, 16, requires_grad=True)
    report = measure_activation_memory(lambda: _SaveOnlyOutput.apply(x).sum())
    assert report.activation_bytes == x.numel() * F32 and report.num_saved_tensors == 1
    torch.testing.assert_close(x.grad, x.exp())  # backward through the meter still correct


def test_hugging_face_outputs_with_a_loss_are_accepted():
    from transformers.modeling_outputs import SequenceClassifierOutput

    layer = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    report = measure_activation_memory(lambda: SequenceClassifierOutput(loss=layer(x).sum()), layer)
    assert report.activation_bytes == x.numel() * F32


def test_backward_false_leaves_no_gradients():
    layer = nn.Linear(3, 3)
    measure_activation_memory(lambda: layer(torch.randn(2, 3)).sum(), layer, backward=False)
    assert layer.weight.grad is None


def test_measure_activation_memory_bad_input():
    with pytest.raises(TypeError, match="function"):
        measure_activation_memory(torch.zeros(3))
    with pytest.raises(TypeError, match="loss tensor"):
        measure_activation_memory(lambda: 3.0)
    with pytest.raises(ValueError, match="does not require grad"):
        measure_activation_memory(lambda: torch.zeros(3).sum())


def test_gradient_checkpointing_cuts_minilm_activation_memory(minilm_encoder):
    model = minilm_encoder
    ids = torch.randint(1000, 20000, (2, 32))
    step = lambda: model(input_ids=ids).last_hidden_state.pow(2).mean()  # noqa: E731
    model.train()
    try:
        full = measure_activation_memory(step, model)
        model.activation_checkpointing_enable()
        checkpointed = measure_activation_memory(step, model)
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    # checkpointing keeps ~one hidden state per layer instead of everything inside it
    assert checkpointed.activation_bytes < full.activation_bytes / 8
    # 6 layers x (2, 32, 384) hidden states is the least it can keep
    assert checkpointed.activation_bytes >= 6 * 2 * 32 * 384 * F32


_LARGE_TEMPORARY = """
import json, torch
from course_lib.meters import measure_peak_process_memory
size = 64 * 2**20  # 64 MiB
def step():
    block = torch.ones(size // 4)  # touched pages count in RSS
    return float(block[-1])
report = measure_peak_process_memory(step)
print(json.dumps({"baseline": report.baseline_bytes, "peak": report.peak_bytes, "increase": report.increase_bytes}))
"""


def test_peak_process_memory_sees_a_large_temporary():
    """In a fresh process: in this one, memory that earlier tests freed but the allocator kept can
    serve the temporary without a new page (the increase then reads 0, as the docstring warns;
    seen once in a full `make test` run)."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _LARGE_TEMPORARY], capture_output=True, text=True, timeout=120,
                            check=True)  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["peak"] >= report["baseline"]
    assert report["increase"] >= 0.85 * 64 * 2**20
    with pytest.raises(TypeError):
        measure_peak_process_memory(None)


# ----------------------------------------------------------------------------- activation density


class _TinyMLP(nn.Module):
    """x -> Linear -> ReLU (a module named mlp.act) -> Linear, like one transformer MLP."""

    def __init__(self, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, hidden)
        self.mlp.act = nn.ReLU()
        self.mlp.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc2(self.mlp.act(self.mlp.fc1(x)))


def test_count_active_by_hand():
    a = torch.tensor([[0.0, 1e-3, -2.0, 0.0]])
    assert count_active(a) == (2, 4)
    assert count_active(a, threshold=0.01) == (1, 4)
    with pytest.raises(ValueError, match="threshold"):
        count_active(a, threshold=-1.0)


def test_count_active_masks_padding_tokens():
    a = torch.ones(2, 3, 4)  # (B, T, H): every entry non-zero
    a[0, 0, :2] = 0.0  # two zeros in a real token
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # 3 real tokens, 3 padding
    assert count_active(a) == (22, 24)
    assert count_active(a, attention_mask=mask) == (3 * 4 - 2, 3 * 4)
    with pytest.raises(ValueError, match="does not match"):
        count_active(a, attention_mask=torch.ones(2, 4))


def test_activation_density_matches_brute_force_on_a_relu_mlp():
    torch.manual_seed(0)
    model = _TinyMLP()
    x = torch.randn(5, 7, 8)
    hidden = torch.relu(model.mlp.fc1(x))  # reference: recompute the activation by hand
    density = activation_density(model, x)
    assert list(density) == ["mlp.act"]  # found by the default patterns
    assert density["mlp.act"] == pytest.approx((hidden != 0).float().mean().item())
    tau = 0.3
    assert activation_density(model, x, threshold=tau)["mlp.act"] == pytest.approx((hidden.abs() > tau).float().mean().item())


def test_density_over_batches_pools_counts():
    torch.manual_seed(1)
    model = _TinyMLP()
    batches = [torch.randn(4, 8), torch.randn(6, 8)]
    pooled = activation_density(model, torch.cat(batches))
    assert density_over_batches(model, batches) == pytest.approx(pooled)


def test_pattern_that_matches_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="no module .* matches"):
        activation_density(_TinyMLP(), torch.randn(2, 8), module_pattern=r"does_not_exist")
    with pytest.raises(ValueError, match="module_pattern"):
        find_activation_modules(nn.Sequential(nn.Linear(2, 2)))  # no default pattern matches
    with pytest.raises(ValueError, match="regular expression"):
        find_activation_modules(_TinyMLP(), "(")


def test_density_restores_training_mode_and_removes_hooks():
    model = _TinyMLP().train()
    activation_density(model, torch.randn(2, 8))
    assert model.training
    assert not model.mlp.act._forward_hooks


def test_collector_keeps_graph_for_a_loss_when_asked():
    model = _TinyMLP()
    x = torch.randn(3, 8)
    with ActivationCollector(model, detach=False) as collector:
        model(x)
        activation = collector.activations["mlp.act"]
        assert activation.requires_grad
        (activation**2).mean().backward()  # a loss on the activations reaches fc1
    assert model.mlp.fc1.weight.grad is not None
    assert not model.mlp.act._forward_hooks
    with ActivationCollector(model) as collector:
        model(x)
    assert not collector.activations["mlp.act"].requires_grad
    torch.testing.assert_close(collector.activations["mlp.act"], torch.relu(model.mlp.fc1(x)).detach())


def test_density_counter_needs_a_forward_pass():
    with DensityCounter(_TinyMLP()) as counter:
        pass
    with pytest.raises(ValueError, match="forward pass"):
        counter.densities()


def test_minilm_activation_module_is_post_gelu_and_baseline_is_dense(minilm_encoder, minilm_tokenizer):
    texts = ["The food was great but the service was slow.", "A cat.", "I did not like this film at all."]
    batch = dict(minilm_tokenizer(texts, padding=True, return_tensors="pt"))
    modules = find_activation_modules(minilm_encoder)
    assert len(modules) == 6 and all("intermediate_act_fn" in name for name in modules)
    # reference: the output of each BertIntermediate block (dense + GELU), read by a separate hook
    outputs = []
    handles = [layer.intermediate.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in minilm_encoder.encoder.layer]
    try:
        density = activation_density(minilm_encoder, batch, attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].bool()
    for value, output in zip(density.values(), outputs):
        assert value == pytest.approx((output[mask] != 0).float().mean().item())
    mean = sum(density.values()) / len(density)
    assert 0.99 < mean <= 1.0  # DEFT: a baseline MiniLM is ~99.8% exactly non-zero


def test_activation_patterns_follow_peft_conventions():
    """One convention for every module pattern in course_lib: a regex matching the whole name, or a
    list of name endings (Hugging Face peft's target_modules); a regex that only matches inside a
    name is refused with the whole-name form to write."""
    model = nn.Sequential(_TinyMLP(), _TinyMLP())  # names 0.mlp.act and 1.mlp.act
    assert list(find_activation_modules(model, r".*mlp\.act")) == ["0.mlp.act", "1.mlp.act"]
    assert list(find_activation_modules(model, ["mlp.act"])) == ["0.mlp.act", "1.mlp.act"]
    assert list(find_activation_modules(model, r"0\.mlp\.act")) == ["0.mlp.act"]
    with pytest.raises(ValueError, match=r"matches inside 2 name\(s\).*'\.\*mlp\\\\.act'"):
        find_activation_modules(model, r"mlp\.act$")
    with pytest.raises(TypeError, match="list of name endings"):
        find_activation_modules(model, 3)


def test_density_counts_real_tokens_by_default_where_a_mask_exists():
    """mask_padding=True is the default everywhere (DEFTLoss, SparsityConfig, the meters): real
    tokens where a batch carries an attention mask, every position where it has none."""
    class Tokens(nn.Module):  # input_ids (B, T) -> a ReLU'd embedding (B, T, 4): zeros where ids are 0
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, input_ids, attention_mask=None):
            return self.act(input_ids.float()[..., None].expand(-1, -1, 4) - 0.5)

    ids = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])  # padding id 0 gives zeros
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    assert density_over_batches(Tokens(), [batch], "act") == {"act": 1.0}  # real tokens only
    assert density_over_batches(Tokens(), [batch], "act", mask_padding=False) == {"act": 3 / 8}
    assert density_over_batches(Tokens(), [{"input_ids": ids}], "act") == {"act": 3 / 8}  # no mask, no padding known
