#!/usr/bin/env bash
# Create (or bring up to date) the course's virtual environment in .venv.
#
# Called by `make` whenever requirements.lock or pyproject.toml is newer than the last
# successful install. Steps:
#   1. open3d's system libraries (Debian/Ubuntu: libusb-1.0-0, libgl1, libgomp1): installed
#      with apt-get when we are root, otherwise we stop and print the exact command to run;
#   2. a Python 3.11 virtual environment in .venv;
#   3. the pinned requirements (requirements.lock) and course_lib in editable mode;
#   4. an import check of the heavy dependencies.
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
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = "3.11" ] || die "the course is pinned for Python 3.11, but $PYTHON is $pyver. Run 'make PYTHON=/path/to/python3.11'."
if [ -x "$VENV/bin/python" ]; then
  venv_ver=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
  if [ "$venv_ver" != "3.11" ]; then
    say "$VENV has Python $venv_ver: recreating it"
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"

# --- 3. pinned requirements + course_lib -------------------------------------------------
say "installing the pinned requirements (requirements.lock)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.lock
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

# --- 4. check -----------------------------------------------------------------------------
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
