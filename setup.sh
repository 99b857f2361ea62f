#!/usr/bin/env bash
# Install everything paco_ray needs on a fresh Debian machine: system packages (the embedded
# Fashion-MNIST data), a virtualenv at .venv and the pinned Python packages. Safe to re-run.
#   ./setup.sh            everything, the test tools included (what the README and .ci/run use)
#   ./setup.sh --runtime  what training needs only (cluster nodes: cluster.yaml)
set -euo pipefail
cd "$(dirname "$0")"

EXTRAS="[dev]"
if [ "${1:-}" = "--runtime" ]; then EXTRAS=""; fi

# Fashion-MNIST IDX files (the embedded default); OpenCV and libjpeg-turbo headers that FFCV builds against.
APT_PACKAGES=(dataset-fashion-mnist libopencv-dev libturbojpeg0-dev pkg-config)
# the tests also use rsync (the cluster launcher's file sync, checked offline) and a real Prometheus
if [ -n "$EXTRAS" ]; then APT_PACKAGES+=(rsync prometheus); fi
PYTHON=${PYTHON:-python3.11}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found (paco_ray needs Python 3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.paco_ray-installed${EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages (first time: a few minutes, torch is a large wheel)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${EXTRAS}"
  .venv/bin/python -m pip check
  touch "$stamp"
fi
echo "setup: ready"
