#!/usr/bin/env bash
# Create (or bring up to date) the course's virtual environment in .venv.
#
# Called by `make` whenever requirements.lock or pyproject.toml is newer than the last
# successful install. Steps:
#   1. open3d's system libraries (Debian/Ubuntu: libusb-1.0-0, libgl1, libgomp1): installed
#      with apt-get when we are root, otherwise we stop and print the exact command to run;
#   2. a Python 3.11, 3.12 or 3.13 virtual environment in .venv (3.10 is refused, with why);
#   3. the pinned requirements (requirements.lock) and course_lib in editable mode;
#   4. JupyterLab's page config (no build prompt for dash's source extension);
#   5. an import check of the heavy dependencies.
# The stamp file .venv/.installed is written last, so an interrupted run is redone next time.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. system libraries needed by open3d's wheel -------------------------------------
# library file -> Debian package that provides it
declare -A SYSTEM_LIBS=(
  [libusb-1.0.so.0]=libusb-1.0-0
  [libGL.so.1]=libgl1
  [libgomp.so.1]=libgomp1
)
missing_pkgs=()
if [ "$(uname -s)" = "Linux" ]; then
  for lib in "${!SYSTEM_LIBS[@]}"; do
    if ! /sbin/ldconfig -p 2>/dev/null | grep -q "$lib"; then
      missing_pkgs+=("${SYSTEM_LIBS[$lib]}")
    fi
  done
fi
if [ ${#missing_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing open3d's system libraries: ${missing_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
  elif command -v apt-get >/dev/null 2>&1; then
    die "open3d needs system libraries that are missing. Run:
    sudo apt-get update && sudo apt-get install -y ${missing_pkgs[*]}
then run make again."
  else
    die "open3d needs these shared libraries, which were not found: $(printf '%s ' "${!SYSTEM_LIBS[@]}").
Install them with your system's package manager (Debian names: ${missing_pkgs[*]}), then run make again."
  fi
fi

# --- 2. the virtual environment --------------------------------------------------------
# requirements.lock holds for Python 3.11, 3.12 and 3.13 (3.11 is the one the course runs on in
# CI; `python scripts/check_locks.py` resolves the lock for the others). Python 3.10 cannot take
# it: numpy 2.4, matplotlib 3.11 and transformers 5.21+ need 3.11.
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11-3.13 or run 'make PYTHON=/path/to/python3.12'"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$pyver" in
  3.11|3.12|3.13) ;;
  *) die "the course runs on Python 3.11, 3.12 or 3.13, but $PYTHON is $pyver (numpy 2.4, matplotlib 3.11 and transformers 5.21+ need 3.11 or newer). Run 'make PYTHON=/path/to/python3.12' (or 3.11, 3.13).";;
esac
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:3] < (3, 11, 5))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1): the lock needs 3.11.5 or newer (soupsieve 4.1.3). Update Python, or use 3.12 / 3.13."
if [ -x "$VENV/bin/python" ]; then
  venv_ver=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
  if [ "$venv_ver" != "$pyver" ]; then
    say "$VENV has Python $venv_ver, not $pyver: recreating it"
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"

# --- 3. pinned requirements + course_lib -------------------------------------------------
# torch: the lock pins 2.13.0. For Python 3.11 this machine's pip finds the CPU build on disk;
# for 3.12 and 3.13 it comes from PyTorch's CPU index first (PyPI's Linux wheel is the CUDA
# build, several GB). TORCH_INDEX_URL picks another index (https://pypi.org/simple: the CUDA build).
if [ "$pyver" != "3.11" ] && ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  say "installing torch 2.13.0 for Python $pyver from $TORCH_INDEX_URL"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --timeout 30 --retries 1 \
      --index-url "$TORCH_INDEX_URL" "torch==2.13.0" \
    || die "could not install torch 2.13.0 from $TORCH_INDEX_URL. With no access to it, run
    TORCH_INDEX_URL=https://pypi.org/simple make book   (PyPI's CUDA build of torch, several GB)
or use Python 3.11 on a machine that has the CPU wheel."
fi
say "installing the pinned requirements (requirements.lock)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.lock
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

# --- 4. JupyterLab without a build prompt ---------------------------------------------------
# open3d pulls in dash, whose JupyterLab extension is a source extension: every JupyterLab
# session opened with a "Build Recommended" dialog whose default button downloads ~139 MB and
# then fails offline. The course needs no build (its widgets are prebuilt extensions): the
# venv's own labconfig turns the build check off and disables that extension, for `make lab`
# and any `jupyter lab` started from this venv.
mkdir -p "$VENV/etc/jupyter/labconfig"
cp scripts/jupyterlab_page_config.json "$VENV/etc/jupyter/labconfig/page_config.json"

# --- 5. check -----------------------------------------------------------------------------
"$VENV/bin/python" - <<'PY'
import importlib, sys
for name in ["torch", "transformers", "peft", "open3d", "nbval", "course_lib"]:
    try:
        importlib.import_module(name)
    except Exception as error:  # report which import failed and why
        sys.exit(f"[setup] ERROR: 'import {name}' failed after install: {error}")
import torch
if torch.version.cuda is not None:
    print(f"[setup] note: torch {torch.__version__} is a CUDA build; the course runs on the CPU either way")
PY
date -u +%FT%TZ > "$STAMP"
say "environment ready: $VENV"
