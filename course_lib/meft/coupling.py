"""The reversible coupling of MEFT: two streams, two functions, two scales, and an exact inverse.

A layer reads a pair of hidden states (x1, x2), each (B, T, C), and computes

    y1 = lambda * x1 + F(x2)
    y2 = beta   * x2 + G(y1)

F and G can be anything (a whole pre-trained layer, half of one, an adapter): the inverse never
inverts them, it only calls them again,

    x2 = (y2 - G(y1)) / beta
    x1 = (y1 - F(x2)) / lambda

so from a layer's outputs we get its inputs back without having stored them. This is what lets
a stack of couplings train without keeping activations (`course_lib.meft.reversible`). Dividing
by a scale of 0.1 multiplies any rounding error in y by 10: the inverse is exact in real
numbers, not in floating point, and the error grows with depth (measured in
notebooks/part4_meft/31_reversible_layers.ipynb).

Precision. The rounding error of storing y1 = lambda x1 + F(x2) is about eps |F(x2)|, and the
inverse divides it by lambda; layer after layer the error grows by about 10x (more with F's
own sensitivity), and in float32 six MiniLM layers already lose most digits of the gradient. A
partial cure measured in notebook 31: keep the *streams* in float64 (`compute_dtype=torch.float32`
with float64 inputs): F and G still run in float32 on a float32 copy of their input, while the
sums and differences of the coupling are done and stored in float64. The stream arithmetic is
then exact to float64 rounding, but F(x2) recomputed in backward equals the forward's value only
when the reconstructed x2 rounds to the same float32 input; when it lands one float32 step away,
F's output moves by that much and the divisions amplify it again. The full cure keeps one parity
bit per element of the float32 input (`course_lib.meft.rounding`): with it, `run_F`/`run_G`
take the forward's exact input (`exact_input=`), and the custom backward of
`course_lib.meft.reversible` reproduces plain autograd's gradients.

MEFT1 and MEFT2 hand the two outputs to the next layer in swapped order, (y2, y1); MEFT3 keeps
(y1, y2). `swap_outputs=True` makes `forward` return (y2, y1), and `inverse` takes the outputs
in the order `forward` returned them.

Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ReversibleCoupling"]


class ReversibleCoupling(nn.Module):
    """y1 = lambda x1 + F(x2); y2 = beta x2 + G(y1), with `inverse` recovering (x1, x2).

    `F` and `G` are modules called as `F(x, attention_mask)` (mask may be None), each mapping
    (B, T, C) to (B, T, C). `lambda_` and `beta` must be non-zero (the inverse divides by them).
    `compute_dtype`: if set, F and G get their input cast to it and their output cast back to
    the streams' dtype (float64 streams around float32 layers: see the module docstring).

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """

    def __init__(
        self,
        F: nn.Module,
        G: nn.Module,
        lambda_: float = 1.0,
        beta: float = 1.0,
        swap_outputs: bool = False,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(F, nn.Module) or not isinstance(G, nn.Module):
            raise TypeError(f"F and G must be nn.Modules, got {type(F).__name__} and {type(G).__name__}")
        for name, value in (("lambda_", lambda_), ("beta", beta)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value == 0:
                raise ValueError(f"{name} must be a non-zero number (the inverse divides by it), got {value!r}")
        self.F = F
        self.G = G
        self.lambda_ = float(lambda_)
        self.beta = float(beta)
        self.swap_outputs = bool(swap_outputs)
        if compute_dtype is not None and not isinstance(compute_dtype, torch.dtype):
            raise TypeError(f"compute_dtype must be a torch.dtype or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype

    def layer_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """x cast to `compute_dtype` (what F or G computes on), or None when no cast happens."""
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            return None
        return x.detach().to(self.compute_dtype)

    def _run(
        self,
        part: nn.Module,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        exact_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            return part(x, attention_mask)
        if exact_input is None:
            layer_input = x.to(self.compute_dtype)  # the stream rounded to the layer's dtype
        elif torch.is_grad_enabled() and x.requires_grad:
            # the given value (the forward's exact input, course_lib.meft.rounding); the gradient
            # flows back to x as through the cast
            layer_input = _CastWithValue.apply(x, exact_input)
        else:
            layer_input = exact_input  # no gradient to route: the given value as it is
        return part(layer_input, attention_mask).to(x.dtype)  # layer in compute dtype, stream kept

    def run_F(
        self, x2: torch.Tensor, attention_mask: torch.Tensor | None = None, exact_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F(x2), in `compute_dtype` if set (on `exact_input` if given), returned in x2's dtype."""
        return self._run(self.F, x2, attention_mask, exact_input)

    def run_G(
        self, y1: torch.Tensor, attention_mask: torch.Tensor | None = None, exact_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """G(y1), in `compute_dtype` if set (on `exact_input` if given), returned in y1's dtype."""
        return self._run(self.G, y1, attention_mask, exact_input)

    # the two half-steps, also used by the custom backward -------------------------------------

    def first_half(
        self, x1: torch.Tensor, x2: torch.Tensor, attention_mask: torch.Tensor | None = None,
        exact_input: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """y1 = lambda x1 + F(x2)."""
        return self.lambda_ * x1 + self.run_F(x2, attention_mask, exact_input)

    def second_half(
        self, x2: torch.Tensor, y1: torch.Tensor, attention_mask: torch.Tensor | None = None,
        exact_input: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """y2 = beta x2 + G(y1)."""
        return self.beta * x2 + self.run_G(y1, attention_mask, exact_input)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x1, x2) -> (y1, y2), or (y2, y1) with `swap_outputs`; all (B, T, C)."""
        _check_streams(x1, x2, "ReversibleCoupling")
        y1 = self.first_half(x1, x2, attention_mask)  # (B, T, C)
        y2 = self.second_half(x2, y1, attention_mask)  # (B, T, C)
        return (y2, y1) if self.swap_outputs else (y1, y2)

    @torch.no_grad()
    def inverse(
        self, out1: torch.Tensor, out2: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs (x1, x2) from the outputs, given in the order `forward` returned them.

        Calls G and F again (in eval mode dropout is off; in training mode the caller must
        replay the random state, as `course_lib.meft.reversible` does).
        """
        _check_streams(out1, out2, "ReversibleCoupling.inverse")
        y1, y2 = (out2, out1) if self.swap_outputs else (out1, out2)
        x2 = (y2 - self.run_G(y1, attention_mask)) / self.beta  # undo the second half
        x1 = (y1 - self.run_F(x2, attention_mask)) / self.lambda_  # then the first
        return x1, x2

    def extra_repr(self) -> str:
        extra = f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else ""
        return f"lambda_={self.lambda_:g}, beta={self.beta:g}, swap_outputs={self.swap_outputs}{extra}"


class _CastWithValue(torch.autograd.Function):
    """forward(x, value) -> value (x rounded elsewhere, exactly); backward: the cast's, grad in x's dtype."""

    @staticmethod
    def forward(ctx, x, value):  # type: ignore[override]
        ctx.dtype = x.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.to(ctx.dtype), None


def _check_streams(x1: torch.Tensor, x2: torch.Tensor, who: str) -> None:
    if not isinstance(x1, torch.Tensor) or not isinstance(x2, torch.Tensor):
        raise TypeError(f"{who} expects two tensors (x1, x2), got {type(x1).__name__} and {type(x2).__name__}")
    if x1.shape != x2.shape:
        raise ValueError(
            f"{who}: the two streams must have the same shape (B, T, C), got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    if x1.dtype != x2.dtype or x1.device != x2.device:
        raise ValueError(f"{who}: the two streams must share dtype and device, got {x1.dtype}/{x1.device} and {x2.dtype}/{x2.device}")
