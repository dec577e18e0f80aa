"""The activation-sparsity explorer: pick a layer, a threshold and a sentence; see where the MLP
activations lie and how dense they are, for one model or several side by side (before/after DEFT).

Derived in notebooks/part3_deft/20_activation_sparsity.ipynb (and reused in 22_deft_in_practice).

`sentence_activations` runs a sentence through a model and keeps the post-activation MLP
outputs of every layer; `sparsity_histogram` bins one layer's values by log10|a| (exact zeros
counted on their own) and computes the densities; `sparsity_figure` draws it. The explorer wires
ipywidgets controls to these plain functions; tests set `.value` on the controls and read
`explorer.last_histograms`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from course_lib.deft.density import collect_activations
from course_lib.widgets.neighbourhood import figure_png

__all__ = [
    "SparsityHistogram",
    "layer_label",
    "sentence_activations",
    "sparsity_histogram",
    "sparsity_figure",
    "SparsityExplorer",
    "make_sparsity_widget",
]

#: log10|a| bin edges of the histogram: 1e-9 .. 1e2 (GELU's smallest non-zero outputs are ~1e-7).
LOG_BINS = np.linspace(-9.0, 2.0, 45)


class SparsityHistogram(NamedTuple):
    """What the explorer shows for one layer of one model on one sentence.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """

    layer: str  # module name
    threshold: float
    num_values: int  # tokens x hidden units
    num_exact_zeros: int
    counts: np.ndarray  # (len(LOG_BINS) - 1,) non-zero values per log10|a| bin (values outside: clipped in)
    exact_density: float  # fraction of a != 0
    threshold_density: float  # fraction of |a| > threshold
    minimum: float  # smallest activation (GELU: about -0.17)


def layer_label(name: str) -> str:
    """"bert.encoder.layer.3.intermediate.intermediate_act_fn" -> "layer 3" (the first number in the name).

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return f"layer {match.group(1)}" if match else name


def sentence_activations(
    model: nn.Module, tokenizer: Any, sentence: str, module_pattern: str | None = None
) -> dict[str, torch.Tensor]:
    """Post-activation MLP outputs of every layer for one sentence: name -> (tokens, H), eval mode.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    if not isinstance(sentence, str) or not sentence.strip():
        raise ValueError("sentence must be a non-empty string")
    batch = dict(tokenizer([sentence], return_tensors="pt"))
    return collect_activations(model, batch, module_pattern, mask_padding=True)


def sparsity_histogram(activation: torch.Tensor, threshold: float = 0.0, layer: str = "") -> SparsityHistogram:
    """Histogram of log10|a| over the non-zero entries of `activation`, and its densities.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    values = activation.detach().reshape(-1).cpu()  # compared in its own dtype, as the density meter does
    if values.numel() == 0:
        raise ValueError("the activation is empty")
    nonzero = values[values != 0]
    log_magnitude = nonzero.double().abs().log10().clamp(LOG_BINS[0], LOG_BINS[-1]).numpy()
    counts, _ = np.histogram(log_magnitude, bins=LOG_BINS)
    return SparsityHistogram(
        layer=layer,
        threshold=float(threshold),
        num_values=values.numel(),
        num_exact_zeros=int((values == 0).sum()),
        counts=counts,
        exact_density=nonzero.numel() / values.numel(),
        threshold_density=int((values.abs() > threshold).sum()) / values.numel(),
        minimum=float(values.min()),
    )


def sparsity_figure(histograms: Mapping[str, SparsityHistogram], title: str = "") -> Figure:
    """One panel: log10|a| histograms (one colour per model), exact zeros as a bar on the left, tau as a line.

    `histograms`: model name -> SparsityHistogram (of the same layer and sentence).

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    if not histograms:
        raise ValueError("histograms is empty: pass model name -> SparsityHistogram")
    figure = Figure(figsize=(8.5, 3.8))
    ax = figure.add_subplot(1, 1, 1)
    width = LOG_BINS[1] - LOG_BINS[0]
    centres = (LOG_BINS[:-1] + LOG_BINS[1:]) / 2
    zero_x = LOG_BINS[0] - 4 * width  # where the exact zeros are drawn (a decade left of 1e-9: room for the label)
    for index, (name, histogram) in enumerate(histograms.items()):
        colour = f"C{index}"
        fraction = histogram.counts / histogram.num_values
        ax.step(centres, fraction, where="mid", color=colour, linewidth=1.5,
                label=f"{name}: exact {histogram.exact_density:.3f}, |a|>tau {histogram.threshold_density:.3f}")
        ax.bar(zero_x + (index - (len(histograms) - 1) / 2) * width * 0.8, histogram.num_exact_zeros / histogram.num_values,
               width=width * 0.8, color=colour, alpha=0.7)
    threshold = next(iter(histograms.values())).threshold
    if threshold > 0:
        ax.axvline(np.log10(threshold), color="k", linestyle="--", linewidth=1)
        ax.text(np.log10(threshold), ax.get_ylim()[1] * 0.95, f" tau = {threshold:.0e}", va="top", fontsize=8)
    ax.set_xticks([zero_x, *range(int(LOG_BINS[0]), int(LOG_BINS[-1]) + 1)])
    ax.set_xticklabels(["exact 0", *[f"1e{p}" for p in range(int(LOG_BINS[0]), int(LOG_BINS[-1]) + 1)]])
    ax.set_xlabel("|activation| (log scale); left bar: entries that are exactly 0")
    ax.set_ylabel("fraction of entries")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or layer_label(next(iter(histograms.values())).layer), fontsize=10)
    figure.tight_layout()
    return figure


def _widgets():
    import ipywidgets

    return ipywidgets


class SparsityExplorer:
    """The explorer's state and controls; `.widget` is the ipywidgets box to display.

    Attributes the tests read: `controls` (name -> ipywidget: "layer", "threshold", "sentence"),
    `last_histograms` (model name -> SparsityHistogram of the last update), `last_figure`,
    `update_count`. Activations are computed once per sentence and model, then cached.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """

    def __init__(
        self,
        models: nn.Module | Mapping[str, nn.Module],
        tokenizer: Any,
        sentences: Sequence[str],
        *,
        module_pattern: str | None = None,
        threshold: float = 1e-3,
    ) -> None:
        widgets = _widgets()
        self.models = {"model": models} if isinstance(models, nn.Module) else dict(models)
        if not self.models:
            raise ValueError("models is empty: pass an nn.Module or a dict of name -> nn.Module")
        sentences = list(sentences)
        if not sentences:
            raise ValueError("sentences is empty: pass at least one sentence")
        self.tokenizer = tokenizer
        self.module_pattern = module_pattern
        self._cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        layers = list(self._activations(next(iter(self.models)), sentences[0]))
        self.controls = {
            "layer": widgets.Dropdown(options=[(layer_label(name), name) for name in layers], description="layer"),
            "threshold": widgets.FloatLogSlider(value=threshold, base=10, min=-8, max=0, step=0.25, description="tau"),
            "sentence": widgets.Dropdown(options=sentences, description="sentence", layout=widgets.Layout(width="95%")),
        }
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.controls["layer"], self.controls["threshold"]]),
                                    self.controls["sentence"], self.output])
        self.widget.explorer = self
        self.last_histograms: dict[str, SparsityHistogram] = {}
        self.last_figure: Figure | None = None
        self.update_count = 0
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def _activations(self, model_name: str, sentence: str) -> dict[str, torch.Tensor]:
        key = (model_name, sentence)
        if key not in self._cache:
            self._cache[key] = sentence_activations(self.models[model_name], self.tokenizer, sentence, self.module_pattern)
        return self._cache[key]

    def update(self) -> dict[str, SparsityHistogram]:
        """Recompute the histograms from the controls' values and redraw."""
        layer, threshold, sentence = (self.controls[name].value for name in ("layer", "threshold", "sentence"))
        histograms = {
            name: sparsity_histogram(self._activations(name, sentence)[layer], threshold, layer) for name in self.models
        }
        tokens = next(iter(histograms.values())).num_values // self._activations(next(iter(self.models)), sentence)[layer].shape[1]
        figure = sparsity_figure(histograms, title=f"{layer_label(layer)}, {tokens} tokens: \"{sentence[:60]}\"")
        self.last_histograms, self.last_figure = histograms, figure
        self.update_count += 1
        from IPython.display import Image

        self.output.outputs = ()
        self.output.append_display_data(Image(figure_png(figure)))
        return histograms


def make_sparsity_widget(
    models: nn.Module | Mapping[str, nn.Module],
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    module_pattern: str | None = None,
    threshold: float = 1e-3,
) -> Any:
    """The sparsity explorer (an ipywidgets VBox) for one model or a dict of models (e.g. before/after DEFT).

    The controller is `widget.explorer` (a SparsityExplorer: controls, last_histograms, update).

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    return SparsityExplorer(models, tokenizer, sentences, module_pattern=module_pattern, threshold=threshold).widget
