#!/usr/bin/env bash
# Idempotent set-up for `make test` / `make demo` on a fresh Debian 12 machine:
#   1. Debian packages the build needs (only the missing ones; skipped without root or network),
#   2. a git-ignored virtual environment with torch==2.11.0 and the Python test tools,
# Where an importable torch 2.11 already exists and nothing can be downloaded (the GPU machine), the venv is
# created with --system-site-packages on top of it instead of downloading torch again.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
VENV=${GRADIVEQ_VENV:-.venv}
APT_PACKAGES=(cmake ninja-build ccache g++ libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev
              libgloo-dev dataset-fashion-mnist iproute2)
PY_TOOLS=(pytest pytest-timeout numpy matplotlib tqdm "scikit-build-core>=0.10")

log() { echo "[setup] $*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
      log "WARNING: apt-get failed; continuing with what is installed (missing: ${missing[*]})"
    fi
  else
    log "WARNING: not root; cannot install ${missing[*]}"
  fi
fi

torch_ok() {  # $1 = python; true when it imports torch $TORCH_VERSION
  "$1" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null
}
tools_ok() {
  "$1" -c "import pytest, pytest_timeout, numpy, matplotlib, tqdm, scikit_build_core" 2>/dev/null
}

if [[ -x $VENV/bin/python ]] && torch_ok "$VENV/bin/python" && tools_ok "$VENV/bin/python"; then
  log "reusing $VENV ($("$VENV/bin/python" -c 'import torch;print(torch.__version__)'))"
  exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
  if torch_ok python3; then
    log "python3 already has torch $TORCH_VERSION: creating $VENV on top of it (--system-site-packages)"
    python3 -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
fi
if ! torch_ok "$VENV/bin/python"; then
  log "installing torch==$TORCH_VERSION into $VENV (several GB on first run; pip's cache is kept)"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
if ! tools_ok "$VENV/bin/python"; then
  log "installing Python test tools: ${PY_TOOLS[*]}"
  "$VENV/bin/pip" install -q "${PY_TOOLS[@]}" || log "WARNING: could not install ${PY_TOOLS[*]} (offline?)"
fi
torch_ok "$VENV/bin/python" || { log "ERROR: no torch $TORCH_VERSION in $VENV"; exit 1; }
log "ready: $("$VENV/bin/python" -c 'import torch;print("torch", torch.__version__)')"
