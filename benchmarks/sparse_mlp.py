"""Does activation sparsity make MiniLM's second MLP projection faster on this CPU?

y = h W2 + b2 at MiniLM's sizes (H = 1536 -> C = 384) on a token batch of 32 x 128 = 4096
tokens, with one thread. Three ways, timed in alternation (interleaved medians):

- dense:  `F.linear(h, W, b)`, what the model does;
- rows:   `course_lib.deft.sparse_second_projection`: keep the hidden units active for any token
          of the batch, a smaller dense matmul on them (row skipping);
- csr:    `course_lib.deft.csr_second_projection`: h as a sparse CSR matrix, per-token sparsity.

Two kinds of sparsity at each density d:

- unit-structured: a fraction d of the hidden units is active, for every token; the others are
  zero for the whole batch. The best case for row skipping (its union density is d). These
  are the headline `ratios` (rows / dense), the issue's "skips the rows of W2 whose activations
  are zero for a token batch".
- per-token random: each entry is non-zero with probability d, independently. The union over
  4096 tokens is then every unit (1 - (1 - d)^4096 = 1): row skipping cannot skip anything,
  only CSR can use these zeros.

Where notebook 22 has written results/deft.json, the ratios are also measured at the density
DEFT reached (and at the union density of the real activations when the notebook recorded it).

    .venv/bin/python -m benchmarks.sparse_mlp      # writes results/bench/sparse_mlp.json
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_median_seconds, write_bench
from course_lib import config
from course_lib.config import fast_or_full
from course_lib.deft import csr_second_projection, sparse_second_projection, union_density
from course_lib.results import read_json

NAME = "sparse_mlp"
HIDDEN, WIDTH = 1536, 384  # MiniLM: 4 x 384 -> 384
DENSITIES = (0.5, 0.3, 0.1)


def unit_structured_hidden(tokens: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """(tokens, H) GELU outputs where round(d H) units are active (non-zero) and the rest are zero for every token."""
    hidden = F.gelu(torch.randn(tokens, HIDDEN, generator=generator)) + 1e-3  # GELU > -0.17: +1e-3 keeps all non-zero
    active = torch.randperm(HIDDEN, generator=generator)[: round(density * HIDDEN)]
    keep = torch.zeros(HIDDEN)
    keep[active] = 1.0
    return hidden * keep  # (tokens, H)


def per_token_random_hidden(tokens: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """(tokens, H) GELU outputs where each entry is non-zero with probability d, independently."""
    hidden = F.gelu(torch.randn(tokens, HIDDEN, generator=generator)) + 1e-3
    return hidden * (torch.rand(tokens, HIDDEN, generator=generator) < density)


def time_ratios(hidden: torch.Tensor, weight, bias, weight_by_unit, repeats: int, warmup: int) -> dict[str, float]:
    """Median times of dense / rows / csr on `hidden` and the two ratios, plus the max |difference|."""
    dense = lambda: F.linear(hidden, weight, bias)  # noqa: E731
    rows = lambda: sparse_second_projection(hidden, weight, bias, weight_by_unit=weight_by_unit)  # noqa: E731
    csr = lambda: csr_second_projection(hidden, weight, bias, weight_by_unit=weight_by_unit)  # noqa: E731
    reference = dense()
    max_abs_diff = max((rows() - reference).abs().max().item(), (csr() - reference).abs().max().item())
    seconds = interleaved_median_seconds({"dense": dense, "rows": rows, "csr": csr}, repeats=repeats, warmup=warmup)
    return {
        "dense_ms": 1e3 * seconds["dense"],
        "rows_ms": 1e3 * seconds["rows"],
        "csr_ms": 1e3 * seconds["csr"],
        "rows_ratio": seconds["rows"] / seconds["dense"],
        "csr_ratio": seconds["csr"] / seconds["dense"],
        "union_density": union_density(hidden),
        "max_abs_diff": max_abs_diff,
    }


def deft_densities() -> dict[str, float] | None:
    """The densities of notebook 22's full run (results/deft.json), or None when it has not run."""
    path = config.RESULTS_DIR / "deft.json"
    if not path.exists():
        return None
    data = read_json(path)
    found = {f"{method}.deft_density": values["deft_density"] for method, values in data.get("methods", {}).items()}
    sparse = data.get("sparse_mlp", {})
    if "union_density" in sparse:
        found["real_activations.union_density"] = sparse["union_density"]
    return found or None


def main() -> None:
    # one thread: the machines are shared, and the question is per-core work saved
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = measure()
    finally:
        torch.set_num_threads(default_threads)
    write_bench(NAME, payload)


def measure() -> dict:
    generator = torch.Generator().manual_seed(config.SEED)
    batch_size, seq_len = fast_or_full((4, 64), (32, 128))
    tokens = batch_size * seq_len
    repeats, warmup = fast_or_full(3, 15), fast_or_full(1, 3)
    linear = torch.nn.Linear(HIDDEN, WIDTH)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    weight_by_unit = weight.t().contiguous()  # (H, C), as SparseSecondProjection keeps it

    structured, random = {}, {}
    with torch.no_grad():
        for density in DENSITIES:
            structured[str(density)] = time_ratios(
                unit_structured_hidden(tokens, density, generator), weight, bias, weight_by_unit, repeats, warmup
            )
            random[str(density)] = time_ratios(
                per_token_random_hidden(tokens, density, generator), weight, bias, weight_by_unit, repeats, warmup
            )
        at_deft = {}
        for source, density in (deft_densities() or {}).items():
            at_deft[source] = {
                "density": density,
                "unit_structured": time_ratios(
                    unit_structured_hidden(tokens, density, generator), weight, bias, weight_by_unit, repeats, warmup
                ),
                "per_token_random": time_ratios(
                    per_token_random_hidden(tokens, density, generator), weight, bias, weight_by_unit, repeats, warmup
                ),
            }
    all_cases = [*structured.values(), *random.values()]
    all_cases += [case[kind] for case in at_deft.values() for kind in ("unit_structured", "per_token_random")]
    return {
        "ratios": {d: round(structured[d]["rows_ratio"], 4) for d in structured},
        "max_abs_diff": max(case["max_abs_diff"] for case in all_cases),
        "what": "ratio = time of the sparse second projection / dense F.linear, (tokens, 1536) -> (tokens, 384); "
        "'ratios': row skipping with unit-structured sparsity (a fraction d of hidden units active for the batch)",
        "ratios_csr_per_token_random": {d: round(random[d]["csr_ratio"], 4) for d in random},
        "ratios_rows_per_token_random": {d: round(random[d]["rows_ratio"], 4) for d in random},
        "union_density_per_token_random": {d: random[d]["union_density"] for d in random},
        "unit_structured": structured,
        "per_token_random": random,
        "at_deft_density": at_deft if at_deft else None,
        "tokens": tokens,
        "batch_shape": [batch_size, seq_len],
        "hidden": HIDDEN,
        "width": WIDTH,
        "threads": 1,
        "repeats": repeats,
        "fast": config.is_fast(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


if __name__ == "__main__":
    main()
