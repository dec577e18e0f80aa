"""README.md's "Using course_lib in your own code" and examples/using_course_lib.py say the same:
every Python block of that section is one `# --- README: <name>` section of the file, character
for character, and every section of the file is in the README. Running the file is the job of
tests/test_wheel.py (from a wheel in a fresh environment)."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _readme_blocks() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Using course_lib in your own code") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```\n", section, re.S)


def _example_sections() -> dict[str, str]:
    text = (REPO_ROOT / "examples" / "using_course_lib.py").read_text()
    return dict(re.findall(r"# --- README: (\w+)\n(.*?)# --- README: end\n", text, re.S))


def test_every_readme_snippet_is_a_section_of_the_example_file_and_back():
    blocks, sections = _readme_blocks(), _example_sections()
    assert len(sections) >= 6, sorted(sections)
    missing_from_file = [block.splitlines()[0] for block in blocks if block not in sections.values()]
    assert not missing_from_file, f"README blocks not in examples/using_course_lib.py: {missing_from_file}"
    missing_from_readme = [name for name, code in sections.items() if code not in blocks]
    assert not missing_from_readme, f"sections of examples/using_course_lib.py not in the README: {missing_from_readme}"
