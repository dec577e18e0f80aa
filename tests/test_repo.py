"""Checks of the repository itself: clean notebooks, consistent pins, a complete table of contents."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = json.loads(path.read_text())
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), f"{path.name} cell {index} has outputs: clear them before committing"
        assert cell.get("execution_count") is None, f"{path.name} cell {index} has an execution count"


def test_environment_yml_has_the_same_pins_as_requirements():
    requirements = _pins((ROOT / "requirements.in").read_text().splitlines())
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == requirements
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"


def test_lock_file_agrees_with_requirements():
    requirements = _pins((ROOT / "requirements.in").read_text().splitlines())
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    for name, version in requirements.items():
        assert lock.get(name) == version, f"{name}: requirements.in pins {version}, lock has {lock.get(name)}"
    assert lock["torch"] == "2.13.0", "torch must stay pinned to the CPU build found on disk"


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def test_every_notebook_is_in_the_table_of_contents_and_the_readme():
    toc = set(_toc_files())
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        stem = str(path.relative_to(ROOT).with_suffix(""))
        assert stem in toc, f"{stem} is missing from toc.yml"
        assert path.name in readme, f"{path.name} is missing from the README's course map"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_has_its_own_id(path):
    """nbformat 4.5 cells carry an id; a cell added without one makes nbformat warn on every read
    (and a future nbformat refuse the notebook)."""
    notebook = json.loads(path.read_text())
    ids = [cell.get("id") for cell in notebook["cells"]]
    assert None not in ids, f"cells {[i for i, cell_id in enumerate(ids) if cell_id is None]} have no id"
    assert len(set(ids)) == len(ids), "two cells share an id"


def test_notebook_00s_course_map_has_a_row_for_every_notebook():
    """The course map a learner opens first stays in step with toc.yml: one row per notebook."""
    welcome = json.loads((ROOT / "notebooks" / "00_welcome.ipynb").read_text())
    course_map = next("".join(cell["source"]) for cell in welcome["cells"]
                      if "".join(cell["source"]).startswith("## The course map"))  # fmt: skip
    rows = re.findall(r"^\| \d \| `(\w+)` \|", course_map, re.M)
    notebooks = [Path(entry).name for entry in _toc_files() if (ROOT / f"{entry}.ipynb").exists()]
    assert rows == [name for name in notebooks if name != "00_welcome"]


def test_every_toc_entry_exists():
    for entry in _toc_files():
        candidates = [ROOT / f"{entry}{suffix}" for suffix in (".ipynb", ".md")]
        assert any(p.exists() for p in candidates), f"toc.yml names {entry}, which does not exist"


def test_every_course_lib_module_has_a_docstring():
    import course_lib

    for module_info in pkgutil.walk_packages(course_lib.__path__, prefix="course_lib."):
        module = importlib.import_module(module_info.name)
        assert module.__doc__ and module.__doc__.strip(), f"{module_info.name} has no module docstring"


def test_every_image_a_notebook_shows_exists_and_is_valid_svg_or_png():
    """Diagrams are files in notebooks/figures referenced from Markdown cells; a broken path would
    show an empty frame in JupyterLab and a warning in the book."""
    import json
    import re
    import xml.dom.minidom

    referenced = 0
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", "".join(cell["source"])):
                if target.startswith(("http:", "https:", "attachment:")):
                    continue
                image = (path.parent / target).resolve()
                assert image.is_file(), f"{path.name} shows {target}, which does not exist"
                if image.suffix == ".svg":
                    xml.dom.minidom.parse(str(image))  # well-formed
                referenced += 1
    assert referenced >= 5  # the method diagrams of notebooks 02, 14, 21, 31 and 32


#: The widest figure that stays legible on the site: the book's content column is about 690 CSS px
#: in a 1280-px window, and a 10-pt tick label of a W-inch figure shows at 10/72 x 690 / W px,
#: at least 9 px (scripts/check_site.py's limit) for W <= 10.6 (the same holds in JupyterLab).
MAX_FIGURE_INCHES = 10.5
FIGURE_SOURCES = NOTEBOOKS + sorted((ROOT / "course_lib").rglob("*.py"))


def _code_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    return path.read_text()


@pytest.mark.parametrize("path", FIGURE_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_are_narrow_enough_to_read_on_the_site(path: Path):
    """A wide figure is scaled down to the page and its labels with it (a 15-inch figure's tick labels
    showed at about 6 px); tick labels keep matplotlib's 10 pt. The built pages are measured by
    scripts/check_site.py (`make check-site`)."""
    code = _code_of(path)
    for width in re.findall(r"figsize=\(\s*([0-9.]+)\s*,", code):  # the width is a number everywhere
        assert float(width) <= MAX_FIGURE_INCHES, f"{path.name}: a figsize {width} inches wide is wider than {MAX_FIGURE_INCHES}"
    assert not re.search(r"figsize=\((?!\s*[0-9.]+\s*,)", code), f"{path.name}: a computed figure width: keep it a number here"
    for line in code.splitlines():
        if re.search(r"(set_[xy]ticks|set_[xy]ticklabels|tick_params)\([^;]*(fontsize|labelsize)\s*=", line):
            raise AssertionError(f"{path.name}: tick labels below matplotlib's 10 pt are unreadable on the site: {line.strip()}")
