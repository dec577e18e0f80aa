"""The memory-curve widget: fitted costs against direct measurements, and the widget driven by `.value`."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("ipywidgets")

from course_lib.meft import build_method, fit_activation_costs, measure_saved_bytes  # noqa: E402
from course_lib.meters import MIB  # noqa: E402
from course_lib.widgets.memory_curves import (  # noqa: E402
    X_AXES,
    make_memory_curves_widget,
    memory_curves,
    memory_curves_figure,
)

METHODS = ("lora", "lora_checkpointing", "meft1")


@pytest.fixture(scope="module")
def pretrained():
    from course_lib.text import load_classifier

    torch.manual_seed(0)
    return load_classifier(num_labels=4).eval()


@pytest.fixture(scope="module")
def costs(pretrained):
    return fit_activation_costs(pretrained, METHODS, batch_sizes=(1, 2), seq_lens=(4, 8, 12), layer_counts=(1, 2), progress=False)


def test_fitted_costs_predict_sizes_they_did_not_see(pretrained, costs):
    for method in METHODS:
        assert costs[method].max_relative_residual < 1e-6, method  # the formula is exact on its grid
        torch.manual_seed(0)
        model = build_method(method, pretrained, num_layers=3)
        measured = measure_saved_bytes(model, batch_size=3, seq_len=10)  # off the grid in B, T and L
        assert costs[method].predict_bytes(3, 10, 3) == pytest.approx(measured, rel=1e-6), method
    # MEFT per token and layer: only the parity bits of its F and G inputs, 2 x C bits (notebook 31)
    assert costs["meft1"].per_token_per_layer_bytes(128) == pytest.approx(2 * 384 / 8, rel=1e-6)
    assert costs["lora_checkpointing"].per_token_per_layer_bytes(128) == pytest.approx(384 * 4, rel=1e-6)  # the layer input


def test_memory_curves_and_figure(costs):
    curves = memory_curves(costs, ["lora", "meft1"], "num_layers", batch_size=4, seq_len=32, num_layers=6)
    xs, mib = curves["lora"]
    assert list(xs) == list(X_AXES["num_layers"][1])
    assert mib[3] == pytest.approx(costs["lora"].predict_bytes(4, 32, int(xs[3])) / MIB)
    assert (mib[1:] > mib[:-1]).all()  # LoRA grows with depth
    meft_xs, meft_mib = curves["meft1"]  # MEFT per layer: two random states and two parity-bit arrays
    rng_state_bytes = torch.get_rng_state().numel()
    per_layer = 2 * rng_state_bytes + 2 * 4 * 32 * 384 // 8  # B = 4, T = 32, C = 384: 1 bit per element
    assert (meft_mib[-1] - meft_mib[0]) * MIB == pytest.approx(per_layer * (meft_xs[-1] - meft_xs[0]), rel=1e-3)
    figure = memory_curves_figure(costs, ["meft1"], "seq_len")
    assert len(figure.axes) == 1 and "B = 32, L = 6" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match="x_axis"):
        memory_curves(costs, x_axis="width")
    with pytest.raises(ValueError, match="no fitted costs"):
        memory_curves(costs, ["adapter"])


def test_widget_updates_when_controls_change(costs):
    widget = make_memory_curves_widget(costs, methods=["lora"])
    explorer = widget.explorer
    controls = explorer.controls
    assert explorer.update_count == 1 and list(explorer.last_curves) == ["lora"]
    controls["methods"].value = ("lora", "meft1")
    assert explorer.update_count == 2 and set(explorer.last_curves) == {"lora", "meft1"}
    controls["x_axis"].value = "seq_len"
    assert list(explorer.last_curves["lora"][0]) == list(X_AXES["seq_len"][1])
    controls["batch_size"].value = 8
    expected = costs["meft1"].predict_mib(8, int(X_AXES["seq_len"][1][2]), 6)
    assert explorer.last_curves["meft1"][1][2] == pytest.approx(expected)
    assert len(explorer.output.outputs) == 1 and explorer.output.outputs[0]["data"]["image/png"]
    with pytest.raises(ValueError, match="costs is empty"):
        make_memory_curves_widget({})


def test_widget_shows_the_peak_when_given_peak_costs(pretrained, costs):
    from course_lib.meft import fit_peak_costs

    peaks = fit_peak_costs(pretrained, ["lora"], batch_sizes=(2, 4), seq_lens=(16, 32, 48), layer_counts=(2, 3), progress=False)
    explorer = make_memory_curves_widget(costs, methods=["lora", "meft1"], peak_costs=peaks).explorer
    saved = explorer.last_curves["lora"][1].copy()
    explorer.controls["measure"].value = "peak"
    assert list(explorer.last_curves) == ["lora"]  # MEFT1 has no peak fit here: left out, and the figure says so
    assert "no peak fit: MEFT1" in explorer.last_figure.axes[0].texts[-1].get_text()
    assert explorer.last_curves["lora"][1][3] == pytest.approx(peaks["lora"].predict_mib(int(X_AXES["batch_size"][1][3]), 128, 6))
    assert (explorer.last_curves["lora"][1] > saved).all()  # the peak holds the saved tensors and more
    assert "peak" in explorer.last_figure.axes[0].get_title()
    explorer.controls["measure"].value = "saved"
    assert explorer.last_curves["lora"][1] == pytest.approx(saved) and set(explorer.last_curves) == {"lora", "meft1"}
    assert "measure" not in make_memory_curves_widget(costs).explorer.controls  # saved bytes only without peaks
    with pytest.raises(ValueError, match="costs has not"):
        make_memory_curves_widget({"meft1": costs["meft1"]}, peak_costs=peaks)
    with pytest.raises(ValueError, match="measure"):
        memory_curves_figure(costs, measure="rss")
