"""Quantised frozen weights under a LoRA: QLoRA's NF4 and a per-row int8, in plain torch.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) keeps the frozen weight W of each nn.Linear in
4 bits and trains a LoRA on top; the forward pass dequantises W on the fly:

    h = deq(q(W)) x + b + (alpha / r) * B A x

Gradients reach x (so the LoRA factors A, B and every earlier layer) but never the codes.

- NF4, 4-bit NormalFloat (`quantise_nf4`): the flattened W (row-major, nn.Linear's (out, in)) is
  cut into blocks of `block_size` (64, as QLoRA) consecutive values. Each block keeps its absmax
  m = max |w| in float32, and each value the index k of the code value nearest to w / m among the
  16 of `NF4_CODEBOOK` (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0):

      k = argmin_j |w / m - c_j|,     deq = c_k * m,     |w - deq| <= m * max_j (c_{j+1} - c_j) / 2

  Two 4-bit indices go into one uint8 byte, the first in the high nibble (bitsandbytes' layout):
  4 bits per value plus 32 / block_size bits of absmax, 4.5 bits at block_size 64. QLoRA's
  *double quantisation* (the absmaxes themselves quantised to 8 bits, 4.127 bits per value) is
  not done here: the absmaxes stay float32.
- int8 per output row (`quantise_int8`): s_i = max_j |W_ij| / 127 and W_ij ~ s_i * round(W_ij / s_i),
  |error| <= s_i / 2. It is LLM.int8()'s (Dettmers et al., 2022, arXiv:2208.07339) vector-wise
  weight quantisation *without* its outlier decomposition (no fp16 columns for outlier
  features) and without int8 matmuls: the weight is dequantised and multiplied in float.

`QuantisedLinear` holds the codes and scales as buffers (nothing to train, nothing an optimiser
sees) and is an nn.Linear subclass, so `course_lib.peft.inject_peft(model, "lora", ...)` wraps it
like any Linear; `quantise_linears` swaps a model's Linears for it in place and reports the
weight memory before and after. Dequantising costs time on every forward: QLoRA trades speed for
memory.

Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.peft.inject import DEFAULT_TRAINABLE_MODULES
from course_lib.peft.matching import (
    ModulePattern,
    _check_pattern,
    describe_pattern,
    name_matches,
)

__all__ = [
    "NF4_CODEBOOK",
    "SCHEMES",
    "Int8Tensor",
    "NF4Tensor",
    "QuantisationReport",
    "QuantisedLinear",
    "dequantise_int8",
    "dequantise_nf4",
    "pack_4bit",
    "quantise_int8",
    "quantise_linears",
    "quantise_nf4",
    "unpack_4bit",
]

#: The 16 NF4 code values (bitsandbytes / QLoRA), sorted, with -1, 0 and 1 exactly.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)  # (16,)
# the decision thresholds between neighbouring code values: nearest value = bucket among them
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2  # (15,)

#: The schemes `QuantisedLinear` and `quantise_linears` accept.
SCHEMES = ("nf4", "int8")


@dataclass
class NF4Tensor:
    """A tensor in blockwise NF4: packed 4-bit codes, one float32 absmax per block, the shape.

    `codes` (numel / 2,) uint8, two indices into `NF4_CODEBOOK` per byte (first in the high
    nibble); `absmax` (numel / block_size,); `dtype` is the dtype `dequantise_nf4` returns.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    block_size: int
    dtype: torch.dtype = torch.float32

    def nbytes(self) -> int:
        """Bytes of the codes plus the absmaxes."""
        return _tensor_bytes(self.codes) + _tensor_bytes(self.absmax)


@dataclass
class Int8Tensor:
    """A (out, in) matrix in int8 with a float32 scale per output row: W ~ codes * scale[:, None]."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def nbytes(self) -> int:
        """Bytes of the codes plus the scales."""
        return _tensor_bytes(self.codes) + _tensor_bytes(self.scale)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _check_weight(weight: object, what: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = f"a {weight.dtype} tensor" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{what} must be a floating-point tensor, got {kind}")
    if weight.numel() == 0:
        raise ValueError(f"{what} is empty: nothing to quantise")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{what} has inf or NaN values: an absmax scale cannot represent them")
    return weight


def _check_block_size(block_size: object) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (QLoRA uses 64), got {block_size!r}")
    return block_size


def _check_nf4_block_size(block_size: object, numel: int | None = None, what: str = "weight") -> int:
    block_size = _check_block_size(block_size)
    if block_size % 2:
        raise ValueError(
            f"NF4 packs two 4-bit codes per byte, so block_size must be even, got {block_size}; use 64 (QLoRA's)"
        )
    if numel is not None and numel % block_size:
        raise ValueError(
            f"{what} has {numel} values, not a multiple of block_size={block_size}: pick a block_size that "
            f"divides {numel} (e.g. a divisor of the input width), or leave this layer unquantised"
        )
    return block_size


def _check_scheme(scheme: object) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; use one of {list(SCHEMES)}")
    return scheme  # type: ignore[return-value]


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte: (2n,) integers in [0, 15] -> (n,) uint8, element 2i in the high nibble.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    flat = indices.reshape(-1)
    if flat.numel() % 2:
        raise ValueError(f"pack_4bit needs an even number of values, got {flat.numel()}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 15):
        raise ValueError(f"4-bit values must be in [0, 15], got the range [{int(flat.min())}, {int(flat.max())}]")
    flat = flat.to(torch.uint8)
    return (flat[0::2] << 4) | flat[1::2]  # (n,)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_4bit`: (n,) uint8 -> (2n,) uint8 values in [0, 15].

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed 4-bit codes are uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)  # (2n,): high, low, high, low...


def quantise_nf4(weight: torch.Tensor, block_size: int = 64) -> NF4Tensor:
    """Blockwise NF4 of any tensor whose size is a multiple of `block_size` (even; 64 by default).

    Each value becomes the index of the `NF4_CODEBOOK` value nearest to w / absmax(block); a
    block of zeros gets absmax 0 and dequantises to zeros. No double quantisation.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    weight = _check_weight(weight)
    block_size = _check_nf4_block_size(block_size, weight.numel())
    blocks = weight.detach().to(torch.float32).reshape(-1, block_size)  # (n_blocks, B)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]  # in [-1, 1]
    # nearest code value: bucketize against the midpoints (a value on a midpoint goes to the lower
    # code, as in bitsandbytes' thresholds)
    indices = torch.bucketize(scaled, _NF4_MIDPOINTS.to(scaled.device))  # (n_blocks, B), in [0, 15]
    return NF4Tensor(
        codes=pack_4bit(indices),  # (numel / 2,)
        absmax=absmax,
        shape=weight.shape,
        block_size=block_size,
        dtype=weight.dtype,
    )


def dequantise_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codebook[index] * absmax(block), in `q.shape` and `dtype` (default: the quantised tensor's).

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    indices = unpack_4bit(q.codes).long()  # (numel,)
    values = NF4_CODEBOOK.to(q.codes.device)[indices].reshape(-1, q.block_size)  # (n_blocks, B), in [-1, 1]
    weight = values * q.absmax.to(torch.float32)[:, None]  # (n_blocks, B)
    return weight.reshape(q.shape).to(dtype or q.dtype)


def quantise_int8(weight: torch.Tensor) -> Int8Tensor:
    """Symmetric int8 with one absmax scale per output row: (out, in) -> codes in [-127, 127].

    scale_i = max_j |W_ij| / 127, codes = round(W / scale); a zero row gets scale 0. LLM.int8()'s
    vector-wise weight quantisation without the outlier decomposition.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    weight = _check_weight(weight)
    if weight.dim() != 2:
        raise ValueError(f"int8 quantisation is per output row of an (out, in) matrix, got shape {tuple(weight.shape)}")
    rows = weight.detach().to(torch.float32)  # (out, in)
    scale = rows.abs().amax(dim=1) / 127  # (out,)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # (out, 1)
    codes = torch.round(rows / divisor).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return Int8Tensor(codes=codes, scale=scale, dtype=weight.dtype)


def dequantise_int8(q: Int8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes * scale[:, None], (out, in), in `dtype` (default: the quantised tensor's).

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    weight = q.codes.to(torch.float32) * q.scale.to(torch.float32)[:, None]  # (out, in)
    return weight.to(dtype or q.dtype)


class QuantisedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in NF4 or int8 and dequantised in every forward.

    The codes and scales are buffers (`weight_codes`, `weight_scales`): they move with `.to()`,
    are saved in the state dict, and are no parameters, so nothing of the weight is trained. The
    bias stays float, as a parameter with requires_grad=False (BitFit could still train it).
    `weight` is a read-only property returning the dequantised (out, in) matrix, so code that
    reads `linear.weight` (LoRALinear's dtype and device) works; assigning to it (LoRA's
    `merge()`) raises: merge into `to_linear()` instead. It subclasses nn.Linear so that
    `inject_peft(model, "lora", ...)` accepts it; nn.Linear's own float weight is never made.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """

    def __init__(self, quantised: NF4Tensor | Int8Tensor, bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        if isinstance(quantised, NF4Tensor):
            if len(quantised.shape) != 2:
                raise ValueError(f"a QuantisedLinear needs an (out, in) weight, got shape {tuple(quantised.shape)}")
            self.scheme = "nf4"
            self.block_size: int | None = quantised.block_size
            scales = quantised.absmax
        elif isinstance(quantised, Int8Tensor):
            self.scheme = "int8"
            self.block_size = None
            scales = quantised.scale
        else:
            raise TypeError(f"QuantisedLinear takes an NF4Tensor or Int8Tensor, got {type(quantised).__name__}")
        self.out_features, self.in_features = (int(n) for n in quantised.shape)
        self.weight_dtype = quantised.dtype
        self.register_buffer("weight_codes", quantised.codes)  # nf4: (out * in / 2,) uint8; int8: (out, in)
        self.register_buffer("weight_scales", scales)  # nf4: (out * in / B,) absmax; int8: (out,) scale
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be (out,) = ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "nf4", block_size: int = 64) -> QuantisedLinear:
        """Quantise an nn.Linear's weight (`scheme` "nf4" or "int8"; `block_size` is NF4's only).

        Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
        """
        if isinstance(linear, QuantisedLinear):
            raise TypeError("this layer is already a QuantisedLinear; quantise the original nn.Linear")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantisedLinear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        scheme = _check_scheme(scheme)
        quantised = quantise_nf4(linear.weight, block_size) if scheme == "nf4" else quantise_int8(linear.weight)
        module = cls(quantised, linear.bias)
        module.train(linear.training)
        return module

    def quantised_weight(self) -> NF4Tensor | Int8Tensor:
        """The stored weight as an NF4Tensor or Int8Tensor (sharing the buffers)."""
        if self.scheme == "nf4":
            shape = torch.Size((self.out_features, self.in_features))
            return NF4Tensor(self.weight_codes, self.weight_scales, shape, self.block_size, self.weight_dtype)
        return Int8Tensor(self.weight_codes, self.weight_scales, self.weight_dtype)

    def dequantised_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight, recomputed from the codes on each call."""
        quantised = self.quantised_weight()
        if self.scheme == "nf4":
            return dequantise_nf4(quantised, dtype)  # type: ignore[arg-type]
        return dequantise_int8(quantised, dtype)  # type: ignore[arg-type]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantised weight (a fresh tensor, not a parameter: changing it changes nothing)."""
        return self.dequantised_weight()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        raise AttributeError(
            "QuantisedLinear's weight is stored as quantised codes and cannot be assigned (LoRA's merge() does); "
            "take a float copy with .to_linear(), or keep the LoRA unmerged"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantised_weight(x.dtype), bias)  # (..., out)

    def weight_bytes(self) -> int:
        """Bytes this layer's weight takes: codes + scales (+ the bias, as stored)."""
        total = _tensor_bytes(self.weight_codes) + _tensor_bytes(self.weight_scales)
        return total + (_tensor_bytes(self.bias) if self.bias is not None else 0)

    def to_linear(self) -> nn.Linear:
        """A plain float nn.Linear holding the dequantised weight and a copy of the bias."""
        weight = self.dequantised_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{block}")


@dataclass
class QuantisationReport:
    """What `quantise_linears` did: the scheme, the layers replaced, their weight bytes before and after.

    `bytes_before` counts the replaced layers' weights and biases in float32 (4 bytes a value);
    `bytes_after` their `QuantisedLinear.weight_bytes()` (codes + scales + float32 bias).
    """

    scheme: str
    block_size: int | None
    replaced: list[str]
    bytes_before: int
    bytes_after: int
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.bytes_before / max(self.bytes_after, 1)  # how many times smaller

    def __str__(self) -> str:
        block = f" (block {self.block_size})" if self.block_size is not None else ""
        before, after = self.bytes_before / 2**20, self.bytes_after / 2**20
        return (f"{self.scheme}{block}: {len(self.replaced)} linear layers quantised, weight memory "
                f"{before:.2f} MiB -> {after:.2f} MiB ({self.ratio:.2f}x smaller)")

    def to_markdown(self) -> str:
        """A small Markdown table, for notebooks and result pages."""
        rows = [
            ("scheme", self.scheme),
            ("block size", str(self.block_size) if self.block_size is not None else "-"),
            ("layers quantised", f"{len(self.replaced)}"),
            ("weight bytes before (float32)", f"{self.bytes_before:,}"),
            ("weight bytes after", f"{self.bytes_after:,}"),
            ("smaller by", f"{self.ratio:.2f}x"),
        ]
        return "| | |\n| --- | --- |\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _under_head(name: str) -> bool:
    """True for a task head (`classifier`, `score`) and anything inside one."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[: i + 1]), DEFAULT_TRAINABLE_MODULES) for i in range(len(parts)))


def quantise_linears(
    model: nn.Module,
    target_modules: ModulePattern | None = None,
    scheme: str = "nf4",
    block_size: int = 64,
) -> QuantisationReport:
    """Replace `model`'s nn.Linear layers by `QuantisedLinear` in place and report the weight memory.

    `target_modules`: a pattern as in `course_lib.peft.matching` (a regex on the whole dotted name,
    or a list of name endings); the nn.Linear layers among its matches are quantised. None: every
    nn.Linear except the task head (`classifier`, `score`, and what is inside them), which stays
    float and trainable. Layers that are already quantised are left as they are. `block_size` is
    used by "nf4" only; every chosen weight's size must be a multiple of it. Nothing is replaced
    when a check fails. LoRA can be injected afterwards (`inject_peft(model, "lora", ...)`), or
    before: then the Linear inside each LoRALinear (`...query.base`) is quantised.

    Raises ValueError for an unknown scheme, a bad block size, a weight whose size the block size
    does not divide (naming the layer), or a pattern that matches no nn.Linear.
    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    scheme = _check_scheme(scheme)
    block_size = _check_nf4_block_size(block_size) if scheme == "nf4" else _check_block_size(block_size)
    linears = {name: module for name, module in model.named_modules() if name and isinstance(module, nn.Linear)}
    float_linears = {name: module for name, module in linears.items() if not isinstance(module, QuantisedLinear)}
    if target_modules is None:
        names = [name for name in float_linears if not _under_head(name)]
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no float nn.Linear outside the task head to quantise "
                f"(Linear layers: {list(linears)[:8]}); pass target_modules to choose layers by name"
            )
    else:
        _check_pattern(target_modules)
        names = [name for name in float_linears if name_matches(name, target_modules)]
        if not names:
            done = [name for name in linears if name not in float_linears and name_matches(name, target_modules)]
            hint = f" (already quantised: {done[:4]})" if done else ""
            raise ValueError(
                f"target_modules={describe_pattern(target_modules)} matches no float nn.Linear of "
                f"{type(model).__name__}{hint}. A string is a regex that must match the whole dotted name; "
                f"a list matches name endings. Some nn.Linear names of this model: {list(float_linears)[:8]}"
            )
    if scheme == "nf4":
        for name in names:  # check them all before changing anything
            _check_nf4_block_size(block_size, float_linears[name].weight.numel(), what=f"nn.Linear {name!r}")

    bytes_before = bytes_after = 0
    for name in names:
        linear = float_linears[name]
        quantised = QuantisedLinear.from_linear(linear, scheme=scheme, block_size=block_size)
        bytes_before += 4 * (linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0))
        bytes_after += quantised.weight_bytes()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, quantised)
    return QuantisationReport(
        scheme=scheme, block_size=block_size if scheme == "nf4" else None, replaced=names,
        bytes_before=bytes_before, bytes_after=bytes_after,
    )
