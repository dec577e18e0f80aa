"""Backward without stored activations: a custom autograd Function over a stack of couplings.

Plain autograd keeps, for every layer, what each operation needs for its backward pass (the
input of every Linear with a trainable weight, GELU's input, softmax's output, dropout masks...).
For a stack of `ReversibleCoupling`s none of that is needed: the forward pass runs without a
graph and saves only the stack's two output streams; the backward pass walks the layers from the
top down and, for each one,

    1. recomputes g = G(y1) with a graph                        (y1 is known: an output)
    2. reconstructs x2 = (y2 - g) / beta
    3. backpropagates dy2 through G: parameter gradients of G, and dL/dy1 += G'(y1)^T dy2
    4. recomputes f = F(x2) with a graph, reconstructs x1 = (y1 - f) / lambda
    5. backpropagates dL/dy1 through F: parameter gradients of F, and G-free part of dL/dx2
    6. dL/dx1 = lambda dL/dy1,   dL/dx2 = beta dL/dy2 + F'(x2)^T dL/dy1

so each F and G runs twice in all (once in forward, once in backward), like a layer under
gradient checkpointing, and memory stays flat in the number of layers.

Choices that keep it cheap and correct:

- trainable parameters are *inputs* of the Function and their gradients its return values, so
  autograd calls backward even when the stack's input needs no gradient (frozen embeddings),
  `torch.autograd.grad(loss, params)` works, and frozen weights get no weight gradient at all;
- the values computed in step 1 and 4 serve both the reconstruction and the backward pass (no
  second forward);
- dropout: the random state is saved before every F and G call in forward and restored before
  the recomputation, so the recomputed masks are the forward's masks; the global state is put
  back afterwards (`torch.random.fork_rng`);
- at the bottom of the stack, dL/dx2 through F is skipped when the stack's input needs none;
- with float64 streams around float32 layers, one parity bit per element of each F and G input
  lets the backward rebuild those inputs exactly (`course_lib.meft.rounding`).

Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from course_lib.meft.coupling import ReversibleCoupling, _check_streams
from course_lib.meft.rounding import pack_parity, round_with_parity

__all__ = ["ReversibleStackFunction", "reversible_stack", "run_couplings"]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class ReversibleStackFunction(torch.autograd.Function):
    """forward(x1, x2, mask, couplings, exact_inputs, *trainable_params) -> (out1, out2); saves only
    the outputs (and, with exact_inputs, the parity bits of every layer input).

    Use `reversible_stack`, which collects the parameters. Derived in
    notebooks/part4_meft/31_reversible_layers.ipynb.
    """

    @staticmethod
    def forward(ctx, x1, x2, attention_mask, couplings, exact_inputs, *params):  # type: ignore[override]
        # runs without a graph (autograd.Function.forward is under no_grad)
        replay_dropout = any(coupling.training for coupling in couplings)
        states, bits, bit_slots = [], [], []  # bit_slots[i] = (F's, G's) index into bits, -1: none

        def parity_of(layer_input: torch.Tensor | None) -> int:
            if not exact_inputs or layer_input is None:
                return -1
            bits.append(pack_parity(layer_input))  # 1 bit per element (course_lib.meft.rounding)
            return len(bits) - 1

        for coupling in couplings:
            if replay_dropout:
                states.append(_rng_state(x1.device))  # before F: dropout inside F
            f_input = coupling.layer_input(x2)
            f_slot = parity_of(f_input)
            y1 = coupling.first_half(x1, x2, attention_mask, f_input)
            if replay_dropout:
                states.append(_rng_state(x1.device))  # before G
            g_input = coupling.layer_input(y1)
            bit_slots.append((f_slot, parity_of(g_input)))
            y2 = coupling.second_half(x2, y1, attention_mask, g_input)
            x1, x2 = (y2, y1) if coupling.swap_outputs else (y1, y2)
        ctx.couplings = couplings
        ctx.has_mask = attention_mask is not None
        ctx.replay_dropout = replay_dropout
        ctx.num_states = len(states)
        ctx.bit_slots = bit_slots
        ctx.index = {id(p): i for i, p in enumerate(params)}  # parameter -> position among the inputs
        ctx.num_params = len(params)
        masks = [attention_mask] if attention_mask is not None else []
        # the only tensors kept for backward: the two output streams (+ the mask, RNG states and
        # with exact_inputs the parity bits of every F and G input)
        ctx.save_for_backward(x1, x2, *masks, *states, *bits)
        return x1, x2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out1, grad_out2):  # type: ignore[override]
        saved = ctx.saved_tensors
        out1, out2 = saved[0], saved[1]
        attention_mask = saved[2] if ctx.has_mask else None
        rest = saved[3:] if ctx.has_mask else saved[2:]
        states, bits = rest[: ctx.num_states], rest[ctx.num_states :]
        device = out1.device
        need_input_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        param_grads: list[torch.Tensor | None] = [None] * ctx.num_params

        def accumulate(params: list[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
            for p, g in zip(params, grads):
                if g is None:
                    continue
                i = ctx.index[id(p)]
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g

        d1, d2 = grad_out1, grad_out2
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, enabled=ctx.replay_dropout):
            for i in reversed(range(len(ctx.couplings))):
                coupling = ctx.couplings[i]
                # the layer's own (y1, y2) and their gradients
                if coupling.swap_outputs:
                    y1, y2, dy1, dy2 = out2, out1, d2, d1
                else:
                    y1, y2, dy1, dy2 = out1, out2, d1, d2
                g_params, f_params = _trainable(coupling.G), _trainable(coupling.F)

                # 1-3: G with a graph; x2 from it; dy2 through G
                if ctx.replay_dropout:
                    _set_rng_state(states[2 * i + 1], device)
                f_slot, g_slot = ctx.bit_slots[i]
                g_input = _exact_input(coupling, y1, bits, g_slot)
                with torch.enable_grad():
                    y1_leaf = y1.detach().requires_grad_(True)
                    g = coupling.run_G(y1_leaf, attention_mask, g_input)  # (B, T, C)
                grads = torch.autograd.grad(g, [y1_leaf, *g_params], dy2, allow_unused=True)
                accumulate(g_params, grads[1:])
                dy1 = dy1 + grads[0] if grads[0] is not None else dy1  # dL/dy1 = dy1 + G'(y1)^T dy2
                x2 = (y2 - g.detach()) / coupling.beta  # x2 = (y2 - G(y1)) / beta
                del g, grads, y1_leaf

                # 4-5: F with a graph; x1 from it; dL/dy1 through F
                need_x2_grad = i > 0 or need_input_grad
                if ctx.replay_dropout:
                    _set_rng_state(states[2 * i], device)
                f_input = _exact_input(coupling, x2, bits, f_slot)
                with torch.enable_grad():
                    x2_leaf = x2.detach().requires_grad_(need_x2_grad)
                    f = coupling.run_F(x2_leaf, attention_mask, f_input)  # (B, T, C)
                inputs = ([x2_leaf] if need_x2_grad else []) + f_params
                grads = torch.autograd.grad(f, inputs, dy1, allow_unused=True) if inputs and f.requires_grad else [None] * len(inputs)
                accumulate(f_params, grads[1:] if need_x2_grad else grads)
                x1 = (y1 - f.detach()) / coupling.lambda_  # x1 = (y1 - F(x2)) / lambda
                dx2 = coupling.beta * dy2  # dL/dx2 = beta dy2 + F'(x2)^T dL/dy1
                if need_x2_grad and grads[0] is not None:
                    dx2 = dx2 + grads[0]
                dx1 = coupling.lambda_ * dy1  # dL/dx1 = lambda dL/dy1
                del f, grads, x2_leaf

                out1, out2, d1, d2 = x1, x2, dx1, dx2  # the layer below sees (x1, x2) as its outputs
        return (
            d1 if ctx.needs_input_grad[0] else None,
            d2 if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            *param_grads,
        )


def _exact_input(coupling: ReversibleCoupling, stream: torch.Tensor, bits: Sequence[torch.Tensor], slot: int):
    """The forward's layer input, rebuilt from the reconstructed stream and its parity bits."""
    if slot < 0:
        return None
    return round_with_parity(stream.detach(), bits[slot], coupling.compute_dtype)


def reversible_stack(
    couplings: Sequence[ReversibleCoupling],
    x1: torch.Tensor,
    x2: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exact_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `couplings` in turn on (x1, x2), keeping only the two outputs for backward.

    Gradients equal those of `run_couplings` (plain autograd) up to the reconstruction error of
    the inverse. Works whether or not x1/x2 require grad: the trainable parameters of the
    couplings are passed to the Function, so backward runs if any of them trains. With no
    gradient needed at all (torch.no_grad, or nothing trainable) it simply runs the layers.

    `exact_inputs` (default True) matters when the couplings cast the streams to a
    `compute_dtype` (float64 streams around float32 layers): the forward keeps one parity bit per
    element of every F and G input, and the backward uses them to rebuild those inputs exactly
    (`course_lib.meft.rounding`), so that the recomputed F and G equal the forward's and the
    gradients equal plain autograd's as long as the streams' reconstruction error stays below half
    a float32 step. Cost: 2 bits per element per coupling. Without a cast it stores nothing.

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """
    couplings = tuple(couplings)
    if not couplings:
        raise ValueError("reversible_stack needs at least one ReversibleCoupling")
    for coupling in couplings:
        if not isinstance(coupling, ReversibleCoupling):
            raise TypeError(f"reversible_stack runs ReversibleCoupling modules, got {type(coupling).__name__}")
    _check_streams(x1, x2, "reversible_stack")
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for coupling in couplings:
        for p in coupling.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or bool(params))
    if not needs_grad:
        return run_couplings(couplings, x1, x2, attention_mask)
    return ReversibleStackFunction.apply(x1, x2, attention_mask, couplings, bool(exact_inputs), *params)


def run_couplings(
    couplings: Sequence[ReversibleCoupling],
    x1: torch.Tensor,
    x2: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same stack through plain autograd (stores every activation): the reference to check against.

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """
    for coupling in couplings:
        x1, x2 = coupling(x1, x2, attention_mask)
    return x1, x2
