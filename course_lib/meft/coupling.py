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
    `batch_chunks`: F and G run on that many pieces of the batch, one after another, here and in
    the custom backward of `course_lib.meft.reversible`, which then holds the recomputation graph
    of one piece at a time: its peak memory falls by about that factor, for smaller matrix
    products (F and G must treat the examples of a batch apart, as transformer layers do; the
    RNG draws of dropout happen piece by piece in the same order in forward and backward).

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
        batch_chunks: int = 1,
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
        if not isinstance(batch_chunks, int) or isinstance(batch_chunks, bool) or batch_chunks < 1:
            raise ValueError(f"batch_chunks must be an int >= 1, got {batch_chunks!r}")
        self.batch_chunks = batch_chunks

    def chunk_bounds(self, batch_size: int) -> list[tuple[int, int]]:
        """The (start, stop) rows of the `batch_chunks` pieces F and G run on, in order."""
        count = max(1, min(self.batch_chunks, batch_size))
        edges = [round(i * batch_size / count) for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))

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
        cast_back: bool = True,
        in_chunks: bool = True,
    ) -> torch.Tensor:
        bounds = self.chunk_bounds(x.shape[0]) if in_chunks else []
        if len(bounds) > 1:  # one piece of the batch after another (F and G treat examples apart)
            return torch.cat([
                self._run(part, x[a:b], batch_rows(attention_mask, a, b), batch_rows(exact_input, a, b), cast_back, False)
                for a, b in bounds
            ])  # fmt: skip
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
        out = part(layer_input, attention_mask)  # the layer in its compute dtype
        return out.to(x.dtype) if cast_back else out  # back to the stream's dtype

    def run_F(
        self, x2: torch.Tensor, attention_mask: torch.Tensor | None = None, exact_input: torch.Tensor | None = None,
        cast_back: bool = True, in_chunks: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """F(x2), in `compute_dtype` if set (on `exact_input` if given), returned in x2's dtype
        (in the compute dtype with `cast_back=False`); in `batch_chunks` pieces unless
        `in_chunks=False` (the custom backward runs the pieces itself)."""
        return self._run(self.F, x2, attention_mask, exact_input, cast_back, in_chunks)

    def run_G(
        self, y1: torch.Tensor, attention_mask: torch.Tensor | None = None, exact_input: torch.Tensor | None = None,
        cast_back: bool = True, in_chunks: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """G(y1), as `run_F`."""
        return self._run(self.G, y1, attention_mask, exact_input, cast_back, in_chunks)

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
        extra += f", batch_chunks={self.batch_chunks}" if self.batch_chunks > 1 else ""
        return f"lambda_={self.lambda_:g}, beta={self.beta:g}, swap_outputs={self.swap_outputs}{extra}"


def batch_rows(x: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows start:stop of a per-example tensor (None stays None; a batch dimension of 1 broadcasts)."""
    if x is None or x.dim() == 0 or x.shape[0] == 1:
        return x
    return x[start:stop]


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
