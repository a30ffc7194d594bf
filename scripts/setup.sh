#!/usr/bin/env bash
# Install everything gym-libero-vla needs on a fresh Debian/Ubuntu machine (run as root, or with sudo):
# the system libraries MuJoCo needs to render headless (EGL, OSMesa), then a virtualenv in .venv with
# the project and its pinned dependencies. Re-running is cheap: nothing is reinstalled while
# pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SYSTEM_PACKAGES=(libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libosmesa6)

missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "== installing system packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.gym-libero-vla-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "== installing Python packages (first time: a few minutes; log in .venv/install.log)"
  log=.venv/install.log
  {
    .venv/bin/python -m pip install --upgrade pip &&
      # torch first and pinned: the CPU build; an unpinned torch pulled in by a dependency is a multi-GB CUDA build.
      .venv/bin/python -m pip install torch==2.13.0 &&
      .venv/bin/python -m pip install -e '.[dev]'
  } >"$log" 2>&1 || {
    tail -n 40 "$log"
    echo "pip install failed; full log in $log" >&2
    exit 1
  }
  echo "$wanted" >"$stamp"
fi
