"""Exact layer inputs from approximate streams: one parity bit per element.

With float64 streams around float32 layers (`ReversibleCoupling(compute_dtype=torch.float32)`),
a layer's input is the stream rounded to float32, x = fl32(s). The backward pass rebuilds the
stream only approximately, s' = s + delta (float64 rounding, multiplied by 1/lambda per layer),
and |delta| is far below a float32 step. So fl32(s') is almost always x again, but not when s
lies within |delta| of a midpoint between two float32 numbers: then s' rounds to the
neighbour, F sees an input one float32 step off, and the divisions by lambda multiply that
error layer after layer (notebook 31 measures the cascade).

The fix stores one bit per element in the forward pass: the parity of x's last mantissa bit
(the lowest bit of its int32 pattern). In the backward pass, c = fl32(s') is either x or x's
neighbour on the side of s' (s and s' straddle the midpoint between them), and two neighbouring
float32 numbers have different parities. So

    x = c                           if parity(c) == stored bit
    x = nextafter(c, towards s')    otherwise

recovers the forward's float32 input exactly whenever |delta| < half a float32 step. With exact
inputs, F and G recompute bitwise the forward's outputs and the parameter gradients equal plain
autograd's. The price is 1 bit per element per F or G call: 2 bits per element per layer, a
sixteenth of the 32 bits per element per layer that gradient checkpointing keeps. The bits are
the kind of "lost information" MacKay et al. (2018) store to make reversible RNNs exact.

Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
"""

from __future__ import annotations

import torch

__all__ = ["pack_parity", "round_with_parity"]

_SUPPORTED = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _int_view(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"parity bits are defined for {sorted(str(d) for d in _SUPPORTED)} tensors, got {x.dtype}")
    return x.contiguous().view(_SUPPORTED[x.dtype])


def pack_parity(x: torch.Tensor) -> torch.Tensor:
    """The lowest bit of every element's bit pattern, eight to a byte: (ceil(numel / 8),) uint8.

    `x` is the layer input in its compute dtype (float32, bfloat16 or float16).

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """
    bits = _int_view(x).reshape(-1).to(torch.uint8) & 1  # (N,): the low byte, then its lowest bit
    padding = (-bits.numel()) % 8
    if padding:
        bits = torch.cat([bits, bits.new_zeros(padding)])
    bits = bits.view(-1, 8)  # (N/8, 8)
    packed = bits[:, 0].clone()
    for k in range(1, 8):  # byte = b0 | b1 << 1 | ... | b7 << 7
        packed |= bits[:, k] << k
    return packed  # (N/8,)


def round_with_parity(stream: torch.Tensor, packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Round an approximate `stream` (float64) to `dtype`, choosing the value whose parity bit
    matches `packed` (from `pack_parity` of the exact value): the forward's input exactly when the
    stream is off by less than half a step of `dtype`. Same shape as `stream`, in `dtype`.

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-stream.numel() // 8):
        raise ValueError(
            f"packed must be the (ceil(numel / 8),) uint8 tensor of pack_parity for {stream.numel()} elements, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}"
        )
    rounded = stream.to(dtype)  # nearest: the exact value or its neighbour
    disagree = pack_parity(rounded) ^ packed  # a set bit: that element's parity is wrong  (N/8,)
    wrong_bytes = disagree.nonzero().squeeze(1)  # (W,)
    if wrong_bytes.numel() == 0:  # the common case: every element rounded right
        return rounded
    # the few elements in those bytes whose parity disagrees: move them one step towards the stream
    weights = _BIT_WEIGHTS.to(packed.device)
    flips = (disagree[wrong_bytes].view(-1, 1) & weights) != 0  # (W, 8)
    index = (wrong_bytes.view(-1, 1) * 8 + torch.arange(8, device=packed.device)).masked_select(flips)  # (M,)
    flat_rounded, flat_stream = rounded.reshape(-1), stream.reshape(-1)
    wrong = flat_rounded[index]
    above = wrong.to(stream.dtype) > flat_stream[index]
    towards = torch.where(above, torch.full_like(wrong, float("-inf")), torch.full_like(wrong, float("inf")))
    fixed = flat_rounded.clone()
    fixed[index] = torch.nextafter(wrong, towards)  # the neighbour on the side of the stream value
    return fixed.view_as(rounded)
