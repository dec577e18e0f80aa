"""benchmarks/lr_sweep.py and meft_seeds.py: their copies of notebooks 02's and 32's recipes are
the notebooks' own (lr_sweep's `notebook_lr` and `agrees` would lie otherwise), and `--reuse`
keeps exactly the pairs an earlier run of the same budget measured."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from benchmarks import lr_sweep
from course_lib import config

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_recipes(path: Path) -> dict:
    """The value of the notebook's `recipes = {...}` assignment (its entries use only literals and dict())."""
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if "recipes = {" not in source:
            continue
        for node in ast.walk(ast.parse("\n".join(line for line in source.splitlines() if not line.startswith(("%", "!"))))):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "recipes" for t in node.targets):
                return eval(compile(ast.Expression(node.value), str(path), "eval"), {"__builtins__": {}, "dict": dict})
    raise AssertionError(f"no `recipes = {{...}}` in {path}")


@pytest.mark.parametrize(("notebook", "path"), [("02", "part1_foundations/02_peft_zoo.ipynb"), ("32", "part4_meft/32_meft.ipynb")])
def test_the_sweeps_copy_of_the_recipes_is_the_notebooks(notebook, path):
    recipes = notebook_recipes(NOTEBOOKS / path)
    methods, _, _ = lr_sweep.NOTEBOOKS[notebook]
    for name, (kind, options, rate, candidates) in methods.items():
        assert recipes[name] == (kind, options, rate), f"benchmarks/lr_sweep.py's {name} differs from notebook {notebook}"
        assert rate in candidates   # the notebook's rate is one the sweep scores


def test_the_seeds_benchmarks_copy_of_notebook_32s_recipes_is_the_notebooks():
    from benchmarks import meft_seeds

    assert meft_seeds.RECIPES == notebook_recipes(NOTEBOOKS / "part4_meft/32_meft.ipynb")


def test_reuse_keeps_what_an_earlier_run_measured_and_trains_the_rest(tmp_path, monkeypatch):
    methods = {"a": ("peft", {}, 1e-2, (1e-3, 1e-2)), "b": ("peft", {}, 3e-2, (1e-2, 3e-2))}
    accuracy, reused, to_train = lr_sweep.plan(methods, ["a", "b"], {"a": {"0.01": 0.9, "0.5": 0.1}, "c": {"0.01": 0.5}})
    assert accuracy == {"a": {"0.01": 0.9}, "b": {}} and reused == ["a @ 0.01"]
    assert to_train == [("a", 1e-3), ("b", 1e-2), ("b", 3e-2)]
    assert lr_sweep.plan(methods, ["b"], {})[2] == [("b", 1e-2), ("b", 3e-2)]   # without --reuse: everything

    # an earlier run counts only with the same budget and mode
    monkeypatch.setattr(config, "RESULTS_DIR", tmp_path)
    budget = {"num_epochs": 2, "batch_size": 32}
    assert lr_sweep._earlier_accuracies("sweep", budget) == {}   # none yet
    (tmp_path / "bench").mkdir()
    earlier = {"validation_accuracy": {"a": {"0.01": 0.9}}, "budget": budget, "fast": config.fast_or_full(True, False)}
    (tmp_path / "bench" / "sweep.json").write_text(json.dumps(earlier))
    assert lr_sweep._earlier_accuracies("sweep", budget) == {"a": {"0.01": 0.9}}
    assert lr_sweep._earlier_accuracies("sweep", {**budget, "num_epochs": 4}) == {}
    (tmp_path / "bench" / "sweep.json").write_text(json.dumps({**earlier, "fast": not earlier["fast"]}))
    assert lr_sweep._earlier_accuracies("sweep", budget) == {}
