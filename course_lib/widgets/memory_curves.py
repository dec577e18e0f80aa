"""The memory-curve widget: activation memory (or a step's peak) vs batch size, sequence length or depth, per method.

Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.

Nothing is measured while the sliders move. The curves come from per-method formulas
(`course_lib.meft.fit_activation_costs`): each method's saved bytes were measured once on a small
grid of batch sizes, lengths and depths, and the exact form of the count,

    bytes = B (a + b T + c T L + d T^2 + e T^2 L) + f + g L + h T,

was fitted to them; the widget evaluates that formula. Given `peak_costs`
(`course_lib.meft.fit_peak_costs`: the same formula fitted to the peak of each phase of a training
step, the largest phase predicted), a "measure" control switches the curves to the peak of a
step minus the weights, the figure that decides whether a batch fits. `memory_curves` computes the curves,
`memory_curves_figure` draws them (the notebook shows a static figure first), and
`make_memory_curves_widget` wires ipywidgets controls to them. Tests set `.value` on the
controls and read `explorer.last_curves`.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import io

import numpy as np
from matplotlib.figure import Figure

from course_lib.meft.memory_costs import ActivationCostModel, PeakCostModel
from course_lib.meft.methods import METHOD_LABELS, METHOD_NAMES

__all__ = ["MEASURES", "X_AXES", "memory_curves", "memory_curves_figure", "MemoryCurvesExplorer", "make_memory_curves_widget"]

#: x axis name -> (label, values drawn)
X_AXES: dict[str, tuple[str, np.ndarray]] = {
    "batch_size": ("batch size B", np.array([1, 2, 4, 8, 16, 32, 64, 128])),
    "seq_len": ("sequence length T (tokens)", np.array([16, 32, 64, 128, 192, 256, 384, 512])),
    "num_layers": ("number of layers L", np.array([1, 2, 4, 6, 8, 12, 16, 24, 32, 48])),
}


#: measure name -> (y-axis label, title prefix)
MEASURES: dict[str, tuple[str, str]] = {
    "saved": ("activation memory (MiB, parameters excluded)", "saved for backward"),
    "peak": ("peak allocated (MiB, weights excluded)", "peak of an AdamW step"),
}


class CostModel(Protocol):
    """What the curves need of a fitted model: ActivationCostModel and PeakCostModel both have it."""

    def predict_mib(self, batch_size: float, seq_len: float, num_layers: float) -> float: ...


def memory_curves(
    costs: Mapping[str, CostModel],
    methods: Sequence[str] | None = None,
    x_axis: str = "batch_size",
    batch_size: int = 32,
    seq_len: int = 128,
    num_layers: int = 6,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method -> (x values, activation MiB) along `x_axis`, the other two sizes held fixed.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {list(X_AXES)}, got {x_axis!r}")
    methods = list(costs) if methods is None else list(methods)
    missing = [m for m in methods if m not in costs]
    if missing:
        raise ValueError(f"no fitted costs for {missing}; have {list(costs)}")
    if min(batch_size, seq_len, num_layers) < 1:
        raise ValueError(f"batch_size, seq_len and num_layers must be >= 1, got {batch_size}, {seq_len}, {num_layers}")
    xs = X_AXES[x_axis][1]
    curves = {}
    for method in methods:
        sizes = {"batch_size": batch_size, "seq_len": seq_len, "num_layers": num_layers}
        values = []
        for x in xs:
            sizes[x_axis] = int(x)
            values.append(costs[method].predict_mib(sizes["batch_size"], sizes["seq_len"], sizes["num_layers"]))
        curves[method] = (xs.copy(), np.array(values))
    return curves


def memory_curves_figure(
    costs: Mapping[str, CostModel],
    methods: Sequence[str] | None = None,
    x_axis: str = "batch_size",
    batch_size: int = 32,
    seq_len: int = 128,
    num_layers: int = 6,
    curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    measure: str = "saved",
) -> Figure:
    """Log-log plot of the curves, with the current setting marked on each; `measure` ("saved" or
    "peak", `MEASURES`) names what `costs` predict.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {list(MEASURES)}, got {measure!r}")
    if curves is None:
        curves = memory_curves(costs, methods, x_axis, batch_size, seq_len, num_layers)
    y_label, title = MEASURES[measure]
    figure = Figure(figsize=(7.5, 4.2))
    ax = figure.add_subplot(1, 1, 1)
    current = {"batch_size": batch_size, "seq_len": seq_len, "num_layers": num_layers}[x_axis]
    for method, (xs, mib) in curves.items():
        colour = f"C{METHOD_NAMES.index(method)}" if method in METHOD_NAMES else None  # one colour per method in every view
        (line,) = ax.plot(xs, mib, "o-", markersize=3, color=colour, label=METHOD_LABELS.get(method, method))
        ax.plot([current], [costs[method].predict_mib(batch_size, seq_len, num_layers)], "o", color=line.get_color(), markersize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(X_AXES[x_axis][0])
    ax.set_ylabel(y_label)
    fixed = {"batch_size": f"B = {batch_size}", "seq_len": f"T = {seq_len}", "num_layers": f"L = {num_layers}"}
    ax.set_title(title + ", " + ", ".join(v for k, v in fixed.items() if k != x_axis) + " (fitted to measurements)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _figure_png(figure: Figure, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _widgets():
    import ipywidgets

    return ipywidgets


class MemoryCurvesExplorer:
    """The widget's state and controls; `.widget` is the ipywidgets box to display.

    Attributes the tests read: `controls` (name -> ipywidget), `last_curves`, `last_figure`,
    `update_count`. With `peak_costs` (some or all of the methods of `costs`) a "measure" control
    switches between saved-for-backward bytes and the peak of a training step.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """

    def __init__(
        self,
        costs: Mapping[str, ActivationCostModel],
        methods: Sequence[str] | None = None,
        batch_size: int = 32,
        seq_len: int = 128,
        num_layers: int = 6,
        peak_costs: Mapping[str, PeakCostModel] | None = None,
    ) -> None:
        widgets = _widgets()
        if not costs:
            raise ValueError("costs is empty: pass the result of course_lib.meft.fit_activation_costs")
        if peak_costs is not None and not set(peak_costs) <= set(costs):
            raise ValueError(f"peak_costs has methods that costs has not: {sorted(set(peak_costs) - set(costs))}")
        self.costs = dict(costs)
        self.peak_costs = dict(peak_costs) if peak_costs is not None else None
        chosen = list(self.costs) if methods is None else list(methods)
        self.controls = {
            "methods": widgets.SelectMultiple(
                options=[(METHOD_LABELS.get(m, m), m) for m in self.costs], value=tuple(chosen), description="methods", rows=7
            ),
            "x_axis": widgets.Dropdown(
                options=[("batch size", "batch_size"), ("sequence length", "seq_len"), ("number of layers", "num_layers")],
                value="batch_size",
                description="x axis",
            ),
            "batch_size": widgets.IntSlider(value=batch_size, min=1, max=128, description="batch B"),
            "seq_len": widgets.IntSlider(value=seq_len, min=16, max=512, step=16, description="length T"),
            "num_layers": widgets.IntSlider(value=num_layers, min=1, max=48, description="layers L"),
        }
        if self.peak_costs is not None:
            self.controls["measure"] = widgets.Dropdown(
                options=[("saved for backward", "saved"), ("peak of a step", "peak")], value="saved", description="measure",
            )
        self.output = widgets.Output()
        controls = list(self.controls.values())
        self.widget = widgets.VBox([widgets.HBox([controls[0], widgets.VBox(controls[1:])]), self.output])
        self.widget.explorer = self
        self.last_curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.last_figure: Figure | None = None
        self.update_count = 0
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def update(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Recompute the curves from the controls' values and redraw."""
        v = {name: control.value for name, control in self.controls.items()}
        measure = v.get("measure", "saved")
        costs = self.peak_costs if measure == "peak" else self.costs
        methods = [m for m in v["methods"] if m in costs]  # a method without a peak fit is left out of the peak view
        curves = memory_curves(costs, methods, v["x_axis"], v["batch_size"], v["seq_len"], v["num_layers"])
        figure = memory_curves_figure(
            costs, methods, v["x_axis"], v["batch_size"], v["seq_len"], v["num_layers"], curves=curves, measure=measure
        )
        left_out = [METHOD_LABELS.get(m, m) for m in v["methods"] if m not in costs]
        if left_out:
            figure.axes[0].text(0.99, 0.01, "no peak fit: " + ", ".join(left_out), transform=figure.axes[0].transAxes,
                                ha="right", va="bottom", fontsize=8)  # fmt: skip
        self.last_curves, self.last_figure = curves, figure
        self.update_count += 1
        from IPython.display import Image

        self.output.outputs = ()
        self.output.append_display_data(Image(_figure_png(figure)))
        return curves


def make_memory_curves_widget(
    costs: Mapping[str, ActivationCostModel],
    methods: Sequence[str] | None = None,
    batch_size: int = 32,
    seq_len: int = 128,
    num_layers: int = 6,
    peak_costs: Mapping[str, PeakCostModel] | None = None,
) -> Any:
    """The memory-curve widget (an ipywidgets VBox); its controller is `widget.explorer`.
    `peak_costs` (from `course_lib.meft.fit_peak_costs`) adds the peak of a step as a measure.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    return MemoryCurvesExplorer(costs, methods, batch_size, seq_len, num_layers, peak_costs).widget
