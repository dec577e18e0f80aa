"""Update functions behind the course's interactive widgets.

Each widget is a plain function of its controls' values that returns a matplotlib Figure (or
data), plus a small `make_*_widget()` that wires ipywidgets controls to it. The plain function
is what the tests call (they also set `.value` on the controls); a notebook shows a static
figure of the same function before the live widget, so the book (no kernel) still has a picture.
"""
from course_lib.widgets.memory_curves import make_memory_curves_widget, memory_curves, memory_curves_figure  # noqa: F401
from course_lib.widgets.sparsity import make_sparsity_widget, sparsity_figure, sparsity_histogram  # noqa: F401
