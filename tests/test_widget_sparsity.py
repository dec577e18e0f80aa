"""The activation-sparsity explorer: its plain functions, and the widget driven by setting `.value`.

Counts are compared with brute-force counts on the activations recomputed by hand from the
model's own layers, not with the widget's output.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("ipywidgets")

from course_lib.widgets.sparsity import (  # noqa: E402
    LOG_BINS,
    layer_label,
    make_sparsity_widget,
    sentence_activations,
    sparsity_figure,
    sparsity_histogram,
)

PATTERN = r"layers\.\d+\.act"


class WordTokenizer:
    """A stand-in tokenizer: one id per word (hash mod 50), HF-style output."""

    def __call__(self, texts, return_tensors="pt", padding=False):
        ids = [[sum(map(ord, word)) % 50 for word in text.split()] for text in texts]
        length = max(map(len, ids))
        return {
            "input_ids": torch.tensor([row + [0] * (length - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids]),
        }


class TinyModel(nn.Module):
    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.layers = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(8, 16), "act": nn.GELU(), "fc2": nn.Linear(16, 8)}) for _ in range(3))
        with torch.no_grad():
            for layer in self.layers:
                layer["fc1"].bias -= shift  # a large shift sends most pre-activations below -5.5: exact zeros

    def hidden_by_hand(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        x, hidden = self.embed(input_ids), []
        for layer in self.layers:
            hidden.append(F.gelu(layer["fc1"](x)))
            x = x + layer["fc2"](hidden[-1])
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer["fc2"](layer["act"](layer["fc1"](x)))
        return x


SENTENCES = ["the film was not good at all", "great acting", "a slow but moving story about two brothers"]


def test_layer_label():
    assert layer_label("bert.encoder.layer.3.intermediate.intermediate_act_fn") == "layer 3"
    assert layer_label("blocks.0.mlp.activation") == "layer 0"
    assert layer_label("act") == "act"


def test_sparsity_histogram_counts_by_hand():
    values = torch.tensor([[0.0, 0.0, 1e-7, -0.1], [2.0, 0.0, 5e-4, -1e-3]])
    histogram = sparsity_histogram(values, threshold=1e-3, layer="x")
    assert histogram.num_values == 8 and histogram.num_exact_zeros == 3
    assert histogram.exact_density == pytest.approx(5 / 8)
    assert histogram.threshold_density == pytest.approx(2 / 8)  # |a| > 1e-3: -0.1 and 2.0
    assert histogram.counts.sum() == 5
    expected, _ = np.histogram(np.log10([1e-7, 0.1, 2.0, 5e-4, 1e-3]), bins=LOG_BINS)
    assert histogram.counts.tolist() == expected.tolist()
    assert histogram.minimum == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        sparsity_histogram(values, threshold=-1.0)


def test_sentence_activations_match_the_layers_by_hand():
    torch.manual_seed(0)
    model = TinyModel()
    tokenizer = WordTokenizer()
    activations = sentence_activations(model, tokenizer, SENTENCES[0], PATTERN)
    by_hand = model.hidden_by_hand(tokenizer([SENTENCES[0]])["input_ids"])
    assert list(activations) == [f"layers.{i}.act" for i in range(3)]
    for got, expected in zip(activations.values(), by_hand):
        assert got.shape == (7, 16) and torch.allclose(got, expected[0], atol=1e-6)
    with pytest.raises(ValueError, match="matches"):
        sentence_activations(model, tokenizer, SENTENCES[0], r"no_such_module$")
    with pytest.raises(ValueError, match="non-empty"):
        sentence_activations(model, tokenizer, "  ", PATTERN)


def test_sparsity_figure_is_a_static_figure():
    histogram = sparsity_histogram(torch.randn(5, 16), 1e-2, "layers.1.act")
    figure = sparsity_figure({"before": histogram, "after": histogram})
    assert len(figure.axes) == 1 and figure.axes[0].get_title() == "layer 1"
    assert len(figure.axes[0].get_legend().get_texts()) == 2
    with pytest.raises(ValueError, match="histograms is empty"):
        sparsity_figure({})


def test_widget_updates_when_controls_change():
    torch.manual_seed(0)
    before, after = TinyModel(), TinyModel(shift=8.0)
    tokenizer = WordTokenizer()
    widget = make_sparsity_widget({"before": before, "after": after}, tokenizer, SENTENCES, module_pattern=PATTERN, threshold=1e-3)
    explorer = widget.explorer
    controls = explorer.controls
    assert explorer.update_count == 1 and set(explorer.last_histograms) == {"before", "after"}

    def brute(model, sentence, layer_index, tau):
        hidden = model.hidden_by_hand(tokenizer([sentence])["input_ids"])[layer_index][0]
        return (hidden != 0).float().mean().item(), (hidden.abs() > tau).float().mean().item()

    controls["layer"].value = "layers.2.act"
    assert explorer.update_count == 2 and explorer.last_histograms["before"].layer == "layers.2.act"
    controls["sentence"].value = SENTENCES[2]
    controls["threshold"].value = 1e-2
    for name, model in (("before", before), ("after", after)):
        exact, thresholded = brute(model, SENTENCES[2], 2, 1e-2)
        histogram = explorer.last_histograms[name]
        assert histogram.exact_density == pytest.approx(exact) and histogram.threshold_density == pytest.approx(thresholded)
        assert histogram.num_values == len(SENTENCES[2].split()) * 16
    assert explorer.last_histograms["after"].exact_density < explorer.last_histograms["before"].exact_density
    assert explorer.update_count == 4
    assert len(explorer.output.outputs) == 1 and explorer.output.outputs[0]["data"]["image/png"]


def test_widget_needs_models_and_sentences():
    with pytest.raises(ValueError, match="models is empty"):
        make_sparsity_widget({}, WordTokenizer(), SENTENCES)
    with pytest.raises(ValueError, match="sentences is empty"):
        make_sparsity_widget(TinyModel(), WordTokenizer(), [], module_pattern=PATTERN)
