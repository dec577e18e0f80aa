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
- the four streams (y1, y2, dy1, dy2) are rebuilt in place as the walk goes down: the backward
  holds four stream buffers however deep the stack (`overwrite_outputs=True` lets it reuse the
  two outputs' buffers as well);
- with `batch_chunks` > 1 on a coupling, F and G are recomputed and differentiated one piece of
  the batch at a time, so only one piece's graph (attention weights, MLP activations) is alive:
  the peak of a step falls by about that factor, the gradients stay bit for bit plain autograd's
  on the same (pieced) forward;
- with float64 streams around float32 layers, one parity bit per element of each F and G input
  lets the backward rebuild those inputs exactly (`course_lib.meft.rounding`).

Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from course_lib.meft.coupling import ReversibleCoupling, _check_streams, batch_rows
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
    """forward(x1, x2, mask, couplings, exact_inputs, overwrite_outputs, *trainable_params) -> (out1, out2);
    saves only the outputs (and, with exact_inputs, the parity bits of every layer input).

    Use `reversible_stack`, which collects the parameters. Derived in
    notebooks/part4_meft/31_reversible_layers.ipynb.
    """

    @staticmethod
    def forward(ctx, x1, x2, attention_mask, couplings, exact_inputs, overwrite_outputs, *params):  # type: ignore[override]
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
        ctx.overwrite_outputs = bool(overwrite_outputs)
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
        # The four streams (y1, y2 and their gradients) are rewritten in place as the walk goes
        # down, so the whole backward holds four (B, T, C) buffers instead of allocating new ones
        # at every step (MEFT's streams are float64: 12.6 MiB each at batch 32 x 128 x 384). The
        # top layer's tensors are not ours: the incoming gradients (autograd may hand the same
        # tensor to both streams) and the saved outputs, which the caller may still read; that
        # step computes them out of place, unless overwrite_outputs says the outputs are free to
        # reuse. From then on every buffer is one this backward allocated.
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, enabled=ctx.replay_dropout):
            for i in reversed(range(len(ctx.couplings))):
                coupling = ctx.couplings[i]
                below_top = i < len(ctx.couplings) - 1
                owned = below_top or ctx.overwrite_outputs  # may y1, y2 be overwritten?
                owned_grads = below_top  # may dy1, dy2?
                # the layer's own (y1, y2) and their gradients
                if coupling.swap_outputs:
                    y1, y2, dy1, dy2 = out2, out1, d2, d1
                else:
                    y1, y2, dy1, dy2 = out1, out2, d1, d2
                del out1, out2, d1, d2
                g_params, f_params = _trainable(coupling.G), _trainable(coupling.F)

                # 1-3: G with a graph; x2 from it; dy2 through G (one piece of the batch at a
                # time, coupling.batch_chunks, so that one piece's graph is alive at a time)
                bounds = coupling.chunk_bounds(y1.shape[0])
                if ctx.replay_dropout:
                    _set_rng_state(states[2 * i + 1], device)
                f_slot, g_slot = ctx.bit_slots[i]
                g_input = _exact_input(coupling, y1, bits, g_slot)
                dy1 = dy1 if owned_grads else dy1.clone()  # dL/dy1 = dy1 + G'(y1)^T dy2
                x2 = y2 if owned else y2.clone()  # x2 = (y2 - G(y1)) / beta
                del y2
                g_grads = _undo_half(coupling.run_G, g_params, y1, x2, dy2, dy1, coupling.beta, bounds, attention_mask, g_input)
                accumulate(g_params, g_grads)
                del g_input, g_grads
                dx2 = _scale(dy2, coupling.beta, owned_grads)  # dL/dx2 = beta dy2 (+ F'(x2)^T dL/dy1 below)
                del dy2

                # 4-5: F with a graph; x1 from it; dL/dy1 through F, in the same pieces
                need_x2_grad = i > 0 or need_input_grad
                if ctx.replay_dropout:
                    _set_rng_state(states[2 * i], device)
                f_input = _exact_input(coupling, x2, bits, f_slot)
                x1 = y1 if owned else y1.clone()  # x1 = (y1 - F(x2)) / lambda
                del y1
                f_grads = _undo_half(coupling.run_F, f_params, x2, x1, dy1, dx2 if need_x2_grad else None,
                                     coupling.lambda_, bounds, attention_mask, f_input)  # fmt: skip
                accumulate(f_params, f_grads)
                del f_input, f_grads
                dx1 = _scale(dy1, coupling.lambda_, True)  # dL/dx1 = lambda dL/dy1 (dy1 is ours by now)
                del dy1

                out1, out2, d1, d2 = x1, x2, dx1, dx2  # the layer below sees (x1, x2) as its outputs
                del x1, x2, dx1, dx2
        return (
            d1 if ctx.needs_input_grad[0] else None,
            d2 if ctx.needs_input_grad[1] else None,
            None,  # attention_mask
            None,  # couplings
            None,  # exact_inputs
            None,  # overwrite_outputs
            *param_grads,
        )


def _undo_half(run, params: list[nn.Parameter], inp: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor,
               grad_in: torch.Tensor | None, scale: float, bounds: list[tuple[int, int]],
               attention_mask: torch.Tensor | None, exact_input: torch.Tensor | None) -> list[torch.Tensor | None]:  # fmt: skip
    """One half of a coupling backwards, out = scale * target + H(inp), H = F or G (`run` is
    `coupling.run_F` or `run_G`), piece by piece: recompute H(inp) with a graph, rebuild
    target = (out - H(inp)) / scale in `target`'s buffer (it holds `out` on entry), add
    H'(inp)^T grad_out to `grad_in` (None: no input gradient wanted), and return the parameter
    gradients of H summed over the pieces."""
    piece_grads = []
    for a, b in bounds:
        with torch.enable_grad():
            leaf = inp[a:b].detach().requires_grad_(grad_in is not None)
            h = run(leaf, batch_rows(attention_mask, a, b), batch_rows(exact_input, a, b), cast_back=False,
                    in_chunks=False)  # (b - a, T, C), in the layer's dtype  # fmt: skip
        inputs = ([leaf] if grad_in is not None else []) + params
        if inputs and h.requires_grad:
            grads = list(torch.autograd.grad(h, inputs, grad_out[a:b].to(h.dtype), allow_unused=True))
        else:
            grads = [None] * len(inputs)
        if grad_in is not None:
            input_grad = grads.pop(0)
            if input_grad is not None:
                grad_in[a:b].add_(input_grad)
            del input_grad  # not alive during the next piece's backward
        piece_grads.append(grads)
        target[a:b].sub_(h.detach()).div_(scale)
        del grads, leaf, h
    return _sum_pieces(piece_grads)


def _sum_pieces(piece_grads: list[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """Per-parameter sums of the pieces' gradients, last piece first: the order in which autograd
    accumulates them through the pieces of a plain forward (the later graph runs first), so that
    the sums are bit for bit the same."""
    sums: list[torch.Tensor | None] = list(piece_grads[-1])
    for grads in reversed(piece_grads[:-1]):
        sums = [g if s is None else s if g is None else s + g for s, g in zip(sums, grads)]
    return sums


def _scale(x: torch.Tensor, scale: float, in_place: bool) -> torch.Tensor:
    """scale * x, in x's own buffer when `in_place` (a new tensor otherwise, even for scale 1)."""
    if in_place:
        return x if scale == 1.0 else x.mul_(scale)
    return x * scale


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
    overwrite_outputs: bool = False,
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

    `overwrite_outputs` (default False): the backward may rebuild the top layer's inputs in the
    buffers of the two returned outputs, which saves two (B, T, C) buffers at the backward's peak;
    after backward the returned tensors then hold the stack's *inputs*. Set it only when nothing
    reads the outputs after backward (`MEFTEncoder.forward` does: it keeps only their average).
    A second backward through the same graph is then refused by autograd's in-place check.

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
    return ReversibleStackFunction.apply(x1, x2, attention_mask, couplings, bool(exact_inputs), bool(overwrite_outputs), *params)


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
