"""Check that requirements.lock resolves for every Python the set-up accepts (3.11.5+, 3.12, 3.13).

Only Python 3.11 runs on the course's machines, so for the others this resolves the lock the
way pip would on a Linux x86_64 machine with that Python, binary wheels only, without
installing anything (`pip install --dry-run --python-version X --only-binary=:all:`); it needs
the package index. torch is left out of the check here: the set-up takes it from PyTorch's CPU
index for 3.12 and 3.13 (PyPI's Linux wheel is the CUDA build); the script only checks that
PyPI lists a torch 2.13.0 wheel for each Python.

    python scripts/check_locks.py [--pythons 3.11 3.12 3.13]     # writes results/bench/locks.json

Exit status 0 when every Python resolves.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "linux_x86_64")  # fmt: skip  (open3d 0.20's wheels are manylinux_2_35)


def torch_pin(lock: Path) -> str:
    for line in lock.read_text().splitlines():
        if line.startswith("torch=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit(f"{lock} pins no torch")


def resolve(lock: Path, python: str) -> dict:
    """pip's dry-run resolution of `lock` (torch aside) for `python`: {"ok", "packages" (of the lock),
    "unpinned" (packages pip would add that the lock does not pin), "error"}."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(line + "\n" for line in lock.read_text().splitlines()
                                        if line and not line.startswith(("#", "torch=="))))  # fmt: skip
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                   *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
                   "--target", str(Path(tmp) / "target"), "--report", str(report), "-r", str(requirements)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            return {"ok": False, "packages": 0, "unpinned": [], "error": "\n".join(errors)[-2000:] or done.stderr[-2000:]}
        installed = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
        pinned = {line.split("==")[0].lower().replace("_", "-") for line in lock.read_text().splitlines() if "==" in line}
        # Without torch installed first, pip satisfies the packages that need torch with PyPI's CUDA
        # build and its CUDA libraries; the set-up installs the CPU build first, which needs none.
        unpinned = sorted(name for name in installed - pinned if name not in ("torch", "triton")
                          and not name.startswith("nvidia-"))  # fmt: skip
        error = f"packages outside the lock: {unpinned}" if unpinned else None
        return {"ok": not unpinned, "packages": len(installed & pinned), "unpinned": unpinned, "error": error}


def torch_wheels_on_pypi(version: str) -> set[str]:
    """The CPython tags (cp311, ...) of PyPI's Linux x86_64 torch `version` wheels."""
    with urllib.request.urlopen("https://pypi.org/simple/torch/", timeout=30) as response:
        page = response.read().decode()
    return set(re.findall(rf"torch-{re.escape(version)}-(cp3\d+)-cp3\d+-manylinux[^\"#<]*x86_64\.whl", page))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 3.11.5: the lock's soupsieve 4.1.3 needs it (3.11.0-3.11.4 cannot take the lock)
    parser.add_argument("--pythons", nargs="+", default=["3.11.5", "3.12", "3.13"])
    parser.add_argument("--lock", type=Path, default=REPO_ROOT / "requirements.lock")
    args = parser.parse_args()
    version = torch_pin(args.lock)
    try:
        torch_tags = torch_wheels_on_pypi(version)
    except OSError as error:
        print(f"check_locks: PyPI is not reachable ({error}); nothing checked", file=sys.stderr)
        return 2
    results = {}
    for python in args.pythons:
        start = time.perf_counter()
        row = resolve(args.lock, python)
        row["torch_wheel_on_pypi"] = "cp" + "".join(python.split(".")[:2]) in torch_tags
        row["seconds"] = round(time.perf_counter() - start, 1)
        results[python] = row
        status = "resolves" if row["ok"] else "FAILS"
        print(f"Python {python}: {args.lock.name} {status} ({row['packages']} packages, torch {version} wheel on "
              f"PyPI: {row['torch_wheel_on_pypi']}){'' if row['ok'] else chr(10) + row['error']}", flush=True)  # fmt: skip
    sys.path.insert(0, str(REPO_ROOT))
    from course_lib.results import results_path, write_json

    write_json(results_path("locks", "bench"), {"lock": args.lock.name, "torch": version, "platforms": list(PLATFORMS),
                                                "pythons": results})  # fmt: skip
    return 0 if all(row["ok"] and row["torch_wheel_on_pypi"] for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
