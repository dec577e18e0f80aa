"""scripts/setup_env.sh refuses the Pythons the lock cannot serve, and says why and what to run.

A stand-in interpreter answers the script's version questions, so these run in a second and
install nothing. (That the lock resolves for 3.11.5, 3.12 and 3.13 is checked, with the package
index, by `python scripts/check_locks.py`.)"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def fake_python(tmp_path: Path, minor: str, micro_ok: bool = True) -> Path:
    """A 'python' that reports version `minor` and answers the 3.11.5 check with `micro_ok`."""
    script = tmp_path / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f'  *"(3, 11, 5)"*) exit {0 if micro_ok else 1};;\n'
        f'  *) echo "{minor}";;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def run_setup(tmp_path: Path, python: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=str(python), VENV=str(tmp_path / "venv"))
    return subprocess.run(["bash", "scripts/setup_env.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip


@pytest.mark.parametrize("minor", ["3.10", "3.9", "3.14"])
def test_unsupported_pythons_are_refused_with_the_reason(tmp_path, minor):
    done = run_setup(tmp_path, fake_python(tmp_path, minor))
    assert done.returncode != 0
    assert f"is {minor}" in done.stderr and "3.11, 3.12 or 3.13" in done.stderr and "make PYTHON=" in done.stderr
    assert not (tmp_path / "venv").exists()  # nothing created


def test_an_old_python_3_11_is_refused(tmp_path):
    done = run_setup(tmp_path, fake_python(tmp_path, "3.11", micro_ok=False))
    assert done.returncode != 0 and "3.11.5 or newer" in done.stderr


def test_a_missing_interpreter_says_how_to_pick_one(tmp_path):
    done = run_setup(tmp_path, tmp_path / "no-such-python")
    assert done.returncode != 0 and "not found" in done.stderr and "make PYTHON=" in done.stderr
