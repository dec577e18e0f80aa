"""Tests of course_lib.meft: the coupling and its inverse, the custom backward against plain
autograd, dropout replay, MEFT on MiniLM against Hugging Face's own layers, and the per-module
attribution of saved tensors in course_lib.meters.

References are plain autograd on the same modules (computed with torch's own backward) and the
Hugging Face BertLayer, never the code under test.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from course_lib.meft import (
    MEFT_VARIANTS,
    ReversibleCoupling,
    build_method,
    gradient_errors,
    meft_from_hf,
    pack_parity,
    reversible_and_plain_gradients,
    reversible_stack,
    round_with_parity,
    run_couplings,
    with_num_layers,
)
from course_lib.meters import NO_MODULE, SavedTensorRecorder, measure_activation_memory

F32 = 4


class TinyPart(nn.Module):
    """A small F or G: Linear -> GELU -> dropout -> Linear, called as part(x, mask)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x, attention_mask=None):
        return self.net(x)


def tiny_stack(depth=4, dim=16, lambda_=0.5, beta=0.8, dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    couplings = nn.ModuleList(
        ReversibleCoupling(TinyPart(dim, dropout), TinyPart(dim, dropout), lambda_, beta, swap_outputs=i % 2 == 0)
        for i in range(depth)
    )
    return couplings.to(dtype)


def grads_of(couplings, x1, x2, *, reversible: bool, seed: int = 7, exact_inputs: bool = True):
    """Loss = weighted sum of both outputs; returns (grads of parameters, grads of inputs)."""
    for p in couplings.parameters():
        p.grad = None
    for x in (x1, x2):
        if x.grad is not None:
            x.grad = None
    torch.manual_seed(seed)
    run = functools.partial(reversible_stack, exact_inputs=exact_inputs) if reversible else run_couplings
    out1, out2 = run(couplings, x1, x2)
    weights = torch.linspace(-1, 1, out1.numel(), dtype=out1.dtype).view_as(out1)
    ((out1 * weights).sum() + (out2**2).sum()).backward()
    params = [p.grad.clone() for p in couplings.parameters()]
    inputs = [None if x.grad is None else x.grad.clone() for x in (x1, x2)]
    return params, inputs


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------- coupling


@pytest.mark.parametrize("swap", [False, True])
def test_inverse_of_forward_is_identity(swap):
    torch.manual_seed(0)
    coupling = ReversibleCoupling(TinyPart(8), TinyPart(8), lambda_=0.1, beta=0.1, swap_outputs=swap).double().eval()
    x1, x2 = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    y = coupling(x1, x2)
    # by hand: y1 = 0.1 x1 + F(x2), y2 = 0.1 x2 + G(y1)
    with torch.no_grad():
        y1 = 0.1 * x1 + coupling.F.net(x2)
        y2 = 0.1 * x2 + coupling.G.net(y1)
    assert torch.allclose(y[0], y2 if swap else y1) and torch.allclose(y[1], y1 if swap else y2)
    r1, r2 = coupling.inverse(*y)
    assert torch.allclose(r1, x1, atol=1e-12) and torch.allclose(r2, x2, atol=1e-12)
    coupling.float()
    r1, r2 = coupling.inverse(*coupling(x1.float(), x2.float()))
    assert torch.allclose(r1, x1.float(), atol=1e-4) and torch.allclose(r2, x2.float(), atol=1e-5)


def test_coupling_rejects_bad_input():
    with pytest.raises(ValueError, match="non-zero"):
        ReversibleCoupling(TinyPart(4), TinyPart(4), lambda_=0.0)
    with pytest.raises(TypeError, match="nn.Modules"):
        ReversibleCoupling(lambda x, m: x, TinyPart(4))
    coupling = ReversibleCoupling(TinyPart(4), TinyPart(4))
    with pytest.raises(ValueError, match="same shape"):
        coupling(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="at least one"):
        reversible_stack([], torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(TypeError, match="ReversibleCoupling"):
        reversible_stack([nn.Linear(4, 4)], torch.randn(1, 2, 4), torch.randn(1, 2, 4))


# ------------------------------------------------------------------------------- custom backward


@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_custom_backward_equals_autograd_float64(inputs_need_grad):
    couplings = tiny_stack(lambda_=0.1, beta=0.1)
    x1 = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=inputs_need_grad)
    x2 = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=inputs_need_grad)
    reversible, reversible_inputs = grads_of(couplings, x1, x2, reversible=True)
    plain, plain_inputs = grads_of(couplings, x1, x2, reversible=False)
    for a, b in zip(reversible, plain):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    if inputs_need_grad:
        for a, b in zip(reversible_inputs, plain_inputs):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    else:  # no trainable-embedding workaround needed: parameters got gradients all the same
        assert reversible_inputs == [None, None] and all(g.abs().sum() > 0 for g in reversible)


def test_custom_backward_float32_within_tolerance_and_saves_only_outputs():
    couplings = tiny_stack(lambda_=0.5, beta=0.8, dtype=torch.float32)
    x1, x2 = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    reversible, _ = grads_of(couplings, x1, x2, reversible=True)
    plain, _ = grads_of(couplings, x1, x2, reversible=False)
    assert max(max_rel(a, b) for a, b in zip(reversible, plain)) < 1e-4
    # what the Function keeps: its two outputs, nothing per layer (eval: no random states)
    couplings.eval()
    report = measure_activation_memory(lambda: sum(o.sum() for o in reversible_stack(couplings, x1, x2)), couplings)
    assert report.activation_bytes == 2 * x1.numel() * F32
    plain_report = measure_activation_memory(lambda: sum(o.sum() for o in run_couplings(couplings, x1, x2)), couplings)
    assert plain_report.activation_bytes > 4 * report.activation_bytes


def test_outputs_are_kept_unless_overwrite_outputs():
    """By default the backward leaves the returned outputs as they are (the caller may read them);
    with overwrite_outputs it rebuilds the stack's inputs in their buffers, gradients unchanged, and
    a second backward through the graph is refused instead of computing garbage."""
    couplings = tiny_stack(depth=3)
    x1 = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 3, 16, dtype=torch.float64)
    params = list(couplings.parameters())
    grads = {}
    for overwrite in (False, True):
        out1, out2 = reversible_stack(couplings, x1, x2, overwrite_outputs=overwrite)
        kept = out1.detach().clone(), out2.detach().clone()
        loss = out1.sum() + out2.pow(2).sum()
        grads[overwrite] = torch.autograd.grad(loss, [x1, *params], retain_graph=True)
        if not overwrite:
            assert torch.equal(out1, kept[0]) and torch.equal(out2, kept[1])
        else:  # the buffers now hold the inputs (x1, x2), up to float64 rounding of the inverse
            assert not torch.equal(out1, kept[0])
            assert torch.allclose(out1, x1, atol=1e-10) and torch.allclose(out2, x2, atol=1e-10)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(loss, [x1, *params])
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


def test_autograd_grad_and_hybrid_use():
    couplings = tiny_stack(depth=3)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    params = list(couplings.parameters())
    # torch.autograd.grad (not just .backward) works: gradients are the Function's return values
    out = reversible_stack(couplings, x, x)
    ours = torch.autograd.grad(out[0].sum() + out[1].pow(2).sum(), params)
    out = run_couplings(couplings, x, x)
    reference = torch.autograd.grad(out[0].sum() + out[1].pow(2).sum(), params)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(ours, reference))
    # under no_grad it simply runs the layers
    with torch.no_grad():
        a = reversible_stack(couplings, x, x)
    assert not a[0].requires_grad and torch.allclose(a[0], out[0])


def test_dropout_is_replayed():
    couplings = tiny_stack(dropout=0.3).train()
    x1 = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 4, 16, dtype=torch.float64)
    reversible, (dx1, _) = grads_of(couplings, x1, x2, reversible=True, seed=3)
    state_after = torch.get_rng_state()
    plain, (dx1_plain, _) = grads_of(couplings, x1, x2, reversible=False, seed=3)
    assert torch.equal(state_after, torch.get_rng_state())  # backward leaves the global RNG where forward left it
    assert torch.allclose(dx1, dx1_plain, rtol=1e-9, atol=1e-11)
    for a, b in zip(reversible, plain):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    # the check can fail: another seed in the reference gives other masks, other gradients
    other, _ = grads_of(couplings, x1, x2, reversible=False, seed=4)
    assert max(max_rel(a, b) for a, b in zip(reversible, other)) > 1e-3


# ------------------------------------------------------------------------------- MEFT on MiniLM


@pytest.fixture(scope="module")
def minilm_classifier():
    from course_lib.text import load_classifier
    from course_lib.train import set_seed

    set_seed(0)
    return load_classifier(num_labels=4).eval()


@pytest.fixture(scope="module")
def small_batch(minilm_classifier):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 3])}


def _hf_mask(mask):
    return torch.where(mask.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]


def test_meft1_with_zero_adapters_follows_hugging_face_layers(minilm_classifier, small_batch):
    model = meft_from_hf(minilm_classifier, "meft1").eval()
    for module in model.modules():
        if hasattr(module, "up") and hasattr(module, "down"):
            nn.init.zeros_(module.up.weight)
    ids, mask = small_batch["input_ids"], small_batch["attention_mask"]
    with torch.no_grad():
        x1, x2 = model.encoder.streams(ids, mask)
        # reference: the same recursion with Hugging Face's own BertLayer
        bert = minilm_classifier.bert
        a = b = bert.embeddings(input_ids=ids)
        for layer in bert.encoder.layer:
            out = layer(b, attention_mask=_hf_mask(mask))
            out = out[0] if isinstance(out, tuple) else out
            a, b = b, 0.1 * a + out  # G = 0, beta = 1: y2 = x2; outputs swapped
    real = mask.bool()
    assert torch.allclose(x1[real].float(), a[real], atol=1e-4) and torch.allclose(x2[real].float(), b[real], atol=1e-4)


def test_starting_point_is_kept_at_initialisation(minilm_classifier, small_batch):
    ids, mask = small_batch["input_ids"], small_batch["attention_mask"]
    with torch.no_grad():
        reference = minilm_classifier.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()

    def closest_stream_cosine(model):
        with torch.no_grad():
            streams = model.encoder.streams(ids, mask)
        return max(nn.functional.cosine_similarity(s.float()[real], reference[real], dim=-1).mean().item() for s in streams)

    torch.manual_seed(0)
    for name in MEFT_VARIANTS:
        assert closest_stream_cosine(meft_from_hf(minilm_classifier, name).eval()) > 0.95, name
    broken = meft_from_hf(minilm_classifier, "meft1", lambda_=1.0, beta=1.0).eval()  # RevNet-style scales
    assert closest_stream_cosine(broken) < 0.9
    assert minilm_classifier.bert.encoder.layer[0].attention.self.query.weight.requires_grad  # original untouched


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_meft_custom_backward_matches_plain_autograd_float64(minilm_classifier, small_batch, variant):
    two_layers = with_num_layers(minilm_classifier, 2).double()
    torch.manual_seed(0)
    model = meft_from_hf(two_layers, variant).train()  # dropout on: replayed
    reversible_grads, plain_grads = reversible_and_plain_gradients(model, small_batch, seed=5)
    assert model.reversible  # the switch is restored
    grads = {True: reversible_grads, False: plain_grads}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 2 * 2 * 4 + 2
    for name in grads[True]:
        assert torch.allclose(grads[True][name], grads[False][name], rtol=1e-7, atol=1e-10), name


def test_meft_trainable_parameters_hybrid_and_memory(minilm_classifier, small_batch):
    torch.manual_seed(0)
    model = meft_from_hf(minilm_classifier, "meft1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith("classifier.") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 12 * (384 * 8 + 8 + 8 * 384 + 384) + 384 * 4 + 4
    model.train()
    step = lambda: model(**small_batch).loss
    B, T, C = 2, 9, 384
    reversible = measure_activation_memory(step, model, backward=False).activation_bytes
    model.encoder.num_reversible_layers = 3  # hybrid: the upper 3 layers keep their activations
    hybrid = measure_activation_memory(step, model, backward=False).activation_bytes
    model.reversible = False
    plain = measure_activation_memory(step, model, backward=False).activation_bytes
    assert 2 * B * T * C * 8 <= reversible < 2 * B * T * C * 8 + 200_000  # two float64 streams + RNG states + head
    assert reversible < hybrid < plain
    with pytest.raises(ValueError, match="num_reversible_layers"):
        model.encoder.num_reversible_layers = 7


@pytest.mark.parametrize("exact_inputs", [True, False])
def test_meft_memory_is_flat_in_depth(minilm_classifier, small_batch, exact_inputs):
    sizes = {}
    for depth in (2, 4):
        torch.manual_seed(0)
        model = build_method("meft2", minilm_classifier, num_layers=depth, exact_inputs=exact_inputs)
        sizes[depth] = measure_activation_memory(lambda: model(**small_batch).loss, model, backward=False).activation_bytes
    rng_state_bytes = torch.get_rng_state().numel()  # saved twice per layer (before F and before G)
    B, T = small_batch["input_ids"].shape
    parity_bytes = math.ceil(B * T * 384 / 8) if exact_inputs else 0  # 1 bit per element of each F and G input
    assert sizes[4] - sizes[2] == 2 * 2 * (rng_state_bytes + parity_bytes)


# ------------------------------------------------------------------------------- exact layer inputs


def test_parity_bits_recover_the_rounded_value_across_a_midpoint():
    torch.manual_seed(0)
    exact = torch.randn(1001)  # float32 layer inputs (an odd count: the last byte is padded)
    above = torch.nextafter(exact, torch.full_like(exact, float("inf")))
    midpoint = (exact.double() + above.double()) / 2
    stream = midpoint * (1 + 1e-12 * torch.sign(midpoint))  # just past the midpoint, on the neighbour's side
    assert not torch.equal(stream.float(), exact)  # plain rounding lands on the neighbour...
    packed = pack_parity(exact)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(1001 / 8),)
    assert torch.equal(round_with_parity(stream, packed), exact)  # ...the parity bit brings it back
    nearby = exact.double() * (1 - 1e-10)  # close to a float32 value: rounding was right already
    assert torch.equal(round_with_parity(nearby, packed), exact)
    with pytest.raises(ValueError, match="pack_parity"):
        round_with_parity(stream[:-9], packed)
    with pytest.raises(TypeError, match="parity bits"):
        pack_parity(exact.double())


def float64_streams_stack(depth=8, dim=64, lambda_=0.1, beta=0.1, seed=0):
    """float32 layers on float64 streams, the course's MEFT default, with MEFT3's scales."""
    torch.manual_seed(seed)
    couplings = nn.ModuleList(
        ReversibleCoupling(TinyPart(dim), TinyPart(dim), lambda_, beta, swap_outputs=i % 2 == 0, compute_dtype=torch.float32)
        for i in range(depth)
    )
    return couplings.float()


def test_exact_inputs_make_the_custom_backward_match_autograd():
    couplings = float64_streams_stack(depth=8, dim=64)
    x1, x2 = (torch.randn(32, 32, 64).double() for _ in range(2))  # float32 values on float64 streams, as in MEFT
    plain, _ = grads_of(couplings, x1, x2, reversible=False)
    errors = {}
    for exact in (False, True):
        reversible, _ = grads_of(couplings, x1, x2, reversible=True, exact_inputs=exact)
        errors[exact] = max(max_rel(g, g_ref) for g, g_ref in zip(reversible, plain))
    assert errors[False] > 1e-4  # rounding flips in the recomputed inputs, amplified by 1/lambda per division
    # the forward's inputs exactly: what is left is the order of float sums in the backward
    assert errors[True] < 1e-6


def test_meft_on_minilm_with_exact_inputs_matches_autograd_bit_for_bit(minilm_classifier, small_batch):
    torch.manual_seed(0)
    model = meft_from_hf(minilm_classifier, "meft3").train()  # float32 layers, float64 streams, dropout on
    reversible_grads, plain_grads = reversible_and_plain_gradients(model, small_batch, seed=3)
    assert all(torch.equal(reversible_grads[name], plain_grads[name]) for name in plain_grads)


@pytest.mark.parametrize("batch_chunks", [2, 3])
def test_batch_chunks_replay_dropout_and_match_autograd_bit_for_bit(minilm_classifier, batch_chunks):
    """F and G on pieces of the batch (forward and custom backward alike): the gradients are plain
    autograd's of the same model, bit for bit, dropout on and padding in the batch."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (5, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 3, 0, 2, 1])}
    torch.manual_seed(0)
    model = meft_from_hf(minilm_classifier, "meft3", batch_chunks=batch_chunks).train()
    assert all(c.batch_chunks == batch_chunks for c in model.encoder.couplings)
    assert model.encoder.couplings[0].chunk_bounds(5) == ([(0, 2), (2, 5)] if batch_chunks == 2 else [(0, 2), (2, 3), (3, 5)])
    reversible_grads, plain_grads = reversible_and_plain_gradients(model, batch, seed=3)
    assert all(torch.equal(reversible_grads[name], plain_grads[name]) for name in plain_grads)
    # and the model is the same function as without pieces (up to float rounding) in eval mode
    torch.manual_seed(0)
    whole = meft_from_hf(minilm_classifier, "meft3").eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, whole(**batch).logits, atol=1e-5)


def test_batch_chunks_lower_the_backward_peak(minilm_classifier):
    from course_lib.meters import measure_peak_memory

    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(1000, 20000, (8, 64), generator=g), "labels": torch.zeros(8, dtype=torch.long)}
    peaks = {}
    for chunks in (1, 4):
        torch.manual_seed(0)
        model = meft_from_hf(minilm_classifier, "meft3", batch_chunks=chunks).train()
        peaks[chunks] = measure_peak_memory(lambda: model(**batch).loss.backward()).peak_minus_weights_mib
    # the (B, H, T, T) attention and (B, T, 4C) MLP tensors of the recomputed layer, a quarter as many
    assert peaks[4] < 0.8 * peaks[1], peaks


def test_meft_errors(minilm_classifier):
    with pytest.raises(ValueError, match="unknown MEFT variant"):
        meft_from_hf(minilm_classifier, "meft4")
    with pytest.raises(ValueError, match="batch_chunks must be an int >= 1"):
        meft_from_hf(minilm_classifier, "meft3", batch_chunks=0)
    with pytest.raises(TypeError, match="BertModel"):
        meft_from_hf(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown method"):
        build_method("qlora", minilm_classifier)
    model = meft_from_hf(minilm_classifier.bert, "meft3")  # a bare BertModel gives an encoder
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))


# ------------------------------------------------------------------------------- meters: who saved what


def test_saved_bytes_are_attributed_to_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.5), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    with SavedTensorRecorder(model, attribute_modules=True) as recorder:
        loss = model(x).pow(2).sum()
    report = recorder.report
    by_module = report.bytes_by_module()
    # by hand: Linear 0 saves x (5x6); GELU its input (5x8); dropout its mask (5x8);
    # Linear 3 its input (5x8); pow (outside every module) its input (5x3)
    assert by_module == {"1": 5 * 8 * F32, "2": 5 * 8 * F32, "3": 5 * 8 * F32, "0": 5 * 6 * F32, NO_MODULE: 5 * 3 * F32}
    assert sum(by_module.values()) == report.activation_bytes
    assert report.bytes_by_module(by="module_type")["Linear"] == (5 * 6 + 5 * 8) * F32
    assert measure_activation_memory(lambda: model(x).pow(2).sum(), model, attribute_modules=True).bytes_by_module() == by_module
    del loss
    with pytest.raises(ValueError, match="no module names"):
        measure_activation_memory(lambda: model(x).sum(), model).bytes_by_module()
    with pytest.raises(TypeError, match="nn.Module"):
        SavedTensorRecorder([x], attribute_modules=True)
    assert all(not hook for hook in (model[0]._forward_pre_hooks, model[0]._forward_hooks))  # hooks removed


def test_gradient_errors_by_hand():
    reference = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([4.0])}
    ours = {"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([4.0])}
    errors = gradient_errors(ours, reference)
    assert errors["max_rel_err"] == pytest.approx(0.5)  # |(-1) - (-2)| / 2
    assert errors["max_norm_rel_err"] == pytest.approx(1 / 5**0.5)  # ||(0, 1)|| / ||(1, -2)||
    assert errors["global_norm_rel_err"] == pytest.approx(1 / 21**0.5)  # 1 / ||(1, -2, 4)||
    with pytest.raises(ValueError, match="same"):
        gradient_errors({"a": reference["a"]}, reference)
    with pytest.raises(TypeError, match="reversible"):
        reversible_and_plain_gradients(nn.Linear(2, 2), {})


# ------------------------------------------------------------------------------- RoBERTa (issue 14)


@pytest.fixture(scope="module")
def tiny_roberta():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, num_labels=3, max_position_embeddings=40, pad_token_id=1)  # fmt: skip
    return transformers.RobertaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def roberta_batch():
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}


def test_meft_on_roberta_keeps_the_starting_point(tiny_roberta, roberta_batch):
    ids, mask = roberta_batch["input_ids"], roberta_batch["attention_mask"]
    with torch.no_grad():
        reference = tiny_roberta.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.manual_seed(0)
    for name in MEFT_VARIANTS:
        model = meft_from_hf(tiny_roberta, name).eval()
        assert model.head_reads_sequence and model.num_labels == 3
        with torch.no_grad():
            streams = model.encoder.streams(ids, mask)
        best = max(nn.functional.cosine_similarity(s.float()[real], reference[real], dim=-1).mean().item() for s in streams)
        assert best > 0.95, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith("classifier.") for n in trainable)
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= trainable  # RoBERTa's whole head trains


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_meft_on_roberta_custom_backward_matches_autograd_float64(tiny_roberta, roberta_batch, variant):
    torch.manual_seed(0)
    model = meft_from_hf(copy.deepcopy(tiny_roberta).double(), variant).train()
    reversible_grads, plain_grads = reversible_and_plain_gradients(model, roberta_batch, seed=5)
    assert reversible_grads.keys() == plain_grads.keys()
    for name in reversible_grads:
        assert torch.allclose(reversible_grads[name], plain_grads[name], rtol=1e-7, atol=1e-10), name


def test_meft_on_roberta_memory_is_flat_in_depth(roberta_batch):
    transformers = pytest.importorskip("transformers")
    sizes = {}
    for depth in (2, 4):
        torch.manual_seed(0)
        config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=depth, num_attention_heads=4,
                                            intermediate_size=64, num_labels=3, max_position_embeddings=40, pad_token_id=1)  # fmt: skip
        model = meft_from_hf(transformers.RobertaForSequenceClassification(config), "meft2").train()
        sizes[depth] = measure_activation_memory(lambda: model(**roberta_batch).loss, model, backward=False).activation_bytes
    B, T = roberta_batch["input_ids"].shape
    per_layer = 2 * (torch.get_rng_state().numel() + math.ceil(B * T * 32 / 8))  # RNG states and parity bits of F, G
    assert sizes[4] - sizes[2] == 2 * per_layer


def test_meft_saves_and_loads_its_trained_state(tiny_roberta, roberta_batch, tmp_path):
    from course_lib.meft import MEFTConfig, load_meft, meft, save_meft

    torch.manual_seed(0)
    model, _ = meft(tiny_roberta, MEFTConfig("meft3", train_layer_norms=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_meft(model.eval(), tmp_path / "meft")
    again, report = load_meft(tiny_roberta, tmp_path / "meft")
    assert again.meft_config == model.meft_config and not report.in_place
    with torch.no_grad():
        assert torch.equal(again.eval()(**roberta_batch).logits, model(**roberta_batch).logits)
    with pytest.raises(ValueError, match="no .meft_config"):
        save_meft(nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_meft(tiny_roberta, tmp_path)


# ------------------------------------------------------------------------------- GPT-2, a decoder (issue 14)


def _tiny_gpt2(depth: int = 2):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32,
                                                                n_layer=depth, n_head=4)).eval()  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_batch():
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_meft_on_gpt2_keeps_the_starting_point_and_trains_adapters_only(gpt2_batch):
    gpt2 = _tiny_gpt2()
    ids = gpt2_batch["input_ids"]
    with torch.no_grad():
        reference = gpt2.transformer(input_ids=ids).last_hidden_state  # after GPT-2's final LayerNorm
    torch.manual_seed(0)
    for name in MEFT_VARIANTS:
        model = meft_from_hf(gpt2, name).eval()
        with torch.no_grad():
            streams = model.encoder.streams(ids)
            best = max(nn.functional.cosine_similarity(model.final_norm(s.float()), reference, dim=-1).mean().item()
                       for s in streams)  # fmt: skip
        assert best > 0.95, name
    out = model(**gpt2_batch)
    assert out.logits.shape == (2, 9, 100) and out.loss.isfinite()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert model.lm_head.weight is model.encoder.embeddings.word_embeddings.weight  # tied, as in GPT-2
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        meft_from_hf(gpt2.transformer, "meft1")


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_meft_on_gpt2_custom_backward_matches_autograd_float64(gpt2_batch, variant):
    torch.manual_seed(0)
    model = meft_from_hf(_tiny_gpt2().double(), variant).train()
    reversible_grads, plain_grads = reversible_and_plain_gradients(model, gpt2_batch, seed=5)
    assert reversible_grads.keys() == plain_grads.keys() and len(reversible_grads) == 2 * 2 * 4
    for name in reversible_grads:
        assert torch.allclose(reversible_grads[name], plain_grads[name], rtol=1e-7, atol=1e-10), name


def test_meft_on_gpt2_memory_is_flat_in_depth(gpt2_batch):
    sizes = {}
    for depth in (2, 4):
        torch.manual_seed(0)
        model = meft_from_hf(_tiny_gpt2(depth), "meft2").train()
        sizes[depth] = measure_activation_memory(lambda: model(**gpt2_batch).loss, model, backward=False).activation_bytes
    B, T = gpt2_batch["input_ids"].shape
    per_layer = 2 * (torch.get_rng_state().numel() + math.ceil(B * T * 32 / 8))
    assert sizes[4] - sizes[2] == 2 * per_layer
