#!/usr/bin/env bash
# Chromium for the browser tests of the built site (tests/test_browser_site.py, scripts/check_site.py).
#
# Playwright (in requirements.lock) drives the system's Chromium; it never downloads a browser.
# Found already (chromium or chromium-browser on PATH, or $CHROMIUM): nothing to do. Otherwise,
# as root with apt-get (Debian, Ubuntu, CI), install Debian's chromium package; otherwise print
# the exact command to run and carry on: the browser tests are then skipped, saying the same.
set -euo pipefail

say() { printf '[browser] %s\n' "$*"; }

if [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ]; then
  exit 0
fi
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(uname -s)" = "Linux" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Chromium for the browser tests (Debian package chromium)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
  command -v chromium >/dev/null 2>&1 || { say "ERROR: apt-get installed no chromium command"; exit 1; }
elif command -v apt-get >/dev/null 2>&1; then
  say "no Chromium: the browser tests will be skipped. To run them:"
  say "    sudo apt-get update && sudo apt-get install -y chromium"
else
  say "no Chromium: the browser tests will be skipped. Install Chromium with your system's package"
  say "manager (or set CHROMIUM=/path/to/chromium), then run make test again."
fi
