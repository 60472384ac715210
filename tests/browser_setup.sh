#!/usr/bin/env bash
# Installs what tests/test_page_browser.py needs: Debian's chromium (headless, driven over --remote-debugging-pipe,
# so no driver and no Python package). Run as root on a fresh machine; does nothing when chromium is present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "tests/browser_setup.sh: chromium is missing; run this script as root (or: sudo apt-get install chromium)" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
