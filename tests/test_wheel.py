"""course_lib as an engineer gets it: a wheel built from this tree, installed into a fresh
virtual environment with its core dependencies only.

- the wheel carries the shipped Point-MAE checkpoint and its SHA256SUMS (package data);
- the core install pulls neither matplotlib, ipywidgets, open3d nor peft;
- every sub-package imports, and examples/using_course_lib.py (the README's snippets) runs.

torch is the pinned CPU build of the course's own environment, made visible to the fresh one by
a .pth file that lists a folder of links to torch and its own dependencies only (installing a
second copy of torch would cost a minute and a gigabyte for nothing this test checks); pip
installs everything else the wheel declares, at the versions of requirements.lock.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SUBPACKAGES = ["course_lib", "course_lib.peft", "course_lib.deft", "course_lib.meft", "course_lib.meters",
               "course_lib.text", "course_lib.train", "course_lib.points", "course_lib.point_peft",
               "course_lib.run_cache"]  # fmt: skip
NOT_IN_CORE = ["matplotlib", "ipywidgets", "open3d", "peft", "plotly", "h5py"]


def _requirement_names(distribution: metadata.Distribution) -> list[str]:
    names = []
    for requirement in distribution.requires or []:
        if "extra ==" in requirement:
            continue
        names.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return names


def _closure(name: str) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        key = current.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            distribution = metadata.distribution(current)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency (e.g. triton) that this machine does not have
        seen[key] = distribution
        todo += _requirement_names(distribution)
    return list(seen.values())


def _link_torch(into: Path) -> None:
    """Links to torch's files and its dependencies' (their top-level entries of site-packages)."""
    into.mkdir()
    for distribution in _closure("torch"):
        site = Path(distribution.locate_file(""))
        tops = {Path(str(file)).parts[0] for file in distribution.files or []}
        for top in tops:
            source = site / top
            if source.exists() and not (into / top).exists() and top != "..":
                (into / top).symlink_to(source)


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the tracked tree")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "course_lib", "pyproject.toml", "README.md"],
                             cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, tracked):
        if (REPO_ROOT / name).exists():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    # new files not yet committed belong to the tree under test as well
    for path in (REPO_ROOT / "course_lib").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            target = source / path.relative_to(REPO_ROOT)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(source)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (work / "dist").glob("course_lib-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    _link_torch(work / "torch_only")
    (Path(site) / "course_torch.pth").write_text(str(work / "torch_only") + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "-c", str(REPO_ROOT / "requirements.lock"), str(wheel)],
                             capture_output=True, text=True, timeout=900)  # fmt: skip
    if install.returncode != 0 and "No matching distribution" in install.stderr + install.stdout:
        pytest.skip(f"the package index is unreachable: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr[-2000:]
    return work


def _run(work: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COURSE_", "PYTHONPATH"))}
    return subprocess.run([str(work / "venv" / "bin" / "python"), *args], capture_output=True, text=True,
                          cwd=cwd or work, env=env, timeout=600)  # fmt: skip


def test_the_wheel_carries_the_checkpoint(fresh_env):
    (wheel,) = (fresh_env / "dist").glob("course_lib-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"course_lib/checkpoints/point_mae_tiny.pt", "course_lib/checkpoints/SHA256SUMS"} <= set(names)


def test_the_core_install_imports_every_subpackage_without_the_extras(fresh_env):
    code = (f"import importlib, sys\nfor name in {SUBPACKAGES!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(set({NOT_IN_CORE!r}) & set(sys.modules)))\n"
            "import course_lib\nprint(course_lib.__file__)")  # fmt: skip
    result = _run(fresh_env, "-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, location = result.stdout.strip().splitlines()[-2:]
    assert loaded == "[]", f"importing course_lib loaded optional packages: {loaded}"
    assert str(fresh_env / "venv") in location  # the installed wheel, not this checkout
    installed = _run(fresh_env, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert not [name for name in NOT_IN_CORE if f"\n{name}==" in "\n" + installed]


def test_the_readme_snippets_run_from_the_wheel(fresh_env):
    result = _run(fresh_env, str(REPO_ROOT / "examples" / "using_course_lib.py"), cwd=fresh_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all README snippets ran" in result.stdout
